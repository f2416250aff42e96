"""A client of a gateway's HTTP sync API: :class:`GatewayClient`.

Typed methods over an injected :class:`httpx.AsyncClient`, which owns the base URL,
the API key and the connection pool (the caller decides those, and closes it). The
answers come back as the sync models, the streams as :class:`~edgebundle.sse.Event`
iterators; the ways a request fails come back as exceptions a caller can act on:

- :class:`Dropped`: worth trying again (a 502/503/504 of a gateway restarting or of
  its Redis away for a moment, a stream cut short, an ``error`` event); a connection
  that fails is httpx's own :class:`httpx.TransportError`, also worth trying again.
- :class:`EpochMoved`: a 409 ``epoch_mismatch``, the gateway has the thread under
  another epoch than the caller's cursor (sync in full, then send again).
- :class:`Gone`: a 404 of a thread or run that expired meanwhile.
- :class:`~edgebundle.errors.GatewayError`: refused for good (no key, not a sync
  gateway, a bad request), with a sentence that says so.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from httpx_sse import SSEError

from edgebundle.errors import GatewayError
from edgebundle.sse import Event, aiter_events
from edgebundle.sync.models import SyncState

STREAM_READ_TIMEOUT = 60.0  # s; the watch sends a keep-alive every 15 s, a silent run
# stream is simply rejoined from its last event id (nothing is lost or repeated)
RETRY_STATUSES = frozenset({502, 503, 504})  # a gateway restarting, or its Redis away


class Dropped(Exception):
    """A stream or request failed in a way worth retrying (5xx, cut short, ``error``)."""


class EpochMoved(Exception):
    """The gateway has the thread under another epoch than the caller's (409)."""


class Gone(Exception):
    """The thread or run is not on the gateway (404: it expired meanwhile)."""


Events = AsyncIterator[Event]


class GatewayClient:
    """The sync API of the gateway at ``server`` (named so in errors) through ``http``."""

    def __init__(self, http: httpx.AsyncClient, server: str) -> None:
        self.http = http
        self.server = server

    # -- requests -----------------------------------------------------------------

    async def join(self, thread_id: str | None = None) -> SyncState:
        """``POST /v1/threads``: create a thread (``thread_id`` None: the gateway names
        it) or join it; any failure is one clear :class:`GatewayError`."""
        body = {} if thread_id is None else {"id": thread_id}
        try:
            response = await self.http.post("/v1/threads", json=body)
        except httpx.TransportError as exc:
            raise GatewayError(f"cannot reach the gateway at {self.server} ({reason(exc)}): "
                               "start it with `edgebundle run`, or pass --server URL") from None
        if response.status_code >= 400:
            raise self._refused(response)
        return SyncState.from_json(response.json())

    async def thread(self, thread_id: str) -> SyncState:
        """``GET /v1/threads/{id}``: the whole thread as the gateway has it now."""
        response = await self.http.get(_path(thread_id))
        self._check(response)
        return SyncState.from_json(response.json())

    async def push(self, thread_id: str, body: dict[str, Any]) -> SyncState:
        """``POST …/push``: apply a device's mutations (``device_id``, ``epoch``,
        ``since``, ``mutations``, ``reseed``); the answer is what the device lacks."""
        response = await self.http.post(_path(thread_id, "push"), json=body)
        if _epoch_moved(response):
            raise EpochMoved
        self._check(response)
        return SyncState.from_json(response.json())

    async def cancel(self, thread_id: str, run_id: str, device_id: str,
                     content_seen: str | None = None) -> None:
        """``POST …/runs/{run}/cancel``; ``content_seen``: the text the reply keeps."""
        body: dict[str, Any] = {"device_id": device_id}
        if content_seen is not None:
            body["content_seen"] = content_seen
        self._check(await self.http.post(_path(thread_id, "runs", run_id, "cancel"), json=body))

    async def sync_link(self) -> dict[str, Any] | None:
        """``sync`` of ``/healthz`` (the device's link to the central Redis); None if the
        gateway has none or does not answer (never raises: a caller polls it)."""
        try:
            response = await self.http.get("/healthz")
            sync = response.json().get("sync") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return sync if isinstance(sync, dict) else None

    # -- streams ------------------------------------------------------------------

    @asynccontextmanager
    async def start_run(self, thread_id: str, body: dict[str, Any]) -> AsyncIterator[Events]:
        """``POST …/runs`` streamed: a turn's events (``sync`` first, then the run's)."""
        async with self._stream("POST", _path(thread_id, "runs"), json=body) as response:
            if _epoch_moved(response):
                raise EpochMoved
            self._check(response)
            yield _events(response)

    @asynccontextmanager
    async def run_events(self, thread_id: str, run_id: str,
                         after: str | None = None) -> AsyncIterator[Events]:
        """``GET …/runs/{run}/events``: from the start, or after the event id ``after``
        (sent as ``Last-Event-ID``: the gateway resumes there, nothing twice)."""
        headers = {"Last-Event-ID": after} if after else {}
        async with self._stream("GET", _path(thread_id, "runs", run_id, "events"),
                                headers=headers) as response:
            self._check_found(response)
            yield _events(response)

    @asynccontextmanager
    async def watch(self, thread_id: str, epoch: str | None,
                    since: int) -> AsyncIterator[Events]:
        """``GET …/watch``: a ``sync`` event for every change after the cursor."""
        params: dict[str, str | int] = {"epoch": epoch or "", "since": since}
        async with self._stream("GET", _path(thread_id, "watch"),
                                params=params) as response:
            self._check_found(response)
            yield _events(response)

    @asynccontextmanager
    async def _stream(self, method: str, url: str,
                      **kw: Any) -> AsyncIterator[httpx.Response]:
        timeout = httpx.Timeout(10.0, read=STREAM_READ_TIMEOUT)
        async with self.http.stream(method, url, timeout=timeout, **kw) as response:
            if response.status_code >= 400:  # read the answer, so that its text can be told
                await response.aread()
            yield response

    # -- answers ------------------------------------------------------------------

    def _check_found(self, response: httpx.Response) -> None:
        if response.status_code == 404:
            raise Gone(error_text(response))
        self._check(response)

    def _check(self, response: httpx.Response) -> None:
        if response.status_code in RETRY_STATUSES:
            raise Dropped(f"HTTP {response.status_code}: {error_text(response)}")
        if response.status_code >= 400:
            raise self._refused(response)

    def _refused(self, response: httpx.Response) -> GatewayError:
        server = self.server
        if response.status_code == 401:
            return GatewayError(f"the gateway at {server} needs an API key: set "
                                "EDGEBUNDLE_API_KEY (or api_key in config.toml) to its key")
        if response.status_code == 404 and response.request.url.path == "/v1/threads":
            return GatewayError(f"{server} does not serve the sync API: is it an "
                                "`edgebundle run` gateway? (pass --server URL)")
        return GatewayError(f"the gateway at {server} refused the request "
                            f"(HTTP {response.status_code}): {error_text(response)}")


async def _events(response: httpx.Response) -> Events:
    """The stream's events, each with a JSON object as data ({} if it had other data);
    an ``error`` event (the gateway lost Redis or the thread mid-stream) is
    :class:`Dropped`."""
    try:
        async for event in aiter_events(response):
            data = event.data if isinstance(event.data, dict) else {}
            if event.type == "error":
                raise Dropped(str(data.get("message", "stream error")))
            yield Event(event.id, event.type, data)
    except SSEError:  # a 200 that is no event stream: something else answers there
        raise GatewayError(f"{response.request.url} did not answer with an event stream "
                           f"(Content-Type {response.headers.get('content-type')!r})") from None


def _path(thread_id: str, *parts: str) -> str:
    return "/".join(("/v1/threads", thread_id, *parts))


def _epoch_moved(response: httpx.Response) -> bool:
    if response.status_code != 409:
        return False
    try:
        return bool(response.json().get("error") == "epoch_mismatch")
    except (ValueError, AttributeError):
        return False


def error_text(response: httpx.Response) -> str:
    """What the gateway said about a refused request, briefly."""
    try:
        body = response.json()
        return str(body.get("message") or body.get("error") or body)
    except (ValueError, AttributeError):
        return response.text.strip()[:200] or f"HTTP {response.status_code}"


def reason(exc: Exception) -> str:
    """An exception as a few words for a note."""
    text = str(exc).strip()
    return text or type(exc).__name__
