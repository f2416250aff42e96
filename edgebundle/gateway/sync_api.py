"""The sync routes of the gateway (docs/api.md): threads, pushes, runs and their events.

Mounted by :func:`edgebundle.gateway.app.create_app` when the gateway has a
:class:`~edgebundle.sync.service.SyncService`. Every device serves the same routes
over the same Redis, so a thread started on one device continues on any other.

Owns the HTTP side only: parse and check a request, call the sync core
(:mod:`edgebundle.sync`) or the turn core (:mod:`edgebundle.turns`: a turn is started,
checked against the caps and generated there), and render the answer as JSON or SSE.
The cores raise the errors of :mod:`edgebundle.errors`;
:func:`~edgebundle.gateway.api_errors.api_error` maps them to HTTP statuses.

A turn is idempotent by its input id (or an ``Idempotency-Key`` header): a retry gets
the run it started (see :func:`edgebundle.turns.start_turn`).

Errors are JSON ``{"error": code, "message": …}`` (plus the fields the client needs:
``epoch`` for ``epoch_mismatch``, ``active_run`` for ``thread_busy``). A request is
checked completely before anything is written, so a bad one changes nothing; that
includes the caps of :mod:`edgebundle.limits` (413 ``message_too_large``, 409
``thread_full``, 429 ``too_many_streams`` / ``too_many_runs`` / ``queue_full`` with
``Retry-After``). A 503 ``redis_unavailable`` does not say where the sync Redis is
(the log does).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, cast

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgebundle import keys, sse
from edgebundle.completion import ChatParams, ChatService
from edgebundle.errors import (
    EdgebundleError,
    UsageError,
)
from edgebundle.gateway.api_errors import ApiError, api_error
from edgebundle.gateway.limits import holding
from edgebundle.gateway.openai_api import INVALID_JSON, parse_json
from edgebundle.gateway.sync_bodies import (
    MAX_VERSION,
    CancelBody,
    NewThreadBody,
    PushBody,
    RunBody,
    epoch_of,
    parse,
)
from edgebundle.limits import Limits, Slots
from edgebundle.sync.events import EVENT_ID
from edgebundle.sync.models import Run, SyncState
from edgebundle.sync.service import RunEvent, ThreadSync
from edgebundle.sync.store import check_mutation
from edgebundle.turns import (
    RunGenerator,
    RunRequest,
    check_content,
    check_thread_room,
    idempotent_input_id,
    start_turn,
)
from edgebundle.turns import prompt_messages as prompt_messages  # its old home, kept

WATCH_KEEPALIVE = 15.0  # seconds of silence before a watch stream sends a comment
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_VERSION = re.compile(r"[0-9]{1,16}")


# -- request parsing (all checks before any write) ------------------------------------


async def _body(request: Request, *, optional: bool = False) -> dict[str, Any]:
    raw = await request.body()
    if optional and not raw.strip():
        return {}
    try:
        body = parse_json(raw)
    except ValueError:
        raise ApiError(400, "invalid_json", INVALID_JSON) from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "the request body must be a JSON object")
    return body


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def _path_id(request: Request, kind: str) -> str:
    """The ``<kind>_id`` of the route's path, checked (path parameters are strings)."""
    try:
        return keys.check_id(kind, request.path_params[f"{kind}_id"])
    except UsageError as exc:
        raise _bad(f"{kind} id: {exc}") from None


def _since_query(request: Request) -> int:
    raw = request.query_params.get("since", "0")
    # ASCII digits only: str.isdigit() takes "²" or "٣", which int() then refuses.
    if not _VERSION.fullmatch(raw) or int(raw) > MAX_VERSION:
        raise _bad(f"since must be a version, a whole number from 0 to {MAX_VERSION}, "
                   f"not {raw!r}")
    return int(raw)


def _mutations(value: list[Any], limits: Limits) -> list[dict[str, Any]]:
    """The mutations of a push, each checked in order by the store's own rules
    (sync.store.check_mutation: one definition of a valid mutation) and the message
    cap; the first fault is the 400, named by its index."""
    for index, item in enumerate(value):
        where = f"mutations[{index}]"
        try:
            checked = check_mutation(item)
        except UsageError as exc:
            raise _bad(f"{where}: {exc}") from None
        if checked["op"] == "put":
            check_content(limits, checked["message"]["content"], f"{where}.message.content")
    return value


def parse_run_request(body: dict[str, Any], default_device: str,
                      idempotency_key: str | None = None) -> RunRequest:
    """The turn ``body`` asks for (:class:`~.sync_bodies.RunBody`); UsageError if bad."""
    run = parse(RunBody, body, device_id=default_device)
    return RunRequest(
        device_id=run.device_id,
        epoch=run.epoch,
        since=run.since,
        content=run.input.content,
        input_id=idempotent_input_id(run.input.id, idempotency_key),
        multitask=run.multitask,
        params=run.params.chat() if run.params is not None else ChatParams(),
        stream=run.stream,
    )


# -- routes ---------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]


def _guarded(handler: Handler) -> Handler:
    """Turn ApiError and the sync core's errors into JSON answers."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except EdgebundleError as exc:
            return api_error(exc).response()

    return wrapped


def _resume_from(request: Request) -> str | None:
    """The event id a client resumes after (``Last-Event-ID`` or ``?after=``), checked."""
    after = request.headers.get("last-event-id") or request.query_params.get("after")
    if after is not None and not EVENT_ID.fullmatch(after):
        raise _bad(f"invalid event id {after!r}: resume with the id of an event you got "
                   "(such as 1712345678901-0)")
    return after


def _events(sync: ThreadSync, thread_id: str, run_id: str,
            after: str | None) -> AsyncGenerator[RunEvent, None]:
    # SyncService.events is an async generator: close it when the client goes away.
    return cast("AsyncGenerator[RunEvent, None]", sync.events(thread_id, run_id, after))


async def _relay(sync: ThreadSync, thread_id: str, run_id: str,
                 after: str | None) -> AsyncIterator[str]:
    """The run's events as SSE, replay then live, until ``done``."""
    try:
        async with aclosing(_events(sync, thread_id, run_id, after)) as events:
            async for event in events:
                yield sse.encode(event.data, event.type, event.id)
    except EdgebundleError as exc:  # the thread expired or Redis went away mid-stream
        error = api_error(exc)
        yield sse.encode({"error": error.code, "message": error.message}, "error")


async def _last_run(sync: ThreadSync, thread_id: str, run_id: str) -> Run:
    """Wait for the run's end (through its events), then the run object."""
    async with aclosing(_events(sync, thread_id, run_id, None)) as events:
        async for _ in events:
            pass
    return await sync.get_run(thread_id, run_id)


async def _turn(runner: RunGenerator, thread_id: str, parsed: RunRequest,
                after: str | None) -> Response:
    """Start the turn; its run's events as SSE, or the ended run with stream false."""
    sync = runner.sync
    started = await start_turn(runner, thread_id, parsed)
    ticket, opening = started.ticket, started.opening
    run_id = ticket.run.id
    # A retry gets the run it started, never a second one (Stripe's header says so).
    headers = {"Idempotent-Replayed": "true"} if ticket.again else {}
    if not parsed.stream:
        run = await _last_run(sync, thread_id, run_id)
        return JSONResponse(run.to_json(), headers=headers)

    async def stream() -> AsyncIterator[str]:
        if after is None:  # a client resuming after an event id had the opening
            yield sse.encode(opening.to_json(), "sync")
        async for chunk in _relay(sync, thread_id, run_id, after):
            yield chunk

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={**SSE_HEADERS, **headers})


async def _watch(sync: ThreadSync, thread_id: str, epoch: str | None,
                 since: int) -> Response:
    """The watch stream: a sync event now, one per change, keep-alives in between."""
    changes = cast("AsyncGenerator[SyncState, None]", sync.watch(thread_id, epoch, since))
    first = await anext(changes)  # an unknown thread is a 404, not an empty stream

    async def stream() -> AsyncIterator[str]:
        yield sse.encode(first.to_json(), "sync")
        step: asyncio.Future[SyncState] | None = None
        try:
            while True:
                # One pending step, waited on in slices: cancelling a generator's step
                # would end the generator, so the keep-alive must not time it out.
                step = asyncio.ensure_future(anext(changes))
                while not (await asyncio.wait({step}, timeout=WATCH_KEEPALIVE))[0]:
                    yield ": keep-alive\n\n"  # proxies close silent streams
                yield sse.encode(step.result().to_json(), "sync")
        except EdgebundleError as exc:
            error = api_error(exc)
            yield sse.encode({"error": error.code, "message": error.message}, "error")
        finally:  # the client went away (or the thread did): stop polling Redis
            if step is not None and not step.done():
                step.cancel()
                with contextlib.suppress(BaseException):
                    await step
            await changes.aclose()

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


def sync_routes(sync: ThreadSync, chat: ChatService, device_id: str,
                generator: RunGenerator | None = None) -> list[Route]:
    """The routes of the sync API for this device (``device_id`` generates its runs;
    the caps are ``generator``'s limits)."""
    runner = generator or RunGenerator(sync, chat)
    limits = runner.limits
    streams = Slots(limits.max_streams, limits.streams_per_thread)  # readers (limits)

    async def create_thread(request: Request) -> Response:
        given = parse(NewThreadBody, await _body(request, optional=True))
        state = await sync.create_thread(given.id)
        return JSONResponse(state.to_json(), status_code=201)

    async def get_thread(request: Request) -> Response:
        thread_id = _path_id(request, "thread")
        epoch = epoch_of(request.query_params.get("epoch"))
        state = await sync.sync(thread_id, epoch, _since_query(request))
        return JSONResponse(state.to_json())

    async def watch_thread(request: Request) -> Response:
        thread_id = _path_id(request, "thread")
        epoch = epoch_of(request.query_params.get("epoch"))
        since = _since_query(request)
        return await holding(streams, thread_id, "streams",
                             lambda: _watch(sync, thread_id, epoch, since))

    async def push(request: Request) -> Response:
        thread_id = _path_id(request, "thread")
        # device_id has no default: its None is refused, after a missing epoch.
        given = parse(PushBody, await _body(request), device_id=None)
        mutations = _mutations(given.mutations, limits)
        puts = sum(1 for item in mutations if item["op"] == "put")
        if puts:
            check_thread_room(limits, thread_id, await sync.size(thread_id), puts)
        state = await sync.push(thread_id, given.device_id, given.epoch or "", given.since,
                                mutations, reseed=given.reseed)
        return JSONResponse(state.to_json())

    async def start_run(request: Request) -> Response:
        thread_id = _path_id(request, "thread")
        after = _resume_from(request)
        parsed = parse_run_request(await _body(request), device_id,
                                   request.headers.get("idempotency-key"))
        return await holding(runner.turns, thread_id, "turns",
                             lambda: _turn(runner, thread_id, parsed, after))

    async def get_run(request: Request) -> Response:
        thread_id = _path_id(request, "thread")
        run = await sync.get_run(thread_id, _path_id(request, "run"))
        return JSONResponse(run.to_json())

    async def run_events(request: Request) -> Response:
        thread_id = _path_id(request, "thread")
        run_id = _path_id(request, "run")
        after = _resume_from(request)

        async def answer() -> Response:
            await sync.get_run(thread_id, run_id)  # an unknown run is a 404, not an empty stream
            return StreamingResponse(_relay(sync, thread_id, run_id, after),
                                     media_type="text/event-stream", headers=SSE_HEADERS)

        return await holding(streams, thread_id, "streams", answer)

    async def cancel_run(request: Request) -> Response:
        thread_id = _path_id(request, "thread")
        run_id = _path_id(request, "run")
        given = parse(CancelBody, await _body(request, optional=True), device_id=device_id)
        run = await sync.cancel_run(thread_id, run_id, given.device_id, given.content_seen)
        return JSONResponse(run.to_json())

    base = "/v1/threads/{thread_id}"
    return [
        Route("/v1/threads", _guarded(create_thread), methods=["POST"]),
        Route(base, _guarded(get_thread), methods=["GET"]),
        Route(f"{base}/watch", _guarded(watch_thread), methods=["GET"]),
        Route(f"{base}/push", _guarded(push), methods=["POST"]),
        Route(f"{base}/runs", _guarded(start_run), methods=["POST"]),
        Route(f"{base}/runs/{{run_id}}", _guarded(get_run), methods=["GET"]),
        Route(f"{base}/runs/{{run_id}}/events", _guarded(run_events), methods=["GET"]),
        Route(f"{base}/runs/{{run_id}}/cancel", _guarded(cancel_run), methods=["POST"]),
    ]
