"""Threads: create, diff by (epoch, version), and pushes of client changes.

A thread is a random epoch plus a version counter (``HINCRBY``, never a device
clock). Every change stamps the message with the new version and indexes it in the
changes zset, so the diff since V is the messages scored above V; deletes are
tombstones so they diff too. A client that has another epoch, or a version the
server cannot diff from, gets the full state instead: never a silent gap.

Pushes carry per-device mutation ids, Replicache's way: a device numbers its
mutations of a thread 1, 2, 3 … (whole numbers up to 2^53 - 1, what a JSON number
holds exactly). A mutation whose ``mid`` is not above the last one applied for that
device is a repeat and skipped, the next one is applied, and the last applied ``mid``
is stored in the same function as the change, so a retried push applies once. A push
that skips ahead is refused whole (:class:`~edgebundle.errors.MutationGapError`,
naming the expected id): a push that claims another device's id cannot push that
device's counter ahead and silence its later edits. Client edits win. The answer is
the server's diff since the client's version, from the same atomic step.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, NamedTuple

from edgebundle import keys
from edgebundle.errors import MutationGapError, UsageError
from edgebundle.sync.backend import Backend, new_id, parse_state, raise_for
from edgebundle.sync.models import MESSAGE_STATUSES, ROLES, SyncState, dumps

OPS = ("put", "delete")
MAX_MUTATION_ID = 2**53 - 1  # the largest whole number a JSON number (a double) holds exactly
# The highest position a client may give a message. The push script places a message
# at its position and the next new ones after it (floor + 1), in Lua numbers (doubles):
# far below 2**53 each + 1 still counts, where 1e300 + 1 == 1e300 would give every later
# message the same position (the thread's order flattened).
MAX_POSITION = 2**40


def new_epoch() -> str:
    return secrets.token_hex(8)


def check_since(since: int) -> int:
    if not isinstance(since, int) or isinstance(since, bool) or since < 0:
        raise UsageError(f"since must be a version (a whole number >= 0), not {since!r}")
    return since


class ThreadSize(NamedTuple):
    """What a thread holds: messages (tombstones too) and runs waiting in its queue;
    ``started``: the input id asked about already started a run (a retry adds nothing)."""

    messages: int
    queued_runs: int
    started: bool = False


class ThreadStore:
    """The static state of threads: meta, messages, the version index, mutation ids."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    async def create(self, thread_id: str | None = None) -> SyncState:
        """Create the thread, or join it if it exists; its full state either way."""
        thread_id = keys.check_id("thread", thread_id or new_id("thr"))
        reply = await self._backend.call(self._backend.functions.create, thread_id, None,
                                         new_epoch())
        return parse_state(thread_id, reply[1:])

    async def sync(self, thread_id: str, epoch: str | None, since: int) -> SyncState:
        """The diff since (epoch, since); the full state if it cannot be a diff."""
        keys.check_id("thread", thread_id)
        reply = await self._backend.call(self._backend.functions.sync, thread_id, None,
                                         epoch or "", check_since(since))
        raise_for(reply, thread_id)
        return parse_state(thread_id, reply[1:])

    async def size(self, thread_id: str, input_id: str | None = None) -> ThreadSize:
        """The thread's :class:`ThreadSize` (zeros for a thread that does not exist), in
        one round trip of O(1) reads (HLEN, LLEN, and HEXISTS for ``input_id``), no
        script."""
        keys.check_id("thread", thread_id)
        async with self._backend.redis.pipeline(transaction=False) as pipe:
            pipe.hlen(keys.messages(thread_id))
            pipe.llen(keys.queue(thread_id))
            if input_id is not None:
                pipe.hexists(keys.turn_inputs(thread_id), input_id)
            messages, queued, *started = await pipe.execute()
        return ThreadSize(int(messages), int(queued), bool(started and started[0]))

    async def watch(self, thread_id: str, epoch: str | None, since: int,
                    interval: float) -> AsyncIterator[SyncState]:
        """The diff since (epoch, since) now, then one diff each time the thread changes.

        Between diffs only meta's epoch, version and active run are read (one HMGET per
        ``interval``): a watcher costs Redis a hash read, not a function call, while nothing
        happens. Polling rather than a notification key keeps every write path as it
        is; at 4 reads a second per watcher it is far below what one Redis serves.
        ThreadNotFoundError when the thread is gone.
        """
        state = await self.sync(thread_id, epoch, since)
        yield state
        meta = keys.meta(thread_id)
        seen = [state.epoch, str(state.version), state.active_run.id if state.active_run else ""]
        while True:
            await asyncio.sleep(interval)
            now = await self._backend.redis.hmget(meta, ["epoch", "version", "active_run"])
            if now[0] is None:
                raise_for(["gone"], thread_id)
            if [now[0], now[1], now[2] or ""] == seen:
                continue
            state = await self.sync(thread_id, state.epoch, state.version)
            seen = [state.epoch, str(state.version),
                    state.active_run.id if state.active_run else ""]
            yield state

    async def push(self, thread_id: str, device_id: str, epoch: str, since: int,
                   mutations: Sequence[Mapping[str, Any]], *, reseed: bool = False) -> SyncState:
        """Apply the device's mutations once each; the server's diff since ``since``."""
        keys.check_id("thread", thread_id)
        keys.check_id("device", device_id)
        encoded = [dumps(check_mutation(m)) for m in mutations]
        reply = await self._backend.call(
            self._backend.functions.push, thread_id, None,
            device_id, epoch or "", check_since(since), "1" if reseed else "0", new_epoch(),
            *encoded,
        )
        if reply[0] == "gap":
            expected, sent = int(reply[1]), int(reply[2])
            raise MutationGapError(
                f"mutation {sent} of device {device_id} skips ahead: thread {thread_id} "
                f"expects mutation {expected} of it next (a device numbers its mutations "
                "of a thread 1, 2, 3 …): nothing of this push was written; send "
                f"{expected} first, or number the mutations on from {expected}",
                expected=expected)
        if reply[0] == "badmutation":
            raise UsageError(f"the push function refused mutation {_short(str(reply[1]))}: "
                             "mid must be a whole number from 1 to 2^53 - 1, op put or delete, "
                             "and message an object with an id")
        raise_for(reply, thread_id)
        return parse_state(thread_id, reply[1:])


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _shown(value: Any) -> str:
    """A value for an error message (a huge int's repr would be huge, or refused)."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"a {value.bit_length()}-bit number"
    return _short(repr(value))


def check_mutation(mutation: Mapping[str, Any]) -> dict[str, Any]:
    """The mutation as the push function expects it; UsageError saying what is wrong."""
    if not isinstance(mutation, Mapping):
        raise UsageError(f"a mutation must be an object, not {mutation!r}")
    mid, op, message = mutation.get("mid"), mutation.get("op"), mutation.get("message")
    if not isinstance(mid, int) or isinstance(mid, bool) or not 1 <= mid <= MAX_MUTATION_ID:
        raise UsageError(f"mutation mid must be a whole number from 1 to 2^53 - 1 "
                         f"({MAX_MUTATION_ID}), not {_shown(mid)}")
    if op not in OPS:
        raise UsageError(f"mutation {mid}: op must be 'put' or 'delete', not {op!r}")
    if not isinstance(message, Mapping):
        raise UsageError(f"mutation {mid}: message must be an object")
    clean: dict[str, Any] = {"id": keys.check_id("message", message.get("id", ""))}
    if op == "put":
        clean.update(_put_fields(mid, message))
    return {"mid": mid, "op": op, "message": clean}


def _put_fields(mid: int, message: Mapping[str, Any]) -> dict[str, Any]:
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise UsageError(f"mutation {mid}: role must be one of {', '.join(ROLES)}, not {role!r}")
    if not isinstance(content, str):
        raise UsageError(f"mutation {mid}: content must be a string")
    fields: dict[str, Any] = {"role": role, "content": content}
    status = message.get("status")
    if status is not None:
        if status not in MESSAGE_STATUSES:
            raise UsageError(f"mutation {mid}: status must be one of "
                             f"{', '.join(MESSAGE_STATUSES)}, not {status!r}")
        fields["status"] = status
    for name, highest in (("position", MAX_POSITION), ("created_at", math.inf)):
        value = message.get(name)
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(
                value) or not 0 <= value <= highest:
            most = "" if highest == math.inf else f" and <= {highest}"
            raise UsageError(f"mutation {mid}: {name} must be a number >= 0{most}, "
                             f"not {value!r}")
        fields[name] = value
    run_id = message.get("run_id")
    if run_id is not None:
        fields["run_id"] = keys.check_id("run", run_id)
    return fields
