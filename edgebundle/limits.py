"""The device's caps: what one client (no API key is needed by default) can make it hold.

Owns the caps (:class:`Limits`) and the counters of what is held (:class:`Slots`); no
HTTP here, so the turn core (:mod:`edgebundle.turns`) checks them too. The gateway
holds a slot for as long as a response is sent (:mod:`edgebundle.gateway.limits`).

Sizes (a refused request changes nothing):

- ``max_message_bytes`` (64 KiB of UTF-8 by default): the content of a message pushed
  to a thread, of a turn's input (``POST …/runs``, and chat completions with
  ``thread_id``, whose earlier messages seed a new thread). Over it: 413
  ``message_too_large``. (A request body as a whole: ``max_body_bytes``, see
  :mod:`edgebundle.gateway.guard`.)
- ``max_thread_messages`` (1000): a thread holding that many messages (tombstones of
  deleted ones count: they are kept to sync deletes) takes no new ones: a push that
  puts messages, a turn, answer 409 ``thread_full`` (start a new thread). With both
  caps a thread stays below about 64 MiB however it is filled; real chats are far
  smaller. Counted before the write, so writers racing at the cap may pass it by a few.

Concurrency (each answer 429 with ``Retry-After``, so a client backs off instead of
starving the others):

- ``max_streams`` (64) readers at once per gateway, of which
  :data:`STREAMS_PER_THREAD` (16) on one thread: ``GET …/watch`` and
  ``GET …/runs/{id}/events``. 429 ``too_many_streams``.
- ``max_runs`` (32) turns at once per gateway: requests that start or follow a turn
  (``POST …/runs``, chat completions with ``thread_id``) and the runs this device
  generates (waiting for their turn or generating; they outlive their request).
  429 ``too_many_runs``.
- ``max_queued_runs`` (24) runs waiting in line on one thread (from every device: the
  thread's queue in Redis). A turn beyond it: 429 ``queue_full``.

Each reader, turn and waiting run holds at most one blocking Redis read (``XREAD
BLOCK`` / ``BLPOP``); those go through a connection pool of their own, sized from
these caps (:func:`blocking_connections`), so ordinary requests keep the main pool
(:mod:`edgebundle.sync.client`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields
from typing import Any

from edgebundle.config import Settings

STREAMS_PER_THREAD = 16
RETRY_AFTER = 5  # s a client refused for load is told to wait


# The settings' defaults (edgebundle.config.Settings): one place says them.
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Settings)}


@dataclass(frozen=True)
class Limits:
    """The caps of the module docstring (defaults: the settings' defaults)."""

    max_message_bytes: int = DEFAULTS["max_message_bytes"]
    max_thread_messages: int = DEFAULTS["max_thread_messages"]
    max_streams: int = DEFAULTS["max_streams"]
    max_runs: int = DEFAULTS["max_runs"]
    max_queued_runs: int = DEFAULTS["max_queued_runs"]

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        """The caps ``settings`` set."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    @property
    def streams_per_thread(self) -> int:
        return min(STREAMS_PER_THREAD, self.max_streams)


def blocking_connections(limits: Limits) -> int:
    """Connections the blocking reads may need at once: one per reader, per request
    following a turn and per run waiting for its turn, and a few to spare."""
    return limits.max_streams + 2 * limits.max_runs + 4


class Full(Exception):
    """No slot is free: ``scope`` says whether the gateway or the thread is at its cap."""

    def __init__(self, scope: str, cap: int) -> None:
        super().__init__(f"{scope} cap of {cap}")
        self.scope = scope
        self.cap = cap


class Slots:
    """A counter of things held at once, per gateway and per thread."""

    def __init__(self, total: int, per_thread: int) -> None:
        self.total = total
        self.per_thread = per_thread
        self._held: Counter[str] = Counter()

    @property
    def held(self) -> int:
        return self._held.total()

    def take(self, thread_id: str) -> Slot:
        """A slot for one more on ``thread_id``; :class:`Full` if there is none."""
        if self.held >= self.total:
            raise Full("gateway", self.total)
        if self._held[thread_id] >= self.per_thread:
            raise Full("thread", self.per_thread)
        self._held[thread_id] += 1
        return Slot(self, thread_id)

    def _give_back(self, thread_id: str) -> None:
        self._held[thread_id] -= 1
        if self._held[thread_id] <= 0:
            del self._held[thread_id]


class Slot:
    """One taken slot; :meth:`release` gives it back (once, however often called)."""

    def __init__(self, slots: Slots, thread_id: str) -> None:
        self._slots = slots
        self._thread_id = thread_id
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._slots._give_back(self._thread_id)
