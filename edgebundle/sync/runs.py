"""Runs: one inference on a thread, queued, started, cancelled, looked up.

Starting a run puts the user's input message in the thread (a new version) and the
run in the thread's FIFO queue, in one function that also answers the client's diff
(so a device's turn opens with whatever other devices did). Who generates is then
decided by :mod:`edgebundle.sync.lock`.

Queued turns keep the conversation's shape. The input takes the next free position
and the one right after it is kept for the reply (the run's hash holds it; acquire
puts the assistant message there), so however requests interleave the thread reads
Q1 A1 Q2 A2 Q3 A3 on every device. A run's prompt is the thread up to and including
its input (:func:`edgebundle.turns.prompt_messages`): earlier runs' replies
are in it (FIFO: they ended before it started), inputs queued behind it are not. A
message pushed while runs wait takes the next free position, after all of them: it
is in the prompts of turns asked later and in none of theirs. An edit or delete of an
earlier message is seen by every run that has not started yet (they render when
their turn comes) and interrupts the generating one, as any edit does.

Busy-thread policies:

- ``enqueue`` (default): wait in line; the run starts the moment the one before
  it ends (woken through Redis, no polling).
- ``reject``: :class:`ThreadBusyError` with ``retry_after`` (3 s) while a run is
  active or waiting.
- ``interrupt``: the active run is ended (incomplete, its text so far kept) and
  this run goes first.

A caller that renders the prompt from the thread itself rather than from a copy of its
own (chat completions with ``thread_id``) starts its run with ``CURRENT_EPOCH``: on the
thread as it is now, whatever its epoch, with no sync beforehand (one round trip less
before the first token); its ticket's diff is then the run's own writes.

A caller that generates the run next starts it with ``take``: a thread that is free
with no one in line is taken in the same step (``RunTicket.holding``; acquire then
needs no call). Until the holder's first write the run is only claimed: a retry of the
start (same input id, with take) whose answer was lost takes it over with a new fence,
so no turn is stranded with a lock nobody holds; the first starter, if it lives after
all, finds its lease gone at its first write.

Turns are idempotent by their input id: starting a run whose input id already started
one (a retry after the answer was lost, on any device) starts nothing and returns
that run's ticket (``again``), whatever became of it. An input id that names a message
which is no turn's input is refused.

Cancelling works from any device: a generating run keeps exactly ``content_seen``
(what the user saw is what the model will see next), or else the text so far.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from edgebundle import keys
from edgebundle.errors import InputTakenError, ThreadBusyError, UsageError
from edgebundle.sync.backend import (
    Backend,
    new_id,
    parse_message,
    parse_run,
    parse_state,
    raise_for,
)
from edgebundle.sync.models import MULTITASK_POLICIES, Run, SyncState, ThreadMessage, dumps
from edgebundle.sync.store import check_since

# start_run's epoch for "the thread as it is now" (no epoch check, no diff of others'
# changes): never a real epoch, and a client's empty epoch means "none" to the HTTP API.
CURRENT_EPOCH = ""
_SYNC_PARTS = 6  # a sync object's parts in a function's answer (backend.parse_state)


@dataclass(frozen=True)
class Holding:
    """What a run gets when it takes its thread: the run (in_progress), its assistant
    message (created in_progress), the fence of its writes, and the whole thread as it
    took it."""

    run: Run
    message: ThreadMessage
    fence: int
    thread: SyncState


@dataclass(frozen=True)
class RunTicket:
    """A started (queued) run and the client's diff at that moment; give it to acquire.

    ``again``: the run was started by an earlier request with the same input id (this
    one is a retry); ``run`` is that run as it is now. ``token``: the lock token this
    ticket's holder takes the thread with, the same on every attempt, so an acquire
    sent again after Redis took it but its answer was lost finds the run already its.
    ``holding``: the run took the thread as it started (``take``: it was free and no one
    in line), so acquire answers at once, without Redis.
    """

    run: Run
    sync: SyncState
    again: bool = False
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    holding: Holding | None = None


class RunStore:
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    async def start(self, thread_id: str, device_id: str, *, epoch: str, since: int,
                    content: str, input_id: str | None = None,
                    multitask: str = "enqueue", take: bool = False) -> RunTicket:
        keys.check_id("thread", thread_id)
        keys.check_id("device", device_id)
        if multitask not in MULTITASK_POLICIES:
            raise UsageError(f"multitask must be one of {', '.join(MULTITASK_POLICIES)}, "
                             f"not {multitask!r}")
        if not isinstance(content, str):
            raise UsageError("the run's input content must be a string")
        now = time.time()
        run = Run(id=new_id("run"), thread_id=thread_id, device_id=device_id,
                  message_id=new_id("msg"),
                  input_message_id=keys.check_id("message", input_id or new_id("msg")),
                  created_at=now)
        message = ThreadMessage(id=run.input_message_id or "", role="user", content=content,
                          created_at=now).to_json()
        message["position"] = None  # the next free position, given by the function
        token = secrets.token_hex(16)
        reply = await self._backend.call(
            self._backend.functions.start_run, thread_id, run.id,
            epoch or "", check_since(since), multitask, dumps(run.to_json()), dumps(message),
            token if take else "",
        )
        raise_for(reply, thread_id, run.id)
        if reply[0] == "duplicate":
            raise InputTakenError(f"message {reply[1]} already exists in thread {thread_id} "
                                  "and started no run: give the run's input a new id")
        if reply[0] == "busy":
            blocker = parse_run(reply[1]) if reply[1] else None
            retry = self._backend.settings.retry_after
            raise ThreadBusyError(
                f"thread {thread_id} is busy with run {blocker.id if blocker else '?'}: "
                f"retry after {retry} s, or start the run with multitask=enqueue",
                active_run=blocker, retry_after=retry)
        holding = None
        if len(reply) > 2 + _SYNC_PARTS:  # it took the thread: acquire's answer follows
            rest = reply[2 + _SYNC_PARTS:]
            holding = Holding(parse_run(rest[0]), parse_message(rest[1]), int(rest[2]),
                              parse_state(thread_id, rest[3:]))
        return RunTicket(run=parse_run(reply[1]),
                         sync=parse_state(thread_id, reply[2:2 + _SYNC_PARTS]),
                         again=reply[0] == "again", token=token, holding=holding)

    async def cancel(self, thread_id: str, run_id: str, device_id: str,
                     content_seen: str | None = None) -> Run:
        keys.check_id("thread", thread_id)
        keys.check_id("device", device_id)
        if content_seen is not None and not isinstance(content_seen, str):
            raise UsageError("content_seen must be a string")
        reply = await self._backend.call(
            self._backend.functions.cancel, thread_id, keys.check_id("run", run_id),
            run_id, device_id, "0" if content_seen is None else "1", content_seen or "",
        )
        raise_for(reply, thread_id, run_id)
        return parse_run(reply[1])

    async def get(self, thread_id: str, run_id: str) -> Run:
        keys.check_id("thread", thread_id)
        reply = await self._backend.call(self._backend.functions.read_run, thread_id,
                                         keys.check_id("run", run_id), run_id)
        raise_for(reply, thread_id, run_id)
        return parse_run(reply[1])
