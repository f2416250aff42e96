"""What every request passes before a route sees it: Host, Origin, media type, body size.

The gateway listens on the loopback by default, where any web page the device's
browser opens can reach it, and with no API key (the default) nothing else stands in
the way. :class:`RequestGuard` closes the browser's ways in:

- **Host** (DNS rebinding: a page whose name was made to resolve to 127.0.0.1 reads
  the API as its own origin): the ``Host`` header must name this gateway: localhost,
  127.0.0.1, ``[::1]``, the address it is bound to, or a name of the
  ``allowed_hosts`` setting (comma-separated; ``*.example.com`` matches subdomains,
  ``*`` anything). Bound to every address (``0.0.0.0`` / ``::``) it also answers to
  any IP address (no rebinding comes with a bare address). Otherwise 400
  ``invalid_host``. ``/healthz`` is exempt (probes use whatever name; it holds no
  data). This is Starlette's ``TrustedHostMiddleware`` rule, answered in the API's
  JSON error shapes.
- **Origin** (CSRF: a page posting to the gateway): a POST whose ``Origin`` header
  is neither this gateway's own (same host and port, as the web page at ``/`` sends)
  nor in the ``allowed_origins`` setting (comma-separated, e.g.
  ``https://kiosk.example``; ``*`` any) is refused with 403 ``forbidden_origin``. Clients that
  are not browsers send no Origin and pass.
- **Media type**: a POST that carries a body (or a Content-Type) must say
  ``application/json``; anything else is 415 ``unsupported_media_type`` (a page may
  send ``text/plain`` across origins without asking first; JSON it may not). A POST
  without a body (the optional ones) needs no Content-Type.
- **Size**: a body over ``max_body_bytes`` (1 MiB by default) is 413
  ``body_too_large``: at once when Content-Length says so, else as soon as the bytes
  read pass it (chunked uploads), never read whole. The body is then handed to the
  route from memory.

Refusals use the error shape of the path: ``{"error": code, "message"}`` under
``/v1/threads``, OpenAI's error object elsewhere. Nothing behind a refusal runs.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgebundle.gateway.openai_api import error_body
from edgebundle.limits import DEFAULTS

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})
HOST_EXEMPT = frozenset({"/healthz"})
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SYNC_PREFIX = "/v1/threads"
DEFAULT_MAX_BODY = int(DEFAULTS["max_body_bytes"])


def split_list(value: str | None) -> tuple[str, ...]:
    """A comma-separated setting as its non-empty items, lowercased."""
    return tuple(item.strip().lower() for item in (value or "").split(",") if item.strip())


@dataclass(frozen=True)
class GuardSettings:
    """What :class:`RequestGuard` allows (the module docstring says how it is used)."""

    bound_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY

    def host_allowed(self, host: str) -> bool:
        name = host.lower()
        bound = self.bound_host.lower().strip("[]")
        if name in LOOPBACK_NAMES or (name == bound and bound not in WILDCARD_BINDS):
            return True
        if bound in WILDCARD_BINDS and _is_address(name):
            return True
        return any(_name_matches(name, pattern) for pattern in self.allowed_hosts)

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        origin = origin.strip().lower().rstrip("/")
        parts = urlsplit(origin)
        if parts.scheme in ("http", "https") and parts.netloc == host_header.lower():
            return True  # same origin: the gateway's own web page
        return "*" in self.allowed_origins or origin in self.allowed_origins


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _name_matches(name: str, pattern: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern.strip("[]")


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port (``[::1]:8080`` -> ``::1``)."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    name, colon, port = host_header.rpartition(":")
    return name if colon and port.isdecimal() and port.isascii() else host_header


def _is_json(content_type: str) -> bool:
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json"


class RequestGuard:
    """ASGI middleware: the Host, Origin, media type and size checks of the module doc."""

    def __init__(self, app: ASGIApp, settings: GuardSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path: str = scope["path"]
        host = headers.get("host", "")
        if path not in HOST_EXEMPT and not self.settings.host_allowed(host_name(host)):
            await self._refuse_read(scope, receive, send, 400, "invalid_host",
                          f"the Host header {host!r} names no address of this gateway: use "
                          "localhost or 127.0.0.1, or add the name to the allowed_hosts "
                          "setting (EDGEBUNDLE_ALLOWED_HOSTS)")
            return
        if scope["method"] not in WRITES:
            await self.app(scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is not None and not self.settings.origin_allowed(origin, host):
            await self._refuse_read(scope, receive, send, 403, "forbidden_origin",
                          f"requests from the web origin {origin!r} are not allowed: only "
                          "this gateway's own page may call it from a browser, or add the "
                          "origin to the allowed_origins setting (EDGEBUNDLE_ALLOWED_ORIGINS)")
            return
        length = headers.get("content-length")
        has_body = (length is not None and length.strip() not in ("", "0")) \
            or "transfer-encoding" in headers
        content_type = headers.get("content-type")
        if (has_body or content_type is not None) and not _is_json(content_type or ""):
            await self._refuse_read(scope, receive, send, 415, "unsupported_media_type",
                          f"the request body must be JSON sent as Content-Type: "
                          f"application/json, not {content_type or 'no Content-Type'}")
            return
        limit = self.settings.max_body_bytes
        if length is not None and (not length.isdecimal() or int(length) > limit):
            await self._too_large(scope, receive, send)
            return
        body: list[bytes] = []
        size = 0
        while True:  # read it here, bounded; the route gets it from memory
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its body was whole
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(scope, receive, send)
                return
            body.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(body), receive), send)

    async def _refuse_read(self, scope: Scope, receive: Receive, send: Send, status: int,
                           code: str, message: str) -> None:
        """Refuse a request whose body (within the cap) is read first and dropped: a
        server that closes with bytes still unread resets the connection, and the
        client would get a broken connection instead of the answer."""
        size = 0
        while size <= self.settings.max_body_bytes:
            received = await receive()
            if received["type"] != "http.request":
                return  # the client went away
            size += len(received.get("body", b""))
            if not received.get("more_body", False):
                break
        await _refuse(scope, receive, send, status, code, message)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _refuse(scope, receive, send, 413, "body_too_large",
                      f"the request body is larger than {self.settings.max_body_bytes} bytes "
                      "(the max_body_bytes setting)")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands over ``body`` first, then waits on the client's (for
    ``http.disconnect``, which streaming responses listen for)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, code: str,
                  message: str) -> None:
    """The refusal in the error shape of the request's path (module docstring)."""
    path: str = scope["path"]
    if path == SYNC_PREFIX or path.startswith(SYNC_PREFIX + "/"):
        response = JSONResponse({"error": code, "message": message}, status_code=status)
    else:
        response = JSONResponse(error_body(message, "invalid_request_error", code=code),
                                status_code=status)
    response.headers["Connection"] = "close"  # an unread body must not be taken for a request
    await response(scope, receive, send)


def guard_settings(bound_host: str, allowed_hosts: str | None, allowed_origins: str | None,
                   max_body_bytes: int) -> GuardSettings:
    """GuardSettings from the settings' strings (comma-separated lists)."""
    return GuardSettings(bound_host=bound_host, allowed_hosts=split_list(allowed_hosts),
                         allowed_origins=tuple(o.rstrip("/") for o in split_list(allowed_origins)),
                         max_body_bytes=max_body_bytes)

