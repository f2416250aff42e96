"""The sync core's one entry point: threads, pushes, runs and their events over Redis.

The gateway (and the tests) use :class:`SyncService`; it works the same on a
standalone Redis and on Redis Cluster (every key of a thread shares its hash tag).
The pieces behind it, one per noun: :mod:`~edgebundle.sync.store` (threads, diffs,
pushes), :mod:`~edgebundle.sync.runs` (start, cancel, look up),
:mod:`~edgebundle.sync.lock` (taking the thread, the lease, fenced writes),
:mod:`~edgebundle.sync.events` (replay + follow), :mod:`~edgebundle.sync.lua` (the
Redis functions).

A typical turn on one device::

    ticket = await sync.start_run(thread, device, epoch=e, since=v, content="Hi")
    # ticket.sync: what other devices did since v (the stream opens with it)
    async with await sync.acquire(ticket) as lease:
        async for piece in model.generate(...):
            await lease.delta(piece)
        await lease.finish("eos", {"input_tokens": 12, "output_tokens": 40})

and any device follows it with ``async for event in sync.events(thread, run_id)``.

Redis unavailable (down, restarting, unreachable after the client's own reconnect
attempts, see :mod:`~edgebundle.sync.client`): every method here, and every step of
``events`` and ``watch``, raises :class:`~edgebundle.errors.RedisAccessError` with one line
saying so, never a driver exception; the next call reconnects by itself. A
:class:`RunLease` (the holder's side) raises the driver's errors as they are: its
holder decides what to do with a run it cannot write (see
:meth:`RunLease.interrupt`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from edgebundle.errors import RedisAccessError
from edgebundle.sync.backend import UNAVAILABLE, Backend, SyncSettings
from edgebundle.sync.client import Client
from edgebundle.sync.events import RunEvent, follow
from edgebundle.sync.lock import RunLease, acquire
from edgebundle.sync.models import Run, SyncState
from edgebundle.sync.runs import RunStore, RunTicket
from edgebundle.sync.store import ThreadSize, ThreadStore

__all__ = ["RunEvent", "RunLease", "RunTicket", "SyncService", "SyncSettings", "ThreadSize",
           "ThreadSync"]

T = TypeVar("T")


@contextmanager
def redis_errors() -> Iterator[None]:
    """Turn the driver's "Redis is not there" errors into one clear RedisAccessError."""
    try:
        yield
    except UNAVAILABLE as exc:
        raise RedisAccessError(f"Redis is unavailable ({exc or type(exc).__name__}): it is retried "
                         "by itself when it is back; check the Redis server") from exc


async def _checked(call: Awaitable[T]) -> T:
    with redis_errors():
        return await call


async def _checked_steps(steps: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    try:
        while True:
            with redis_errors():
                try:
                    item = await anext(steps)
                except StopAsyncIteration:
                    return
            yield item
    finally:  # closing this closes the generator underneath (it stops reading Redis)
        close = getattr(steps, "aclose", None)
        if close is not None:
            await close()


class ThreadSync(Protocol):
    """What the gateway serves: :class:`SyncService`, or a device's
    :class:`~edgebundle.sync.replication.DeviceSync` (central and local store)."""

    @property
    def settings(self) -> SyncSettings: ...

    @property
    def redis(self) -> Client: ...

    async def create_thread(self, thread_id: str | None = None) -> SyncState: ...

    async def sync(self, thread_id: str, epoch: str | None, since: int) -> SyncState: ...

    async def size(self, thread_id: str, input_id: str | None = None) -> ThreadSize: ...

    def watch(self, thread_id: str, epoch: str | None, since: int,
              interval: float = 0.25) -> AsyncIterator[SyncState]: ...

    async def push(self, thread_id: str, device_id: str, epoch: str, since: int,
                   mutations: Sequence[Mapping[str, Any]], *, reseed: bool = False
                   ) -> SyncState: ...

    async def start_run(self, thread_id: str, device_id: str, *, epoch: str, since: int,
                        content: str, input_id: str | None = None,
                        multitask: str = "enqueue", take: bool = False) -> RunTicket: ...

    async def acquire(self, ticket: RunTicket, timeout: float | None = None) -> RunLease: ...

    async def cancel_run(self, thread_id: str, run_id: str, device_id: str,
                         content_seen: str | None = None) -> Run: ...

    async def get_run(self, thread_id: str, run_id: str) -> Run: ...

    def events(self, thread_id: str, run_id: str, after: str | None = None
               ) -> AsyncIterator[RunEvent]: ...


class SyncService:
    """The sync core over ``redis``; ``blocking``: a client of its own for the blocking
    reads of readers and queued runs (see :class:`~edgebundle.sync.backend.Backend`),
    default ``redis``. ``tunables`` are :class:`SyncSettings` fields (session_ttl,
    lease_ms, …), whose defaults live there. :meth:`aclose` closes both."""

    def __init__(self, redis: Client, *, blocking: Client | None = None,
                 **tunables: int) -> None:
        self.settings = SyncSettings(**tunables)
        self.redis = redis
        self._blocking = blocking
        self._backend = Backend(redis, self.settings, blocking)
        self._threads = ThreadStore(self._backend)
        self._runs = RunStore(self._backend)

    async def aclose(self) -> None:
        """Close the client(s)."""
        await self.redis.aclose()
        if self._blocking is not None and self._blocking is not self.redis:
            await self._blocking.aclose()

    async def create_thread(self, thread_id: str | None = None) -> SyncState:
        """Create a thread (a random id if none), or join an existing one: its full state."""
        return await _checked(self._threads.create(thread_id))

    async def sync(self, thread_id: str, epoch: str | None, since: int) -> SyncState:
        """What changed since (epoch, since), tombstones included; the full state
        (every message, tombstones too, ``full=True``) if the epoch differs or ``since``
        cannot be diffed. ThreadNotFoundError if the thread is gone (expired)."""
        return await _checked(self._threads.sync(thread_id, epoch, since))

    async def size(self, thread_id: str, input_id: str | None = None) -> ThreadSize:
        """How many messages the thread holds and runs wait in its queue (zeros if it
        does not exist), and whether ``input_id`` already started a run: what the
        gateway's caps count."""
        return await _checked(self._threads.size(thread_id, input_id))

    def watch(self, thread_id: str, epoch: str | None, since: int,
              interval: float = 0.25) -> AsyncIterator[SyncState]:
        """The diff since (epoch, since), then a diff each time the thread changes
        (a message lands or changes, a run starts or ends); until the caller stops."""
        return _checked_steps(self._threads.watch(thread_id, epoch, since, interval))

    async def push(self, thread_id: str, device_id: str, epoch: str, since: int,
                   mutations: Sequence[Mapping[str, Any]], *, reseed: bool = False) -> SyncState:
        """Apply ``[{"mid", "op": "put"|"delete", "message"}]`` once each (per device
        mid), client wins; answers the server's diff since ``since``.

        An edit or delete of an existing message interrupts a generating run first
        (its text so far kept, incomplete). A gone thread or another epoch raises
        EpochMismatchError(epoch=<server epoch or None>); ``reseed=True`` re-creates a
        gone thread under a new epoch from the client's full history.
        """
        return await _checked(self._threads.push(thread_id, device_id, epoch, since, mutations,
                                                 reseed=reseed))

    async def start_run(self, thread_id: str, device_id: str, *, epoch: str, since: int,
                        content: str, input_id: str | None = None,
                        multitask: str = "enqueue", take: bool = False) -> RunTicket:
        """Queue a turn (the input message lands now); the ticket carries the diff.
        With ``take`` (the caller acquires it next) a run that finds the thread free
        takes it in the same step (``ticket.holding``)."""
        return await _checked(self._runs.start(
            thread_id, device_id, epoch=epoch, since=since, content=content, input_id=input_id,
            multitask=multitask, take=take))

    async def acquire(self, ticket: RunTicket, timeout: float | None = None) -> RunLease:
        """Wait for the run's turn (woken by Redis, no polling); the holder's lease.

        LeaseLostError if the run ended before it could start (cancelled, or skipped
        because it did not take its turn within a lease); with ``timeout`` (s), the run
        is withdrawn (cancelled) and ThreadBusyError raised when its turn did not come.
        """
        return await _checked(acquire(self._backend, ticket, timeout))

    async def cancel_run(self, thread_id: str, run_id: str, device_id: str,
                         content_seen: str | None = None) -> Run:
        """Stop a run; a generating one keeps exactly ``content_seen`` (or its text so far)."""
        return await _checked(self._runs.cancel(thread_id, run_id, device_id, content_seen))

    async def get_run(self, thread_id: str, run_id: str) -> Run:
        return await _checked(self._runs.get(thread_id, run_id))

    def events(self, thread_id: str, run_id: str, after: str | None = None
               ) -> AsyncIterator[RunEvent]:
        """Replay (after ``after``, exclusive) then follow live until ``done``."""
        return _checked_steps(follow(self._backend, thread_id, run_id, after))
