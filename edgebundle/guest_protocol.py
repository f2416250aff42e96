"""The stdin/stdout protocol between the orchestrator and the edgechat guest.

The guest (``wasm/edgechat/edgechat.c``) loads its model, says ``READY <graph>
<ctx>`` (or ``FATAL <errno> <message>`` and exits), then answers each request::

    -> REQ <prompt_len> <meta_len> <max_tokens>\\n <prompt bytes><metadata JSON bytes>
    <- D <n>\\n <n bytes>                       one per generated piece
    <- END <reason> <errno> <info_len>\\n <info JSON bytes>
    -> STOP\\n                                 ends the running request (reason cancelled)

Everything is length-prefixed, so prompts and pieces may hold any bytes (a piece
can be half of a UTF-8 character).

Framing. The guest shares stdout with its runtime, and genuine WasmEdge's WASI-NN
plugin logs its errors there (``[<time>] [error] [WASI-NN] GGML backend: …``, for
a prompt that is too long, bad metadata …), in the middle of the protocol; such a
line may even quote a client's prompt. So each launch gives the guest a random token
(``EDGECHAT_FRAME``, see :func:`new_frame`) and every line the guest writes starts
with ``<token> ``. With a frame, the parser takes only framed lines as the protocol;
anything else (whole lines, or text before the frame on a line) is a
:class:`Foreign` event, the runtime's log, which nobody can make look like the
protocol without knowing the token. This module has no I/O of its own: encode a
request, feed whatever bytes arrived to :class:`GuestOutputParser` and act on the
events it returns, from blocking or asyncio code alike.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from edgebundle.errors import GuestProtocolError

# A header line longer than this is not the protocol (the guest's own limit is 128).
_MAX_HEADER = 1024
MAX_TOKENS = 2**31 - 1  # the guest's u32, and the plugin's n-predict (an int32)


class EndReason(StrEnum):
    """Why a request ended (the ``END`` line's first field)."""

    EOS = "eos"  # an end-of-generation token (WASI-NN errno 100)
    LENGTH = "length"  # max_tokens reached
    CONTEXT_FULL = "context_full"  # errno 101
    PROMPT_TOO_LONG = "prompt_too_long"  # errno 102: more than ctx-size - 4 tokens
    CANCELLED = "cancelled"  # the orchestrator wrote STOP (or closed stdin) mid-request
    ERROR = "error"  # any other errno; see End.errno


@dataclass(frozen=True)
class Ready:
    """The model is loaded; the guest serves requests."""

    graph: int
    ctx: int


@dataclass(frozen=True)
class Fatal:
    """Loading failed (e.g. errno 8: no such preload alias, 103: model file missing)."""

    errno: int
    message: str


@dataclass(frozen=True)
class Delta:
    """One generated piece, raw bytes (possibly a partial UTF-8 sequence)."""

    data: bytes


@dataclass(frozen=True)
class End:
    """The request is over. ``info`` is the plugin's output-1 JSON, or {}."""

    reason: EndReason
    errno: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Foreign:
    """Output that is not the guest's (the runtime's log), one line, newline removed."""

    text: bytes


Event = Ready | Fatal | Delta | End | Foreign

FRAME_ENV = "EDGECHAT_FRAME"
_MAX_FOREIGN = 64 * 1024  # a longer unterminated foreign line is passed on in parts


def new_frame() -> str:
    """A fresh random frame token for one launch (16 hex digits)."""
    return secrets.token_hex(8)


STOP_LINE = b"STOP\n"


def encode_request(prompt: bytes, metadata: bytes, max_tokens: int) -> bytes:
    """One request: the header line, the prompt, then the metadata JSON (may be empty).

    ``max_tokens`` 0 means no limit from the guest (the model or context ends it).
    """
    if not 0 <= max_tokens <= MAX_TOKENS:
        # The guest reads a u32: a bigger number is a malformed header, and the guest
        # would then take the request's bytes for the next header.
        raise ValueError(f"max_tokens must be between 0 and {MAX_TOKENS}")
    header = f"REQ {len(prompt)} {len(metadata)} {max_tokens}\n".encode("ascii")
    return header + prompt + metadata


class GuestOutputParser:
    """Incremental parser of the guest's stdout: ``feed(bytes) -> [events]``.

    Raises :class:`~edgebundle.errors.GuestProtocolError` on anything that is not
    the protocol; the parser is unusable afterwards (the stream is out of step).
    """

    def __init__(self, frame: str = "") -> None:
        self._marker = f"{frame} ".encode("ascii") if frame else b""
        self._buf = bytearray()
        self._pending: tuple[str, str, int] | None = None  # (kind, reason, errno) awaiting payload
        self._need = 0

    @property
    def idle(self) -> bool:
        """True when no partial event is buffered."""
        return not self._buf and self._pending is None

    def feed(self, data: bytes) -> list[Event]:
        self._buf += data
        events: list[Event] = []
        while True:
            if self._pending is None:
                if self._marker and not self._buf.startswith(self._marker):
                    foreign = self._foreign()
                    if foreign is None:
                        return events  # the rest of a log line, or of a frame, is to come
                    events.append(foreign)
                    continue
                newline = self._buf.find(b"\n")
                if newline < 0:
                    if len(self._buf) > _MAX_HEADER:
                        raise GuestProtocolError(
                            f"guest wrote a {len(self._buf)}-byte line that is not the protocol: "
                            f"{bytes(self._buf[:60])!r}…"
                        )
                    return events
                line = bytes(self._buf[len(self._marker):newline])
                del self._buf[: newline + 1]
                event = self._header(line)
                if event is not None:
                    events.append(event)
                continue
            if len(self._buf) < self._need:
                return events
            payload = bytes(self._buf[: self._need])
            del self._buf[: self._need]
            kind, reason, errno = self._pending
            self._pending = None
            events.append(self._payload_event(kind, reason, errno, payload))

    def _foreign(self) -> Foreign | None:
        """The foreign text at the head of the buffer (which does not start with the
        frame), or None while it may still be cut short or turn into the frame."""
        marker = self._marker
        at = self._buf.find(marker)
        newline = self._buf.find(b"\n")
        if newline >= 0 and (at < 0 or newline < at):
            text = bytes(self._buf[:newline])
            del self._buf[: newline + 1]
            return Foreign(text)
        if at > 0:  # log text without its newline, then the guest's line
            text = bytes(self._buf[:at])
            del self._buf[:at]
            return Foreign(text)
        if len(self._buf) > _MAX_FOREIGN:
            keep = len(marker) - 1  # the frame's start may have arrived already
            text = bytes(self._buf[:-keep])
            del self._buf[:-keep]
            return Foreign(text)
        return None

    def _header(self, raw: bytes) -> Event | None:
        try:
            line = raw.decode("ascii")
        except UnicodeDecodeError:
            raise GuestProtocolError(
                f"guest wrote a line that is not the protocol: {raw[:80]!r}") from None
        kind, _, rest = line.partition(" ")
        try:
            if kind == "D":
                self._expect(kind, "", 0, int(rest))
                return None
            if kind == "END":
                reason, errno, size = rest.split(" ")
                self._expect(kind, reason, int(errno), int(size))
                return None
            if kind == "READY":
                graph, ctx = rest.split(" ")
                return Ready(int(graph), int(ctx))
            if kind == "FATAL":
                errno, _, message = rest.partition(" ")
                return Fatal(int(errno), message)
        except ValueError:
            pass
        raise GuestProtocolError(f"guest wrote a line that is not the protocol: {line[:80]!r}")

    def _expect(self, kind: str, reason: str, errno: int, size: int) -> None:
        if size < 0:
            raise ValueError(size)
        self._pending = (kind, reason, errno)
        self._need = size

    @staticmethod
    def _payload_event(kind: str, reason: str, errno: int, payload: bytes) -> Event:
        if kind == "D":
            return Delta(payload)
        try:
            end_reason = EndReason(reason)
        except ValueError:
            raise GuestProtocolError(
                f"guest ended a request with an unknown reason {reason!r}") from None
        info: dict[str, Any] = {}
        if payload:
            try:
                decoded = json.loads(payload)
            except ValueError:
                decoded = None
            if isinstance(decoded, dict):
                info = decoded
        return End(end_reason, errno, info)
