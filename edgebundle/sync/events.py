"""Reading a run's events: replay from any event id, then follow live until ``done``.

Each run has one Redis Stream; its entry ids double as resume cursors (SSE's
``Last-Event-ID``). Any number of readers can read the same run: each one replays
what is already there (XRANGE, exclusive of the cursor) and then follows with
``XREAD BLOCK``, so two readers see the same events in the same order. Reading
works the same after the run ended (the stream lives as long as the thread).

A follower wakes at least once per lease (or per ``BLOCK_SLICE``, if shorter) even
when nothing is written; it then looks at the run (the read_run function), which ends a
run whose holder's lease ran out, so a reader of a dead holder's run still gets its
terminal events and ``done``.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from edgebundle import keys
from edgebundle.errors import UsageError
from edgebundle.sync.backend import BLOCK_SLICE, Backend
from edgebundle.sync.runs import RunStore

# A stream entry id (fullmatch it: ``$`` would let a trailing newline through; ``\d``
# would let other scripts' digits through).
EVENT_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_PAGE = 500


@dataclass(frozen=True)
class RunEvent:
    """One step of a run: its stream id (the resume cursor), type and JSON data."""

    id: str
    type: str
    data: dict[str, Any]


def _event(entry_id: str, fields: dict[str, str]) -> RunEvent:
    return RunEvent(id=entry_id, type=fields["type"], data=json.loads(fields["data"]))


Entries = list[tuple[str, dict[str, str]]]


async def _page(backend: Backend, stream: str, cursor: str) -> Entries:
    """Entries after ``cursor`` (exclusive) that are already there."""
    entries: Any = await backend.redis.xrange(stream, min=f"({cursor}", count=_PAGE)
    return list(entries or [])


async def _wait(backend: Backend, stream: str, cursor: str, block_ms: int) -> Entries:
    """Entries after ``cursor``, waiting up to ``block_ms`` for the first one."""
    answer: Any = await backend.blocking.xread({stream: cursor}, count=_PAGE, block=block_ms)
    if not answer:
        return []
    if isinstance(answer, dict):  # RESP3 shape
        return list(next(iter(answer.values()))[0])
    return list(answer[0][1])


async def follow(backend: Backend, thread_id: str, run_id: str,
                 after: str | None = None) -> AsyncIterator[RunEvent]:
    """The run's events after ``after`` (an event id; None: from the start) until done."""
    stream = keys.run_events(thread_id, run_id)
    if after is not None and not EVENT_ID.fullmatch(after):
        raise UsageError(f"invalid event id {after!r}: use an id from a previous event "
                         "(such as 1712345678901-0)")
    runs = RunStore(backend)
    cursor = after or "0-0"
    entries = await _page(backend, stream, cursor)
    if not entries:
        await runs.get(thread_id, run_id)  # an unknown run (or gone thread) is an error
    while True:
        for entry_id, fields in entries:
            event = _event(entry_id, fields)
            yield event
            cursor = entry_id
            if event.type == "done":
                return
        if len(entries) == _PAGE:  # still replaying: the next page
            entries = await _page(backend, stream, cursor)
            continue
        block_ms = min(backend.settings.lease_ms, int(BLOCK_SLICE * 1000))
        entries = await _wait(backend, stream, cursor, block_ms)
        if not entries:
            await runs.get(thread_id, run_id)  # ends a dead holder's run; raises if gone
