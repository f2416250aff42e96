"""Runs on a real Redis (standalone and a 3-node cluster): turns, queueing, the fenced
lock and its takeover, busy policies, cancel and interrupt."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from edgebundle import keys
from edgebundle.errors import EpochMismatchError, LeaseLostError, ThreadBusyError, UsageError
from edgebundle.gateway.sync_api import prompt_messages
from edgebundle.sync.models import SyncState, ThreadMessage
from edgebundle.sync.runs import CURRENT_EPOCH
from edgebundle.sync.service import RunLease, RunTicket, SyncService
from tests.support.sync import collect, delete, new_thread_id, put, sync_service, turn


def message(state: SyncState, message_id: str | None) -> ThreadMessage:
    return next(m for m in state.messages if m.id == message_id)


async def started(sync: SyncService, content: str, thread_id: str | None = None,
                  **options: str) -> tuple[RunTicket, RunLease]:
    """A run that holds its (new, or given) thread and is generating."""
    if thread_id is None:
        thread_id = (await sync.create_thread(new_thread_id())).id
    state = await sync.sync(thread_id, None, 0)
    ticket = await sync.start_run(thread_id, "phone", epoch=state.epoch, since=state.version,
                                  content=content, **options)
    return ticket, await sync.acquire(ticket)


async def start(sync: SyncService, thread_id: str, content: str, device: str = "laptop",
                multitask: str = "enqueue") -> RunTicket:
    state = await sync.sync(thread_id, None, 0)
    return await sync.start_run(thread_id, device, epoch=state.epoch, since=state.version,
                                content=content, multitask=multitask)


def test_a_turn_lands_in_the_thread_with_new_versions(sync_redis_url: str) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            tid = (await sync.create_thread(new_thread_id())).id
            ticket, lease = await turn(sync, tid, "phone", "Hi there", "Hello! How can I help?")
            run = await sync.get_run(tid, ticket.run.id)
            assert (run.status, run.reason, run.fence) == ("completed", "eos", lease.fence)
            assert run.usage == {"input_tokens": 5, "output_tokens": 5}
            state = await sync.sync(tid, None, 0)
            assert [(m.role, m.content, m.status) for m in state.messages] == [
                ("user", "Hi there", "completed"),
                ("assistant", "Hello! How can I help?", "completed")]
            reply = message(state, run.message_id)
            assert reply.run_id == run.id and reply.version == state.version == 3
            assert state.active_run is None and state.queued_runs == ()
            assert not await sync.redis.exists(keys.lock(tid))  # released

    asyncio.run(main())


def test_scenario_2a_the_next_run_opens_with_the_other_devices_turn(
    sync_redis_url: str,
) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            created = await sync.create_thread(new_thread_id())
            tid = created.id
            laptop = await sync.push(tid, "laptop", created.epoch, 0, [put(1, "s", "be brief",
                                                                             role="system")])
            await turn(sync, tid, "phone", "What is Redis?", "An in-memory data store.")

            ticket = await sync.start_run(tid, "laptop", epoch=laptop.epoch,
                                          since=laptop.version, content="And Valkey?")
            assert not ticket.sync.full
            assert [(m.role, m.content, m.status) for m in ticket.sync.messages] == [
                ("user", "What is Redis?", "completed"),
                ("assistant", "An in-memory data store.", "completed"),
                ("user", "And Valkey?", "completed")]
            assert ticket.sync.queued_runs[0].id == ticket.run.id
            assert ticket.sync.version == (await sync.sync(tid, laptop.epoch, 0)).version
            await sync.cancel_run(tid, ticket.run.id, "laptop")

    asyncio.run(main())


def test_a_run_started_on_the_current_epoch_needs_no_sync_and_opens_with_its_own_diff(
    sync_redis_url: str,
) -> None:
    """CURRENT_EPOCH (chat completions with thread_id render from the thread itself):
    no epoch check, whatever the thread went through; the diff is the run's own input;
    a thread that does not exist is an EpochMismatchError without an epoch."""
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            created = await sync.create_thread(new_thread_id())
            tid = created.id
            await sync.push(tid, "laptop", created.epoch, 0, [put(1, "s", "be brief",
                                                                  role="system")])
            await turn(sync, tid, "phone", "What is Redis?", "An in-memory data store.")
            before = await sync.sync(tid, None, 0)

            ticket = await sync.start_run(tid, "kiosk", epoch=CURRENT_EPOCH, since=0,
                                          content="And Valkey?")
            assert not ticket.again and not ticket.sync.full
            assert ticket.sync.epoch == created.epoch
            assert [(m.role, m.content) for m in ticket.sync.messages] == [
                ("user", "And Valkey?")]
            assert ticket.sync.version == before.version + 1
            async with await sync.acquire(ticket) as lease:
                await lease.finish("eos", {})
            again = await sync.start_run(tid, "kiosk", epoch=CURRENT_EPOCH, since=0,
                                         content="And Valkey?",
                                         input_id=ticket.run.input_message_id)
            assert again.again and again.run.id == ticket.run.id and again.sync.messages == ()

            with pytest.raises(EpochMismatchError) as missing:
                await sync.start_run(new_thread_id(), "kiosk", epoch=CURRENT_EPOCH, since=0,
                                     content="Hello?")
            assert missing.value.epoch is None

    asyncio.run(main())


def test_a_run_started_with_take_on_a_free_thread_holds_it_at_once(
    sync_redis_url: str,
) -> None:
    """take (the starter generates next): a free thread with no one in line is taken in
    the start's own step, with the events and the thread acquire would give; a busy
    thread is not taken: that run waits in line as ever."""
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            tid = (await sync.create_thread(new_thread_id())).id
            first = await sync.start_run(tid, "kiosk", epoch=CURRENT_EPOCH, since=0,
                                         content="one", take=True)
            assert first.holding is not None and first.holding.run.status == "in_progress"
            assert first.run.status == "queued"  # as the turn found it, as for any start
            assert first.holding.run.fence == first.holding.fence
            assert first.sync.messages[-1].content == "one"  # its reply not there yet
            assert [(m.role, m.status) for m in first.holding.thread.messages] == [
                ("user", "completed"), ("assistant", "in_progress")]
            assert first.holding.thread.active_run == first.holding.run
            second = await sync.start_run(tid, "kiosk", epoch=CURRENT_EPOCH, since=0,
                                          content="two", take=True)
            assert second.holding is None and second.run.status == "queued"

            lease = await asyncio.wait_for(sync.acquire(first), 1)
            assert (lease.run.id, lease.fence) == (first.run.id, first.holding.fence)
            assert lease.message.id == first.run.message_id
            waiting = asyncio.create_task(sync.acquire(second))
            await asyncio.sleep(0.1)
            assert not waiting.done()  # in line behind the holder
            await lease.delta("a reply")
            await lease.finish("eos", {})
            async with await asyncio.wait_for(waiting, 5) as next_lease:
                prompt = [m.content for m in prompt_messages(next_lease.thread.messages,
                                                             next_lease.run)]
                assert prompt == ["one", "a reply", "two"]
                await next_lease.finish("eos", {})
            events = [e.type for e in await collect(sync, tid, first.run.id)]
            assert events == ["run.queued", "message.created", "run.started",
                              "message.created", "message.delta", "message.completed",
                              "run.completed", "done"]

    asyncio.run(main())


def test_a_retry_takes_over_a_claimed_run_whose_starter_never_wrote(
    sync_redis_url: str,
) -> None:
    """A start with take whose answer was lost leaves its run claimed by nobody: the
    retry (same input id) takes it over, and the lost start's lease writes nothing. A
    run whose holder wrote, or that ended, is never taken over."""
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            tid = (await sync.create_thread(new_thread_id())).id
            lost = await sync.start_run(tid, "kiosk", epoch=CURRENT_EPOCH, since=0,
                                        content="hello?", input_id="turn-1", take=True)
            retry = await sync.start_run(tid, "kiosk", epoch=CURRENT_EPOCH, since=0,
                                         content="hello?", input_id="turn-1", take=True)
            assert retry.again and retry.holding is not None
            assert lost.holding is not None
            assert retry.run.id == lost.run.id and retry.holding.fence > lost.holding.fence
            stale = await sync.acquire(lost)  # the starter that lost its answer, had it lived
            async with await sync.acquire(retry) as lease:
                await lease.delta("hi")
                await lease.flush()
                with pytest.raises(LeaseLostError):
                    await stale.delta("ghost")
                    await stale.flush()
                await stale.close()
                # Written: a second retry only follows the run.
                again = await sync.start_run(tid, "kiosk", epoch=CURRENT_EPOCH, since=0,
                                             content="hello?", input_id="turn-1", take=True)
                assert again.again and again.holding is None
                assert again.run.status == "in_progress"
                await lease.finish("eos", {})
            state = await sync.sync(tid, None, 0)
            assert [m.content for m in state.messages] == ["hello?", "hi"]

            done = await sync.start_run(tid, "kiosk", epoch=CURRENT_EPOCH, since=0,
                                        content="bye", input_id="turn-2", take=True)
            async with await sync.acquire(done) as quick:
                await quick.finish("eos", {})  # its only write ends it
            after = await sync.start_run(tid, "kiosk", epoch=CURRENT_EPOCH, since=0,
                                         content="bye", input_id="turn-2", take=True)
            assert after.again and after.holding is None and after.run.status == "completed"

    asyncio.run(main())


def test_queued_runs_start_in_fifo_order_the_moment_the_previous_one_ends(
    sync_redis_url: str,
) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:  # default lease: 30 s
            first, lease = await started(sync, "one")
            tid = first.run.thread_id
            tickets = [await start(sync, tid, f"turn {n}") for n in range(4)]
            order: list[str] = []

            async def run_when_its_turn_comes(ticket: RunTicket) -> None:
                async with await sync.acquire(ticket) as mine:
                    order.append(ticket.run.id)
                    await mine.finish("eos", {})

            # waiters begin in reverse order: the queue, not arrival at acquire, decides
            waiters = [asyncio.create_task(run_when_its_turn_comes(t)) for t in reversed(tickets)]
            await asyncio.sleep(0.1)
            assert order == []
            await lease.finish("eos", {})
            # every handoff is a wake-up from Redis: far quicker than one 30 s lease
            await asyncio.wait_for(asyncio.gather(*waiters), timeout=5)
            assert order == [t.run.id for t in tickets]
            fences = [(await sync.get_run(tid, t.run.id)).fence or 0 for t in tickets]
            assert fences == sorted(fences) and len(set(fences)) == 4 and 0 not in fences

    asyncio.run(main())


def test_reject_answers_thread_busy_with_retry_after(sync_redis_url: str) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            ticket, lease = await started(sync, "one")
            tid = ticket.run.thread_id
            with pytest.raises(ThreadBusyError) as caught:
                await start(sync, tid, "two", multitask="reject")
            assert caught.value.retry_after == 3
            assert caught.value.active_run is not None
            assert caught.value.active_run.id == ticket.run.id
            assert "retry after 3 s" in str(caught.value)
            await lease.finish("eos", {})
            state = await sync.sync(tid, None, 0)
            assert [m.content for m in state.messages if m.role == "user"] == ["one"]
            again = await start(sync, tid, "two", multitask="reject")  # free now
            async with await sync.acquire(again) as second:
                await second.finish("eos", {})

    asyncio.run(main())


def test_interrupt_ends_the_active_run_keeping_its_text_and_goes_first(
    sync_redis_url: str,
) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url, delta_batch_ms=0) as sync:
            ticket, lease = await started(sync, "tell me a story")
            tid = ticket.run.thread_id
            await lease.delta("Once upon")
            await lease.flush()  # write-behind when unbatched: store it now
            waiting = await start(sync, tid, "queued before")
            urgent = await start(sync, tid, "stop, do this", multitask="interrupt")

            interrupted = await sync.get_run(tid, ticket.run.id)
            assert (interrupted.status, interrupted.reason) == ("incomplete", "interrupted")
            state = await sync.sync(tid, None, 0)
            kept = message(state, ticket.run.message_id)
            assert (kept.content, kept.status) == ("Once upon", "incomplete")
            assert [r.id for r in state.queued_runs] == [urgent.run.id, waiting.run.id]
            with pytest.raises(LeaseLostError):  # at the latest when the write is due
                await lease.delta(" a time")
                await lease.flush()
            assert lease.lost

            async with await asyncio.wait_for(sync.acquire(urgent), timeout=5) as now:
                await now.finish("eos", {})
            async with await asyncio.wait_for(sync.acquire(waiting), timeout=5) as later:
                await later.finish("eos", {})
            kinds = [e.type for e in await collect(sync, tid, ticket.run.id)]
            assert kinds[-3:] == ["message.completed", "run.cancelled", "done"]
            await lease.close()

    asyncio.run(main())


def test_cancel_with_content_seen_stores_exactly_what_the_user_saw(
    sync_redis_url: str,
) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url, delta_batch_ms=0) as sync:
            ticket, lease = await started(sync, "count")
            tid = ticket.run.thread_id
            await lease.delta("one two three four")
            await lease.flush()  # write-behind when unbatched: store it now
            before = (await sync.sync(tid, None, 0)).version
            run = await sync.cancel_run(tid, ticket.run.id, "laptop", content_seen="one two")
            assert (run.status, run.reason) == ("cancelled", "cancelled")
            diff = await sync.sync(tid, (await sync.sync(tid, None, 0)).epoch, before)
            stopped = message(diff, ticket.run.message_id)
            assert (stopped.content, stopped.status) == ("one two", "incomplete")
            assert stopped.version == diff.version > before
            with pytest.raises(LeaseLostError):
                await lease.finish("eos", {})  # the holder cannot overwrite what was seen
            assert message(await sync.sync(tid, None, 0), run.message_id).content == "one two"
            events = await collect(sync, tid, run.id)
            assert [e.type for e in events][-3:] == ["message.completed", "run.cancelled", "done"]
            assert events[-3].data["message"]["content"] == "one two"

            # without content_seen the text so far is kept; cancelling again changes nothing
            second, lease2 = await started(sync, "again", thread_id=tid)
            await lease2.delta("partial")
            await lease2.flush()  # write-behind when unbatched: store it now
            await sync.cancel_run(tid, second.run.id, "phone")
            again = await sync.cancel_run(tid, second.run.id, "phone", content_seen="x")
            assert again.status == "cancelled"
            final = await sync.sync(tid, None, 0)
            assert message(final, second.run.message_id).content == "partial"
            await lease.close()
            await lease2.close()

    asyncio.run(main())


def test_cancelling_a_queued_run_takes_it_out_of_line(sync_redis_url: str) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            ticket, lease = await started(sync, "one")
            tid = ticket.run.thread_id
            queued = await start(sync, tid, "two")
            waiter = asyncio.create_task(sync.acquire(queued))
            await asyncio.sleep(0.05)
            cancelled = await sync.cancel_run(tid, queued.run.id, "laptop")
            assert cancelled.status == "cancelled"
            with pytest.raises(LeaseLostError):  # woken at once, told it will never run
                await asyncio.wait_for(waiter, timeout=5)
            assert (await sync.sync(tid, None, 0)).queued_runs == ()
            await lease.finish("eos", {})

    asyncio.run(main())


def test_an_edit_during_a_run_interrupts_it_first(sync_redis_url: str) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url, delta_batch_ms=0) as sync:
            ticket, lease = await started(sync, "translate: chat")
            tid = ticket.run.thread_id
            await lease.delta("le ch")
            await lease.flush()  # write-behind when unbatched: store it now
            state = await sync.sync(tid, None, 0)
            answer = await sync.push(tid, "laptop", state.epoch, state.version, [
                put(1, ticket.run.input_message_id or "", "translate: dog")])
            edited = message(answer, ticket.run.input_message_id)
            stopped = message(answer, ticket.run.message_id)
            assert edited.content == "translate: dog"
            assert (stopped.content, stopped.status) == ("le ch", "incomplete")
            assert stopped.version < edited.version  # interrupted first, then applied
            assert answer.active_run is None
            run = await sync.get_run(tid, ticket.run.id)
            assert (run.status, run.reason) == ("incomplete", "interrupted")
            with pytest.raises(LeaseLostError):  # at the latest when the write is due
                await lease.delta("at")
                await lease.flush()
            # a new message (not an edit of history) leaves a running run alone
            second, lease2 = await started(sync, "more", thread_id=tid)
            now = await sync.sync(tid, None, 0)
            await sync.push(tid, "laptop", now.epoch, now.version, [put(2, "new", "hi")])
            await lease2.delta("fine")
            assert (await lease2.finish("eos", {})).status == "completed"
            await lease.close()

    asyncio.run(main())


def test_a_stalled_holder_cannot_write_and_the_next_run_takes_over(
    sync_redis_url: str,
) -> None:
    async def main() -> None:
        # the watchdog renews every 60 s, the lease is 300 ms: the holder has stalled
        async with sync_service(sync_redis_url, lease_ms=300, renew_ms=60000,
                                delta_batch_ms=0) as sync:
            ticket, stalled = await started(sync, "long answer")
            tid = ticket.run.thread_id
            await stalled.delta("partial ")
            await stalled.flush()  # write-behind when unbatched: store it now
            nxt = await start(sync, tid, "next")
            lease = await asyncio.wait_for(sync.acquire(nxt), timeout=5)

            dead = await sync.get_run(tid, ticket.run.id)
            assert (dead.status, dead.reason) == ("incomplete", "interrupted")
            state = await sync.sync(tid, None, 0)
            kept = message(state, ticket.run.message_id)
            assert (kept.content, kept.status) == ("partial ", "incomplete")
            stream = keys.run_events(tid, ticket.run.id)
            length = await sync.redis.xlen(stream)
            with pytest.raises(LeaseLostError):  # at the latest when the write is due
                await stalled.delta("more")
                await stalled.flush()
            with pytest.raises(LeaseLostError):
                await stalled.finish("eos", {})
            assert await sync.redis.xlen(stream) == length  # nothing written
            assert message(await sync.sync(tid, None, 0), kept.id) == kept
            assert lease.fence > stalled.fence
            events = await collect(sync, tid, ticket.run.id)
            assert events[-2].type == "run.cancelled"
            assert events[-2].data["cause"] == "lease_expired"
            await lease.finish("eos", {})
            await stalled.close()

    asyncio.run(main())


def test_a_queued_run_whose_device_never_took_its_turn_is_skipped(
    sync_redis_url: str,
) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url, lease_ms=300) as sync:
            tid = (await sync.create_thread(new_thread_id())).id
            abandoned = await start(sync, tid, "never acquired")
            mine = await start(sync, tid, "mine")
            lease = await asyncio.wait_for(sync.acquire(mine), timeout=5)
            skipped = await sync.get_run(tid, abandoned.run.id)
            assert (skipped.status, skipped.reason) == ("failed", "error")
            with pytest.raises(LeaseLostError):
                await sync.acquire(abandoned)
            await lease.finish("eos", {})

    asyncio.run(main())


def test_acquire_with_a_timeout_withdraws_the_run(sync_redis_url: str) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            ticket, lease = await started(sync, "one")
            tid = ticket.run.thread_id
            late = await start(sync, tid, "two")
            with pytest.raises(ThreadBusyError):
                await sync.acquire(late, timeout=0.2)
            assert (await sync.get_run(tid, late.run.id)).status == "cancelled"
            await lease.finish("eos", {})

    asyncio.run(main())


def test_the_watchdog_keeps_a_slow_run_alive(sync_redis_url: str) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url, lease_ms=300, renew_ms=80) as sync:
            ticket, lease = await started(sync, "think hard")
            await asyncio.sleep(0.7)  # longer than two leases, renewed meanwhile
            await lease.delta("done thinking")
            run = await lease.finish("eos", {})
            assert run.status == "completed" and not lease.lost
            await lease.close()

    asyncio.run(main())


def test_queued_turns_keep_the_conversations_shape_and_each_prompt_ends_at_its_input(
    sync_redis_url: str,
) -> None:
    """Three devices ask at once: their inputs land first, yet every reply lands right
    after its own input (Q1 A1 Q2 A2 Q3 A3), and each run's prompt is the thread up to
    its input: the earlier replies in, the later queued inputs out. A note pushed while
    the runs wait comes after all of them and is in none of their prompts."""
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            tid = (await sync.create_thread(new_thread_id())).id
            tickets = [await start(sync, tid, f"Q{n}", device=f"dev{n}") for n in (1, 2, 3)]
            state = await sync.sync(tid, None, 0)
            note = await sync.push(tid, "dev9", state.epoch, state.version,
                                   [put(1, "note", "pushed while queued")])
            prompts = []
            for number, ticket in enumerate(tickets, 1):
                async with await sync.acquire(ticket) as lease:
                    thread = await sync.sync(tid, None, 0)
                    prompts.append([m.content for m in prompt_messages(thread.messages,
                                                                       lease.run)])
                    await lease.delta(f"A{number}")
                    await lease.finish("eos", {})
            thread = await sync.sync(tid, None, 0)
            ordered = sorted(thread.messages, key=lambda m: m.position)
            assert [m.content for m in ordered] == [
                "Q1", "A1", "Q2", "A2", "Q3", "A3", "pushed while queued"]
            assert prompts == [["Q1"], ["Q1", "A1", "Q2"], ["Q1", "A1", "Q2", "A2", "Q3"]]
            assert message(note, "note").position > max(
                m.position for m in ordered if m.id != "note")

    asyncio.run(main())


def test_a_run_whose_input_was_deleted_before_its_turn_cannot_be_prompted(
    sync_redis_url: str,
) -> None:
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            tid = (await sync.create_thread(new_thread_id())).id
            ticket = await start(sync, tid, "never mind")
            state = await sync.sync(tid, None, 0)
            await sync.push(tid, "laptop", state.epoch, state.version,
                            [delete(1, ticket.run.input_message_id or "")])
            async with await sync.acquire(ticket) as lease:
                thread = await sync.sync(tid, None, 0)
                with pytest.raises(UsageError, match="was deleted"):
                    prompt_messages(thread.messages, lease.run)

    asyncio.run(main())


def test_a_turn_started_again_with_its_input_id_returns_the_same_run(
    sync_redis_url: str,
) -> None:
    """A retry whose first answer was lost (on any device) starts nothing new, whatever
    became of the run; an input id that names a plain message is refused."""
    async def main() -> None:
        async with sync_service(sync_redis_url) as sync:
            tid = (await sync.create_thread(new_thread_id())).id
            state = await sync.sync(tid, None, 0)
            first = await sync.start_run(tid, "phone", epoch=state.epoch, since=state.version,
                                         content="Hi", input_id="q-1")
            assert not first.again
            again = await sync.start_run(tid, "laptop", epoch=state.epoch, since=0,
                                         content="Hi", input_id="q-1")
            assert again.again and again.run == first.run
            assert [m.id for m in again.sync.messages] == ["q-1"]
            async with await sync.acquire(first) as lease:
                await lease.delta("Hello")
                await lease.finish("eos", {})
            later = await sync.start_run(tid, "phone", epoch="another-epoch", since=0,
                                         content="Hi", input_id="q-1")
            assert (later.again, later.run.id, later.run.status) == (
                True, first.run.id, "completed")
            assert later.sync.full  # another epoch: the whole thread
            thread = await sync.sync(tid, None, 0)
            assert [m.content for m in thread.messages] == ["Hi", "Hello"]
            assert await sync.redis.zcard(keys.runs(tid)) == 1

            await sync.push(tid, "phone", thread.epoch, thread.version, [put(1, "plain", "x")])
            with pytest.raises(UsageError, match="started no run"):
                await sync.start_run(tid, "phone", epoch=thread.epoch, since=0,
                                     content="x", input_id="plain")

    asyncio.run(main())


def test_fenced_writes_sent_again_after_a_lost_reply_change_nothing(
    sync_redis_url: str,
) -> None:
    """What a retried script call does when Redis ran the first one but its reply was
    lost (a restart between fsync and reply): the same acquire holds the run, the same
    text batch is not stored twice, the same finish answers the ended run."""
    async def main() -> None:
        async with sync_service(sync_redis_url, delta_batch_ms=0) as sync:
            tid = (await sync.create_thread(new_thread_id())).id
            ticket = await start(sync, tid, "count")
            backend = sync._backend  # the raw script calls, exactly as a retry resends them
            token = "a-token-of-this-test"
            run_id = ticket.run.id
            first = await backend.call(backend.functions.acquire, tid, run_id, run_id, token)
            again = await backend.call(backend.functions.acquire, tid, run_id, run_id, token)
            assert first[0] == again[0] == "ok" and first[1:] == again[1:]
            fence, message_id = str(first[3]), json.loads(first[2])["id"]

            def delta(base: int, *texts: str) -> Any:
                return backend.call(backend.functions.delta, tid, run_id, run_id, token, fence,
                                    message_id, str(base), *texts)

            assert (await delta(0, "one", " two"))[1] == 2
            assert (await delta(0, "one", " two"))[1] == 2  # sent again: nothing new
            assert (await delta(1, " two", " three"))[1] == 3  # half of it was stored
            finish = [backend.functions.finish, tid, run_id, run_id, token, fence, message_id,
                      "completed", "eos", "{}", "", "3", " four"]
            ended = await backend.call(*finish)
            assert ended == await backend.call(*finish)
            events = await collect(sync, tid, run_id)
            assert [e.data["text"] for e in events if e.type == "message.delta"] == [
                "one", " two", " three", " four"]
            thread = await sync.sync(tid, None, 0)
            assert message(thread, message_id).content == "one two three four"

    asyncio.run(main())
