"""Benchmark: a chat turn through the gateway + sync vs the same runtime called directly.

Prints one JSON object per line (docs/api.md "Benchmarks"):

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
- ``gateway.one_thread_turns_per_s.devices_1`` / ``.devices_4`` / ``.devices_16``: turns
  per second of wall time when N devices take T turns in all (T/N each; T = 32 with
  ``--quick``, else 48) on ONE thread: devices ``dev0``… each with its own
  ``device_id``, device i sending to gateway i mod 2 of two ``edgebundle run``
  processes (``gw-a``, ``gw-b``) on one redis-server. Every turn is ``POST
  /v1/threads/{id}/runs`` with ``"multitask": "enqueue"``, streamed (SSE until
  ``done``); a device asks again once it has its answer, with the thread's epoch and
  the version its last turn opened with. Runs on a thread are serialised, so ideally
  the rate does not change with N: ``.devices_4.ratio`` / ``.devices_16.ratio`` = the
  rate over the N = 1 rate of the same round (baseline "1 device, same thread") show
  the queueing cost (< 1), or the gain of the next run being queued already (> 1: one
  device leaves the model idle between its turns).
- ``gateway.threads_turns_per_s.devices_4`` / ``.devices_16`` (+ ``.ratio``, same
  baseline): the same N devices and T turns, each device on a thread of its own, for
  contrast: nothing queues and both gateways generate at once (the threads are T/N
  turns long, so their prompts are shorter too).

  Each of these lines also carries ``"all_completed"`` (every run, read back with
  ``GET …/runs/{run_id}``, has status ``completed``) and ``"ordered"`` (each thread,
  by ``position``, reads Q1 A1 Q2 A2 ...: user and assistant alternate and every run's
  ``message_id`` stands right after its ``input_message_id``). If either is false the
  bench says what it saw on stderr and exits 1, after printing every line.

Both sides run the guest on the embedded runtime with the same settings; the gateway
uses its private redis-server (AOF on), as ``run`` does by default. Turns alternate
direct/gateway so background load hits both alike; the ratio is the median of
neighbouring pairs. Each gateway turn starts a fresh thread so both prompts are the
same single user message.

The concurrency lines use a tiny scripted model (1 layer, 4-word replies, 4096 tokens
of context) so that a turn is mostly the gateway's and the sync's own work, which
queueing could add to, not generation that would hide it; the redis-server is the
bench's own (bench/sync.py's, AOF off). A thread grows by about 66 prompt tokens a
turn (the scripted tokenizer spells prompts byte by byte), the same for every N on
one thread. Each device has its own HTTP connection. The cases alternate, one round
with ``--quick``, else 3 rounds: the rates are medians, a ratio is the median of each
round's ratio.

Usage: python bench/gateway.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from edgebundle.completion import ChatParams, ChatService, Finished, TextDelta, chat_setup
from edgebundle.config import Settings, load_settings
from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.engine import Engine
from edgebundle.serving import launch_spec
from edgebundle.sse import aiter_events
from edgebundle.templates import Message

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime import emit, pick_model, reply_words  # noqa: E402  (the sibling benches')
from sync import free_port, redis_server  # noqa: E402

QUESTION = "Tell me something."
WORDS = 200  # tokens per reply: long enough that per-turn costs are measured per token
CTX = 512
DEVICE = "bench-caller"
THREAD_DEVICES = (1, 4, 16)  # concurrent devices on one thread; the first is the baseline
THREAD_REPLY_WORDS = 4  # short replies: a thread of 48 turns fits THREAD_CTX
THREAD_CTX = 4096
GATEWAYS = ("gw-a", "gw-b")


def run_flags(model: Path, port: int, ctx: int = CTX) -> list[str]:
    return ["--runtime", "embedded", "--model", str(model), "--template", "llama-3-chat",
            "--ctx-size", str(ctx), "--port", str(port)]


def settings_for(home: Path, model: Path, port: int) -> tuple[Settings, list[str]]:
    """The same settings for both sides: as Settings (direct) and as run flags (gateway)."""
    settings = load_settings({"home": str(home), "runtime": "embedded", "model": str(model),
                              "template": "llama-3-chat", "ctx_size": CTX, "port": port},
                             environ={})
    return settings, run_flags(model, port)


class Direct:
    """The runtime called directly: one engine, one ChatService, in this process."""

    def __init__(self, settings: Settings) -> None:
        spec = launch_spec(replace(settings, app=None, app_kind=None))
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


async def read_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The SSE events of ``response`` (:func:`edgebundle.sse.aiter_events`) as
    {"id", "event", "data"} each, "id" only on an event that has its own."""
    async for event in aiter_events(response):
        yield {**({"id": event.id} if event.id is not None else {}),
               "event": event.type, "data": event.data}


RUN_ENDS = ("run.completed", "run.failed", "run.cancelled", "error")


@dataclass
class StreamedRun:
    """What the client of ``POST /v1/threads/{id}/runs`` (SSE) saw of its run."""

    run_id: str | None = None  # from run.queued
    opening: dict[str, Any] = field(default_factory=dict)  # the sync event's object
    end: dict[str, Any] = field(default_factory=dict)  # the event of RUN_ENDS it ended with
    ended_at: float = 0.0  # perf_counter() when that event arrived
    pieces: list[str] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # one per token (word)

    @property
    def completed(self) -> bool:
        return self.end.get("event") == "run.completed"


async def stream_run(http: httpx.AsyncClient, thread_id: str, body: dict[str, Any],
                     on_run: Any = None) -> StreamedRun:
    """Start a run and read its events until ``done``; ``on_run(thread, run)`` as it
    starts. A refused request ends as an ``error`` event carrying the answer."""
    seen = StreamedRun()
    async with http.stream("POST", f"/v1/threads/{thread_id}/runs", json=body) as response:
        if response.status_code != 200:
            seen.end = {"event": "error", "data": {"status": response.status_code,
                                                   "body": (await response.aread()).decode()}}
            return seen
        async for event in read_events(response):
            kind, data = event["event"], event["data"]
            if kind == "sync":
                seen.opening = data
            elif kind == "run.queued":
                seen.run_id = data["run"]["id"]
            elif kind == "run.started" and on_run is not None:
                on_run(thread_id, data["run"]["id"])
            elif kind == "message.delta":
                seen.arrivals.extend([time.perf_counter()] * len(data["text"].split()))
                seen.pieces.append(data["text"])
            elif kind in RUN_ENDS:
                seen.end, seen.ended_at = event, time.perf_counter()
    return seen


async def gateway_turn(http: httpx.AsyncClient,
                       on_run: Any = None) -> tuple[float, str, list[float]]:
    """One turn on a fresh thread: wall time, text, and each delta's arrival time."""
    thread = (await http.post("/v1/threads", json={})).json()
    body = {"device_id": DEVICE, "epoch": thread["epoch"], "since": thread["version"],
            "input": {"content": QUESTION}}
    started = time.perf_counter()
    run = await stream_run(http, thread["id"], body, on_run)
    if not run.completed or run.end["data"]["reason"] != "eos":
        raise SystemExit(f"gateway turn ended with {run.end}")
    return run.ended_at - started, "".join(run.pieces), run.arrivals


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


def spawn_gateway(home: Path, flags: list[str]) -> subprocess.Popen[bytes]:
    """``edgebundle run`` as a child process with its own home (stderr in run.stderr)."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
    env["EDGEBUNDLE_HOME"] = str(home)
    return subprocess.Popen([sys.executable, "-m", "edgebundle", "run", "--no-preflight",
                             *flags], env=env, stdout=subprocess.DEVNULL,
                            stderr=(home / "run.stderr").open("wb"))


def wait_healthy(proc: subprocess.Popen[bytes], home: Path, port: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"edgebundle run exited: {(home / 'run.stderr').read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("edgebundle run did not become healthy in 120 s")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(30)


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


# -- N devices on one thread, over two gateways sharing one Redis -----------------------


@dataclass
class DeviceTurns:
    """One device's turns on one thread: its runs, and those that did not complete."""

    thread_id: str
    run_ids: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


async def device_turns(base_url: str, device: str, thread: dict[str, Any],
                       turns: int) -> DeviceTurns:
    """A device asking ``turns`` questions on the thread, each once the last is answered,
    streamed; it syncs like a client (``since`` = the version its last turn opened with)."""
    done = DeviceTurns(thread["id"])
    since = thread["version"]
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:
        for turn in range(turns):
            body = {"device_id": device, "epoch": thread["epoch"], "since": since,
                    "multitask": "enqueue", "input": {"content": f"q{turn}"}}
            run = await stream_run(http, thread["id"], body)
            since = run.opening.get("version", since)
            if run.run_id is not None:
                done.run_ids.append(run.run_id)
            if not run.completed:
                done.failed.append(f"{device} turn {turn}: {run.end or 'no end event'}")
    return done


async def check_thread(http: httpx.AsyncClient, thread_id: str,
                       run_ids: list[str]) -> tuple[list[str], bool]:
    """The runs whose status is not ``completed``, and whether the thread reads
    Q1 A1 Q2 A2 ... (by position: user/assistant alternate, each reply right after its
    run's input)."""
    answers = await asyncio.gather(*(http.get(f"/v1/threads/{thread_id}/runs/{run_id}")
                                     for run_id in run_ids))
    runs = [answer.json() for answer in answers]
    not_completed = [f"run {run.get('id')}: {run.get('status')} ({run.get('reason')})"
                     for run in runs if run.get("status") != "completed"]
    state = (await http.get(f"/v1/threads/{thread_id}")).json()
    messages = sorted((m for m in state["messages"] if not m["deleted"]),
                      key=lambda m: m["position"])
    order = [m["id"] for m in messages]
    alternating = [m["role"] for m in messages] == ["user", "assistant"] * len(runs)
    after_input = all(
        run.get("input_message_id") in order and run.get("message_id") in order
        and order.index(run["message_id"]) == order.index(run["input_message_id"]) + 1
        for run in runs)
    return not_completed, alternating and after_input


@dataclass(frozen=True)
class Concurrent:
    turns_per_s: float
    completed: bool  # every run ended completed
    ordered: bool  # every thread reads Q1 A1 Q2 A2 ...
    problems: list[str]


async def concurrent_turns(urls: list[str], devices: int, turns: int,
                           one_thread: bool) -> Concurrent:
    """``devices`` devices at once (device i on gateway i mod 2), ``turns`` turns in all
    (a multiple of ``devices``), on one thread or on a thread each: turns per second of
    wall time."""
    if turns % devices:
        raise ValueError(f"{turns} turns do not split evenly over {devices} devices")
    async with httpx.AsyncClient(base_url=urls[0], timeout=60) as http:
        created = await asyncio.gather(*(http.post("/v1/threads", json={})
                                         for _ in range(1 if one_thread else devices)))
        threads = [answer.json() for answer in created]
        started = time.perf_counter()
        results = await asyncio.gather(*(
            device_turns(urls[i % len(urls)], f"dev{i}", threads[i % len(threads)],
                         turns // devices)
            for i in range(devices)))
        elapsed = time.perf_counter() - started
        checks = await asyncio.gather(*(
            check_thread(http, thread["id"], [run for result in results
                                              if result.thread_id == thread["id"]
                                              for run in result.run_ids])
            for thread in threads))
    problems = [failure for result in results for failure in result.failed]
    problems += [problem for not_completed, _ in checks for problem in not_completed]
    completed = not problems
    ordered = all(thread_ordered for _, thread_ordered in checks)
    problems += [f"thread {thread['id']} does not read Q1 A1 Q2 A2 ..."
                 for thread, (_, thread_ordered) in zip(threads, checks, strict=True)
                 if not thread_ordered]
    return Concurrent(turns / elapsed, completed, ordered, problems)


@contextmanager
def two_gateways(root: Path, model: Path, redis_url: str) -> Iterator[list[str]]:
    """Two ``edgebundle run`` (devices gw-a, gw-b) on one Redis: their base URLs."""
    ports = {name: free_port() for name in GATEWAYS}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, port in ports.items():
            procs.append(spawn_gateway(root / name, [*run_flags(model, port, THREAD_CTX),
                                                     "--redis-url", redis_url,
                                                     "--device-id", name]))
        for (name, port), proc in zip(ports.items(), procs, strict=True):
            wait_healthy(proc, root / name, port)
        yield [f"http://127.0.0.1:{port}" for port in ports.values()]
    finally:
        stop(procs)


async def concurrency(urls: list[str], turns: int, rounds: int
                      ) -> dict[str, list[Concurrent]]:
    """Each case (``one_thread.devices_N``, ``threads.devices_N``) once per round; the
    cases alternate so background load hits them alike."""
    cases: dict[str, list[Concurrent]] = {  # each guest's first request, not measured
        "warm-up": [await concurrent_turns(urls, len(urls), len(urls), one_thread=False)]}
    for _ in range(rounds):
        for one_thread, counts in ((True, THREAD_DEVICES), (False, THREAD_DEVICES[1:])):
            for devices in counts:
                name = f"{'one_thread' if one_thread else 'threads'}.devices_{devices}"
                cases.setdefault(name, []).append(
                    await concurrent_turns(urls, devices, turns, one_thread))
    return cases


def report_concurrency(cases: dict[str, list[Concurrent]], turns: int) -> list[str]:
    """Print the concurrency lines (medians over the rounds; a ratio is the median of
    each round's ratio to that round's baseline); the problems seen."""
    baselines = [case.turns_per_s for case in cases["one_thread.devices_1"]]
    for name, rounds in cases.items():
        if name == "warm-up":
            continue
        where, devices = name.split(".")
        n = devices.removeprefix("devices_")
        shape = "one thread" if where == "one_thread" else f"{n} threads (one each)"
        spread = "1 device on gw-a" if n == "1" else f"{n} devices over gw-a and gw-b"
        checks = {"all_completed": all(case.completed for case in rounds),
                  "ordered": all(case.ordered for case in rounds)}
        emit(f"gateway.{where}_turns_per_s.{devices}",
             statistics.median(case.turns_per_s for case in rounds), "turns/s",
             f"{spread}, {shape}, {turns} streamed turns in all", "-",
             **checks)
        if name != "one_thread.devices_1":
            ratio = statistics.median(case.turns_per_s / baseline
                                      for case, baseline in zip(rounds, baselines, strict=True))
            emit(f"gateway.{where}_turns_per_s.{devices}.ratio", ratio, "ratio",
                 "1 device, same thread", "-", **checks)
    return [f"{name}: {problem}" for name, rounds in cases.items() for case in rounds
            for problem in case.problems]


def thread_bench(root: Path, turns: int, rounds: int) -> list[str]:
    """The concurrency lines, on a tiny scripted model; the problems seen."""
    model = write_scripted_model(root / "bench-thread.gguf", ScriptedModelSpec(
        layers=1, reply=reply_words(THREAD_REPLY_WORDS), context_length=THREAD_CTX))
    with redis_server() as redis_port, \
            two_gateways(root, model, f"redis://127.0.0.1:{redis_port}/0") as urls:
        cases = asyncio.run(concurrency(urls, turns, rounds))
    return report_concurrency(cases, turns)


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
        proc = spawn_gateway(root / "gateway-home", flags)
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(proc, root / "gateway-home", port)
            turns = asyncio.run(measure(settings, base_url, rounds))
            relays = {n: asyncio.run(relay(base_url, n)) for n in (1, 10)}
        finally:
            stop([proc])
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
        problems = thread_bench(root, *((32, 1) if args.quick else (48, 3)))
    if problems:
        print("\n".join(problems), file=sys.stderr)
        raise SystemExit(f"{len(problems)} problem(s): runs failed or a thread out of order")


if __name__ == "__main__":
    main()
