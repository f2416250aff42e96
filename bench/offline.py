"""Benchmark: offline replication (edgebundle.sync.replication.DeviceSync).

Prints one JSON object per line (docs/api.md "Benchmarks"):

- ``offline.online_turn_ratio``: what replication adds to a chat turn while the link
  is up. A turn (start_run, acquire, 20 deltas, finish: a scripted holder, no model)
  through an online ``DeviceSync`` (started: its probe and its mirror run in this event
  loop, as in a gateway) over the same turn through ``SyncService`` directly, on the
  same central redis-server. Each side takes blocks of 15 turns on a new thread of
  100 messages, then syncs it; the blocks alternate (device, direct), and the ratio is
  the median over the pairs of the device block's time over the direct block's. Blocks,
  not single turns: the mirror copies a thread whenever its central version moved, in
  the background, so its work lands on some turns and would spill into the next direct
  turn; a per-turn median would hide it. Before each direct block the bench waits,
  untimed, until the device's copy is at the central version, so the direct block pays
  for none of it (the copy the device block's last sync asks for is left out: at most
  one copy in 15 turns, in replication's favour). Goal <= 1.05.
  ``offline.online_turn_ms`` / ``offline.direct_turn_ms``: the two per-turn times
  (median block time / 15).
- ``offline.heal_ms``: from the link healing to convergence: the device's ``status()``
  online with 0 pending, and the central thread holding every offline change (the
  same ids, roles, contents and statuses in the same order: none lost, none twice).
  The device had made 100 changes while cut off: 50 turns as above through the
  DeviceSync API, on a thread it had seen. Measured from ``TcpProxy.resume()``, so
  detection is part of the figure: with ``offline_after`` 0.6 s the probe looks every
  0.2 s (``min(1 s, offline_after / 3)``; 1 s with the default 10 s). Convergence is
  polled every 2 ms. Median of the rounds. Goal <= one probe interval + 100 ms (300).
- ``offline.heal_notice_ms``: from ``resume()`` to the device noticing (its probe logs
  that the central Redis answers again: the moment is taken from that log record), and
  ``offline.heal_after_notice_ms``: from there to convergence: the heal without
  detection (any wait of the replication loop for its next round included).
- ``offline.push_ms``: the baseline: the same 100 messages (ids, roles, contents,
  statuses) sent to a new central thread with one ``SyncService.push`` over the same
  link (through the proxy), after the heal; median of 3 a round.
- ``offline.heal_ratio``: ``heal_after_notice_ms`` over ``push_ms`` of the same round,
  median over the rounds: what healing costs once the device knows the link is back,
  over sending its changes once. Detection is left out (it is a fixed latency of the
  probe, not work, and ``heal_ms`` shows it). Goal <= 10 (a heal reads the local copy,
  pushes once and copies the thread back).

``offline.heal_ms`` and ``offline.heal_ratio`` carry ``"ok"``: every round converged
with nothing lost or duplicated and the device counted 100 pending changes offline. If
not, what was seen goes to stderr and the bench exits 1 after printing its lines.

Three redis-server children on free ports (never daemonized, stopped by their pids):
the central store (AOF off, as bench/sync.py's) and one local store per part (AOF on,
as a device's private store). The partition is tests/support/tcp_proxy.py's TcpProxy
(threads in this process) between the device and the central store: while cut it
refuses connections, so the device's calls fail at once rather than time out.
``--quick``: 4 blocks and 2 heal rounds (else 20 and 6), well under a minute.

Usage: python bench/offline.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from edgebundle import keys
from edgebundle.sync.client import connect
from edgebundle.sync.models import ThreadMessage
from edgebundle.sync.replication import PROBE_INTERVAL, DeviceSync
from edgebundle.sync.service import SyncService, ThreadSync

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]
from sync import emit, new_thread, one_turn, redis_server  # noqa: E402  (the sibling bench's)

from tests.support.tcp_proxy import TcpProxy  # noqa: E402

OFFLINE_AFTER = 0.6  # s; the probe looks every OFFLINE_AFTER / 3
TURNS = 50  # offline turns: 100 messages
DELTAS = 20  # pieces of each reply
HISTORY = 100  # messages on each thread before the online turns
BLOCK = 15  # online turns in a row on one side
POLL = 0.002  # s between looks for convergence (its resolution)
NOTICED = "the central Redis answers again"  # the probe's log line when the link is back


def url_of(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20,
                interval: float = POLL) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


class LinkLog(logging.Handler):
    """Keeps the replication log's lines with the moment (perf_counter) each was written;
    nothing reaches stderr unless the bench says so."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((time.perf_counter(), record.getMessage()))

    def first(self, start: str, after: float) -> float | None:
        return next((at for at, line in self.lines if at >= after and line.startswith(start)),
                    None)


# -- offline.heal_* --------------------------------------------------------------------


@dataclass
class HealRound:
    heal_ms: float  # proxy.resume() -> converged
    notice_ms: float | None  # proxy.resume() -> the probe's line (None: not seen)
    push_ms: float  # the baseline
    problems: list[str]

    @property
    def after_notice_ms(self) -> float:
        return self.heal_ms - (self.notice_ms or 0)


def probe_interval() -> float:
    """s between the device's looks at the central Redis (DeviceSync._probe_forever)."""
    return min(PROBE_INTERVAL, OFFLINE_AFTER / 3)


async def mirrored(device: DeviceSync, central: SyncService, thread: str) -> bool:
    """The device's local copy of ``thread`` is at the central version."""
    have = await device.local.redis.hget(keys.replica(thread), "central_version")
    return have is not None and have == await central.redis.hget(keys.meta(thread), "version")


async def offline(device: DeviceSync) -> bool:
    return not (await device.status()).online


async def converged(device: DeviceSync, central: SyncService, thread: str,
                    made: list[ThreadMessage]) -> bool:
    status = await device.status()
    return (status.online and status.pending == 0
            and transcript(await messages(central, thread)) == transcript(made))


async def messages(service: ThreadSync, thread: str) -> list[ThreadMessage]:
    """The thread's visible messages in order."""
    state = await service.sync(thread, None, 0)
    return sorted((m for m in state.messages if not m.deleted), key=lambda m: m.position)


def transcript(made: list[ThreadMessage]) -> list[tuple[str, str, str, str]]:
    return [(m.id, m.role, m.content, m.status) for m in made]


def as_put(mid: int, message: ThreadMessage) -> dict[str, Any]:
    """``message`` as a push mutation (without its position: it goes at the end)."""
    fields = {"id": message.id, "role": message.role, "content": message.content,
              "status": message.status, "created_at": message.created_at}
    if message.run_id is not None:
        fields["run_id"] = message.run_id
    return {"mid": mid, "op": "put", "message": fields}


async def heal_round(device: DeviceSync, proxy: TcpProxy, central: SyncService,
                     linked: SyncService, log: LinkLog) -> HealRound:
    """A thread the device has seen, the link cut, TURNS turns offline, the link healed."""
    thread = (await device.create_thread(f"heal-{time.monotonic_ns()}")).id
    await until(lambda: mirrored(device, central, thread), "the device's copy")
    proxy.cut(hold=True)
    await until(lambda: offline(device), "the device to go offline", interval=0.01)
    state = await device.sync(thread, None, 0)  # the local copy: an epoch of its own
    version = state.version
    for n in range(TURNS):
        version = await one_turn(device, thread, state.epoch, version,
                                 content=f"offline {n}", deltas=DELTAS)
    made = await messages(device, thread)
    problems = []
    if (pending := (await device.status()).pending) != len(made):
        problems.append(f"{pending} changes pending offline, not {len(made)}")

    started = time.perf_counter()
    proxy.resume()
    try:
        await until(lambda: converged(device, central, thread, made), "convergence", 30)
    except RuntimeError as exc:
        problems.append(f"{exc}: {await device.status()}; the central thread: "
                        f"{transcript(await messages(central, thread))}")
    healed = time.perf_counter()
    notice = log.first(NOTICED, started)

    mutations = [as_put(mid, message) for mid, message in enumerate(made, 1)]
    pushes = []
    for _ in range(3):
        target, epoch, since = await new_thread(linked, "push")
        began = time.perf_counter()
        await linked.push(target, "bench-baseline", epoch, since, mutations)
        pushes.append((time.perf_counter() - began) * 1000)
    return HealRound((healed - started) * 1000,
                     None if notice is None else (notice - started) * 1000,
                     statistics.median(pushes), problems)


async def heal(central_port: int, central: SyncService, rounds: int) -> list[str]:
    """The offline.heal_* lines; what went wrong, if anything."""
    proxy = TcpProxy(central_port).start()
    log = LinkLog()
    logger = logging.getLogger("edgebundle.sync.replication")
    logger.addHandler(log)
    linked_client = await connect(url_of(proxy.port))
    try:
        with redis_server(aof=True) as local_port:
            device = DeviceSync(SyncService(await connect(url_of(proxy.port))),
                                SyncService(await connect(url_of(local_port))),
                                "bench-offline", offline_after=OFFLINE_AFTER)
            await device.start()
            try:
                results = [await heal_round(device, proxy, central,
                                            SyncService(linked_client), log)
                           for _ in range(rounds)]
            finally:
                await device.close()
    finally:
        logger.removeHandler(log)
        await linked_client.aclose()
        proxy.stop()
    problems = [problem for result in results for problem in result.problems]
    ok = {"ok": not problems}
    emit("offline.heal_ms", statistics.median(r.heal_ms for r in results), "ms",
         f"proxy.resume() -> converged, {2 * TURNS} offline changes, offline_after "
         f"{OFFLINE_AFTER} s (a probe every {probe_interval() * 1000:.0f} ms), median of "
         f"{rounds} rounds", f"<= {probe_interval() * 1000 + 100:.0f}", **ok)
    noticed = [r for r in results if r.notice_ms is not None]
    if len(noticed) < rounds:
        problems.append(f"the probe's line {NOTICED!r} was seen in {len(noticed)} of "
                        f"{rounds} rounds: {log.lines}")
        return problems
    emit("offline.heal_notice_ms", statistics.median(r.notice_ms or 0 for r in results), "ms",
         "proxy.resume() -> the probe logs that the central Redis answers again", "")
    emit("offline.heal_after_notice_ms", statistics.median(r.after_notice_ms for r in results),
         "ms", "the probe logs that the central Redis answers again -> converged", "")
    emit("offline.push_ms", statistics.median(r.push_ms for r in results), "ms",
         f"one SyncService.push of the same {2 * TURNS} messages over the same link", "")
    emit("offline.heal_ratio", statistics.median(r.after_notice_ms / r.push_ms for r in results),
         "ratio", f"one SyncService.push of the same {2 * TURNS} messages over the same link, "
         "same round (heal_after_notice_ms over push_ms)", "<= 10", **ok)
    return problems


# -- offline.online_turn_* -------------------------------------------------------------


async def history(service: ThreadSync, name: str) -> tuple[str, str, int]:
    """A new thread with HISTORY messages (an ongoing chat): id, epoch, version."""
    thread = (await service.create_thread(f"{name}-{time.monotonic_ns()}")).id
    state = await service.sync(thread, None, 0)
    said = [{"mid": mid, "op": "put", "message": {
        "id": f"h{mid}", "role": ("user", "assistant")[mid % 2],
        "content": f"message {mid}: the quick brown fox jumps over the lazy dog"}}
        for mid in range(1, HISTORY + 1)]
    pushed = await service.push(thread, "bench-history", state.epoch, state.version, said)
    return thread, pushed.epoch, pushed.version


async def timed_block(service: ThreadSync, thread: str, epoch: str, since: int) -> float:
    """ms of BLOCK turns on ``thread``, then a sync of it (as a client does after a turn)."""
    began = time.perf_counter()
    for _ in range(BLOCK):
        since = await one_turn(service, thread, epoch, since, deltas=DELTAS)
    await service.sync(thread, epoch, since)
    return (time.perf_counter() - began) * 1000


async def online_turns(central_url: str, central: SyncService, blocks: int) -> None:
    """The offline.online_turn_* lines: blocks of turns, device then direct, alternating."""
    with redis_server(aof=True) as local_port:
        device = DeviceSync(SyncService(await connect(central_url)),
                            SyncService(await connect(url_of(local_port))), "bench-online")
        await device.start()
        try:
            device_ms, direct_ms = [], []
            for block in range(blocks + 1):  # the first pair warms up (scripts, pools)
                mine, mine_epoch, mine_version = await history(device, "online")
                theirs, theirs_epoch, theirs_version = await history(central, "direct")
                copied = partial(mirrored, device, central, mine)
                await until(copied, "the device's copy")
                device_block = await timed_block(device, mine, mine_epoch, mine_version)
                # Not timed: the copy the block's last sync asked for (at most one in a
                # block), so that none of the mirror's work lands in the direct block.
                await until(copied, "the device's copy")
                direct = await timed_block(central, theirs, theirs_epoch, theirs_version)
                if block:
                    device_ms.append(device_block)
                    direct_ms.append(direct)
        finally:
            await device.close()
    what = (f"{blocks} blocks of {BLOCK} turns ({DELTAS} deltas each) on a thread of "
            f"{HISTORY} messages, per turn")
    emit("offline.online_turn_ms", statistics.median(device_ms) / BLOCK, "ms",
         f"DeviceSync online (probe and mirror running), {what}", "")
    emit("offline.direct_turn_ms", statistics.median(direct_ms) / BLOCK, "ms",
         f"SyncService on the same central redis-server, {what}", "")
    emit("offline.online_turn_ratio",
         statistics.median(d / b for d, b in zip(device_ms, direct_ms, strict=True)), "ratio",
         f"the same {BLOCK} turns through SyncService directly, same server, alternating "
         "blocks", "<= 1.05")


async def main(quick: bool) -> None:
    with redis_server() as central_port:
        central_client = await connect(url_of(central_port))
        try:
            await online_turns(url_of(central_port), SyncService(central_client),
                               4 if quick else 20)
            problems = await heal(central_port, SyncService(central_client),
                                  2 if quick else 6)
        finally:
            await central_client.aclose()
    for problem in problems:
        print(f"offline bench: {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, < 1 min")
    asyncio.run(main(parser.parse_args().quick))
