"""Run event streams on a real Redis (standalone and a 3-node cluster): order, rejoin,
several readers, delta batching, retention."""

from __future__ import annotations

import asyncio

import pytest

from edgebundle import keys
from edgebundle.errors import RunNotFoundError, ThreadNotFoundError
from edgebundle.sync.service import RunEvent, RunLease, RunTicket, SyncService
from tests.support.sync import collect, new_thread_id, sync_service, turn


async def begin(sync: SyncService, content: str = "hi") -> tuple[RunTicket, RunLease]:
    state = await sync.create_thread(new_thread_id())
    ticket = await sync.start_run(state.id, "phone", epoch=state.epoch, since=0,
                                  content=content)
    return ticket, await sync.acquire(ticket)


def shape(events: list[RunEvent]) -> list[tuple[str, str, object]]:
    return [(e.id, e.type, e.data) for e in events]


def test_a_run_emits_its_events_in_order(sync_redis_url: str) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url, delta_batch_ms=0) as sync:
            tid = (await sync.create_thread(new_thread_id())).id
            ticket, lease = await turn(sync, tid, "phone", "hi", "Hello there friend")
            events = await collect(sync, tid, ticket.run.id)
            assert [e.type for e in events] == [
                "run.queued", "message.created", "run.started", "message.created",
                "message.delta", "message.delta", "message.delta",
                "message.completed", "run.completed", "done"]
            user, assistant = events[1].data["message"], events[3].data["message"]
            assert (user["role"], user["content"], user["status"]) == ("user", "hi", "completed")
            assert (assistant["status"], assistant["id"]) == ("in_progress", lease.message.id)
            deltas = [e.data for e in events if e.type == "message.delta"]
            assert [d["seq"] for d in deltas] == [1, 2, 3]
            assert {d["message_id"] for d in deltas} == {lease.message.id}
            assert "".join(d["text"] for d in deltas) == "Hello there friend"
            completed = events[7].data["message"]
            assert (completed["content"], completed["status"]) == ("Hello there friend",
                                                                   "completed")
            assert completed["version"] > assistant["version"]
            assert events[8].data["reason"] == "eos"
            assert events[8].data["run"]["status"] == "completed"
            ids = [e.id for e in events]
            assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))

    asyncio.run(main())


def test_scenario_2b_rejoin_from_the_last_event_id_live_and_after_the_end(
    sync_redis_url: str,
) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url, delta_batch_ms=0) as sync:
            ticket, lease = await begin(sync)
            tid, rid = ticket.run.thread_id, ticket.run.id
            await lease.delta("one")

            # a device reads until the first delta, then loses the connection
            seen: list[RunEvent] = []
            async for event in sync.events(tid, rid):
                seen.append(event)
                if event.type == "message.delta":
                    break
            await lease.delta(" two")

            async def rest(after: str) -> list[RunEvent]:
                return await collect(sync, tid, rid, after=after)

            rejoined = asyncio.create_task(rest(seen[-1].id))  # rejoins while live
            await asyncio.sleep(0.05)
            assert not rejoined.done()  # following live, waiting for more
            await lease.delta(" three")
            await lease.finish("eos", {})
            live = await asyncio.wait_for(rejoined, timeout=5)
            everything = await collect(sync, tid, rid)
            assert shape(seen + live) == shape(everything)
            assert [e.data["text"] for e in live if e.type == "message.delta"] == [
                " two", " three"]

            # after the run ended: from any event id, the rest, ending with done
            middle = everything[4].id
            assert shape(await rest(middle)) == shape(everything[5:])
            assert shape(await rest(everything[-2].id)) == shape(everything[-1:])

    asyncio.run(main())


def test_a_second_reader_joins_a_live_run_and_both_see_identical_events(
    sync_redis_url: str,
) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url, delta_batch_ms=0) as sync:
            ticket, lease = await begin(sync)
            tid, rid = ticket.run.thread_id, ticket.run.id
            first = asyncio.create_task(collect(sync, tid, rid))
            await lease.delta("a")
            await asyncio.sleep(0.02)
            second = asyncio.create_task(collect(sync, tid, rid))  # joins mid-run
            for piece in ("b", "c", "d"):
                await lease.delta(piece)
            await lease.finish("length", {"output_tokens": 4})
            one, two = await asyncio.wait_for(asyncio.gather(first, second), timeout=5)
            assert shape(one) == shape(two)
            assert one[-1].type == "done" and one[-2].data["reason"] == "length"

    asyncio.run(main())


async def delta_texts(sync: SyncService, ticket: RunTicket) -> list[str]:
    """The texts of the run's message.delta events, in order (once it ended)."""
    events = await collect(sync, ticket.run.thread_id, ticket.run.id)
    return [e.data["text"] for e in events if e.type == "message.delta"]


def test_deltas_are_batched_by_size_and_by_time(sync_redis_url: str) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url, delta_batch_ms=10000,
                                delta_batch_chars=5) as sync:
            ticket, lease = await begin(sync)
            for piece in ("ab", "cd", "e", "fg"):  # 5 chars flush; "fg" waits for finish
                await lease.delta(piece)
            await lease.finish("eos", {})
            events = await collect(sync, ticket.run.thread_id, ticket.run.id)
            assert [(e.data["seq"], e.data["text"]) for e in events
                    if e.type == "message.delta"] == [(1, "abcde"), (2, "fg")]

        async with sync_service(sync_redis_url, delta_batch_ms=30,
                                delta_batch_chars=1000) as sync:
            ticket, lease = await begin(sync)
            stream = keys.run_events(ticket.run.thread_id, ticket.run.id)
            before = await sync.redis.xlen(stream)
            await lease.delta("the ")
            await lease.flush()  # the first text: written at once anyway (next test)
            await lease.delta("slow ")
            await lease.delta("model")
            assert await sync.redis.xlen(stream) == before + 1  # buffered
            await asyncio.sleep(0.2)
            assert await sync.redis.xlen(stream) == before + 2  # flushed by time
            await lease.finish("eos", {})
            assert await delta_texts(sync, ticket) == ["the ", "slow model"]

    asyncio.run(main())


def test_a_runs_first_text_waits_for_no_batch(sync_redis_url: str) -> None:
    """Time to first token: the first piece is written as it comes, the rest batched."""
    async def main() -> None:
        async with sync_service(sync_redis_url, delta_batch_ms=10000,
                                delta_batch_chars=1000) as sync:
            ticket, lease = await begin(sync)
            stream = keys.run_events(ticket.run.thread_id, ticket.run.id)
            before = await sync.redis.xlen(stream)
            await lease.delta("first")
            for _ in range(200):  # written behind the caller: a round trip, not 10 s
                if await sync.redis.xlen(stream) == before + 1:
                    break
                await asyncio.sleep(0.01)
            assert await sync.redis.xlen(stream) == before + 1
            await lease.delta(" second")
            await lease.delta(" third")
            await asyncio.sleep(0.2)
            assert await sync.redis.xlen(stream) == before + 1  # these wait for the batch
            await lease.finish("eos", {})
            assert await delta_texts(sync, ticket) == ["first", " second third"]

    asyncio.run(main())


def test_a_reader_of_a_dead_holders_run_still_gets_its_end(sync_redis_url: str) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url, lease_ms=300, renew_ms=60000,
                                delta_batch_ms=0) as sync:
            ticket, lease = await begin(sync)
            await lease.delta("half")
            events = await asyncio.wait_for(
                collect(sync, ticket.run.thread_id, ticket.run.id), timeout=5)
            assert [e.type for e in events[-3:]] == ["message.completed", "run.cancelled",
                                                     "done"]
            assert events[-3].data["message"]["content"] == "half"
            await lease.close()

    asyncio.run(main())


def test_run_events_expire_with_the_thread(sync_redis_url: str) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url, session_ttl=1) as sync:
            ticket, lease = await begin(sync)
            await lease.delta("bye")
            await lease.finish("eos", {})
            tid, rid = ticket.run.thread_id, ticket.run.id
            run_keys = [keys.run(tid, rid), keys.run_events(tid, rid), keys.run_text(tid, rid)]
            assert await sync.redis.exists(*run_keys) == 3
            await asyncio.sleep(1.3)  # the TTL plus the run keys' slack (0.1 s)
            assert await sync.redis.exists(*run_keys, *keys.thread_keys(tid)) == 0
            with pytest.raises(ThreadNotFoundError):
                await collect(sync, tid, rid)

    asyncio.run(main())


def test_events_of_an_unknown_run_are_an_error(sync_redis_url: str) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            tid = (await sync.create_thread(new_thread_id())).id
            with pytest.raises(RunNotFoundError):
                await collect(sync, tid, "run_nope")

    asyncio.run(main())


def test_any_text_survives_the_round_trip_exactly(sync_redis_url: str) -> None:
    """Unicode, quotes, backslashes and JSON-looking text go through cjson unchanged."""
    texts = ["héllo 👋 ", '"quoted" \\ back/slash ', '{"not": "json"} ', "\n\ttabs\u2028"]

    async def main() -> None:
        async with sync_service(sync_redis_url, delta_batch_ms=0) as sync:
            ticket, lease = await begin(sync, content=texts[0])
            for text in texts:
                await lease.delta(text)
            await lease.finish("eos", {})
            events = await collect(sync, ticket.run.thread_id, ticket.run.id)
            assert [e.data["text"] for e in events if e.type == "message.delta"] == texts
            state = await sync.sync(ticket.run.thread_id, None, 0)
            assert [m.content for m in state.messages] == [texts[0], "".join(texts)]

    asyncio.run(main())


def test_a_reader_and_a_queued_run_wait_longer_than_the_redis_read_timeout(
    sync_redis_url: str,
) -> None:
    """redis-py gives every connection a read timeout (5 s by default in 8.x): a
    blocking XREAD / BLPOP longer than it must not fail the reader or the queued run."""
    async def main() -> None:
        async with sync_service(sync_redis_url, delta_batch_ms=0) as sync:
            first, lease = await begin(sync)
            tid = first.run.thread_id
            state = await sync.sync(tid, None, 0)
            second = await sync.start_run(tid, "tablet", epoch=state.epoch,
                                          since=state.version, content="next")
            reading = asyncio.ensure_future(collect(sync, tid, first.run.id))
            waiting = asyncio.ensure_future(sync.acquire(second))
            await asyncio.sleep(6.5)  # nothing happens on the thread for longer than 5 s
            assert not reading.done() and not waiting.done()
            await lease.delta("late")
            await lease.finish("eos", {"input_tokens": 1, "output_tokens": 1})
            await lease.close()
            events = await asyncio.wait_for(reading, timeout=10)
            assert [e.type for e in events[-4:]] == ["message.delta", "message.completed",
                                                     "run.completed", "done"]
            next_lease = await asyncio.wait_for(waiting, timeout=10)
            assert next_lease.run.id == second.run.id
            await next_lease.finish("eos", {"input_tokens": 1, "output_tokens": 0})
            await next_lease.close()

    asyncio.run(main())
