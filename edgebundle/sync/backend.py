"""What the sync modules share: the Redis client, the library's functions on it, the settings.

:meth:`Backend.call` runs one Redis function of :mod:`edgebundle.sync.lua` (FCALL) with
the common ``KEYS``/``ARGV`` layout documented there; :func:`parse_state` turns a
function's sync object reply
into a :class:`SyncState`; :func:`new_id` makes the random ids of threads, runs and
messages.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ClusterDownError
from redis.exceptions import ConnectionError as _ConnectionError
from redis.exceptions import TimeoutError as _TimeoutError

from edgebundle.errors import (
    ConfigError,
    EpochMismatchError,
    LeaseLostError,
    RunNotFoundError,
    StateError,
    ThreadNotFoundError,
)
from edgebundle.sync.client import Client
from edgebundle.sync.lua import Function, Functions, script_keys
from edgebundle.sync.models import Run, SyncState, ThreadMessage

# The longest one blocking command (XREAD BLOCK, BLPOP) may wait, in s: redis-py gives
# every connection a read timeout (5 s by default in redis-py 8.x) that a longer block
# would trip. Longer waits are made of several of these.
BLOCK_SLICE = 2.0

# What the driver raises when Redis is not there (OSError: a socket error it let through).
UNAVAILABLE = (_ConnectionError, _TimeoutError, ClusterDownError, OSError)


@dataclass(frozen=True)
class SyncSettings:
    """Tunables of the sync core (docs/api.md defaults); validated once, here."""

    session_ttl: int = 1800  # s, sliding: refreshed on every access of a thread
    lease_ms: int = 30000  # the lock's lease; a holder silent this long is taken over
    renew_ms: int = 10000  # how often the watchdog renews the lease while generating
    delta_batch_ms: int = 20  # generated text is flushed at least this often ...
    delta_batch_chars: int = 256  # ... or once this many characters are buffered
    retry_after: int = 3  # s, what a rejected run is told

    def __post_init__(self) -> None:
        for name in ("session_ttl", "lease_ms", "renew_ms", "retry_after"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"sync setting {name} must be a whole number >= 1, not {value!r}")
        for name in ("delta_batch_ms", "delta_batch_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"sync setting {name} must be a whole number >= 0, not {value!r}")


class Backend:
    """One Redis client with the library's functions on it, and the settings;
    ``blocking``: the client for blocking reads (``XREAD BLOCK``, ``BLPOP``: they hold
    a connection while they wait), default ``redis``. Given its own pool, readers and
    queued runs cannot take every connection of the one ordinary commands use."""

    def __init__(self, redis: Client, settings: SyncSettings,
                 blocking: Client | None = None) -> None:
        self.redis = redis
        self.blocking = blocking if blocking is not None else redis
        self.settings = settings
        self.functions = Functions(redis)

    async def call(self, function: Function, thread_id: str, run_id: str | None,
                   *args: str | int | float) -> list[Any]:
        """Run ``function`` on the thread (and run) keys; ARGV = now, ttl, lease, *args."""
        keys = script_keys(thread_id, run_id)
        argv = [repr(time.time()), self.settings.session_ttl * 1000, self.settings.lease_ms,
                *args]
        reply: list[Any] = await function(keys=keys, args=argv)
        return reply


def new_id(prefix: str) -> str:
    """A random id such as ``run_3f2a…`` (valid for :func:`keys.check_id`)."""
    return f"{prefix}_{secrets.token_hex(12)}"


def parse_state(thread_id: str, parts: Sequence[Any]) -> SyncState:
    """A sync object from ``[epoch, version, full, active, [queued], [messages]]``."""
    epoch, version, full, active, queued, messages = parts
    return SyncState(
        id=thread_id,
        epoch=str(epoch),
        version=int(version),
        full=bool(int(full)),
        messages=tuple(parse_message(raw) for raw in messages),
        active_run=parse_run(active) if active else None,
        queued_runs=tuple(parse_run(raw) for raw in queued),
    )


def parse_message(raw: str) -> ThreadMessage:
    return ThreadMessage.from_json(_document(raw, "a message"))


def parse_run(raw: str) -> Run:
    return Run.from_json(_document(raw, "a run"))


def _document(raw: str, what: str) -> dict[str, Any]:
    """A JSON object stored by the sync functions; StateError for anything else (a key
    written by hand, or by a newer edgebundle's incompatible code)."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise StateError(f"{what} stored in Redis is not a JSON object ({raw[:60]!r}): "
                         "the thread's keys were changed outside edgebundle")
    return data


def raise_for(reply: Sequence[Any], thread_id: str, run_id: str | None = None) -> None:
    """Turn a function's failure reply into its error (``ok`` and ``wait`` pass)."""
    status = reply[0]
    if status == "gone":
        raise ThreadNotFoundError(
            f"thread {thread_id} does not exist (it expired or was never created): "
            "create it again, or re-seed it from a device's copy"
        )
    if status == "norun":
        raise RunNotFoundError(
            f"run {run_id} does not exist in thread {thread_id}: check the run id"
        )
    if status == "epoch":
        epoch = str(reply[1]) or None
        if epoch is None:
            raise EpochMismatchError(
                f"thread {thread_id} no longer exists on the server (it expired): "
                "re-seed it with the device's full history (reseed=true)", epoch=None)
        raise EpochMismatchError(
            f"thread {thread_id} is at epoch {epoch}, not the client's: "
            "sync in full from the server, then try again", epoch=epoch)
    if status == "lost":
        raise lease_lost(thread_id, run_id)


def lease_lost(thread_id: str, run_id: str | None) -> LeaseLostError:
    return LeaseLostError(
        f"run {run_id} no longer holds thread {thread_id} (its lease expired, or it was "
        "cancelled or interrupted): nothing was written; stop generating"
    )
