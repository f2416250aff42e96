"""Benchmark: a chat turn through the gateway + sync vs the same runtime called directly.

Prints one JSON object per line (shared/API.md "Benchmarks"):

- ``gateway.turn_time_ratio``: wall time of one chat turn sent to ``edgebundle run``
  (HTTP ``POST /v1/threads/{id}/runs``, SSE until ``run.completed``: the input message
  lands in Redis, the run takes the thread, the prompt is rendered from the synced
  thread, every piece goes through the run's Redis Stream to the caller) over the same
  turn on the same runtime called directly in this process (``Engine`` +
  ``ChatService.complete``, as ``edgebundle ask`` does), same model, same prompt, same
  tokens (the text is compared). Goal <= 1.03 on a model of >= 5 ms per token.
- ``gateway.turn_ms`` / ``gateway.direct_turn_ms``: the two turn times (medians).
- ``gateway.ms_per_token``: the direct time per generated token.
- ``gateway.relay_tokens_per_s.readers_1`` / ``.readers_10``: tokens per second the
  slowest of N concurrent readers of a live run receives (each follows
  ``…/runs/{run_id}/events`` over its own HTTP connection, joined as the run starts),
  from the run's first to its last token; with ``.ratio`` = that over the tokens per
  second the caller that started the run receives in the same run. Goal >= 0.95
  (readers keep up with generation).

Both sides run the guest on the embedded runtime with the same settings; the gateway
uses its private redis-server (AOF on), as ``run`` does by default. Turns alternate
direct/gateway so background load hits both alike; the ratio is the median of
neighbouring pairs. Each gateway turn starts a fresh thread so both prompts are the
same single user message.

Usage: python bench/gateway.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from edgebundle.chat import ChatParams, ChatService, Finished, TextDelta, chat_setup
from edgebundle.config import Settings, load_settings
from edgebundle.engine import Engine
from edgebundle.runtime.launch import resolve_launch
from edgebundle.templates import Message

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime import emit, pick_model  # noqa: E402  (the sibling bench's model picker)

QUESTION = "Tell me something."
WORDS = 200  # tokens per reply: long enough that per-turn costs are measured per token
CTX = 512
DEVICE = "bench-caller"


def settings_for(home: Path, model: Path, port: int) -> tuple[Settings, list[str]]:
    """The same settings for both sides: as Settings (direct) and as run flags (gateway)."""
    flags = ["--runtime", "embedded", "--model", str(model), "--template", "llama-3-chat",
             "--ctx-size", str(CTX), "--port", str(port)]
    settings = load_settings({"home": str(home), "runtime": "embedded", "model": str(model),
                              "template": "llama-3-chat", "ctx_size": CTX, "port": port},
                             environ={})
    return settings, flags


class Direct:
    """The runtime called directly: one engine, one ChatService, in this process."""

    def __init__(self, settings: Settings) -> None:
        spec = resolve_launch(replace(settings, app=None, app_kind=None))
        self.setup = chat_setup(settings, spec)
        self.engine = Engine(spec, log_path=settings.layout.logs / "bench-direct.log")
        self.chat = ChatService(self.engine, self.setup.template, self.setup.model_info,
                                None, spec.ctx_size)

    async def start(self) -> None:
        await self.engine.start()

    async def turn(self) -> tuple[float, str, int]:
        started = time.perf_counter()
        pieces: list[str] = []
        tokens = 0
        events = self.chat.complete([Message("user", QUESTION)], ChatParams())
        async with aclosing(events):
            async for event in events:
                if isinstance(event, TextDelta):
                    pieces.append(event.text)
                elif isinstance(event, Finished):
                    if event.reason not in ("eos", "stop"):
                        raise SystemExit(f"direct turn ended with {event}")
                    tokens = event.usage.output_tokens
        return time.perf_counter() - started, "".join(pieces), tokens

    async def stop(self) -> None:
        await self.engine.stop()


def sse(lines: list[str]) -> dict[str, Any] | None:
    """One SSE event from its lines (None for a comment-only block)."""
    event: dict[str, Any] = {}
    for line in lines:
        name, _, value = line.partition(": ")
        event[name] = value
    if "data" not in event:
        return None
    event["data"] = json.loads(event["data"])
    return event


async def read_events(response: httpx.Response) -> Any:
    lines: list[str] = []
    async for line in response.aiter_lines():
        if line:
            lines.append(line)
            continue
        event = sse(lines)
        lines = []
        if event is not None:
            yield event


async def gateway_turn(http: httpx.AsyncClient,
                       on_run: Any = None) -> tuple[float, str, list[float]]:
    """One turn on a fresh thread: wall time, text, and each delta's arrival time."""
    thread = (await http.post("/v1/threads", json={})).json()
    body = {"device_id": DEVICE, "epoch": thread["epoch"], "since": thread["version"],
            "input": {"content": QUESTION}}
    started = time.perf_counter()
    pieces: list[str] = []
    arrivals: list[float] = []
    async with http.stream("POST", f"/v1/threads/{thread['id']}/runs", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"run refused: {response.status_code} {await response.aread()!r}")
        async for event in read_events(response):
            kind = event["event"]
            if kind == "run.started" and on_run is not None:
                on_run(thread["id"], event["data"]["run"]["id"])
            elif kind == "message.delta":
                arrivals.extend([time.perf_counter()] * len(event["data"]["text"].split()))
                pieces.append(event["data"]["text"])
            elif kind == "run.completed":
                elapsed = time.perf_counter() - started
                if event["data"]["reason"] != "eos":
                    raise SystemExit(f"gateway turn ended with {event['data']}")
            elif kind in ("run.failed", "run.cancelled", "error"):
                raise SystemExit(f"gateway turn failed: {event}")
    return elapsed, "".join(pieces), arrivals


async def reader(http: httpx.AsyncClient, thread_id: str, run_id: str) -> list[float]:
    """Follow the run's events from the start; one arrival time per token (word)."""
    arrivals: list[float] = []
    path = f"/v1/threads/{thread_id}/runs/{run_id}/events"
    async with http.stream("GET", path) as response:
        async for event in read_events(response):
            if event["event"] == "message.delta":
                arrivals.extend([time.perf_counter()] * len(event["data"]["text"].split()))
    return arrivals


def span_rate(arrivals: list[float], since: float) -> float:
    return len(arrivals) / (arrivals[-1] - since)


async def relay(base_url: str, readers: int) -> tuple[float, float]:
    """(slowest reader's tokens/s, the caller's tokens/s) over one run with N readers."""
    limits = httpx.Limits(max_connections=readers + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:
        tasks: list[asyncio.Task[list[float]]] = []
        started: list[float] = []

        def join(thread_id: str, run_id: str) -> None:
            started.append(time.perf_counter())
            tasks.extend(asyncio.get_running_loop().create_task(reader(http, thread_id, run_id))
                         for _ in range(readers))

        _, _, caller = await gateway_turn(http, join)
        results = await asyncio.gather(*tasks)
    if any(len(r) != len(caller) for r in results):
        raise SystemExit("a reader did not receive every token")
    return min(span_rate(r, started[0]) for r in results), span_rate(caller, started[0])


def start_gateway(home: Path, flags: list[str], port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
    env["EDGEBUNDLE_HOME"] = str(home)
    proc = subprocess.Popen([sys.executable, "-m", "edgebundle", "run", "--no-preflight",
                             *flags], env=env, stdout=subprocess.DEVNULL,
                            stderr=(home / "run.stderr").open("wb"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"edgebundle run exited: {(home / 'run.stderr').read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("edgebundle run did not become healthy in 120 s")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def measure(settings: Settings, base_url: str, rounds: int) -> dict[str, Any]:
    direct = Direct(settings)
    await direct.start()
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
            _, expected, tokens = await direct.turn()  # warm-up, both sides
            _, text, _ = await gateway_turn(http)
            if text != expected:
                raise SystemExit("gateway and direct generated different text")
            direct_s, gateway_s = [], []
            for _ in range(rounds):
                seconds, text, _ = await direct.turn()
                direct_s.append(seconds)
                seconds, text2, _ = await gateway_turn(http)
                gateway_s.append(seconds)
                if text != expected or text2 != expected:
                    raise SystemExit("generation is not deterministic; the comparison is void")
    finally:
        await direct.stop()
    return {"direct": direct_s, "gateway": gateway_s, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (under a minute)")
    args = parser.parse_args()
    rounds = 4 if args.quick else 12

    with tempfile.TemporaryDirectory(prefix="edgebundle-bench-") as tmp:
        root = Path(tmp)
        model, spec, _ = pick_model(root, threads=1, words=WORDS)
        port = free_port()
        settings, flags = settings_for(root / "direct-home", model, port)
        gateway_home = root / "gateway-home"
        gateway_home.mkdir()
        proc = start_gateway(gateway_home, flags, port)
        base_url = f"http://127.0.0.1:{port}"
        try:
            turns = asyncio.run(measure(settings, base_url, rounds))
            relays = {n: asyncio.run(relay(base_url, n)) for n in (1, 10)}
        finally:
            proc.terminate()
            proc.wait(30)
        direct_s, gateway_s = turns["direct"], turns["gateway"]
        print(f"# model {spec.layers} layers x {spec.width}, {turns['tokens']} tokens/turn, "
              f"rounds {rounds}", file=sys.stderr)
        ratio = statistics.median(g / d for g, d in zip(gateway_s, direct_s, strict=True))
        emit("gateway.turn_time_ratio", ratio, "ratio", "the same runtime called directly",
             "<= 1.03")
        emit("gateway.turn_ms", statistics.median(gateway_s) * 1000, "ms",
             "edgebundle run: HTTP + sync + Redis Streams", "-")
        emit("gateway.direct_turn_ms", statistics.median(direct_s) * 1000, "ms",
             "Engine + ChatService in process", "-")
        emit("gateway.ms_per_token", statistics.median(direct_s) * 1000 / turns["tokens"], "ms",
             "direct turn time per generated token", ">= 5")
        for readers, (slowest, caller) in relays.items():
            emit(f"gateway.relay_tokens_per_s.readers_{readers}", slowest, "tokens/s",
                 "slowest reader of the live run", "-")
            emit(f"gateway.relay_tokens_per_s.readers_{readers}.ratio", slowest / caller, "ratio",
                 "tokens/s the run's own caller receives", ">= 0.95")


if __name__ == "__main__":
    main()
