"""How a chat completion with ``thread_id`` follows its run: the tap (the text as this
device generates it), then the run's Redis Stream when the tap cannot say how the run
ended, skipping the text the tap already gave.

The run here is written by another "device" (a lease taken in the test on a real
Redis), as when a retry on another device wins the thread, or a cancel cuts the run
short: the request still gets the whole text once, and the run's end.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from edgebundle.gateway.thread_completions import ThreadChat
from edgebundle.sync.runs import CURRENT_EPOCH
from edgebundle.sync.service import RunEvent, SyncService
from edgebundle.turns import RunGenerator, RunTap
from tests.support.sync import new_thread_id, sync_service


async def followed(sync: SyncService, tapped: list[str], writes: list[str]) -> list[Any]:
    """What the request yields: the tap gives ``tapped`` and ends without an end event;
    the run (on Redis) gets ``writes`` and completes."""
    thread_id = (await sync.create_thread(new_thread_id())).id
    ticket = await sync.start_run(thread_id, "elsewhere", epoch=CURRENT_EPOCH, since=0,
                                  content="hi")
    async with await sync.acquire(ticket) as lease:
        for text in writes:
            await lease.delta(text)
        await lease.finish("eos", {"input_tokens": 3, "output_tokens": len(writes)})
    tap = RunTap()
    for text in tapped:
        tap.text(text)
    tap.close()  # ended here without a result: the stream says how it ended
    # The chat is never asked for text here: following a run reads Redis only.
    chat = ThreadChat(RunGenerator(sync, cast(Any, None)), "here")
    return [item async for item in chat._followed(thread_id, ticket.run.id, tap)]


def test_a_run_the_tap_saw_nothing_of_is_read_whole_from_its_stream(
        sync_redis_url: str) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            items = await followed(sync, [], ["Hello", " world"])
            assert "".join(items[:-1]) == "Hello world"
            end = items[-1]
            assert isinstance(end, RunEvent) and end.type == "run.completed"
            assert end.data["usage"] == {"input_tokens": 3, "output_tokens": 2}

    asyncio.run(main())


def test_the_stream_gives_only_the_text_beyond_what_the_tap_gave(sync_redis_url: str) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            items = await followed(sync, ["Hel"], ["Hello", " world"])
            assert items[0] == "Hel" and "".join(items[:-1]) == "Hello world"
            assert cast(RunEvent, items[-1]).type == "run.completed"
            # The tap ahead of what Redis kept (its last pieces lost): nothing is repeated.
            items = await followed(sync, ["Hello", " world", "!"], ["Hello", " world"])
            assert "".join(items[:-1]) == "Hello world!"

    asyncio.run(main())
