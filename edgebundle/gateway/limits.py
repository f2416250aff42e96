"""The HTTP side of the caps of :mod:`edgebundle.limits`: a response that holds a slot
(a reader's stream, a turn's request) until it was sent."""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from edgebundle.limits import Slot


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
