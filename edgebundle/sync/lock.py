"""Taking a thread for a run, and writing the run's output only while holding it.

One inference per thread. :func:`acquire` runs the acquire function: when the lock is
free (or reserved for this run) and the run is first in line, it sets the lock to a
random token with a lease (``SET … PX``), takes a fence from ``INCR`` and starts the
run, all in one step, and answers the whole thread as it took it (what the holder
renders its prompt from: no second read); a run that took its thread as it started
(:mod:`edgebundle.sync.runs`, ``take``) has all that in its ticket and makes no call.
Otherwise it waits with ``BLPOP`` on the run's own wake-up list: the function that
ends the run ahead pushes a token there the moment it ends (no sleep-polling). The wait
is bounded by what is left of the holder's lease, so a holder that died is noticed
when its lease runs out; the acquire function then ends that run as incomplete (its
text so far kept) and goes on.

:class:`RunLease` is the holder's side: a watchdog task renews the lease every
``renew_ms``; text is batched (``delta_batch_ms`` / ``delta_batch_chars``) into
``message.delta`` events, except the run's first text, written at once (behind the
caller) so a reader's first token waits for no batch; with batching off each piece
is its own event, written behind the caller: pieces that arrive while a write is in
flight go out together in the next function call (one round trip, many events) and
``flush()`` waits for them.
``finish`` / ``fail`` / ``interrupt`` end the run and release the lock by
compare-and-delete in the same function. Every one of those writes is checked in Lua
against the token and the fence, so a holder whose lease ran out (stalled,
partitioned) or whose run was cancelled or interrupted writes nothing: it gets
:class:`LeaseLostError`.

When Redis goes away (a restart, a network cut) the holder rides it out for as long
as its lease lasts: every fenced write (a text batch, the renewal, the end) is sent
again until Redis answers or the lease would have run out. That is safe because each
of them is idempotent: a text batch carries the seq it starts after (the function skips
what it already stored), and the end of a run is recognised by its fence. Redis
restarted from its append-only file still has the lock with its absolute expiry, so
a run interrupted by a restart of a few seconds goes on and completes as if nothing
happened; readers rejoin from their last event id. Only when the lease is over does
a write raise the driver's error (kept for the caller's next call if it was a
background write); the holder then ends the run with :meth:`RunLease.interrupt` once
Redis answers again (or someone else already ended it, lease expired). The text it
ends with is what Redis had stored, never pieces written after a lost one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

from redis.exceptions import RedisError as _RedisPyError

from edgebundle import keys
from edgebundle.errors import LeaseLostError, RedisAccessError, ThreadBusyError, UsageError
from edgebundle.sync.backend import (
    BLOCK_SLICE,
    UNAVAILABLE,
    Backend,
    lease_lost,
    parse_message,
    parse_run,
    parse_state,
    raise_for,
)
from edgebundle.sync.lua import Function
from edgebundle.sync.models import Run, SyncState, ThreadMessage, dumps
from edgebundle.sync.runs import RunTicket

log = logging.getLogger(__name__)
T = TypeVar("T")

_MIN_WAIT = 0.005  # s; BLPOP's timeout 0 would mean forever
_MAX_PENDING = 512  # unwritten pieces before delta() waits for the writer (backpressure)
_OUTAGE_RETRY = (0.1, 1.0)  # s: first and longest wait between sends of a fenced write


async def acquire(backend: Backend, ticket: RunTicket, timeout: float | None = None) -> RunLease:
    """Wait until ``ticket``'s run holds its thread; the lease (watchdog running).

    With a ``timeout`` (seconds) the run is cancelled and :class:`ThreadBusyError`
    raised if its turn has not come by then. A run that was cancelled (or failed)
    before it could start raises :class:`LeaseLostError`.
    """
    run = ticket.run
    thread_id = run.thread_id
    token = ticket.token
    if ticket.holding is not None:  # it took the thread as it started
        held = ticket.holding
        return RunLease(backend, held.run, held.message, held.fence, token, held.thread)
    deadline = None if timeout is None else time.monotonic() + timeout
    wakeup = keys.run_wakeup(thread_id, run.id)
    while True:
        reply = await backend.call(backend.functions.acquire, thread_id, run.id, run.id, token)
        raise_for(reply, thread_id, run.id)
        if reply[0] == "ok":
            return RunLease(backend, parse_run(reply[1]), parse_message(reply[2]),
                            int(reply[3]), token, parse_state(thread_id, reply[4:]))
        if reply[0] == "ended":
            ended = parse_run(reply[1])
            raise LeaseLostError(
                f"run {run.id} can no longer start: it is {ended.status} "
                f"({ended.reason or 'no reason'}); start a new run")
        wait = max(int(reply[1]) / 1000, _MIN_WAIT)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                await backend.call(backend.functions.cancel, thread_id, run.id, run.id,
                                   run.device_id or "acquire", "0", "")
                raise ThreadBusyError(
                    f"run {run.id} did not get thread {thread_id} within {timeout} s and was "
                    "withdrawn: retry later", active_run=None,
                    retry_after=backend.settings.retry_after)
            wait = max(min(wait, left), _MIN_WAIT)
        await backend.blocking.blpop([wakeup], timeout=min(wait, BLOCK_SLICE))


class RunLease:
    """This process holds the thread for ``run``: write its output, then finish or fail.

    Use it as an async context manager: leaving the block without finish/fail fails
    the run (with the exception's text, if any) and always stops the watchdog.
    """

    def __init__(self, backend: Backend, run: Run, message: ThreadMessage, fence: int,
                 token: str, thread: SyncState) -> None:
        self.run = run
        self.fence = fence
        self.message = message  # the assistant message, as created (in_progress)
        # The whole thread the moment the run took it, read on the store the run lives
        # on (a device's router may still point elsewhere while its link heals): what
        # the prompt is rendered from.
        self.thread = thread
        self._backend = backend
        self._token = token
        self._buffer: list[str] = []
        self._buffered = 0
        self._seq = 0  # the seq of the last text batch Redis acknowledged
        self._flushing = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._write_error: _RedisPyError | OSError | None = None  # from the write-behind
        self._failure: LeaseLostError | None = None  # from a background flush or renewal
        self._ended = False
        # Until when (loop time) Redis keeps our lock at the latest: writes are retried
        # through an outage until then, never after.
        self._lease_until = asyncio.get_running_loop().time() + backend.settings.lease_ms / 1000
        self._watchdog = asyncio.create_task(self._renew_forever())

    @property
    def lost(self) -> bool:
        """True once a write or renewal found the lease gone (stop generating)."""
        return self._failure is not None

    async def delta(self, text: str) -> None:
        """Add generated text; written by a background writer, fenced in Lua."""
        self._check_open()
        if not text:
            return
        self._buffer.append(text)
        self._buffered += len(text)
        settings = self._backend.settings
        if self._unbatched:
            # Write-behind: the writer sends what piled up meanwhile in one call;
            # flush() is the barrier for "everything so far is stored".
            if self._writer is None or self._writer.done():
                self._writer = asyncio.create_task(self._write_pending())
            if len(self._buffer) >= _MAX_PENDING:
                await asyncio.shield(self._writer)
        elif self._writer is None:
            # The run's first text is never held for a batch: it is the one a person
            # waits for (time to first token); batching starts with the second.
            self._writer = asyncio.create_task(self._write_pending(once=True))
        elif self._buffered >= settings.delta_batch_chars:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.create_task(self._flush_later(settings.delta_batch_ms / 1000))

    async def flush(self) -> None:
        """Write buffered text now, in one function call: the barrier for "all of it is
        stored"; raises what a write behind the caller met (e.g. LeaseLostError)."""
        self._raise_pending()
        async with self._flushing:
            texts = self._take_buffer()
            if not texts:
                return
            reply = await self._fenced(self._backend.functions.delta, self.message.id,
                                       str(self._seq), *texts)
            self._raise_if_lost(reply)
            self._seq = int(reply[1])

    @property
    def _unbatched(self) -> bool:
        return self._backend.settings.delta_batch_ms == 0

    def _take_buffer(self) -> list[str]:
        """The buffered pieces as event texts: each its own, or one batch."""
        pieces, self._buffer, self._buffered = self._buffer, [], 0
        if self._unbatched or not pieces:
            return pieces
        return ["".join(pieces)]

    async def _write_pending(self, *, once: bool = False) -> None:
        """Write behind the caller (what piled up, or with ``once`` one call's worth);
        what goes wrong is raised by the caller's next call."""
        try:
            while self._buffer:
                await self.flush()
                if once:
                    break
        except LeaseLostError:
            pass  # kept in _failure
        except (_RedisPyError, OSError) as exc:
            self._write_error = exc

    async def finish(self, reason: str, usage: Mapping[str, int]) -> Run:
        """The run completed: its message lands (new version); lock released, next woken."""
        if not isinstance(reason, str) or not reason:
            raise UsageError(f"finish needs a reason such as 'eos', not {reason!r}")
        return await self._end("completed", reason, dumps(dict(usage)), "")

    async def fail(self, error: str) -> Run:
        """The run failed: its text so far stays (incomplete); lock released, next woken."""
        return await self._end("failed", "error", "null", str(error))

    async def interrupt(self, cause: str, *, keep_pending: bool = True) -> Run:
        """End the run as incomplete, interrupted by ``cause`` (such as ``engine_error``
        or ``redis_unavailable``): its message keeps the text written so far, plus the
        pieces not yet written when ``keep_pending`` (pass False after a failed write:
        text written after a lost piece would leave a hole). The lock is released and
        the next run woken. After a Redis error nothing was ended: call it again.
        """
        if self._failure is not None:
            raise self._failure
        if self._ended:
            raise UsageError(f"run {self.run.id} already ended: start a new run")
        self._write_error = None  # the reason we are here; the end is what matters now
        async with self._flushing:
            if not keep_pending:
                self._buffer, self._buffered = [], 0
            await self._stop_watchdog()
            # Peeked, not taken: if this call fails, the next attempt sends them again.
            pieces = self._buffer if self._unbatched or not self._buffer \
                else ["".join(self._buffer)]
            reply = await self._fenced(self._backend.functions.finish, self.message.id,
                                       "incomplete", "interrupted", "null", cause,
                                       str(self._seq), *pieces)
            self._buffer, self._buffered = [], 0
            self._raise_if_lost(reply)
            self._ended = True
        self.run = parse_run(reply[1])
        return self.run

    async def _end(self, outcome: str, reason: str, usage: str, error: str) -> Run:
        self._check_open()
        async with self._flushing:
            texts = self._take_buffer()
            self._ended = True
            await self._stop_watchdog()
            reply = await self._fenced(self._backend.functions.finish, self.message.id,
                                       outcome, reason, usage, error, str(self._seq), *texts)
            self._raise_if_lost(reply)
        self.run = parse_run(reply[1])
        return self.run

    async def _call(self, function: Function, *args: str) -> list[Any]:
        return await self._backend.call(function, self.run.thread_id, self.run.id, self.run.id,
                                        self._token, str(self.fence), *args)

    async def _fenced(self, function: Function, *args: str) -> list[Any]:
        """One fenced write, sent again through a Redis outage while the lease lasts
        (the functions make a repeat harmless); then the driver's error is raised."""
        return await self.ride_out(lambda: self._call(function, *args))

    async def ride_out(self, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()``, made again through a Redis outage for as long as this lease
        lasts (the holder keeps its run); then the error is raised. Only for calls whose
        repeat is harmless: reads, and the fenced functions."""
        loop = asyncio.get_running_loop()
        delay, longest = _OUTAGE_RETRY
        while True:
            try:
                return await call()
            except (*UNAVAILABLE, RedisAccessError) as exc:
                left = self._lease_until - loop.time()
                if left <= delay:
                    raise
                if delay == _OUTAGE_RETRY[0]:
                    log.warning("run %s: Redis is unavailable (%s); holding the run, retrying "
                                "for up to %.0f s (its lease)", self.run.id, exc, left)
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)

    def _raise_if_lost(self, reply: list[Any]) -> None:
        if self._note_if_lost(reply):
            assert self._failure is not None
            raise self._failure

    def _note_if_lost(self, reply: list[Any]) -> bool:
        if reply[0] != "lost":
            return False
        self._failure = lease_lost(self.run.thread_id, self.run.id)
        return True

    def _check_open(self) -> None:
        self._raise_pending()
        if self._ended:
            raise UsageError(f"run {self.run.id} already ended: start a new run")

    def _raise_pending(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._write_error is not None:
            error, self._write_error = self._write_error, None
            raise error

    async def _flush_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._timer = None
        try:
            await self.flush()
        except LeaseLostError:
            pass  # kept in _failure, raised by the next call
        except (_RedisPyError, OSError) as exc:
            self._write_error = exc  # raised by the caller's next call

    async def _renew_forever(self) -> None:
        settings = self._backend.settings
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(settings.renew_ms / 1000)
            sent = loop.time()
            try:
                reply = await self._fenced(self._backend.functions.renew)
            except (_RedisPyError, OSError) as exc:
                # The lease is over: the holder's next write says so.
                log.warning("run %s: its lease could not be renewed (%s)", self.run.id, exc)
                self._write_error = exc
                return
            if self._note_if_lost(reply):
                return
            self._lease_until = sent + settings.lease_ms / 1000

    async def _stop_watchdog(self) -> None:
        self._watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watchdog

    async def close(self) -> None:
        """Stop the watchdog (and a pending flush timer or writer) without writing more."""
        await self._stop_watchdog()
        for task in (self._timer, self._writer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, LeaseLostError):
                    await task
        self._timer = self._writer = None

    async def __aenter__(self) -> RunLease:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if not self._ended and self._failure is None:
                detail = f"{type(exc).__name__}: {exc}" if exc else "the run ended without a result"
                with contextlib.suppress(LeaseLostError):
                    await self.fail(detail)
        finally:
            await self.close()
