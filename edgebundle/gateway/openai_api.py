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
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)
from pydantic_core import ErrorDetails

from edgebundle.completion import ChatParams, Usage
from edgebundle.gateway.sync_bodies import ID_SCHEMA, OURS, string_id
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


class _Wire(BaseModel):
    # JSON's types as they are (no "1" for 1, no true for 1); unknown keys are ignored.
    model_config = ConfigDict(strict=True, frozen=True, protected_namespaces=())


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def message(self) -> Message:
        """As the templates take it: the text parts joined, "developer" a system prompt."""
        text = self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content)
        return Message(ROLE_ALIASES.get(self.role, self.role), text)


class StreamOptions(_Wire):
    include_usage: bool | None = None


SEED_LIMIT = 2**63  # the plugin reads seed as an int64: 2^64-1 fails it (1), 2^70 (2)
Tokens = Annotated[int | None, Field(ge=1, le=MAX_TOKENS)]
Penalty = Annotated[float | None, Field(ge=-2, le=2)]
THREAD_ID = ("Extension: the exchange is a turn of this synced thread. The last message must "
             "be the user's; the prompt is the thread's history; a new thread is created and "
             "seeded with the earlier messages (system ones excluded).")


class ChatBody(_Wire):
    """The body of ``POST /v1/chat/completions``. Unknown fields are ignored, as OpenAI
    clients send many. Of several things wrong the one answered is the first field's in
    the order they are declared (the order the API has always checked them in)."""

    model: str | None = Field(None, description="Ignored: the device serves one model.")
    n: Literal[1] | None = None
    tools: Annotated[list[Any] | None, Field(
        max_length=0, description="Not supported: absent, null or [].")] = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_completion_tokens: Tokens = None
    max_tokens: Tokens = None
    temperature: Annotated[float | None, Field(ge=0, le=2)] = None
    top_p: Annotated[float | None, Field(ge=0, le=1)] = None
    # A seed the plugin takes, refused here before the guest sees it (genuine WasmEdge
    # would log the refusal on the guest's stdout and fail the request).
    seed: Annotated[int | None, Field(ge=0, le=SEED_LIMIT - 1)] = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    thread_id: Annotated[str, BeforeValidator(string_id(
        "thread", "thread_id", "a string (the id of a synced thread)")), ID_SCHEMA] | None = Field(
        None, description=THREAD_ID)
    input_id: Annotated[str, BeforeValidator(string_id(
        "message", "input_id", "a string (the id of the turn's input message)")),
        ID_SCHEMA] | None = Field(None, description="With thread_id: the turn's input id "
                                  "(a retry names it again).")

    def request(self) -> ChatRequest:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        params = ChatParams(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature, top_p=self.top_p, seed=self.seed,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            stop=stop,
        )
        return ChatRequest(
            messages=tuple(message.message() for message in self.messages),
            params=params,
            stream=bool(self.stream),
            include_usage=bool(self.stream_options and self.stream_options.include_usage),
            model=self.model,
            thread_id=self.thread_id,
            input_id=self.input_id,
        )


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a /v1/chat/completions body (:class:`ChatBody`); BadRequest on the first
    problem, in the API's words."""
    try:
        return ChatBody.model_validate(body).request()
    except ValidationError as exc:
        raise _bad_request(exc.errors()) from None


def _bad_request(errors: list[ErrorDetails]) -> BadRequest:
    """The API's message for the first of ``errors``, named by its field."""
    first = errors[0]
    loc = first["loc"]
    if not loc:
        return BadRequest("the request body must be a JSON object")
    field = str(loc[0])
    if first["type"] == OURS:
        return BadRequest(str((first.get("ctx") or {})["message"]), field)
    if field == "messages":
        return _bad_message(loc, first, errors)
    if field == "stream_options" and len(loc) > 1:
        return BadRequest("stream_options.include_usage must be a boolean",
                          "stream_options.include_usage")
    fixed = {
        "n": "only n=1 is supported",
        "tools": "tools are not supported by this server",
        "model": "model must be a string",
        "stream": "stream must be a boolean",
        "stream_options": "stream_options must be an object",
        "stop": f"stop must be a string or a list of up to {MAX_STOP_STRINGS} strings",
    }
    if field in fixed:
        return BadRequest(fixed[field], field)
    low, high = _bounds(field)
    whole = int in get_args(ChatBody.model_fields[field].annotation)
    if first["type"] not in ("greater_than_equal", "less_than_equal"):
        return BadRequest(f"{field} must be {'an integer' if whole else 'a number'}", field)
    if field.startswith("max_"):  # max_completion_tokens is OpenAI's new max_tokens
        bound = f"at least {low}" if first["type"] == "greater_than_equal" else f"at most {high}"
        return BadRequest(f"max_tokens must be {bound}", "max_tokens")
    if whole:
        return BadRequest(f"{field} must be between {low} and {high}", field)
    return BadRequest(f"{field} must be between {low:g} and {high:g}, got {first['input']}",
                      field)


def _bounds(field: str) -> tuple[Any, Any]:
    """The (ge, le) bounds of a field of :class:`ChatBody`, as its annotation says."""
    metadata = ChatBody.model_fields[field].metadata
    low = next(item.ge for item in metadata if hasattr(item, "ge"))
    high = next(item.le for item in metadata if hasattr(item, "le"))
    return low, high


def _bad_message(loc: tuple[int | str, ...], first: ErrorDetails,
                 errors: list[ErrorDetails]) -> BadRequest:
    if len(loc) == 1:
        return BadRequest("messages must be a non-empty list of {role, content} objects",
                          "messages")
    where = f"messages[{loc[1]}]"
    if len(loc) == 2:
        return BadRequest(f"{where} must be an object with role and content", where)
    if loc[2] == "role":
        got = first["input"] if first["type"] != "missing" else None
        return BadRequest(f"{where}.role must be one of {', '.join(ROLES)} (got {got!r})",
                          f"{where}.role")
    where += ".content"
    if any(error["loc"][:3] == loc[:3] and len(error["loc"]) > 4 for error in errors):
        return BadRequest(f"{where}: only text parts ({{\"type\": \"text\", \"text\": …}}) "
                          "are supported", where)
    return BadRequest(f"{where} must be a string or a list of text parts", where)


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
