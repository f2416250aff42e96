"""Benchmark: the sync core (edgebundle.sync) against a redis-server it starts itself.

Prints one JSON object per line (docs/api.md "Benchmarks"):

- ``sync.diff_bytes_ratio``: JSON bytes of the diff a device gets after one new
  message on a 1,000-message thread, over the JSON bytes of the full history. Goal
  <= 0.01.
- ``sync.round_trips_per_turn``: Redis round trips of one chat turn (start_run,
  acquire, assistant message created, finish, release; no deltas), counted as the
  requests the client writes to its sockets (``send_packed_command`` of redis-py's
  asyncio connections: a pipeline or a script call is one); the most over the turns
  measured (a warm-up turn loads the scripts first). Goal <= 4.
- ``sync.second_reader_first_event_ms.p50`` / ``.p99``: a second reader joining a
  live run (``events()`` on its own connection, from the start) until its first
  event arrives. Goal p99 <= 5 ms.
- ``sync.event_relay_ratio``: events per second relayed from ``lease.delta`` (batching
  off: one event per delta) to a reader following the stream live, over
  ``redis-benchmark -c 1 -P 1 XADD`` on the same server in the same run (one
  connection, no pipelining: one writer, like a run). Writer and reader share this
  process's event loop, as they would in one gateway. Goal >= 0.5. The two rates are
  printed too (``sync.event_relay_per_s``, ``sync.redis_benchmark_xadd_per_s``), with
  ``sync.redis_py_ping_per_s``: sequential PINGs from this process, the most any
  design that awaits one round trip per event could relay.
- ``sync.queued_handoff_ms.p50`` / ``.p99``: from calling ``finish()`` on run k to
  ``acquire()`` returning for the queued run k+1 (the waiter blocks in BLPOP on its
  own connection). Goal <= 10 ms.

The redis-server is a child process on a free port (never daemonized), stopped by its
pid. ``--quick`` uses fewer samples and finishes in well under a minute.

Usage: python bench/sync.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from redis.asyncio.connection import AbstractConnection

from edgebundle.sync.client import connect
from edgebundle.sync.models import dumps
from edgebundle.sync.service import SyncService, ThreadSync

REPO = Path(__file__).resolve().parents[1]
DEVICE = "bench-device"


def emit(bench: str, value: float, unit: str, baseline: str, goal: str,
         **fields: bool | str | int) -> None:
    """One bench line; ``fields`` are extra facts of the measurement (checks, counts)."""
    print(json.dumps({"bench": bench, "value": round(value, 4), "unit": unit,
                      "baseline": baseline, "goal": goal, **fields}), flush=True)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# -- a redis-server child of our own ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_server(*, aof: bool = False) -> Iterator[int]:
    """A redis-server child on a free port; yields the port, stops it by pid. ``aof``:
    append-only file on (fsync every second), as a device's private store runs."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed: run ./install.sh --dev --with-redis")
    with tempfile.TemporaryDirectory(prefix="eb-bench-sync-") as directory:
        port = free_port()
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
             "--save", "", "--appendonly", "yes" if aof else "no",
             "--logfile", f"{directory}/redis.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.02)
            yield port
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- measurements ----------------------------------------------------------------------


async def new_thread(service: SyncService, name: str) -> tuple[str, str, int]:
    state = await service.create_thread(f"{name}-{time.monotonic_ns()}")
    return state.id, state.epoch, state.version


async def diff_bytes_ratio(service: SyncService) -> None:
    thread, epoch, version = await new_thread(service, "diff")
    words = "the quick brown fox jumps over the lazy dog " * 4  # ~180 chars, a chat line
    for start in range(0, 1000, 100):
        mutations = [{"mid": start + i + 1, "op": "put",
                      "message": {"id": f"m{start + i}", "role": "user",
                                  "content": f"{start + i}: {words}"}}
                     for i in range(100)]
        version = (await service.push(thread, DEVICE, epoch, version, mutations)).version
    full = await service.sync(thread, None, 0)
    assert full.full and len(full.messages) == 1000, len(full.messages)
    other = {"mid": 1, "op": "put",
             "message": {"id": "new", "role": "user", "content": f"1000: {words}"}}
    await service.push(thread, "other-device", epoch, version, [other])
    diff = await service.sync(thread, epoch, version)
    assert not diff.full and [m.id for m in diff.messages] == ["new"]
    ratio = len(dumps(diff.to_json()).encode()) / len(dumps(full.to_json()).encode())
    emit("sync.diff_bytes_ratio", ratio, "ratio", "full history (1,000 messages, JSON)",
         "<= 0.01")


@contextmanager
def count_requests() -> Iterator[list[int]]:
    """Counts requests written to Redis sockets by any redis-py asyncio connection."""
    counter = [0]
    original = AbstractConnection.send_packed_command

    async def counting(self: AbstractConnection, command: Any, check_health: bool = True
                       ) -> None:
        counter[0] += 1
        await original(self, command, check_health)

    AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


async def one_turn(service: ThreadSync, thread: str, epoch: str, since: int, *,
                   content: str = "hello", deltas: int = 0) -> int:
    """A chat turn with no model: start_run, acquire, ``deltas`` pieces, finish; the
    version the turn's input opened (the ``since`` of the next turn)."""
    ticket = await service.start_run(thread, DEVICE, epoch=epoch, since=since,
                                     content=content)
    async with await service.acquire(ticket, timeout=5) as lease:
        for i in range(deltas):
            await lease.delta(f"word{i} ")
        await lease.finish("eos", {"input_tokens": 1, "output_tokens": max(deltas, 1)})
    return ticket.sync.version


async def round_trips_per_turn(service: SyncService, turns: int) -> None:
    thread, epoch, version = await new_thread(service, "turn")
    version = await one_turn(service, thread, epoch, version)  # scripts loaded, pool warm
    counts = []
    for _ in range(turns):
        with count_requests() as counter:
            version = await one_turn(service, thread, epoch, version)
        counts.append(counter[0])
    emit("sync.round_trips_per_turn", max(counts), "round trips",
         f"most requests the client sent (send_packed_command) in {turns} turns, "
         "start_run..finish, no deltas", "<= 4")


async def second_reader_first_event(url: str, service: SyncService, samples: int) -> None:
    reader_client = await connect(url)
    reader = SyncService(reader_client)
    try:
        thread, epoch, version = await new_thread(service, "reader")
        ticket = await service.start_run(thread, DEVICE, epoch=epoch, since=version,
                                         content="hello")
        async with await service.acquire(ticket, timeout=5) as lease:
            await lease.delta("first words")
            first = reader.events(thread, ticket.run.id)  # the first reader is live
            await anext(first)
            timings = []
            for i in range(samples):
                started = time.perf_counter()
                stream = reader.events(thread, ticket.run.id)
                await anext(stream)
                timings.append((time.perf_counter() - started) * 1000)
                await stream.aclose()  # type: ignore[attr-defined]
                if i % 50 == 0:
                    await lease.delta(" more")
            await first.aclose()  # type: ignore[attr-defined]
            await lease.finish("eos", {"input_tokens": 1, "output_tokens": 1})
    finally:
        await reader_client.aclose()
    for p in (50, 99):
        emit(f"sync.second_reader_first_event_ms.p{p}", percentile(timings, p), "ms",
             f"{samples} joins of a live run, events() from the start", "p99 <= 5")


async def relay_rate(url: str, events: int) -> float:
    writer_client, reader_client = await connect(url), await connect(url)
    writer = SyncService(writer_client, delta_batch_ms=0, delta_batch_chars=0)
    reader = SyncService(reader_client)
    try:
        thread, epoch, version = await new_thread(writer, "relay")
        ticket = await writer.start_run(thread, DEVICE, epoch=epoch, since=version,
                                        content="hello")
        async with await writer.acquire(ticket, timeout=5) as lease:
            received = 0
            ready = asyncio.Event()

            async def follow() -> float:
                nonlocal received
                async for event in reader.events(thread, ticket.run.id):
                    if event.type == "message.created" and event.data["message"][
                            "role"] == "assistant":
                        ready.set()
                    elif event.type == "message.delta":
                        received += 1
                        if received == events:
                            return time.perf_counter()
                raise RuntimeError(f"stream ended after {received} deltas")

            reading = asyncio.create_task(follow())
            await asyncio.wait_for(ready.wait(), 5)  # the reader is live, at the tail
            started = time.perf_counter()
            for i in range(events):
                await lease.delta(f"t{i} ")
            ended = await asyncio.wait_for(reading, 60)
            await lease.finish("eos", {"input_tokens": 1, "output_tokens": events})
        return events / (ended - started)
    finally:
        await writer_client.aclose()
        await reader_client.aclose()


def redis_benchmark_xadd(port: int, requests: int) -> float:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        sys.exit("redis-benchmark is not installed (it comes with redis-server)")
    out = subprocess.run(
        [binary, "-p", str(port), "-n", str(requests), "-c", "1", "-P", "1", "--csv",
         "XADD", "bench:stream", "*", "type", "message.delta", "data", "{}"],
        capture_output=True, text=True, check=True, timeout=120).stdout
    row = out.strip().splitlines()[-1].split(",")
    return float(row[1].strip('"'))


async def ping_rate(url: str, requests: int) -> float:
    """Sequential PINGs per second from this process: redis-py's own round-trip ceiling."""
    client = await connect(url)
    try:
        started = time.perf_counter()
        for _ in range(requests):
            await client.ping()
        return requests / (time.perf_counter() - started)
    finally:
        await client.aclose()


async def event_relay_ratio(url: str, port: int, events: int) -> None:
    relayed, baseline, pings = [], [], []
    for _ in range(3):  # alternate, so background load hits both alike
        relayed.append(await relay_rate(url, events))
        baseline.append(await asyncio.to_thread(redis_benchmark_xadd, port, events))
        pings.append(await ping_rate(url, events))
    ratio = statistics.median(r / b for r, b in zip(relayed, baseline, strict=True))
    emit("sync.event_relay_per_s", statistics.median(relayed), "events/s",
         "lease.delta (batching off: one event per piece, written behind) -> a live reader", "")
    emit("sync.redis_benchmark_xadd_per_s", statistics.median(baseline), "requests/s",
         "redis-benchmark -c 1 -P 1 XADD", "")
    emit("sync.redis_py_ping_per_s", statistics.median(pings), "requests/s",
         "sequential PING from this process (one round trip per await)", "")
    emit("sync.event_relay_ratio", ratio, "ratio", "redis-benchmark -c 1 -P 1 XADD, same "
         "server, same run", ">= 0.5")


async def queued_handoff(url: str, service: SyncService, runs: int) -> None:
    waiter_client = await connect(url)
    waiter = SyncService(waiter_client)
    try:
        thread, epoch, version = await new_thread(service, "handoff")
        tickets = []
        for _ in range(runs):
            ticket = await service.start_run(thread, DEVICE, epoch=epoch, since=version,
                                             content="next")
            tickets.append(ticket)
            version = ticket.sync.version
        lease = await service.acquire(tickets[0], timeout=5)
        timings = []
        for ticket in tickets[1:]:
            waiting = asyncio.create_task(waiter.acquire(ticket, timeout=5))
            await asyncio.sleep(0.002)  # the waiter is blocked in BLPOP
            async with lease:
                started = time.perf_counter()
                await lease.finish("eos", {"input_tokens": 1, "output_tokens": 1})
            lease = await waiting
            timings.append((time.perf_counter() - started) * 1000)
        async with lease:
            await lease.finish("eos", {"input_tokens": 1, "output_tokens": 1})
    finally:
        await waiter_client.aclose()
    for p in (50, 99):
        emit(f"sync.queued_handoff_ms.p{p}", percentile(timings, p), "ms",
             f"{runs - 1} handoffs, finish() of run k -> acquire() of run k+1", "<= 10")


async def main(quick: bool) -> None:
    with redis_server() as port:
        url = f"redis://127.0.0.1:{port}/0"
        client = await connect(url)
        service = SyncService(client)
        try:
            await diff_bytes_ratio(service)
            await round_trips_per_turn(service, 5 if quick else 20)
            await second_reader_first_event(url, service, 200 if quick else 2000)
            await event_relay_ratio(url, port, 2000 if quick else 20000)
            await queued_handoff(url, service, 50 if quick else 500)
        finally:
            await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, < 1 min")
    asyncio.run(main(parser.parse_args().quick))
