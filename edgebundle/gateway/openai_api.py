"""The OpenAI chat-completions wire format: request validation and response objects.

Shapes follow OpenAI's API reference (chat.completion, chat.completion.chunk, the
error object ``{"error": {"message", "type", "param", "code"}}``), which the official
clients parse. Validation is strict about what we use and quiet about the rest:
unknown fields are ignored (clients send many), but a field we use with a wrong type
or range is a 400 naming the field. One extension: ``thread_id`` names a synced thread
the exchange belongs to (see :mod:`edgebundle.gateway.thread_completions`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgebundle import keys
from edgebundle.completion import ChatParams, Usage
from edgebundle.errors import UsageError
from edgebundle.guest_protocol import MAX_TOKENS
from edgebundle.templates import Message

MAX_STOP_STRINGS = 4  # as OpenAI
# OpenAI's newer "developer" role is the system prompt of older models.
ROLE_ALIASES = {"developer": "system"}
ROLES = ("system", "user", "assistant")
INVALID_JSON = ("the request body is not valid JSON (or holds a lone UTF-16 surrogate such as "
                "\\ud800, or nests arrays or objects too deeply)")


class BadRequest(Exception):
    """A request the API refuses (400); ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object; ``kind`` is its ``type`` (invalid_request_error, …)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse_json(raw: bytes) -> Any:
    """A request body's JSON; ValueError if it is not JSON, is nested too deeply for
    Python's parser (it raises RecursionError, once a 500, at about a thousand levels)
    or holds text that is not Unicode (a lone UTF-16 surrogate such as ``"\\ud800"``,
    which JSON escapes allow but nothing downstream can encode)."""
    try:
        value = json.loads(raw)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # UnicodeEncodeError: a ValueError
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    return value


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    params: ChatParams
    stream: bool
    include_usage: bool
    model: str | None
    thread_id: str | None = None  # the extension: the exchange is a turn of this thread
    input_id: str | None = None  # with thread_id: the turn's input id (a retry names it again)


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a /v1/chat/completions body; BadRequest on the first problem."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string", "model")
    n = body.get("n")
    if n is not None and n != 1:
        raise BadRequest("only n=1 is supported", "n")
    if body.get("tools"):
        raise BadRequest("tools are not supported by this server", "tools")
    stream = _optional(body, "stream", bool) or False
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    include_usage = bool(options and _optional(options, "include_usage", bool, "stream_options."))
    max_tokens = _optional(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _optional(body, "max_tokens", int)
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest("max_tokens must be at least 1", "max_tokens")
    if max_tokens is not None and max_tokens > MAX_TOKENS:
        raise BadRequest(f"max_tokens must be at most {MAX_TOKENS}", "max_tokens")
    params = ChatParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0),
        seed=_seed(body),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0),
        stop=_stop(body.get("stop")),
    )
    return ChatRequest(
        messages=_messages(body.get("messages")),
        params=params,
        stream=stream,
        include_usage=include_usage,
        model=model,
        thread_id=_thread_id(body.get("thread_id")),
        input_id=_input_id(body.get("input_id")),
    )


def _input_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest("input_id must be a string (the id of the turn's input message)",
                         "input_id")
    try:
        return keys.check_id("message", value)
    except UsageError as exc:
        raise BadRequest(f"input_id: {exc}", "input_id") from None


def _thread_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest("thread_id must be a string (the id of a synced thread)", "thread_id")
    try:
        return keys.check_id("thread", value)
    except UsageError as exc:
        raise BadRequest(f"thread_id: {exc}", "thread_id") from None


def _optional(body: Mapping[str, Any], key: str, kind: type, prefix: str = "") -> Any:
    value = body.get(key)
    if value is None:
        return None
    # bool is an int in Python; JSON true is not a number.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        name = {bool: "a boolean", int: "an integer"}.get(kind, kind.__name__)
        raise BadRequest(f"{prefix}{key} must be {name}", prefix + key)
    return value


SEED_LIMIT = 2**63  # the plugin reads seed as an int64: 2^64-1 fails it (1), 2^70 (2)


def _seed(body: Mapping[str, Any]) -> int | None:
    """A seed the plugin takes, refused here before the guest sees it (genuine WasmEdge
    would log the refusal on the guest's stdout and fail the request)."""
    seed: int | None = _optional(body, "seed", int)
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise BadRequest(f"seed must be between 0 and {SEED_LIMIT - 1}", "seed")
    return seed


def _number(body: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{key} must be a number", key)
    if not low <= value <= high:
        raise BadRequest(f"{key} must be between {low:g} and {high:g}, got {value}", key)
    return float(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if (
        not isinstance(value, list)
        or not all(isinstance(s, str) for s in value)
        or len(value) > MAX_STOP_STRINGS
    ):
        raise BadRequest(f"stop must be a string or a list of up to {MAX_STOP_STRINGS} strings",
                         "stop")
    return tuple(value)


def _messages(value: Any) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise BadRequest("messages must be a non-empty list of {role, content} objects",
                         "messages")
    out: list[Message] = []
    for index, item in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where} must be an object with role and content", where)
        role = item.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise BadRequest(
                f"{where}.role must be one of system, user, assistant (got {item.get('role')!r})",
                f"{where}.role",
            )
        out.append(Message(role, _content(item.get("content"), f"{where}.content")))
    return tuple(out)


def _content(value: Any, where: str) -> str:
    """A string, or a list of text parts joined (images and audio are not supported)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts: list[str] = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                part.get("text"), str
            ):
                raise BadRequest(f"{where}: only text parts ({{\"type\": \"text\", \"text\": …}}) "
                                 "are supported", where)
            texts.append(part["text"])
        return "".join(texts)
    raise BadRequest(f"{where} must be a string or a list of text parts", where)


# -- responses ----------------------------------------------------------------------


def finish_reason(reason: str) -> str:
    """Our reasons in OpenAI's words: a turn that ended is "stop", a cut one "length"."""
    return "length" if reason in ("length", "context_full") else "stop"


def usage_body(usage: Usage) -> dict[str, int]:
    body = {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }
    if usage.dropped_messages is not None:  # a turn of a thread: what its prompt left out
        body["dropped_messages"] = usage.dropped_messages
    return body


class Completion:
    """Ids and timestamps shared by every object of one completion."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def message(self, text: str, reason: str, usage: Usage) -> dict[str, Any]:
        """The non-streamed ``chat.completion``."""
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(reason),
            }],
            "usage": usage_body(usage),
        }  # fmt: skip

    def chunk(
        self,
        delta: dict[str, Any],
        reason: str | None = None,
        *,
        include_usage: bool = False,
    ) -> dict[str, Any]:
        """One ``chat.completion.chunk`` with a choice (``usage`` null when asked for)."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish_reason(reason) if reason is not None else None,
            }],
        }  # fmt: skip
        if include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The last chunk with ``stream_options.include_usage``: no choices, the usage."""
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage_body(usage),
        }
