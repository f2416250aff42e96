"""The HTTP gateway: an OpenAI-compatible API in front of one chat engine (Starlette).

Routes (docs/api.md): ``GET /healthz`` (503 while the model loads), ``GET
/metrics`` (Prometheus, :mod:`.metrics`), ``GET /openapi.json`` (the spec of every
route, :mod:`.openapi`), ``GET /v1/models``, ``POST /v1/chat/completions`` (stream or
not; with ``thread_id`` a turn of a synced thread, :mod:`.thread_completions`), and the sync
routes (:mod:`.sync_api`) when sync is on. With an API key every route but /healthz
needs ``Authorization: Bearer <key>`` (the spec too, as docs/api.md says; it holds no data,
but a device answers nothing but its probe to strangers). Before the key, every
request passes :mod:`.guard` (Host, Origin, application/json, body size); the caps
on messages, threads, streams and turns are :mod:`edgebundle.limits`. A bad request
is a 400 with OpenAI's error object and changes nothing; a client that goes away
mid-stream cancels its generation (the engine stops the guest and moves on).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from edgebundle import sse
from edgebundle.completion import ChatService, Finished, TextDelta, Usage
from edgebundle.engine import ChatEngine
from edgebundle.errors import UsageError
from edgebundle.gateway.api_errors import ApiError
from edgebundle.gateway.guard import GuardSettings, RequestGuard
from edgebundle.gateway.limits import holding
from edgebundle.gateway.metrics import GatewayMetrics, MetricsMiddleware
from edgebundle.gateway.openai_api import (
    INVALID_JSON,
    BadRequest,
    ChatRequest,
    Completion,
    error_body,
    parse_chat_request,
    parse_json,
)
from edgebundle.gateway.sync_api import sync_routes
from edgebundle.gateway.thread_completions import ThreadChat
from edgebundle.gateway.web import WEB_PATHS, web_routes
from edgebundle.sync.replication import DeviceSync
from edgebundle.turns import RunGenerator

if TYPE_CHECKING:
    from edgebundle.sync.service import ThreadSync

# Reachable without the API key: probes, and the web page with its assets (they hold no
# data; the page's API calls send the key the user entered).
OPEN_PATHS = frozenset({"/healthz"}) | WEB_PATHS


@dataclass(frozen=True)
class GatewayState:
    """What the routes serve: the engine, the chat on top of it, and how to name them."""

    engine: ChatEngine  # the real Engine, or a double at its boundary (tests)
    chat: ChatService
    model_id: str
    runtime: str
    sync: ThreadSync | None = None  # the sync routes are served when set
    device_id: str = ""  # this device (generates the runs started here)
    runs: RunGenerator | None = None  # generates them (stopped by the server, in order)


def create_app(state: GatewayState, *, api_key: str | None = None,
               guard: GuardSettings | None = None) -> Starlette:
    """The ASGI app for ``state``; ``api_key`` None = no authentication; ``guard``: what
    requests may come from (:mod:`.guard`, default: served on 127.0.0.1). The caps of
    :mod:`edgebundle.limits` are those of ``state.runs``."""
    metrics = GatewayMetrics()
    runner: RunGenerator | None = None
    thread_completions: ThreadChat | None = None
    if state.sync is not None:
        runner = state.runs or RunGenerator(state.sync, state.chat)
        thread_completions = ThreadChat(runner, state.device_id)
    spec: dict[str, Any] = {}  # built at the first GET /openapi.json

    async def healthz(request: Request) -> Response:
        if not state.engine.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        body: dict[str, Any] = {"status": "ok", "model": state.model_id,
                                "runtime": state.runtime}
        if isinstance(state.sync, DeviceSync):  # offline, and how much waits to be sent
            body["sync"] = (await state.sync.status()).to_json()
        return JSONResponse(body)

    async def models(request: Request) -> Response:
        return JSONResponse({
            "object": "list",
            "data": [{"id": state.model_id, "object": "model", "created": 0,
                      "owned_by": "edgebundle"}],
        })  # fmt: skip

    async def chat_completions(request: Request) -> Response:
        try:
            body = parse_json(await request.body())
        except ValueError:
            return _error(400, INVALID_JSON)
        try:
            parsed = parse_chat_request(body)
        except BadRequest as exc:
            return _error(400, exc.message, exc.param, exc.code)
        if parsed.thread_id is None or thread_completions is None:
            return await answer(parsed, request)
        try:  # a turn: held against the device's cap on turns (edgebundle.limits)
            return await holding(thread_completions.runner.turns, parsed.thread_id, "turns",
                                 lambda: answer(parsed, request))
        except ApiError as exc:
            return _sync_error(exc)

    async def answer(parsed: ChatRequest, request: Request) -> Response:
        try:
            if parsed.thread_id is None:
                events = state.chat.complete(parsed.messages, parsed.params)
            elif thread_completions is None:
                raise BadRequest("thread_id needs sync, and this device serves without it: "
                                 "start `edgebundle run` with --redis-url (or install "
                                 "redis-server), or leave thread_id out", "thread_id")
            else:
                events = thread_completions.complete(parsed, request.headers.get("idempotency-key"))
            first = await anext(events)  # renders first: a bad conversation is still a 400
        except BadRequest as exc:
            return _error(400, exc.message, exc.param, exc.code)
        except UsageError as exc:
            return _error(400, str(exc), "messages")
        except ApiError as exc:  # the sync store refused the thread's turn
            return _sync_error(exc)
        if isinstance(first, Finished) and first.reason in ("prompt_too_long", "error"):
            await events.aclose()
            return _failed(first)
        completion = Completion(parsed.model or state.model_id)
        if parsed.stream:
            return StreamingResponse(
                _stream(completion, parsed, first, events),
                media_type=sse.MEDIA_TYPE,
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _whole(completion, first, events)

    async def openapi(request: Request) -> Response:
        if not spec:  # the document's module is imported only by those who ask for it
            from edgebundle.gateway.openapi import build_spec

            spec.update(build_spec(state.model_id, sync=state.sync is not None,
                                   api_key=bool(api_key)))
        return JSONResponse(spec)

    app = Starlette(routes=[
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        *web_routes(),
    ])  # fmt: skip
    _collect_from(metrics, state, runner)
    if state.sync is not None:
        app.router.routes.extend(sync_routes(state.sync, state.chat, state.device_id, runner))
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    # Before the key: a page of another site is refused whether it has the key or not.
    app.add_middleware(RequestGuard, settings=guard or GuardSettings())
    # Outermost: a request refused for its key (or by the guard) is counted too.
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.router.routes)
    return app


def _collect_from(metrics: GatewayMetrics, state: GatewayState,
                  runner: RunGenerator | None) -> None:
    """What /metrics reads at scrape time from the parts that count it themselves."""

    async def engine() -> None:
        metrics.engine_ready.set(1 if state.engine.ready else 0)
        metrics.restarts.set_total(total=state.engine.restarts)
        metrics.tokens.set_total(total=state.engine.output_tokens)
        metrics.prompt_tokens.set_total(total=state.engine.input_tokens)

    metrics.add_collector(engine)
    if runner is not None:
        ended = runner.ended

        async def runs() -> None:
            for status, count in ended.items():
                metrics.runs.set_total(status, total=count)
            metrics.windowed_runs.set_total(total=runner.windowed_runs)
            metrics.dropped_messages.set_total(total=runner.dropped_messages)

        metrics.add_collector(runs)
    sync = state.sync
    if sync is not None:  # looked up at each scrape: a device may connect after it started
        metrics.watch_redis(lambda: sync.redis.ping())
    if isinstance(state.sync, DeviceSync):
        metrics.watch_replication(state.sync.status)


async def _whole(
    completion: Completion,
    first: TextDelta | Finished,
    events: AsyncGenerator[TextDelta | Finished, None],
) -> Response:
    pieces: list[str] = []
    finished: Finished | None = None
    async with aclosing(events):
        event: TextDelta | Finished | None = first
        while event is not None:
            if isinstance(event, TextDelta):
                pieces.append(event.text)
            else:
                finished = event
                break
            event = await anext(events, None)
    if finished is None:
        finished = Finished("error", Usage(), "the reply ended without a reason")
    if finished.reason == "error":
        return _failed(finished)
    return JSONResponse(completion.message("".join(pieces), finished.reason, finished.usage))


async def _stream(
    completion: Completion,
    request: ChatRequest,
    first: TextDelta | Finished,
    events: AsyncGenerator[TextDelta | Finished, None],
) -> AsyncIterator[str]:
    """SSE: the role, the content deltas, the finish reason, (usage), then [DONE]."""
    usage = request.include_usage
    async with aclosing(events):
        opening = {"role": "assistant", "content": ""}
        yield sse.encode(completion.chunk(opening, include_usage=usage))
        event: TextDelta | Finished | None = first
        while event is not None:
            if isinstance(event, Finished):
                if event.reason == "error":
                    # Text already sent stays; the client learns the reply broke off.
                    detail = event.detail or "generation failed"
                    yield sse.encode(error_body(detail, "server_error"))
                else:
                    yield sse.encode(completion.chunk({}, event.reason, include_usage=usage))
                    if usage:
                        yield sse.encode(completion.usage_chunk(event.usage))
                break
            yield sse.encode(completion.chunk({"content": event.text}, include_usage=usage))
            event = await anext(events, None)
    yield sse.frame(sse.DONE)  # OpenAI's end: not JSON


def _failed(finished: Finished) -> Response:
    if finished.reason == "prompt_too_long":
        return _error(
            400,
            finished.detail or f"the prompt is {finished.usage.input_tokens} tokens, more than "
            "the model's context allows: shorten the conversation",
            "messages",
            "context_length_exceeded",
        )
    return _error(500, finished.detail or "generation failed", kind="server_error")


def _sync_error(exc: ApiError) -> JSONResponse:
    kind = "server_error" if exc.status >= 500 else "invalid_request_error"
    response = _error(exc.status, exc.message, code=exc.code, kind=kind)
    response.headers.update(exc.headers)
    return response


def _error(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    kind: str = "invalid_request_error",
) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


class BearerAuth:
    """Every route but :data:`OPEN_PATHS` needs ``Authorization: Bearer <api_key>``."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                response = _error(
                    401,
                    "missing or wrong API key: send the header Authorization: Bearer <key>",
                    kind="invalid_request_error",
                    code="invalid_api_key",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
