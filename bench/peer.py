"""Benchmark: ``edgebundle run`` side by side with llama-cpp-python's own OpenAI server.

A Python user who wants a local OpenAI-compatible chat would run ``python -m
llama_cpp.server`` (installed by the dev extra: the same llama-cpp-python, so the
same llama.cpp). Both serve the same generated model (a scripted llama, 8 layers x
768, 121-token replies) with the same threads; requests alternate between them so
background load hits both alike. Prints one JSON object per line (docs/api.md
"Benchmarks"); every ratio is edgebundle over the peer:

- ``peer.turn_s``: a non-streamed turn (``POST /v1/chat/completions``), median;
  ``.ratio`` the median of neighbouring pairs. Goal <= 1.0. Carries ``same_text``:
  both replies were the same text.
- ``peer.ttft_ms``: time to first token of a streamed turn: from sending the request
  to the first chunk with content. Goal <= 1.1.
- ``peer.thread_ttft_extra_ms``: edgebundle's first-token time with ``thread_id`` (a
  new synced thread each time, so the prompt is the same) minus without, in the same
  rounds, the one right after the other (both after edgebundle's own requests, not one
  of them after the peer's): what sync adds before the first token. Goal <= 5 ms.
- ``peer.concurrent_4_s``: wall time of 4 turns sent at once. Goal <= 1.0.
- ``peer.rss_mib``: resident memory of each side's whole process tree after the turns
  (edgebundle: the gateway, its guest and its private redis-server); ``.extra_mib``
  edgebundle minus the peer. Goal <= +32 MiB.
- ``peer.start_s``: from starting the process to the first answer that says the
  model is ready (edgebundle ``/healthz`` 200, the peer ``/v1/models`` 200). Goal <= 1.2.
- ``peer.history_ttft_ms.tokens_2000`` / ``.tokens_5000``: first-token time of a short
  question asked on top of one conversation once it holds about that many tokens
  (median of 5, 2 with ``--quick``): edgebundle through its thread (``thread_id``: the
  device holds the history), the peer sent the whole conversation, as an OpenAI client
  does. Goal <= 1.5 (both reuse the evaluated prefix; without that, the history is
  evaluated again on every turn).

Usage: python bench/peer.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.host import usable_cpus
from edgebundle.sse import DONE, aiter_events

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]
from sync import emit, free_port  # noqa: E402  (the sibling bench's)

from tests.support.processes import children  # noqa: E402

REPLY_WORDS = 120  # + the end token: 121 tokens a reply
CTX = 8192
QUESTION = "Tell me about the weather on the coast today."
# A long user message (the scripted tokenizer spells unknown words piece by piece),
# so a conversation reaches thousands of tokens in a few turns.
LONG_QUESTION = " ".join(f"paragraph{n} about the coastline and harbours" for n in range(40))
HISTORY_MARKS = (2000, 5000)
HISTORY_REPLY = 8  # tokens: the history grows by its questions, in a few turns


def tree_rss_mib(root: int) -> float:
    """Resident memory of ``root`` and all its descendants (VmRSS summed), MiB."""
    tree, frontier = [root], [root]
    while frontier:
        found = children(frontier.pop())
        tree += found
        frontier += found
    total_kib = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except OSError:
            continue
    return total_kib / 1024


@dataclass
class Server:
    """One side: a child process serving the OpenAI API on ``port``."""

    name: str
    argv: list[str]
    env: dict[str, str]
    ready_path: str
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    start_times: list[float] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        began = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=self.log.open("ab"), start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.base_url + self.ready_path, timeout=2).status_code == 200:
                    self.start_times.append(time.perf_counter() - began)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.005)
        self.stop()
        raise SystemExit(f"{self.name} was not ready in 120 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def rss_mib(self) -> float:
        assert self.proc is not None
        return tree_rss_mib(self.proc.pid)


def servers(root: Path, model: Path, threads: int) -> tuple[Server, Server]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
    ours_port, peer_port = free_port(), free_port()
    home = root / "home"
    ours = Server("edgebundle", [
        sys.executable, "-m", "edgebundle", "run", "--no-preflight", "--runtime", "embedded",
        "--model", str(model), "--template", "llama-3-chat", "--ctx-size", str(CTX),
        "--threads", str(threads), "--port", str(ours_port)],
        {**env, "EDGEBUNDLE_HOME": str(home)}, "/healthz", ours_port, root / "run.log")
    peer = Server("llama_cpp.server", [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model),
        "--model_alias", "peer", "--chat_format", "llama-3", "--n_ctx", str(CTX),
        "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--host", "127.0.0.1", "--port", str(peer_port)],
        env, "/v1/models", peer_port, root / "peer.log")
    return ours, peer


# -- requests -------------------------------------------------------------------------


def chat_body(messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    return {"model": "default", "messages": messages, "max_tokens": 256,
            "temperature": 0, **extra}


async def turn(http: httpx.AsyncClient, base_url: str, body: dict[str, Any]) -> tuple[float, str]:
    began = time.perf_counter()
    response = await http.post(base_url + "/v1/chat/completions", json=body)
    response.raise_for_status()
    text = response.json()["choices"][0]["message"]["content"]
    return time.perf_counter() - began, str(text)


async def first_token(http: httpx.AsyncClient, base_url: str, body: dict[str, Any]
                      ) -> tuple[float, str, int]:
    """Seconds until the first chunk with content, the whole streamed text and the
    prompt's tokens (0 unless the stream reports usage)."""
    began = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    prompt = 0
    seen: list[Any] = []
    async with http.stream("POST", base_url + "/v1/chat/completions",
                           json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for event in aiter_events(response):
            seen.append(event.data)
            if event.data == DONE:
                continue
            chunk = event.data
            prompt = int((chunk.get("usage") or {}).get("prompt_tokens", prompt))
            choices = chunk.get("choices") or [{}]
            content = choices[0].get("delta", {}).get("content")
            if content:
                if first is None:
                    first = time.perf_counter() - began
                pieces.append(content)
    if first is None:
        raise SystemExit(f"{base_url}: a stream without content: {seen[-6:]}")
    return first, "".join(pieces), prompt


async def new_thread(http: httpx.AsyncClient, base_url: str) -> str:
    response = await http.post(base_url + "/v1/threads", json={})
    response.raise_for_status()
    return str(response.json()["id"])


def paired_ratio(ours: list[float], peer: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(ours, peer, strict=True))


# -- the measures ---------------------------------------------------------------------


def ask(tag: str) -> list[dict[str, str]]:
    """The question with a tag of its own: every request's prompt differs from the one
    before (as in use), so neither side answers from a prompt it has just evaluated."""
    return [{"role": "user", "content": f"{QUESTION} ({tag})"}]


async def single_turns(ours: Server, peer: Server, rounds: int) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        for side in (ours, peer):  # warm: first use loads lazily on either side
            await turn(http, side.base_url, chat_body(ask("warm")))
        turns: dict[str, list[float]] = {ours.name: [], peer.name: []}
        same = True
        firsts: dict[str, list[float]] = {ours.name: [], peer.name: [], "thread": []}
        for n in range(rounds):
            texts = []
            for side in (ours, peer):
                seconds, text = await turn(http, side.base_url, chat_body(ask(f"t{n:03}")))
                turns[side.name].append(seconds)
                texts.append(text)
                seconds, text, _ = await first_token(http, side.base_url,
                                                     chat_body(ask(f"s{n:03}")))
                firsts[side.name].append(seconds)
                texts.append(text)
                if side is ours:  # right after the one without: the same conditions
                    thread_id = await new_thread(http, ours.base_url)
                    seconds, text, _ = await first_token(
                        http, ours.base_url, chat_body(ask(f"x{n:03}"), thread_id=thread_id))
                    firsts["thread"].append(seconds)
                    texts.append(text)
            if len(set(texts)) != 1:
                same = False
                print(f"replies differ: {texts}", file=sys.stderr)
        emit("peer.turn_s.edgebundle", statistics.median(turns[ours.name]), "s", "", "")
        emit("peer.turn_s.peer", statistics.median(turns[peer.name]), "s", "", "")
        emit("peer.turn_s.ratio", paired_ratio(turns[ours.name], turns[peer.name]), "ratio",
             "llama_cpp.server, same model and request", "<= 1.0", same_text=same)
        emit("peer.ttft_ms.edgebundle", 1000 * statistics.median(firsts[ours.name]), "ms", "", "")
        emit("peer.ttft_ms.peer", 1000 * statistics.median(firsts[peer.name]), "ms", "", "")
        emit("peer.ttft_ms.ratio", paired_ratio(firsts[ours.name], firsts[peer.name]), "ratio",
             "llama_cpp.server, same model and request", "<= 1.1")
        extra = statistics.median(t - p for t, p in zip(firsts["thread"], firsts[ours.name],
                                                         strict=True))
        emit("peer.thread_ttft_extra_ms", 1000 * extra, "ms",
             "edgebundle without thread_id, same rounds", "<= 5")


async def concurrent(ours: Server, peer: Server, rounds: int) -> None:
    walls: dict[str, list[float]] = {ours.name: [], peer.name: []}
    async with httpx.AsyncClient(timeout=300) as http:
        for n in range(rounds):
            for side in (ours, peer):
                began = time.perf_counter()
                await asyncio.gather(*(turn(http, side.base_url, chat_body(ask(f"c{n}{i}")))
                                       for i in range(4)))
                walls[side.name].append(time.perf_counter() - began)
    emit("peer.concurrent_4_s.edgebundle", statistics.median(walls[ours.name]), "s", "", "")
    emit("peer.concurrent_4_s.peer", statistics.median(walls[peer.name]), "s", "", "")
    emit("peer.concurrent_4_s.ratio", paired_ratio(walls[ours.name], walls[peer.name]),
         "ratio", "llama_cpp.server, 4 turns at once", "<= 1.0")


async def history(ours: Server, peer: Server, follow_ups: int) -> None:
    """One conversation on both sides, grown with long questions to each mark, then
    ``follow_ups`` short questions on top of that history, each timed on both sides."""
    async with httpx.AsyncClient(timeout=300) as http:
        thread_id = await new_thread(http, ours.base_url)
        conversation: list[dict[str, str]] = []

        async def both(content: str) -> tuple[float, float, int]:
            question = {"role": "user", "content": content}
            ours_first, reply, tokens = await first_token(http, ours.base_url, chat_body(
                [question], thread_id=thread_id, max_tokens=HISTORY_REPLY,
                stream_options={"include_usage": True}))
            peer_first, peer_reply, _ = await first_token(
                http, peer.base_url, chat_body([*conversation, question],
                                               max_tokens=HISTORY_REPLY))
            if reply != peer_reply:
                print(f"history: replies differ at {tokens} tokens", file=sys.stderr)
            conversation.extend([question, {"role": "assistant", "content": reply}])
            return ours_first, peer_first, tokens

        for mark in HISTORY_MARKS:
            tokens = 0
            while tokens < mark * 0.9:
                tokens = (await both(f"{len(conversation)} {LONG_QUESTION}"))[2]
            timed = [await both(f"and then? ({mark}, {n})") for n in range(follow_ups)]
            ours_times, peer_times = [t[0] for t in timed], [t[1] for t in timed]
            emit(f"peer.history_ttft_ms.tokens_{mark}.edgebundle",
                 1000 * statistics.median(ours_times), "ms", "", "", prompt_tokens=timed[0][2])
            emit(f"peer.history_ttft_ms.tokens_{mark}.peer", 1000 * statistics.median(peer_times),
                 "ms", "", "")
            emit(f"peer.history_ttft_ms.tokens_{mark}.ratio", paired_ratio(ours_times, peer_times),
                 "ratio", "llama_cpp.server sent the same conversation", "<= 1.5")


def start_times(ours: Server, peer: Server, rounds: int) -> None:
    for _ in range(rounds):
        for side in (ours, peer):
            side.stop()
            side.start()
    emit("peer.start_s.edgebundle", statistics.median(ours.start_times), "s", "", "")
    emit("peer.start_s.peer", statistics.median(peer.start_times), "s", "", "")
    emit("peer.start_s.ratio", paired_ratio(ours.start_times, peer.start_times), "ratio",
         "llama_cpp.server, start to ready", "<= 1.2")


@contextmanager
def running(*sides: Server) -> Iterator[None]:
    try:
        for side in sides:
            side.start()
        yield
    finally:
        for side in sides:
            side.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds: under a minute")
    parser.add_argument("--threads", type=int, default=usable_cpus(),
                        help="llama.cpp threads on both sides (default: usable CPUs)")
    args = parser.parse_args()
    rounds = 3 if args.quick else 20  # single turns: a run-to-run spread of ~10% at 10
    with tempfile.TemporaryDirectory(prefix="eb-peer-") as tmp:
        root = Path(tmp)
        reply = " ".join(f"w{n}" for n in range(REPLY_WORDS))
        model = write_scripted_model(root / "peer.gguf", ScriptedModelSpec(
            reply=reply, layers=8, width=768, context_length=CTX))
        ours, peer = servers(root, model, args.threads)
        with running(ours, peer):
            asyncio.run(single_turns(ours, peer, rounds))
            asyncio.run(concurrent(ours, peer, 1 if args.quick else 3))
            rss = {side.name: side.rss_mib() for side in (ours, peer)}
            emit("peer.rss_mib.edgebundle", rss[ours.name], "MiB", "", "")
            emit("peer.rss_mib.peer", rss[peer.name], "MiB", "", "")
            emit("peer.rss_mib.extra_mib", rss[ours.name] - rss[peer.name], "MiB",
                 "llama_cpp.server's process tree", "<= 32")
            asyncio.run(history(ours, peer, 2 if args.quick else 5))
            start_times(ours, peer, 1 if args.quick else 3)


if __name__ == "__main__":
    main()
