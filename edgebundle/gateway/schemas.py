"""The schemas of the OpenAPI document (:mod:`edgebundle.gateway.openapi`), written by
pydantic from the models the gateway has: the request bodies (:mod:`.openai_api`,
:mod:`.sync_bodies`), the sync objects (:mod:`edgebundle.sync.models`), and here, as
typed dicts, the shapes of the other answers no model describes: the two error shapes,
a chat completion, the health probe and one server-sent event. Typed dicts, not
models: a key that may be left out is ``NotRequired`` (absent), not a default, which
is what an answer does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import Field, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode
from pydantic_core import CoreSchema
from typing_extensions import TypedDict  # pydantic needs it before Python 3.12

from edgebundle.gateway.openai_api import ChatBody
from edgebundle.gateway.sync_bodies import (
    ID_SCHEMA,
    CancelBody,
    NewThreadBody,
    PushBody,
    RunBody,
)
from edgebundle.sync.models import (
    MESSAGE_STATUSES,
    ROLES,
    RUN_REASONS,
    RUN_STATUSES,
    Run,
    SyncState,
    ThreadMessage,
)

Schema = dict[str, Any]
REF = "#/components/schemas/{model}"


class OpenAIErrorDetail(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(TypedDict):
    """OpenAI's error object."""

    error: OpenAIErrorDetail


class SyncError(TypedDict):
    """The error of the sync routes."""

    error: Annotated[str, Field(description=(
        "A code: invalid_request, invalid_json, thread_not_found, run_not_found, "
        "epoch_mismatch, thread_busy, run_ended, thread_full, message_too_large, "
        "body_too_large, too_many_streams, too_many_runs, queue_full, invalid_host, "
        "forbidden_origin, unsupported_media_type, redis_unavailable, offline, sync_error."))]
    message: Annotated[str, Field(description="What is wrong and how to fix it.")]
    epoch: NotRequired[str | None]
    active_run: NotRequired[Run | None]


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    dropped_messages: NotRequired[Annotated[int, Field(description=(
        "With thread_id: older messages of the thread the prompt left out to fit the "
        "context."))]]


class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: str


class Choice(TypedDict):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Health(TypedDict):
    status: Literal["ok", "loading"]
    model: NotRequired[str]
    runtime: NotRequired[str]


class SseEvent(TypedDict):
    """One server-sent event, as SSE parsers (and schemathesis) see it: its fields,
    data a string."""

    event: NotRequired[str]
    data: NotRequired[str]
    id: NotRequired[str]
    retry: NotRequired[int]


BODIES: tuple[type, ...] = (ChatBody, NewThreadBody, PushBody, RunBody, CancelBody)
ANSWERS: tuple[type, ...] = (ChatCompletion, Health, OpenAIError, SseEvent, SyncError,
                             SyncState, Run)


class _Untitled(GenerateJsonSchema):
    """pydantic's schemas without the title it gives each field (its name, capitalised)."""

    def field_title_should_be_set(self, schema: CoreSchema) -> bool:
        return False


def components() -> dict[str, Schema]:
    """The OpenAPI document's components: the request bodies as pydantic validates
    them, the answers as they are written, and every model these hold."""
    inputs: list[tuple[type, JsonSchemaMode, TypeAdapter[Any]]] = [
        (kind, "validation", TypeAdapter(kind)) for kind in BODIES]
    inputs += [(kind, "serialization", TypeAdapter(kind)) for kind in ANSWERS]
    _, top = TypeAdapter.json_schemas(inputs, ref_template=REF, schema_generator=_Untitled)
    schemas: dict[str, Schema] = top["$defs"]
    _sync_objects(schemas)
    return schemas


def _sync_objects(schemas: dict[str, Schema]) -> None:
    """What pydantic cannot see in the sync objects, plain dataclasses: their
    ``to_json`` writes every field (so all are required), and their str fields of a
    fixed set take its values (constants of :mod:`edgebundle.sync.models`, not types)."""
    enums: dict[str, dict[str, tuple[str | None, ...]]] = {
        "ThreadMessage": {"role": ROLES, "status": MESSAGE_STATUSES},
        "Run": {"status": RUN_STATUSES, "reason": RUN_REASONS}}
    for kind in (ThreadMessage, Run, SyncState):
        schema = schemas[kind.__name__]
        schema["required"] = list(schema["properties"])
        for name, values in enums.get(kind.__name__, {}).items():
            schema["properties"][name]["enum"] = list(values)
    schemas["ThreadMessage"]["properties"]["id"].update(ID_SCHEMA.json_schema)
