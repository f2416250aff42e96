"""A turn of a synced thread, without HTTP: start it, check the caps, generate its run.

Owns the turn's core, what the gateway's sync routes (:mod:`edgebundle.gateway.sync_api`)
and chat completions with ``thread_id`` (:mod:`edgebundle.gateway.thread_completions`) share,
and what any other front end (the terminal chat, offline replication) can call as it is:
:func:`start_turn` (refuse a turn the caps leave no room for, start it idempotently,
generate it here), :func:`check_room` and its parts, :func:`prompt_messages` (the thread
as the model sees it) and :class:`RunGenerator`. It depends on the sync core
(:mod:`edgebundle.sync`) and the chat (:mod:`edgebundle.completion`), never on the gateway;
what it refuses it raises as the project's errors (:mod:`edgebundle.errors`), which the
gateway maps to HTTP statuses at its boundary.

The device that starts a run also generates it (:class:`RunGenerator`): in a task of
its own, not tied to the request that started it, because other devices may be watching
the run and a client whose connection drops rejoins it through its events. The task
waits for the run's turn (queued runs wait), renders the prompt from the synced thread
on this device (every device renders the same messages with the same template: the
thread up to and including the run's input, see :mod:`edgebundle.sync.runs`) and
streams the engine's text into the run. A run cancelled or interrupted elsewhere
makes the next write fail (LeaseLostError); the engine request is then stopped.

The request that started a run here may follow it through a :class:`RunTap` instead of
the run's stream: the text as the engine gives it, before Redis has acknowledged it,
then the run's end if this device wrote it. A reader of the stream gets the same text
a round trip to Redis and back later, which on a busy device (the guest decoding on
every core) is milliseconds of time to first token.

When the run cannot go on, it ends ``incomplete`` (its text kept, the next turn
builds on it) rather than waiting for its lease to run out:

- the guest died (or the engine broke off) mid-reply: the text so far is written and
  the run interrupted (cause ``engine_error``); the supervisor restarts the guest.
- Redis went away mid-run: the lease rides it out (:mod:`edgebundle.sync.lock`), so
  a restart of a few seconds changes nothing. Once the lease is over the engine
  request is stopped and the run ended with the text Redis had acknowledged, retried
  with backoff until Redis answers; usually it was ended meanwhile (lease expired) by
  whoever read it first. If Redis stays away longer than two leases the device gives
  up; the next reader or run then ends it, as for a device that died.

A turn is idempotent by its input id (or an idempotency key, :func:`idempotent_input_id`):
a retry gets the run it started (see :func:`start_turn`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import Counter
from contextlib import aclosing
from dataclasses import dataclass, replace

from redis.exceptions import RedisError as RedisPyError

from edgebundle.completion import ChatParams, ChatService, Finished, TextDelta, Usage
from edgebundle.context_window import check_policy
from edgebundle.errors import (
    EdgebundleError,
    LeaseLostError,
    MessageTooLargeError,
    QueueFullError,
    RedisAccessError,
    ThreadFullError,
    TooManyRunsError,
    UsageError,
)
from edgebundle.limits import RETRY_AFTER, Limits, Slots
from edgebundle.sync.lock import RunLease
from edgebundle.sync.models import Run, SyncState, ThreadMessage
from edgebundle.sync.runs import RunTicket
from edgebundle.sync.service import RunEvent, ThreadSize, ThreadSync
from edgebundle.tasks import cancel_and_wait
from edgebundle.templates import Message as PromptMessage

log = logging.getLogger(__name__)

# The chat's finish reasons in the run's words: a stop string ends the turn like eos.
_RUN_REASONS = {"eos": "eos", "stop": "eos", "length": "length", "context_full": "context_full"}
# In a run's error when its prompt does not fit the model's context (a failed run
# carries only its message; chat completions answer that one with a 400).
TOO_LONG = "more than the model's context allows"
OUTAGE_RETRY = (0.2, 2.0)  # s: first and longest wait between attempts to end a run


@dataclass(frozen=True)
class RunRequest:
    """A turn as asked: who, from which sync point (``epoch`` None: a client new to the
    thread; ``CURRENT_EPOCH``: the thread as it is now, see :mod:`edgebundle.sync.runs`),
    the input, the queue policy, the sampling, and whether the asker follows it as a
    stream."""

    device_id: str
    epoch: str | None
    since: int
    content: str
    input_id: str | None
    multitask: str
    params: ChatParams
    stream: bool


def idempotent_input_id(input_id: str | None, idempotency_key: str | None) -> str | None:
    """The turn's input id: the one given, else one derived from an ``Idempotency-Key``
    header (the same key names the same turn of a thread), else None (a new one)."""
    if input_id is not None or idempotency_key is None:
        return input_id
    if not 1 <= len(idempotency_key) <= 255 or not idempotency_key.isprintable() \
            or not idempotency_key.isascii():
        raise UsageError("the Idempotency-Key header must be 1-255 printable ASCII characters")
    return "idem-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:40]



def prompt_messages(messages: tuple[ThreadMessage, ...], run: Run) -> list[PromptMessage]:
    """The thread as the model sees it for ``run``: the visible messages by position up
    to and including the run's input, minus the reply being written and replies stopped
    before any text (the person saw nothing of them).

    Later messages (inputs of runs queued behind this one, messages pushed after it
    started) are not part of this turn. UsageError if the input was deleted meanwhile.
    """
    by_id = {m.id: m for m in messages}
    given = by_id.get(run.input_message_id or "")
    if given is None or given.deleted:
        raise UsageError(f"its input message {run.input_message_id} was deleted before the "
                         "run's turn came")
    visible = [m for m in messages if not m.deleted and m.id != run.message_id
               and m.position <= given.position and (m.content or m.role != "assistant")]
    visible.sort(key=lambda m: m.position)
    return [PromptMessage(m.role, m.content) for m in visible]


class RunTap:
    """A run generated on this device, as the request that started it follows it: its
    text pieces the moment the engine gives them, then one end: the run's terminal event
    (``run.completed``) if this device ended it so, else None (it ended otherwise or
    elsewhere: the run's stream says how)."""

    def __init__(self) -> None:
        self._items: asyncio.Queue[str | RunEvent | None] = asyncio.Queue()
        self._closed = False

    def text(self, piece: str) -> None:
        if not self._closed:
            self._items.put_nowait(piece)

    def close(self, end: RunEvent | None = None) -> None:
        """The run is over here; idempotent (the first end counts)."""
        if not self._closed:
            self._closed = True
            self._items.put_nowait(end)

    async def next(self) -> str | RunEvent | None:
        """The next text piece, or the end (RunEvent or None), after which nothing comes."""
        return await self._items.get()


class RunGenerator:
    """Generates this device's runs in background tasks (see the module docstring)."""

    def __init__(self, sync: ThreadSync, chat: ChatService,
                 context_policy: str = "window", limits: Limits | None = None) -> None:
        self.sync = sync
        self.chat = chat
        self.limits = limits or Limits()
        # Requests that start or follow a turn (edgebundle.limits: max_runs).
        self.turns = Slots(self.limits.max_runs, self.limits.max_queued_runs + 1)
        # "window": a run's prompt leaves out the oldest messages that do not fit the
        # context (edgebundle.context_window); "fail": the whole thread or prompt_too_long.
        self.context_policy = check_policy(context_policy)
        self._tasks: dict[str, asyncio.Task[None]] = {}  # by run id
        self.ended: Counter[str] = Counter()  # runs generated here, by final status (metrics)
        self.windowed_runs = 0  # completed runs whose prompt left messages out (metrics)
        self.dropped_messages = 0  # the messages they left out, in all (metrics)

    @property
    def running(self) -> int:
        """Runs generating here, or waiting for their turn to."""
        return len(self._tasks)

    def start(self, ticket: RunTicket, params: ChatParams, *, tap: bool = False
              ) -> RunTap | None:
        """Generate the ticket's run here, unless this device already is; with ``tap``
        a :class:`RunTap` of it for the caller (None if it was generating already).

        A ticket that holds the thread (a retry that took over a start whose answer
        seemed lost, :mod:`edgebundle.sync.runs`) replaces the generation this device
        may have going for the run: that one's lease is gone, its writes would fail."""
        run_id = ticket.run.id
        running = self._tasks.get(run_id)
        if running is not None:
            if ticket.holding is None:
                return None
            running.cancel()
        tapped = RunTap() if tap else None
        task = asyncio.get_running_loop().create_task(self._generate(ticket, params, tapped))
        self._tasks[run_id] = task
        task.add_done_callback(lambda done: self._forget(run_id, done))
        return tapped

    def _forget(self, run_id: str, done: asyncio.Task[None]) -> None:
        if self._tasks.get(run_id) is done:  # not the generation that replaced it
            del self._tasks[run_id]

    async def close(self) -> None:
        """Stop every run generating here (each ends failed, its text kept)."""
        await cancel_and_wait(self._tasks.values())

    async def _generate(self, ticket: RunTicket, params: ChatParams, tap: RunTap | None
                        ) -> None:
        thread_id, run_id = ticket.run.thread_id, ticket.run.id
        try:
            await self._hold_and_write(ticket, params, tap)
            self.ended[(await self.sync.get_run(thread_id, run_id)).status] += 1
        except (EdgebundleError, RedisPyError, OSError) as exc:
            # Nobody awaits this task: say it in the log. Redis unreachable: the run's
            # lease runs out and the next acquire (or a reader) ends it as incomplete.
            log.warning("run %s of thread %s: %s", run_id, thread_id, exc)
        finally:
            if tap is not None:
                tap.close()

    async def _hold_and_write(self, ticket: RunTicket, params: ChatParams,
                              tap: RunTap | None) -> None:
        try:
            lease = await self._acquire(ticket)
        except LeaseLostError:
            return  # cancelled before its turn came
        async with lease:
            try:
                await self._write(lease, params, tap)
            except LeaseLostError:
                pass  # cancelled or interrupted elsewhere: the engine request was stopped
            except (RedisAccessError, RedisPyError, OSError) as exc:
                # Leaving _write stopped the engine request; Redis must hear the end.
                await self._end_after_outage(lease, exc)
            except EdgebundleError as exc:
                with contextlib.suppress(LeaseLostError):
                    await lease.fail(str(exc))

    async def _acquire(self, ticket: RunTicket) -> RunLease:
        """Wait for the run's turn; through a Redis outage too (a queued run whose device
        stopped waiting would keep its place in line until someone ended it)."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # from the first failure: waiting in line is no outage
        delay, longest = OUTAGE_RETRY
        while True:
            try:
                return await self.sync.acquire(ticket)
            except RedisAccessError as exc:
                if deadline is None:
                    deadline = loop.time() + 2 * self.sync.settings.lease_ms / 1000
                if loop.time() + delay > deadline:
                    raise
                log.warning("run %s of thread %s: waiting for its turn: %s; retrying",
                            ticket.run.id, ticket.run.thread_id, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)

    async def _end_after_outage(self, lease: RunLease, error: Exception) -> None:
        """End a run whose writes failed as incomplete, once Redis answers again."""
        thread_id, run_id = lease.run.thread_id, lease.run.id
        log.warning("run %s of thread %s: Redis is unavailable (%s); its generation was "
                    "stopped and it ends as incomplete when Redis is back", run_id, thread_id,
                    error)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * self.sync.settings.lease_ms / 1000
        delay, longest = OUTAGE_RETRY
        while True:
            try:
                await lease.interrupt("redis_unavailable", keep_pending=False)
                log.warning("run %s of thread %s: ended as incomplete after the Redis outage",
                            run_id, thread_id)
                return
            except LeaseLostError:
                # Its lease ran out meanwhile (or it was cancelled): reading the run ends
                # it now if nobody did yet, instead of at the next reader or run.
                with contextlib.suppress(EdgebundleError):
                    await self.sync.get_run(thread_id, run_id)
                return
            except (RedisPyError, OSError) as exc:
                if loop.time() + delay > deadline:
                    log.warning("run %s of thread %s: Redis still unavailable (%s); the run "
                                "ends when its lease runs out", run_id, thread_id, exc)
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)

    async def _write(self, lease: RunLease, params: ChatParams, tap: RunTap | None) -> None:
        try:
            messages = prompt_messages(lease.thread.messages, lease.run)
            events = self.chat.complete(messages, params,
                                        fit_context=self.context_policy == "window")
            first = await anext(events)
        except UsageError as exc:
            await lease.fail(f"the thread cannot be rendered as a prompt: {exc}")
            return
        finished: Finished | None = None
        async with aclosing(events):  # leaving early stops the engine request
            event: TextDelta | Finished | None = first
            while event is not None:
                if isinstance(event, Finished):
                    finished = event
                    break
                await lease.delta(event.text)
                if tap is not None:
                    tap.text(event.text)
                if lease.lost:
                    raise LeaseLostError("the run ended elsewhere")
                event = await anext(events, None)
        if finished is not None and finished.reason == "error":
            # The guest died (it is restarted) or broke off mid-reply: what it wrote so far
            # stays, and the next turn builds on it like on a stopped reply.
            log.warning("run %s of thread %s: the engine broke off: %s", lease.run.id,
                        lease.run.thread_id, finished.detail or "no detail")
            await lease.interrupt("engine_error")
            return
        if finished is None or finished.reason not in _RUN_REASONS:
            reason = finished.reason if finished else "no result"
            detail = finished.detail if finished and finished.detail else reason
            if finished is not None and finished.reason == "prompt_too_long":
                detail = too_long_detail(finished.usage)
            await lease.fail(detail)
            return
        dropped = finished.usage.dropped_messages or 0
        usage = {"input_tokens": finished.usage.input_tokens,
                 "output_tokens": finished.usage.output_tokens,
                 "dropped_messages": dropped}
        reason = _RUN_REASONS[finished.reason]
        await lease.finish(reason, usage)
        if tap is not None:  # as the stream has it, without a round trip to read it
            tap.close(RunEvent("", "run.completed", {"reason": reason, "usage": usage}))
        if dropped:
            self.windowed_runs += 1
            self.dropped_messages += dropped


def too_long_detail(usage: Usage) -> str:
    """A failed run's error when its prompt does not fit the context (holds TOO_LONG)."""
    if usage.dropped_messages is None:  # the whole thread was the prompt
        return (f"the thread is {usage.input_tokens} tokens, {TOO_LONG}: delete older "
                "messages of the thread or start a new one")
    # Windowed: every older message was left out, and the rest still does not fit.
    return (f"its input is {usage.input_tokens} tokens with the system prompt, {TOO_LONG} "
            "even without the thread's older messages: shorten the message")


@dataclass(frozen=True)
class StartedTurn:
    """A turn as started: its ticket, the sync object its stream opens with (the whole
    thread for a client without an epoch), and the run's tap if one was asked for and
    this request started the run."""

    ticket: RunTicket
    opening: SyncState
    tap: RunTap | None = None


async def start_turn(runner: RunGenerator, thread_id: str, request: RunRequest, *,
                     tap: bool = False) -> StartedTurn:
    """Start a turn on the thread and generate it on this device (with ``tap``, to be
    followed through a :class:`RunTap` when this request is what started it).

    A retry (the input id already started a run, ``ticket.again``) starts nothing new.
    If that run is still waiting for its turn this device waits for it too: the device
    that started it may have lost it (its Redis call failed after Redis had taken it),
    and whichever device takes the turn first generates it, once (the lock decides).

    What ``POST /v1/threads/{id}/runs`` and chat completions with ``thread_id`` share;
    raises the errors of :mod:`edgebundle.errors` (LimitError, SyncError …), nothing HTTP.
    """
    sync = runner.sync
    await check_room(runner, thread_id, request.content, request.input_id)
    epoch, since = request.epoch, request.since
    if epoch is None:  # a client new to the thread (curl): it gets the whole history
        epoch, since = (await sync.sync(thread_id, None, 0)).epoch, 0
    ticket = await sync.start_run(
        thread_id, request.device_id, epoch=epoch, since=since,
        content=request.content, input_id=request.input_id, multitask=request.multitask,
        take=True,  # generated here next: a free thread is taken in the same round trip
    )
    tapped = None
    # A retry's ticket holds the thread when the start it repeats had only claimed it
    # (its answer lost, nobody generating): this device generates it from the start.
    fresh = not ticket.again or ticket.holding is not None
    if fresh or ticket.run.status == "queued":
        tapped = runner.start(ticket, request.params, tap=tap and fresh)
    opening = ticket.sync if request.epoch is not None else replace(ticket.sync, full=True)
    return StartedTurn(ticket, opening, tapped)


async def check_room(runner: RunGenerator, thread_id: str, content: str,
                     input_id: str | None = None) -> None:
    """Refuse a turn the caps leave no room for (edgebundle.limits): its input
    too large, this device at ``max_runs``, the thread full or its queue at
    ``max_queued_runs``; before anything is written. A retry of a turn that already
    started a run adds nothing: it gets its run whatever the caps say."""
    limits = runner.limits
    check_content(limits, content, "input.content")
    size = await runner.sync.size(thread_id, input_id)
    if size.started:
        return
    if runner.running >= limits.max_runs:
        raise TooManyRunsError(f"this device has {runner.running} turns going, its cap "
                               "(max_runs): try again in a few seconds", RETRY_AFTER)
    check_thread_room(limits, thread_id, size, 2)  # the input and the reply
    if size.queued_runs >= limits.max_queued_runs:
        raise QueueFullError(f"thread {thread_id} has {size.queued_runs} runs waiting in "
                             "line, its cap (max_queued_runs): try again when one has ended",
                             RETRY_AFTER)


def check_thread_room(limits: Limits, thread_id: str, size: ThreadSize, adding: int) -> None:
    """ThreadFullError (409 ``thread_full``) if ``adding`` more messages pass
    ``max_thread_messages``."""
    held = size.messages
    if adding and held + adding > limits.max_thread_messages:
        raise ThreadFullError(f"thread {thread_id} holds {held} messages, "
                              f"{limits.max_thread_messages} at most (max_thread_messages, "
                              "deleted ones included): start a new thread")


def check_content(limits: Limits, content: str, field: str) -> None:
    """MessageTooLargeError (413 ``message_too_large``) for content over
    ``max_message_bytes`` (UTF-8)."""
    size = len(content.encode("utf-8", "surrogatepass"))
    if size > limits.max_message_bytes:
        raise MessageTooLargeError(f"{field} is {size} bytes, more than "
                                   f"{limits.max_message_bytes} (max_message_bytes): shorten it")
