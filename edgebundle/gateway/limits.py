"""The HTTP side of the caps of :mod:`edgebundle.limits`: a slot taken per request (429
when the cap is reached) and held by its response (a reader's stream, a turn's
request) until it was sent."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from edgebundle.gateway.api_errors import busy
from edgebundle.limits import Full, Slot, Slots


class Holding(Response):
    """``response``, sent as it is; ``slot`` is released once it was sent, or once
    sending it failed (a client gone before the first byte), never before."""

    def __init__(self, response: Response, slot: Slot) -> None:  # no super(): it wraps
        self.response = response
        self.slot = slot
        self.status_code = response.status_code
        self.raw_headers = response.raw_headers  # the same list: .headers works on both
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            self.slot.release()


def take(slots: Slots, thread_id: str, what: str) -> Slot:
    """A slot of ``slots`` for a request on ``thread_id``; 429 if the cap is reached."""
    try:
        return slots.take(thread_id)
    except Full as full:
        where = "this device" if full.scope == "gateway" else f"thread {thread_id}"
        code = "too_many_streams" if what == "streams" else "too_many_runs"
        raise busy(code, f"{where} already serves {full.cap} {what} at once, its cap: try "
                   "again in a few seconds") from None


async def holding(slots: Slots, thread_id: str, what: str,
                  answer: Callable[[], Awaitable[Response]]) -> Response:
    """``answer()`` while holding a slot of ``slots``, released once it was sent."""
    slot = take(slots, thread_id, what)
    try:
        response = await answer()
    except BaseException:
        slot.release()
        raise
    return Holding(response, slot)
