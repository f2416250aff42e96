"""The gateway's OpenAPI 3.1 document, served at ``GET /openapi.json``.

It describes every route the gateway serves (the sync routes only when sync is on,
so every path in it is served), the two error shapes (OpenAI's error object on
``/v1/chat/completions`` and the gateway's own routes, ``{"error": code, "message": …}``
on the sync routes) and the server-sent event streams as ``text/event-stream``. Its
schemas are pydantic's, of the models that validate the request bodies
(:mod:`.openai_api`, :mod:`.sync_bodies`) and of the answers' shapes (the sync objects
of :mod:`edgebundle.sync.models`, the rest in :mod:`.schemas`), so a bound is written
once, where it is checked; the paths table here says which route takes and answers
which. ``tests/test_gateway_openapi.py`` keeps it honest: it compares the spec with the
app's routes and fuzzes the served API from it. With an API key the document itself
needs the key too (docs/api.md: every route but /healthz); it holds no data, but a
device tells strangers nothing but its health.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from edgebundle import __version__
from edgebundle.gateway.openai_api import ChatBody
from edgebundle.gateway.schemas import (
    REF,
    ChatCompletion,
    Health,
    OpenAIError,
    SseEvent,
    SyncError,
    components,
)
from edgebundle.gateway.sync_bodies import (
    ID_SCHEMA,
    CancelBody,
    NewThreadBody,
    PushBody,
    RunBody,
    Version,
)
from edgebundle.gateway.web import WEB_MEDIA_TYPES
from edgebundle.sync.events import EVENT_ID
from edgebundle.sync.models import Run, SyncState

Schema = dict[str, Any]
ID = ID_SCHEMA.json_schema
VERSION = TypeAdapter(Version).json_schema()
# Anchored: JSON Schema patterns match anywhere.
EVENT_ID_SCHEMA = {"type": "string", "pattern": f"^{EVENT_ID.pattern}$"}


def _ref(kind: type) -> Schema:
    return {"$ref": REF.format(model=kind.__name__)}


def _answer(description: str, json: type | Schema | None = None, *, sse: bool = False,
            retry: bool = False) -> Schema:
    """A response: JSON of ``json`` (a component, or a schema), server-sent events, or both;
    with ``retry`` its Retry-After header."""
    content: Schema = {"text/event-stream": {"schema": _ref(SseEvent)}} if sse else {}
    if json is not None:
        content["application/json"] = {"schema": json if isinstance(json, dict) else _ref(json)}
    answer = {"description": description, "content": content}
    return {**answer, "headers": RETRY_AFTER} if retry else answer


def _body(kind: type, required: bool = True) -> Schema:
    return {"required": required, "content": {"application/json": {"schema": _ref(kind)}}}


THREAD_ID = {"name": "thread_id", "in": "path", "required": True, "schema": ID}
RUN_ID = {"name": "run_id", "in": "path", "required": True, "schema": ID}
EPOCH = {"name": "epoch", "in": "query", "schema": {"type": "string"},
         "description": "The epoch of the client's last sync (absent: a full answer)."}
SINCE = {"name": "since", "in": "query", "schema": VERSION,
         "description": "The version of the client's last sync."}
THREAD_EVENTS = ("SSE: a `sync` event with the diff now, then one per change of the thread; "
                 "`: keep-alive` comments while nothing happens; an `error` event if the "
                 "thread goes away. Never ends by itself.")
RUN_EVENTS = ("SSE, each event with `id:` (its resume cursor) and `event:`: (`run.queued`) "
              "`run.started`, `message.created`, `message.delta` …, `message.completed`, "
              "`run.completed` | `run.failed` | `run.cancelled`, then `done`.")


RETRY_AFTER = {"Retry-After": {"schema": {"type": "string"},
                               "description": "Seconds to wait before trying again."}}
TOO_LARGE = ("The body is larger than max_body_bytes (code body_too_large), or a message's "
             "content than max_message_bytes (code message_too_large).")
TOO_MANY_TURNS = ("The device has max_runs turns going (code too_many_runs), or the thread "
                  "max_queued_runs runs waiting (code queue_full); retry after Retry-After.")
TOO_MANY_STREAMS = ("The device serves max_streams readers, or the thread 16 (code "
                    "too_many_streams); retry after Retry-After.")


def _sync_paths() -> dict[str, Schema]:
    base = "/v1/threads/{thread_id}"
    paths: dict[str, Schema] = {
        base: {"get": {
            "summary": "The diff since (epoch, since); the full state if it cannot be a diff.",
            "parameters": [THREAD_ID, EPOCH, SINCE],
            "responses": {"200": _answer("The diff.", SyncState)},
        }},
        f"{base}/watch": {"get": {
            "summary": "Follow the thread: a sync diff now and one per change.",
            "parameters": [THREAD_ID, EPOCH, SINCE],
            "responses": {"200": _answer(THREAD_EVENTS, sse=True),
                          "429": _answer(TOO_MANY_STREAMS, SyncError, retry=True)},
        }},
        f"{base}/push": {"post": {
            "summary": "Apply a device's changes exactly once; answers the server's diff.",
            "parameters": [THREAD_ID],
            "requestBody": _body(PushBody),
            "responses": {
                "200": _answer("The server's diff since `since`.", SyncState),
                "409": _answer("epoch_mismatch: the thread is gone or has another epoch "
                               "(`epoch`); re-seed with reseed: true. thread_full: it holds "
                               "max_thread_messages messages.", SyncError),
            },
        }},
        f"{base}/runs": {"post": {
            "summary": "Start a turn, generated by this device.",
            "parameters": [THREAD_ID],
            "requestBody": _body(RunBody),
            "responses": {
                "200": _answer("SSE: a `sync` event (the diff since the client's version), "
                               "then the run's events (see the events route); with stream "
                               "false the ended run as JSON.", Run, sse=True),
                "409": _answer("thread_busy (policy reject: `active_run`, retry after "
                               "Retry-After seconds), epoch_mismatch or thread_full.",
                               SyncError, retry=True),
                "429": _answer(TOO_MANY_TURNS, SyncError, retry=True),
            },
        }},
        f"{base}/runs/{{run_id}}": {"get": {
            "summary": "The run object.",
            "parameters": [THREAD_ID, RUN_ID],
            "responses": {"200": _answer("The run.", Run)},
        }},
        f"{base}/runs/{{run_id}}/events": {"get": {
            "summary": "The run's events: replay, then live until done.",
            "parameters": [
                THREAD_ID, RUN_ID,
                {"name": "after", "in": "query", "schema": EVENT_ID_SCHEMA,
                 "description": "Resume after this event id (exclusive)."},
                {"name": "Last-Event-ID", "in": "header", "schema": EVENT_ID_SCHEMA,
                 "description": "Resume after this event id (SSE reconnect); wins over after."},
            ],
            "responses": {"200": _answer(RUN_EVENTS, sse=True),
                          "429": _answer(TOO_MANY_STREAMS, SyncError, retry=True)},
        }},
        f"{base}/runs/{{run_id}}/cancel": {"post": {
            "summary": "Stop the run; it keeps content_seen (or its text so far).",
            "parameters": [THREAD_ID, RUN_ID],
            "requestBody": _body(CancelBody, required=False),
            "responses": {"200": _answer("The run, ended.", Run)},
        }},
    }
    paths["/v1/threads"] = {"post": {
        "summary": "Create a thread, or join it by id (a session id shared by devices).",
        "requestBody": _body(NewThreadBody, required=False),
        "responses": {"201": _answer("The thread's full state.", SyncState)},
    }}
    for path, operations in paths.items():
        for operation in operations.values():
            responses = operation["responses"]
            responses["400"] = _answer("Invalid request (nothing was changed).", SyncError)
            if path not in ("/v1/threads", f"{base}/push"):  # (push: epoch_mismatch)
                responses["404"] = _answer("The thread (or run) does not exist, or expired.",
                                           SyncError)
    return paths


def _model_list(model_id: str) -> Schema:
    """``GET /v1/models``, by hand: its one id is the served model's, known only when the
    document is built, where a model's schema is the same for every gateway."""
    model = {"type": "object", "required": ["id", "object"], "properties": {
        "id": {"const": model_id}, "object": {"const": "model"},
        "created": {"type": "integer"}, "owned_by": {"type": "string"}}}
    return {"type": "object", "required": ["object", "data"], "properties": {
        "object": {"const": "list"}, "data": {"type": "array", "items": model}}}


def _paths(model_id: str, sync: bool) -> dict[str, Schema]:
    chat_errors = {
        "400": "Invalid request, or a prompt longer than the context (code "
               "context_length_exceeded).",
        "500": "The model failed the request (code server_error).",
    }
    if sync:
        chat_errors["503"] = "With thread_id: the sync Redis is unreachable (code " \
                             "redis_unavailable)."
        chat_errors["409"] = "With thread_id: the thread changed epoch meanwhile (code " \
                             "epoch_mismatch; retry), or it is full (code thread_full)."
    chat = {code: _answer(text, OpenAIError) for code, text in chat_errors.items()}
    if sync:
        chat["429"] = _answer(f"With thread_id: {TOO_MANY_TURNS}", OpenAIError, retry=True)
    text = {"text/plain": {"schema": {"type": "string"}}}
    paths: dict[str, Schema] = {
        "/healthz": {"get": {
            "summary": "Probe: 200 when the model is loaded, 503 before. Needs no API key.",
            "security": [],
            "responses": {"200": _answer("Ready.", Health), "503": _answer("Loading.", Health)},
        }},
        "/metrics": {"get": {
            "summary": "Prometheus metrics (text exposition format 0.0.4).",
            "responses": {"200": {"description": "The metrics.", "content": text}},
        }},
        "/openapi.json": {"get": {
            "summary": "This document.",
            "responses": {"200": _answer("The OpenAPI 3.1 document.", {"type": "object"})},
        }},
        "/v1/models": {"get": {
            "summary": "The served model, in OpenAI's shape.",
            "responses": {"200": _answer("The model list.", _model_list(model_id))},
        }},
        "/v1/chat/completions": {"post": {
            "summary": "OpenAI chat completions, streamed or not; thread_id makes the "
                       "exchange a turn of a synced thread.",
            "requestBody": _body(ChatBody),
            "responses": {"200": _answer(
                "A chat.completion, or with stream true SSE `data:` lines of "
                "chat.completion.chunk ending in `data: [DONE]`.", ChatCompletion, sse=True),
                **chat},
        }},
    }
    for path, media_type in WEB_MEDIA_TYPES.items():
        paths[path] = {"get": {
            "summary": "The web chat page" if path == "/" else "An asset of the web chat page",
            "security": [],  # no data in them: the page's own API calls send the key
            "responses": {"200": {"description": "The file.", "content": {
                media_type.split(";")[0]: {"schema": {"type": "string"}}}}},
        }}
    if sync:
        paths.update(_sync_paths())
    _guard_responses(paths)
    return paths


def _guard_responses(paths: dict[str, Schema]) -> None:
    """What :mod:`edgebundle.gateway.guard` answers before any route, in the path's shape."""
    for path, operations in paths.items():
        shape = SyncError if path.startswith("/v1/threads") else OpenAIError
        for method, operation in operations.items():
            responses = operation["responses"]
            if path != "/healthz":
                responses.setdefault("400", _answer(
                    "Invalid request; or the Host header names no address of this gateway "
                    "(code invalid_host; the allowed_hosts setting).", shape))
            if method == "post":
                responses["403"] = _answer("Sent by a web page of another origin (code "
                                           "forbidden_origin; the allowed_origins setting).",
                                           shape)
                responses.setdefault("413", _answer(TOO_LARGE, shape))
                responses["415"] = _answer("A body not sent as Content-Type: application/json "
                                           "(code unsupported_media_type).", shape)


def build_spec(model_id: str, *, sync: bool, api_key: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a gateway serving ``model_id``; the sync routes only
    when ``sync``; with ``api_key`` every operation but the open ones (/healthz, the web
    page) needs the bearer key."""
    paths = _paths(model_id, sync)
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "edgebundle gateway", "version": __version__,
                 "description": "The HTTP API of `edgebundle run` (docs/api.md)."},
        "paths": paths,
        "components": {"schemas": components()},
    }
    if api_key:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"bearer": []}]
        unauthorized = {"401": _answer("Missing or wrong API key (code invalid_api_key).",
                                       OpenAIError)}
        for operations in paths.values():
            for operation in operations.values():
                if operation.get("security") != []:  # not an open path
                    operation["responses"].update(unauthorized)
    return spec
