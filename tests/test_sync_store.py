"""Threads, diffs and pushes against a real Redis (standalone and a 3-node cluster)."""

from __future__ import annotations

import asyncio

import pytest

from edgebundle import keys
from edgebundle.errors import (
    EpochMismatchError,
    MutationGapError,
    StateError,
    ThreadNotFoundError,
    UsageError,
)
from edgebundle.sync.models import SyncState
from tests.support.redis_server import RedisServer
from tests.support.sync import delete, new_thread_id, put, sync_service


def by_id(state: SyncState) -> dict[str, tuple[str, int, bool]]:
    return {m.id: (m.content, m.version, m.deleted) for m in state.messages}


def test_scenario_1_client_edits_are_applied_and_answered_with_the_server_diff(
    sync_redis_url: str,
) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            created = await sync.create_thread(new_thread_id())
            tid, epoch = created.id, created.epoch
            assert (created.version, created.full, created.messages) == (0, True, ())

            a1 = await sync.push(tid, "phone", epoch, 0,
                                 [put(1, "m1", "hello"), put(2, "m2", "wrold")])
            assert (a1.version, a1.full) == (2, False)
            assert by_id(a1) == {"m1": ("hello", 1, False), "m2": ("wrold", 2, False)}
            assert [m.position for m in a1.messages] == [1, 2]

            # the laptop, still at version 0, pushes its own message: its answer is the
            # server's diff since 0 (the phone's two messages) plus its own, stamped
            b1 = await sync.push(tid, "laptop", epoch, 0, [put(1, "m3", "again")])
            assert b1.version == 3
            assert by_id(b1) == {"m1": ("hello", 1, False), "m2": ("wrold", 2, False),
                                 "m3": ("again", 3, False)}

            # the phone edits and deletes (client wins); its answer has the laptop's m3
            a2 = await sync.push(tid, "phone", epoch, a1.version,
                                 [put(3, "m2", "world"), delete(4, "m1")])
            assert a2.version == 5
            assert by_id(a2) == {"m3": ("again", 3, False), "m2": ("world", 4, False),
                                 "m1": ("", 5, True)}  # a tombstone diffs too

            full = await sync.sync(tid, None, 0)
            assert full.full and full.version == 5
            assert by_id(full) == by_id(a2)
            nothing = await sync.sync(tid, epoch, 5)
            assert (nothing.full, nothing.messages, nothing.version) == (False, (), 5)

    asyncio.run(main())


def test_each_push_answer_is_one_atomic_cut_of_the_thread(sync_redis_url: str) -> None:
    """Concurrent pushes: every answer (a diff since 0) holds exactly the messages the
    thread had at the answer's version, no more, no less."""

    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            state = await sync.create_thread(new_thread_id())

            async def device(n: int) -> list[SyncState]:
                answers = []
                for mid in range(1, 6):
                    answers.append(await sync.push(state.id, f"dev{n}", state.epoch, 0,
                                                   [put(mid, f"d{n}-m{mid}", f"{n}/{mid}")]))
                return answers

            answers = [a for group in await asyncio.gather(*(device(n) for n in range(8)))
                       for a in group]
            final = {m.id: m.version for m in (await sync.sync(state.id, None, 0)).messages}
            assert len(final) == 40 and sorted(final.values()) == list(range(1, 41))
            for answer in answers:
                expected = {i for i, v in final.items() if v <= answer.version}
                assert {m.id for m in answer.messages} == expected

    asyncio.run(main())


def test_a_retried_push_applies_once(sync_redis_url: str) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            state = await sync.create_thread(new_thread_id())
            batch = [put(1, "a", "one"), put(2, "b", "two")]
            first = await sync.push(state.id, "kiosk", state.epoch, 0, batch)
            again = await sync.push(state.id, "kiosk", state.epoch, 0, batch)
            assert first.version == again.version == 2
            assert by_id(again) == by_id(first)

            # a retry that carries one more mutation applies only the new one
            more = await sync.push(state.id, "kiosk", state.epoch, 2,
                                   [*batch, put(3, "a", "one, edited")])
            assert (more.version, by_id(more)) == (3, {"a": ("one, edited", 3, False)})
            # an old mid of the same device never re-applies, another device's own does
            stale = await sync.push(state.id, "kiosk", state.epoch, 3, [put(2, "b", "late")])
            assert (stale.version, stale.messages) == (3, ())
            other = await sync.push(state.id, "phone", state.epoch, 3, [put(1, "b", "mine")])
            assert by_id(other) == {"b": ("mine", 4, False)}

    asyncio.run(main())


def test_mutation_ids_go_up_by_one_so_a_forged_jump_silences_no_device(
    sync_redis_url: str,
) -> None:
    """Issue 12, item 6: a push claiming phone's id with mid 10^15 used to be applied
    and every later edit of phone skipped. Now ids go 1, 2, 3 … per device and thread:
    a repeat is skipped, a jump is refused whole, naming the id expected."""
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            state = await sync.create_thread(new_thread_id())
            tid, epoch = state.id, state.epoch
            await sync.push(tid, "phone", epoch, 0, [put(1, "a", "one"), put(2, "b", "two")])

            with pytest.raises(MutationGapError, match=r"mutation 1000000000000000 of device "
                                                       r"phone skips ahead.*expects mutation 3"
                                                       ) as caught:
                await sync.push(tid, "phone", epoch, 0, [put(10**15, "evil", "forged")])
            assert caught.value.expected == 3
            # refused whole: the valid first mutation of a push with a gap is not written
            with pytest.raises(MutationGapError):
                await sync.push(tid, "phone", epoch, 0, [put(3, "c", "x"), put(5, "d", "y")])
            assert (await sync.sync(tid, epoch, 0)).version == 2

            later = await sync.push(tid, "phone", epoch, 2, [put(3, "c", "phone's next edit")])
            assert by_id(later) == {"c": ("phone's next edit", 3, False)}
            repeat = await sync.push(tid, "phone", epoch, 3, [put(2, "b", "late"),
                                                              put(3, "c", "again")])
            assert repeat.messages == ()  # repeats: skipped, no gap
            # another device's ids are its own: the first is 1
            with pytest.raises(MutationGapError, match="expects mutation 1"):
                await sync.push(tid, "laptop", epoch, 0, [put(7, "e", "e")])
            assert (await sync.redis.hgetall(keys.mutation_ids(tid))) == {"phone": "3"}

    asyncio.run(main())


def test_mutation_ids_beyond_2_to_the_53_or_not_whole_are_refused(sync_redis_url: str) -> None:
    """10^400 was stored as inf (every later mid of the device skipped for good): now a
    usage error, and the push function refuses it too when called directly."""
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            state = await sync.create_thread(new_thread_id())
            tid, epoch = state.id, state.epoch
            for mid in (10**400, 2**53, 1.5, float("inf"), float("nan"), True, "1"):
                with pytest.raises(UsageError, match="mid must be a whole number from 1 to "
                                                     r"2\^53 - 1 \(9007199254740991\)"):
                    await sync.push(tid, "phone", epoch, 0, [put(mid, "m", "x")])  # type: ignore[arg-type]
            with pytest.raises(MutationGapError):  # the largest id is one, just not next
                await sync.push(tid, "phone", epoch, 0, [put(2**53 - 1, "m", "x")])

            # the function itself, as a device could call it with FCALL
            backend = sync._backend
            for raw in ('{"mid":1e400,"op":"put","message":{"id":"m"}}',
                        '{"mid":9007199254740992,"op":"put","message":{"id":"m"}}',
                        '{"mid":2.5,"op":"put","message":{"id":"m"}}',
                        '{"mid":"1","op":"put","message":{"id":"m"}}',
                        '{"mid":1,"op":"zap","message":{"id":"m"}}',
                        '{"mid":1,"op":"put"}'):
                reply = await backend.call(backend.functions.push, tid, None, "phone", epoch,
                                           0, "0", "", raw)
                assert reply == ["badmutation", raw]
            assert (await sync.sync(tid, epoch, 0)).version == 0
            assert await sync.redis.hgetall(keys.mutation_ids(tid)) == {}

            # a device poisoned by an older version (it stored 1e400 as inf) recovers
            await sync.redis.hset(keys.mutation_ids(tid), "phone", "inf")
            healed = await sync.push(tid, "phone", epoch, 0, [put(8, "m", "back")])
            assert by_id(healed) == {"m": ("back", 1, False)}
            assert await sync.redis.hgetall(keys.mutation_ids(tid)) == {"phone": "8"}

    asyncio.run(main())


def test_another_epoch_gets_a_full_resync_and_a_push_from_it_is_refused(
    sync_redis_url: str,
) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            state = await sync.create_thread(new_thread_id())
            pushed = await sync.push(state.id, "d", state.epoch, 0,
                                     [put(1, "x", "x"), put(2, "y", "y"), delete(3, "x")])
            resync = await sync.sync(state.id, "an-old-epoch", 2)
            assert resync.full and resync.epoch == state.epoch and resync.version == 3
            assert by_id(resync) == {"x": ("", 3, True), "y": ("y", 2, False)}
            with pytest.raises(EpochMismatchError) as caught:
                await sync.push(state.id, "d", "an-old-epoch", 3, [put(4, "z", "z")])
            assert caught.value.epoch == state.epoch
            # a version the server cannot diff from (below the floor, or from the
            # future) answers full too
            assert (await sync.sync(state.id, state.epoch, pushed.version + 5)).full
            await sync.redis.hset(keys.meta(state.id), "floor", 2)
            assert (await sync.sync(state.id, state.epoch, 1)).full
            assert not (await sync.sync(state.id, state.epoch, 2)).full

    asyncio.run(main())


def test_an_expired_thread_is_reseeded_under_a_new_epoch(sync_redis_url: str) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url, session_ttl=1) as sync:
            state = await sync.create_thread(new_thread_id())
            history = [put(1, "q", "question"), put(2, "a", "answer", role="assistant")]
            kept = await sync.push(state.id, "phone", state.epoch, 0, history)
            await asyncio.sleep(1.3)

            with pytest.raises(ThreadNotFoundError):
                await sync.sync(state.id, state.epoch, kept.version)
            with pytest.raises(EpochMismatchError) as caught:
                await sync.push(state.id, "phone", state.epoch, kept.version,
                                [put(3, "q2", "more")])
            assert caught.value.epoch is None
            assert not await sync.redis.exists(*keys.thread_keys(state.id))

            reseeded = await sync.push(
                state.id, "phone", state.epoch, kept.version,
                [put(mid, m.id, m.content, role=m.role, position=m.position)
                 for mid, m in enumerate(kept.messages, start=1)], reseed=True)  # a new count
            assert reseeded.full and reseeded.epoch != state.epoch
            assert [(m.id, m.content, m.position) for m in reseeded.messages] == [
                ("q", "question", 1), ("a", "answer", 2)]

            # another device still on the old epoch: a full resync, its push refused
            laptop = await sync.sync(state.id, state.epoch, kept.version)
            assert laptop.full and laptop.epoch == reseeded.epoch
            with pytest.raises(EpochMismatchError) as refused:
                await sync.push(state.id, "laptop", state.epoch, 2, [put(1, "z", "z")])
            assert refused.value.epoch == reseeded.epoch
            # ... and so is its own re-seed: the thread exists again
            with pytest.raises(EpochMismatchError):
                await sync.push(state.id, "laptop", state.epoch, 0, [put(1, "z", "z")],
                                reseed=True)

    asyncio.run(main())


def test_every_access_slides_the_ttl_of_all_thread_keys(sync_redis_url: str) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url, session_ttl=2) as sync:
            state = await sync.create_thread(new_thread_id())
            tid = state.id
            await sync.push(tid, "d", state.epoch, 0, [put(1, "m", "hi")])
            ticket = await sync.start_run(tid, "d", epoch=state.epoch, since=1, content="go")
            run_keys = [keys.run(tid, ticket.run.id), keys.run_events(tid, ticket.run.id)]
            watched = [keys.meta(tid), keys.messages(tid), keys.changes(tid),
                       keys.mutation_ids(tid), keys.queue(tid), keys.runs(tid), *run_keys]

            async def ttls() -> list[int]:
                return [await sync.redis.pttl(key) for key in watched]

            assert all(t > 1800 for t in await ttls())
            await asyncio.sleep(0.45)
            later = await ttls()
            assert all(0 < t < 1800 for t in later)
            await sync.sync(tid, state.epoch, 0)  # a read is an access too
            again = await ttls()
            assert all(t > before + 300 for t, before in zip(again, later, strict=True))
            await sync.cancel_run(tid, ticket.run.id, "d")

    asyncio.run(main())


def test_create_joins_an_existing_thread(sync_redis_url: str) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            tid = new_thread_id()
            first = await sync.create_thread(tid)
            await sync.push(tid, "d", first.epoch, 0, [put(1, "m", "hi")])
            joined = await sync.create_thread(tid)
            assert (joined.epoch, joined.version, joined.full) == (first.epoch, 1, True)
            assert by_id(joined) == {"m": ("hi", 1, False)}
            generated = await sync.create_thread()
            assert generated.id != tid and generated.version == 0

    asyncio.run(main())


def test_invalid_ids_and_mutations_are_usage_errors(sync_redis_url: str) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            state = await sync.create_thread(new_thread_id())
            tid, epoch = state.id, state.epoch
            bad_calls = [
                sync.create_thread("a}b{c"),
                sync.sync("", None, 0),
                sync.sync(tid, epoch, -1),
                sync.push(tid, "bad device", epoch, 0, []),
                sync.push(tid, "d", epoch, 0, [put(1, "x" * 129, "long id")]),
                sync.push(tid, "d", epoch, 0, [{"mid": 0, "op": "put", "message": {}}]),
                sync.push(tid, "d", epoch, 0, [{"mid": 1, "op": "move", "message": {"id": "m"}}]),
                sync.push(tid, "d", epoch, 0, [put(1, "m", "x", role="robot")]),
                # issue 12: 1e300 + 1 == 1e300 (every later message at one position); a
                # newline after an id made a look-alike of it.
                sync.push(tid, "d", epoch, 0, [put(1, "m", "x", position=1e300)]),
                sync.push(tid, "d", epoch, 0, [put(1, "m", "x", position=2**40 + 1)]),
                sync.push(tid, "d", epoch, 0, [put(1, "m\n", "x")]),
                sync.create_thread("kitchen\n"),
                sync.start_run(tid, "d", epoch=epoch, since=0, content="x", input_id="a b"),
                sync.start_run(tid, "d", epoch=epoch, since=0, content="x", multitask="later"),
                sync.get_run(tid, "run/1"),
                sync.cancel_run(tid, "run:1", "dev ice"),
            ]
            for call in bad_calls:
                with pytest.raises(UsageError):
                    await call
            for after in ("not-an-id", "1-1\n", "١-1"):
                with pytest.raises(UsageError):
                    await anext(sync.events(tid, "r1", after=after))
            # nothing was written by any of them
            assert (await sync.sync(tid, epoch, 0)).version == 0

    asyncio.run(main())


def test_every_key_carries_the_thread_hash_tag(standalone_redis: RedisServer) -> None:
    """The thread's keys start with eb:{<thread>}:, and every key on the session's
    standalone server (every sync and fleet test's) carries a hash tag: threads
    eb:{T}:…, fleet devices eb:dev:{dev:D}:…, fleets eb:fleet:{fleet:F}:…."""

    async def main() -> None:
        async with sync_service(standalone_redis.url) as sync:
            state = await sync.create_thread(new_thread_id())
            tid = state.id
            await sync.push(tid, "d", state.epoch, 0, [put(1, "m", "hi"), delete(2, "m")])
            first = await sync.start_run(tid, "d", epoch=state.epoch, since=0, content="a")
            second = await sync.start_run(tid, "d", epoch=state.epoch, since=0, content="b")
            lease = await sync.acquire(first)
            async with lease:
                await lease.delta("x")
                await lease.finish("eos", {})
            await sync.cancel_run(tid, second.run.id, "d")
            mine = [key async for key in sync.redis.scan_iter(match=f"*{tid}*")]
            assert mine and all(key.startswith(f"eb:{{{tid}}}:") for key in mine)
            everything = [key async for key in sync.redis.scan_iter()]
            tagged = ("eb:{", "eb:dev:{dev:", "eb:fleet:{fleet:")
            assert [key for key in everything if not key.startswith(tagged)] == []

    asyncio.run(main())


def test_a_message_changed_outside_edgebundle_is_a_state_error(sync_redis_url: str) -> None:
    """A key written by hand (or by incompatible code) is the store's fault, exit 1, not
    a usage error and not a bare ValueError (a 500 in the gateway)."""

    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            state = await sync.create_thread(new_thread_id())
            await sync.push(state.id, "kiosk", state.epoch, 0, [put(1, "a", "one")])
            await sync.redis.hset(keys.messages(state.id), "a", "{not json")
            with pytest.raises(StateError, match="a message stored in Redis is not a JSON"):
                await sync.sync(state.id, None, 0)

    asyncio.run(main())
