"""Background tasks stop for good: a cancel lost to Python 3.11's ``asyncio.wait_for``
(it returns a result that arrived with the cancel) must not hang a shutdown.

``edgebundle run`` once hung on SIGTERM this way: the device's link probe loops on a
ping with a timeout, and the cancel of its task could be swallowed, so
``DeviceSync.close()`` awaited it forever. Real parts: asyncio itself, and a real
redis-server for the device's two stores.
"""

from __future__ import annotations

import asyncio
import random

from edgebundle.sync.replication import DeviceSync
from edgebundle.tasks import cancel_and_wait
from tests.support.redis_server import RedisServer
from tests.support.sync import sync_service

TRIALS = 40


def test_cancel_and_wait_ends_a_loop_that_a_single_cancel_may_not() -> None:
    async def probe_forever() -> None:  # the shape of a link probe, on 3.11 semantics
        while True:
            await asyncio.wait_for(asyncio.sleep(0), 1)  # the race itself

    async def main() -> None:
        for trial in range(TRIALS):
            task = asyncio.create_task(probe_forever())
            for _ in range(trial % 5):  # cancel at different points of the loop
                await asyncio.sleep(0)
            await asyncio.wait_for(cancel_and_wait([task]), 5)
            assert task.cancelled()

    asyncio.run(main())


def test_cancel_and_wait_retrieves_what_the_tasks_raised() -> None:
    async def main() -> None:
        async def fails() -> None:
            raise RuntimeError("boom")

        failed = asyncio.create_task(fails())
        await asyncio.sleep(0)
        finished = asyncio.create_task(asyncio.sleep(0))
        await cancel_and_wait([failed, finished])  # no raise: the caller is stopping them
        assert failed.done() and finished.done()

    asyncio.run(main())


def test_a_device_sync_probing_fast_always_closes(redis: RedisServer) -> None:
    """Its probe pings the central store every few ms: close() at random moments."""
    async def main() -> None:
        for _ in range(TRIALS // 2):
            async with sync_service(redis.url) as central, sync_service(redis.url) as local:
                device = DeviceSync(central, local, "closer", offline_after=0.01)
                await device.start()
                await asyncio.sleep(random.uniform(0, 0.02))
                await asyncio.wait_for(device.close(), 5)

    asyncio.run(main())
