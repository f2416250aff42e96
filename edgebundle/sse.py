"""Server-sent events: the one writer of the gateway's streams and the one reader of
their clients (the terminal chat, the tests, the benches).

Reading is httpx-sse's (the line splitting, fields, comments and multi-line data of the
spec). What is added here is the event's *own* id, see :func:`_own_ids`, and JSON
data, which is what every edgebundle stream carries, but for OpenAI's :data:`DONE`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the readers import httpx-sse when called: the gateway only writes
    import httpx
    from httpx_sse import ServerSentEvent

MEDIA_TYPE = "text/event-stream"
DONE = "[DONE]"
"""The data of a chat-completion stream's last event (OpenAI's end): not JSON, so a
reader's :attr:`Event.data` is this string as it came."""


def frame(data: str, event: str | None = None, event_id: str | None = None) -> str:
    """One event as it goes on the wire: ``id:`` (if any), ``event:`` (if any), one
    ``data:`` line. ``data`` must not hold a newline (JSON from :func:`encode` never does)."""
    head = f"id: {event_id}\n" if event_id else ""
    head += f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n"


def encode(data: Any, event: str | None = None, event_id: str | None = None) -> str:
    """:func:`frame` of ``data`` as compact JSON."""
    return frame(json.dumps(data, separators=(",", ":")), event, event_id)


@dataclass(frozen=True)
class Event:
    """A received event: ``id`` is its own (None if it had no ``id:`` line), ``type``
    its ``event:`` (``message`` by default), ``data`` its JSON (:data:`DONE` as is)."""

    id: str | None
    type: str
    data: Any


class _OwnIds:
    """httpx-sse gives each event the stream's *last* event id, as the spec's
    EventSource keeps it (an event without ``id:`` repeats the one before). Callers
    here need to know which events are resume points (a run's events are; ``sync``
    and ``error`` are not), so an id equal to the previous one is taken as none: the
    gateway's ids are Redis stream ids, never twice in one stream.

    Also, httpx-sse dispatches a block without ``data:`` (a ``: keep-alive`` comment
    once an id was seen) as an empty ``message`` event; the spec dispatches no event
    for it, and neither does this reader (:meth:`__call__` gives None)."""

    def __init__(self) -> None:
        self._previous = ""

    def __call__(self, sse: ServerSentEvent) -> Event | None:
        own = sse.id if sse.id and sse.id != self._previous else None
        self._previous = sse.id
        if not sse.data:
            return None
        data = DONE if sse.data == DONE else json.loads(sse.data)
        return Event(own, sse.event or "message", data)


def iter_events(response: httpx.Response) -> Iterator[Event]:
    """The events of a streamed ``text/event-stream`` response (comments skipped)."""
    from httpx_sse import EventSource

    own = _OwnIds()
    for sse in EventSource(response).iter_sse():
        if (event := own(sse)) is not None:
            yield event


async def aiter_events(response: httpx.Response) -> AsyncIterator[Event]:
    """:func:`iter_events` of an async response."""
    from httpx_sse import EventSource

    own = _OwnIds()
    async for sse in EventSource(response).aiter_sse():
        if (event := own(sse)) is not None:
            yield event
