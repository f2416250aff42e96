"""The gateway's OpenAPI 3.1 document, built as data and served at ``GET /openapi.json``.

It describes every route the gateway serves (the sync routes only when sync is on,
so every path in it is served), each request body with the constraints the handlers
check, the two error shapes (OpenAI's error object on ``/v1/chat/completions`` and
the gateway's own routes, ``{"error": code, "message": …}`` on the sync routes) and
the server-sent event streams as ``text/event-stream``. ``tests/test_gateway_openapi.py``
keeps it honest: it compares the spec with the app's routes and fuzzes the served API
from it. With an API key the document itself needs the key too (docs/api.md: every route
but /healthz); it holds no data, but a device tells strangers nothing but its health.
"""

from __future__ import annotations

from typing import Any

from edgebundle import __version__, keys
from edgebundle.gateway.openai_api import MAX_STOP_STRINGS
from edgebundle.gateway.sync_bodies import MAX_VERSION
from edgebundle.gateway.web import WEB_MEDIA_TYPES
from edgebundle.guest_protocol import MAX_TOKENS
from edgebundle.sync.events import EVENT_ID
from edgebundle.sync.models import (
    MESSAGE_STATUSES,
    MULTITASK_POLICIES,
    ROLES,
    RUN_REASONS,
    RUN_STATUSES,
)
from edgebundle.sync.store import MAX_POSITION

Schema = dict[str, Any]

# The checks the gateway makes, anchored (JSON Schema patterns match anywhere).
ID_PATTERN = f"^{keys.ID_CHARS}$"
EVENT_ID_PATTERN = f"^{EVENT_ID.pattern}$"
NOT_BLANK = r"\S"


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _object(properties: dict[str, Schema], required: tuple[str, ...] = (),
            description: str = "") -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if description:
        schema["description"] = description
    return schema


# One server-sent event, as SSE parsers (and schemathesis) see it: its fields, data a string.
SSE_EVENT: Schema = _object({"event": {"type": "string"}, "data": {"type": "string"},
                             "id": {"type": "string"}, "retry": {"type": "integer"}},
                            description="One server-sent event.")


def _sse(description: str) -> Schema:
    return {"description": description, "content": {"text/event-stream": {"schema": SSE_EVENT}}}


ID = {"type": "string", "pattern": ID_PATTERN}
VERSION = {"type": "integer", "minimum": 0, "maximum": MAX_VERSION}
STOP = {"anyOf": [{"type": "string"},
                  {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP_STRINGS}]}


def _schemas() -> dict[str, Schema]:
    message = _object({
        "id": ID,
        "role": {"enum": list(ROLES)},
        "content": {"type": "string"},
        "status": {"enum": list(MESSAGE_STATUSES)},
        "version": {"type": "integer"},
        "position": {"type": "number"},
        "created_at": {"type": "number"},
        "deleted": {"type": "boolean"},
        "run_id": _nullable({"type": "string"}),
    }, ("id", "role", "content", "status", "version", "position", "deleted"),
        "A message of a thread; deleted ones are tombstones (content empty).")
    run = _object({
        "id": {"type": "string"},
        "thread_id": {"type": "string"},
        "status": {"enum": list(RUN_STATUSES)},
        "device_id": _nullable({"type": "string"}),
        "message_id": _nullable({"type": "string"}),
        "input_message_id": _nullable({"type": "string"}),
        "fence": _nullable({"type": "integer"}),
        "reason": {"enum": list(RUN_REASONS)},
        "usage": _nullable({"type": "object", "additionalProperties": {"type": "integer"}}),
        "created_at": {"type": "number"},
    }, ("id", "thread_id", "status"), "One inference on a thread.")
    sync_state = _object({
        "id": {"type": "string"},
        "epoch": {"type": "string"},
        "version": {"type": "integer"},
        "full": {"type": "boolean"},
        "messages": {"type": "array", "items": _ref("Message")},
        "active_run": _nullable(_ref("Run")),
        "queued_runs": {"type": "array", "items": _ref("Run")},
    }, ("id", "epoch", "version", "full", "messages", "active_run", "queued_runs"),
        "What changed since the client's (epoch, version), tombstones included; "
        "everything (full) if the epoch differs or the version is too old.")
    sync_error = _object({
        "error": {"type": "string", "description": "A code: invalid_request, invalid_json, "
                  "thread_not_found, run_not_found, epoch_mismatch, thread_busy, run_ended, "
                  "thread_full, message_too_large, body_too_large, too_many_streams, "
                  "too_many_runs, queue_full, invalid_host, forbidden_origin, "
                  "unsupported_media_type, redis_unavailable, offline, sync_error."},
        "message": {"type": "string", "description": "What is wrong and how to fix it."},
        "epoch": _nullable({"type": "string"}),
        "active_run": _nullable(_ref("Run")),
    }, ("error", "message"), "The error of the sync routes.")
    openai_error = _object({"error": _object({
        "message": {"type": "string"},
        "type": {"type": "string"},
        "param": _nullable({"type": "string"}),
        "code": _nullable({"type": "string"}),
    }, ("message", "type", "param", "code"))}, ("error",), "OpenAI's error object.")
    usage = _object({"prompt_tokens": {"type": "integer"},
                     "completion_tokens": {"type": "integer"},
                     "total_tokens": {"type": "integer"},
                     "dropped_messages": {
                         "type": "integer",
                         "description": "With thread_id: older messages of the thread the "
                                        "prompt left out to fit the context."}},
                    ("prompt_tokens", "completion_tokens", "total_tokens"))
    chat_message = _object({
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"anyOf": [
            {"type": "string"},
            {"type": "array", "items": _object(
                {"type": {"const": "text"}, "text": {"type": "string"}}, ("type", "text"))},
        ]},
    }, ("role", "content"))
    chat_request = _object({
        "messages": {"type": "array", "items": chat_message, "minItems": 1},
        "model": {"type": "string", "description": "Ignored: the device serves one model."},
        "stream": {"type": "boolean"},
        "stream_options": _object({"include_usage": {"type": "boolean"}}),
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS},
        "max_completion_tokens": {"type": "integer", "minimum": 1,
                                  "maximum": MAX_TOKENS},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "stop": STOP,
        "n": {"const": 1},
        "thread_id": {**ID, "description": (
            "Extension: the exchange is a turn of this synced thread. The last message must "
            "be the user's; the prompt is the thread's history; a new thread is created and "
            "seeded with the earlier messages (system ones excluded).")},
    }, ("messages",), "Unknown fields are ignored, as OpenAI clients send many.")
    chat_completion = _object({
        "id": {"type": "string"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": _object({
            "index": {"type": "integer"},
            "message": _object({"role": {"const": "assistant"}, "content": {"type": "string"}},
                               ("role", "content")),
            "finish_reason": {"enum": ["stop", "length"]},
        }, ("index", "message", "finish_reason"))},
        "usage": _ref("Usage"),
    }, ("id", "object", "created", "model", "choices", "usage"))
    run_request = _object({
        "device_id": {**ID, "description": "The device the run is for (default: this one)."},
        "epoch": {"type": "string", "description": "The epoch of the client's last sync."},
        "since": VERSION,
        "input": _object({"id": ID, "content": {"type": "string", "pattern": NOT_BLANK}},
                         ("content",)),
        "multitask": {"enum": list(MULTITASK_POLICIES)},
        "params": _object({"max_tokens": {"type": "integer", "minimum": 1,
                                          "maximum": MAX_TOKENS},
                           "temperature": {"type": "number", "minimum": 0, "maximum": 2}}),
        "stream": {"type": "boolean", "description": "false: wait and answer the run object."},
    }, ("input",))
    mutation = _object({
        "mid": {"type": "integer", "minimum": 1},
        "op": {"enum": ["put", "delete"]},
        "message": _object({
            "id": ID,
            "role": {"enum": list(ROLES)},
            "content": {"type": "string"},
            "status": {"enum": list(MESSAGE_STATUSES)},
            "position": {"type": "number", "minimum": 0, "maximum": MAX_POSITION},
            "created_at": {"type": "number", "minimum": 0},
            "run_id": ID,
        }, ("id",), "role and content are required for put."),
    }, ("mid", "op", "message"))
    push_request = _object({
        "device_id": ID,
        "epoch": {"type": "string", "description": "Required unless reseed is true."},
        "since": VERSION,
        "reseed": {"type": "boolean"},
        "mutations": {"type": "array", "items": mutation},
    }, ("device_id", "mutations"))
    return {
        "Message": message, "Run": run, "SyncState": sync_state, "SyncError": sync_error,
        "OpenAIError": openai_error, "Usage": usage, "ChatCompletionRequest": chat_request,
        "ChatCompletion": chat_completion, "RunRequest": run_request,
        "PushRequest": push_request,
        "CreateThreadRequest": _object({"id": ID}),
        "CancelRequest": _object({"device_id": ID, "content_seen": {
            "type": "string", "description": "The text the user saw: what the thread keeps."}}),
    }


def _openai_error(description: str) -> Schema:
    return _json(_ref("OpenAIError"), description)


def _sync_error(description: str) -> Schema:
    return _json(_ref("SyncError"), description)


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
    bad = _sync_error("Invalid request (nothing was changed).")
    not_found = _sync_error("The thread (or run) does not exist, or expired.")
    base = "/v1/threads/{thread_id}"
    return {
        "/v1/threads": {"post": {
            "summary": "Create a thread, or join it by id (a session id shared by devices).",
            "requestBody": {"required": False, "content": {"application/json": {
                "schema": _ref("CreateThreadRequest")}}},
            "responses": {"201": _json(_ref("SyncState"), "The thread's full state."),
                          "400": bad},
        }},
        base: {"get": {
            "summary": "The diff since (epoch, since); the full state if it cannot be a diff.",
            "parameters": [THREAD_ID, EPOCH, SINCE],
            "responses": {"200": _json(_ref("SyncState"), "The diff."), "400": bad,
                          "404": not_found},
        }},
        f"{base}/watch": {"get": {
            "summary": "Follow the thread: a sync diff now and one per change.",
            "parameters": [THREAD_ID, EPOCH, SINCE],
            "responses": {"200": _sse(THREAD_EVENTS), "400": bad, "404": not_found,
                          "429": {**_sync_error(TOO_MANY_STREAMS), "headers": RETRY_AFTER}},
        }},
        f"{base}/push": {"post": {
            "summary": "Apply a device's changes exactly once; answers the server's diff.",
            "parameters": [THREAD_ID],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref("PushRequest")}}},
            "responses": {
                "200": _json(_ref("SyncState"), "The server's diff since `since`."),
                "400": bad,
                "409": _sync_error("epoch_mismatch: the thread is gone or has another epoch "
                                   "(`epoch`); re-seed with reseed: true. thread_full: it "
                                   "holds max_thread_messages messages."),
                "413": _sync_error(TOO_LARGE),
            },
        }},
        f"{base}/runs": {"post": {
            "summary": "Start a turn, generated by this device.",
            "parameters": [THREAD_ID],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref("RunRequest")}}},
            "responses": {
                "200": {"description": "SSE: a `sync` event (the diff since the client's "
                        "version), then the run's events (see the events route); with "
                        "stream false the ended run as JSON.",
                        "content": {"text/event-stream": {"schema": SSE_EVENT},
                                    "application/json": {"schema": _ref("Run")}}},
                "400": bad,
                "404": not_found,
                "409": {**_sync_error("thread_busy (policy reject: `active_run`, retry after "
                                      "Retry-After seconds), epoch_mismatch or thread_full."),
                        "headers": RETRY_AFTER},
                "413": _sync_error(TOO_LARGE),
                "429": {**_sync_error(TOO_MANY_TURNS), "headers": RETRY_AFTER},
            },
        }},
        f"{base}/runs/{{run_id}}": {"get": {
            "summary": "The run object.",
            "parameters": [THREAD_ID, RUN_ID],
            "responses": {"200": _json(_ref("Run"), "The run."), "400": bad,
                          "404": not_found},
        }},
        f"{base}/runs/{{run_id}}/events": {"get": {
            "summary": "The run's events: replay, then live until done.",
            "parameters": [
                THREAD_ID, RUN_ID,
                {"name": "after", "in": "query",
                 "schema": {"type": "string", "pattern": EVENT_ID_PATTERN},
                 "description": "Resume after this event id (exclusive)."},
                {"name": "Last-Event-ID", "in": "header",
                 "schema": {"type": "string", "pattern": EVENT_ID_PATTERN},
                 "description": "Resume after this event id (SSE reconnect); wins over after."},
            ],
            "responses": {"200": _sse(RUN_EVENTS), "400": bad, "404": not_found,
                          "429": {**_sync_error(TOO_MANY_STREAMS), "headers": RETRY_AFTER}},
        }},
        f"{base}/runs/{{run_id}}/cancel": {"post": {
            "summary": "Stop the run; it keeps content_seen (or its text so far).",
            "parameters": [THREAD_ID, RUN_ID],
            "requestBody": {"required": False, "content": {"application/json": {
                "schema": _ref("CancelRequest")}}},
            "responses": {"200": _json(_ref("Run"), "The run, ended."), "400": bad,
                          "404": not_found},
        }},
    }


def _paths(model_id: str, sync: bool) -> dict[str, Schema]:
    health = _object({"status": {"enum": ["ok", "loading"]}, "model": {"type": "string"},
                      "runtime": {"type": "string"}}, ("status",))
    chat_errors = {
        "400": _openai_error("Invalid request, or a prompt longer than the context "
                             "(code context_length_exceeded)."),
        "500": _openai_error("The model failed the request (code server_error)."),
    }
    if sync:
        chat_errors["503"] = _openai_error("With thread_id: the sync Redis is unreachable "
                                           "(code redis_unavailable).")
        chat_errors["409"] = _openai_error("With thread_id: the thread changed epoch meanwhile "
                                           "(code epoch_mismatch; retry), or it is full (code "
                                           "thread_full).")
        chat_errors["429"] = {**_openai_error(f"With thread_id: {TOO_MANY_TURNS}"),
                              "headers": RETRY_AFTER}
    paths: dict[str, Schema] = {
        "/healthz": {"get": {
            "summary": "Probe: 200 when the model is loaded, 503 before. Needs no API key.",
            "security": [],
            "responses": {"200": _json(health, "Ready."), "503": _json(health, "Loading.")},
        }},
        "/metrics": {"get": {
            "summary": "Prometheus metrics (text exposition format 0.0.4).",
            "responses": {"200": {"description": "The metrics.", "content": {
                "text/plain": {"schema": {"type": "string"}}}}},
        }},
        "/openapi.json": {"get": {
            "summary": "This document.",
            "responses": {"200": _json({"type": "object"}, "The OpenAPI 3.1 document.")},
        }},
        "/v1/models": {"get": {
            "summary": "The served model, in OpenAI's shape.",
            "responses": {"200": _json(_object({
                "object": {"const": "list"},
                "data": {"type": "array", "items": _object({
                    "id": {"const": model_id}, "object": {"const": "model"},
                    "created": {"type": "integer"}, "owned_by": {"type": "string"}},
                    ("id", "object"))},
            }, ("object", "data")), "The model list.")},
        }},
        "/v1/chat/completions": {"post": {
            "summary": "OpenAI chat completions, streamed or not; thread_id makes the "
                       "exchange a turn of a synced thread.",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref("ChatCompletionRequest")}}},
            "responses": {
                "200": {"description": "A chat.completion, or with stream true SSE "
                        "`data:` lines of chat.completion.chunk ending in `data: [DONE]`.",
                        "content": {"application/json": {"schema": _ref("ChatCompletion")},
                                    "text/event-stream": {"schema": SSE_EVENT}}},
                **chat_errors,
            },
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
        error = _sync_error if path.startswith("/v1/threads") else _openai_error
        for method, operation in operations.items():
            responses = operation["responses"]
            if path != "/healthz":
                responses.setdefault("400", error(
                    "Invalid request; or the Host header names no address of this gateway "
                    "(code invalid_host; the allowed_hosts setting)."))
            if method == "post":
                responses["403"] = error("Sent by a web page of another origin (code "
                                         "forbidden_origin; the allowed_origins setting).")
                responses.setdefault("413", error(TOO_LARGE))
                responses["415"] = error("A body not sent as Content-Type: application/json "
                                         "(code unsupported_media_type).")


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
        "components": {"schemas": _schemas()},
    }
    if api_key:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"bearer": []}]
        unauthorized = {"401": _openai_error("Missing or wrong API key (code invalid_api_key).")}
        for operations in paths.values():
            for operation in operations.values():
                if operation.get("security") != []:  # not an open path
                    operation["responses"].update(unauthorized)
    return spec
