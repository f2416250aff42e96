"""Benchmark: the sync core through the sync proxy vs straight to Redis, same run.

Prints one JSON object per line (docs/api.md "Benchmarks"):

- ``proxy.turn_ms_ratio``: median time of one chat turn with no model (start_run,
  acquire, finish: what a device's sync costs per turn) through ``edgebundle fleet
  proxy`` (``--access proxied`` device user) over the same turn by a ``--access
  direct`` device user straight to Redis, alternating. Goal <= 1.5 (the proxy adds a
  hop on loopback, never a round trip of its own).
- ``proxy.turns_per_s_ratio.devices_20``: N = 20 devices at once, each with its own
  user and connection, taking T turns each on ONE thread (runs queue): turns per second
  through the proxy over straight to Redis. ``all_completed``: the thread holds every
  input and reply, so nothing was lost either way. Goal >= 0.8.

The redis-server is a child on a free port (bench/sync.py's), the proxy runs in this
process. Usage: python bench/proxy.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sync import emit, new_thread, one_turn, redis_server  # noqa: E402  (bench/sync.py)

from edgebundle.fleet import acl  # noqa: E402
from edgebundle.fleet.proxy import SyncProxy  # noqa: E402
from edgebundle.sync.client import connect  # noqa: E402
from edgebundle.sync.service import SyncService  # noqa: E402


async def devices(admin_url: str, base_url: str, count: int, access: str) -> list[SyncService]:
    admin = await connect(admin_url)
    try:
        names = [f"bench-{access}-{i}" for i in range(count)]
        result = await acl.provision(admin, "bench", names, base_url=base_url, access=access)
    finally:
        await admin.aclose()
    return [SyncService(await connect(c.redis_url)) for c in result.credentials]


async def turn_times(service: SyncService, turns: int) -> list[float]:
    thread, epoch, since = await new_thread(service, "latency")
    times = []
    for _ in range(turns):
        started = time.perf_counter()
        since = await one_turn(service, thread, epoch, since)
        times.append(time.perf_counter() - started)
    return times


async def many_on_one_thread(services: list[SyncService], turns: int) -> tuple[float, bool]:
    """Turns per second of every device taking ``turns`` turns on one thread at once."""
    thread, epoch, _ = await new_thread(services[0], "shared")

    async def device(service: SyncService) -> None:
        for _ in range(turns):
            state = await service.sync(thread, None, 0)
            await one_turn(service, thread, epoch, state.version)

    started = time.perf_counter()
    await asyncio.gather(*(device(s) for s in services))
    elapsed = time.perf_counter() - started
    state = await services[0].sync(thread, None, 0)
    complete = len(state.messages) == 2 * turns * len(services)
    return len(services) * turns / elapsed, complete


async def main(quick: bool) -> None:
    rounds, turns, count = (3, 30, 20) if quick else (5, 100, 20)
    with redis_server() as port:
        url = f"redis://127.0.0.1:{port}/0"
        proxy = SyncProxy(url, port=0)
        [proxy_port] = await proxy.start()
        direct = await devices(url, url, count, "direct")
        proxied = await devices(url, f"redis://127.0.0.1:{proxy_port}/0", count, "proxied")
        try:
            ratios, direct_ms, proxied_ms = [], [], []
            for _ in range(rounds):  # alternate, so background load hits both alike
                d = statistics.median(await turn_times(direct[0], turns))
                p = statistics.median(await turn_times(proxied[0], turns))
                ratios.append(p / d)
                direct_ms.append(d * 1000)
                proxied_ms.append(p * 1000)
            emit("proxy.turn_ms_ratio", statistics.median(ratios), "ratio",
                 "the same turn straight to Redis", "<= 1.5",
                 direct_ms=str(round(statistics.median(direct_ms), 3)),
                 proxied_ms=str(round(statistics.median(proxied_ms), 3)))
            d_rate, d_ok = await many_on_one_thread(direct, max(2, turns // 10))
            p_rate, p_ok = await many_on_one_thread(proxied, max(2, turns // 10))
            emit(f"proxy.turns_per_s_ratio.devices_{count}", p_rate / d_rate, "ratio",
                 f"{count} devices straight to Redis on one thread", ">= 0.8",
                 direct_turns_per_s=str(round(d_rate, 1)),
                 proxied_turns_per_s=str(round(p_rate, 1)),
                 all_completed=d_ok and p_ok)
        finally:
            for service in (*direct, *proxied):
                await service.aclose()
            await proxy.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (well under a minute)")
    asyncio.run(main(parser.parse_args().quick))
