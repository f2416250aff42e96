"""The request bodies of the sync API as pydantic models, and the messages for bad ones.

Owns what ``POST /v1/threads``, ``POST …/push``, ``POST …/runs`` and ``POST
…/runs/{id}/cancel`` accept (docs/api.md) and the one-line message a bad body is
refused with: a 400
``invalid_request`` through :class:`~edgebundle.errors.UsageError`, which the sync
API maps at its boundary. The messages are the API's (clients and tests read them),
so a check pydantic does itself (a type, a bound) is named here by the field it
failed on, and a check of ours raises its message as it is. Of several things wrong
the one answered is the first in its model's ``check_order``, the order the API has
always checked them in.

The mutations of a push are still checked one by one in :mod:`.sync_api`, in order,
each against the device's caps and the store's own rules
(:func:`edgebundle.sync.store.check_mutation`); :class:`PushBody` checks the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from edgebundle import keys
from edgebundle.completion import ChatParams
from edgebundle.errors import UsageError
from edgebundle.guest_protocol import MAX_TOKENS
from edgebundle.sync.models import MESSAGE_STATUSES, MULTITASK_POLICIES, ROLES
from edgebundle.sync.store import MAX_MUTATION_ID, MAX_POSITION, OPS

MAX_VERSION = 2**53 - 1  # a thread's version is a Lua number: exact up to here
NOT_BLANK = r"\S"
OURS = "invalid_request"  # the error type of a check of ours, its message in ctx

M = TypeVar("M", bound="Body")
# What keys.check_id accepts, for the OpenAPI schema (anchored: patterns match anywhere).
ID_SCHEMA = WithJsonSchema({"type": "string", "pattern": f"^{keys.ID_CHARS}$"})


def refuse(message: str) -> PydanticCustomError:
    # The message goes in the context: a template would read its braces as fields.
    return PydanticCustomError(OURS, "{message}", {"message": message})


def string_id(kind: str, field: str, what: str = "a string id") -> Callable[[Any], Any]:
    """A check of an id of ``kind`` (edgebundle.keys) named ``field`` in messages, which
    say a value that is no string is not ``what``; None passes (an optional id left out).
    Its JSON schema is :data:`ID_SCHEMA` (the check is code, so pydantic cannot tell)."""

    def check(value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise refuse(f"{field} must be {what}")
        try:
            return keys.check_id(kind, value)
        except UsageError as exc:
            raise refuse(f"{field}: {exc}") from None

    return check


def epoch_of(value: Any) -> str | None:
    """The epoch of the client's last sync (a body's or a query's); None (or "") for a
    client without one; UsageError for anything else."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise UsageError("epoch must be a string (the epoch of the client's last sync)")
    return value


def check_epoch(value: Any) -> str | None:
    try:
        return epoch_of(value)
    except UsageError as exc:
        raise refuse(str(exc)) from None


def check_multitask(value: Any) -> Any:
    if value not in MULTITASK_POLICIES:
        raise refuse(f"multitask must be one of {', '.join(MULTITASK_POLICIES)}, "
                     f"not {value!r}")
    return value


# A mutation of a push, as sync.store.check_mutation checks it: written here by hand
# because pydantic does not check it. The store does, one mutation at a time in order,
# for every writer of a thread (not only this API), with its own messages; this is what
# its checks accept, from the same constants.
_ID = ID_SCHEMA.json_schema
MUTATION = WithJsonSchema({"type": "object", "required": ["mid", "op", "message"], "properties": {
    "mid": {"type": "integer", "minimum": 1, "maximum": MAX_MUTATION_ID},
    "op": {"enum": list(OPS)},
    "message": {
        "type": "object", "required": ["id"],
        "description": "role and content are required for put.",
        "properties": {
            "id": _ID, "role": {"enum": list(ROLES)}, "content": {"type": "string"},
            "status": {"enum": list(MESSAGE_STATUSES)},
            "position": {"type": "number", "minimum": 0, "maximum": MAX_POSITION},
            "created_at": {"type": "number", "minimum": 0}, "run_id": _ID,
        },
    },
}})
DeviceId = Annotated[str, BeforeValidator(string_id("device", "device_id")), ID_SCHEMA]
Epoch = Annotated[str | None, BeforeValidator(check_epoch)]
Version = Annotated[int, Field(ge=0, le=MAX_VERSION)]


def _wire_schema(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """The JSON schema of a body as clients send it: a field :func:`parse` gets a
    default for from the route (``route_fills``) is optional there."""
    filled = getattr(model, "route_fills", ())
    if "required" in schema:
        schema["required"] = [name for name in schema["required"] if name not in filled]


class Body(BaseModel):
    # Strict: JSON's types as they are (no "1" for 1, no true for 1); keys we do not
    # know are left alone, as before. Patterns are Python's (\s as str.isspace).
    model_config = ConfigDict(strict=True, frozen=True, regex_engine="python-re",
                              json_schema_extra=_wire_schema)
    # Which of several errors the body is refused with: the first of these it has.
    check_order: ClassVar[tuple[str, ...]] = ()
    # Required here, but the route fills them in when the body leaves them out.
    route_fills: ClassVar[tuple[str, ...]] = ()


class TurnInput(Body):
    content: Annotated[str, Field(pattern=NOT_BLANK)]
    id: Annotated[str, BeforeValidator(string_id("message", "input.id")), ID_SCHEMA] | None = None


class RunParams(Body):
    max_tokens: Annotated[int | None, Field(ge=1, le=MAX_TOKENS)] = None
    temperature: Annotated[float | None, Field(ge=0, le=2)] = None

    def chat(self) -> ChatParams:
        return ChatParams(max_tokens=self.max_tokens, temperature=self.temperature)


class RunBody(Body):
    """``POST /v1/threads/{id}/runs``: a turn."""

    check_order = ("input", "multitask", "stream", "device_id", "epoch", "since", "input.id",
                   "params")
    route_fills = ("device_id",)

    input: TurnInput
    multitask: Annotated[str, BeforeValidator(check_multitask),
                         WithJsonSchema({"enum": list(MULTITASK_POLICIES)})] = "enqueue"
    stream: bool = Field(True, description="false: wait and answer the run object.")
    device_id: DeviceId = Field(description="The device the run is for (default: this one).")
    epoch: Epoch = Field(None, description="The epoch of the client's last sync.")
    since: Version = 0
    params: RunParams | None = None


class PushBody(Body):
    """``POST /v1/threads/{id}/push``: a device's mutations since its last sync."""

    check_order = ("reseed", "epoch", "device_id", "since", "mutations")

    reseed: bool = False
    epoch: Epoch = Field(None, description="Required unless reseed is true.")
    device_id: DeviceId
    since: Version = 0
    mutations: list[Annotated[Any, MUTATION]]

    @field_validator("device_id", mode="before")
    @classmethod
    def _epoch_given(cls, value: Any, info: ValidationInfo) -> Any:
        # Here, not after the model: the API has always said so before a bad device_id
        # (reseed and epoch are validated by now; one missing from data was refused).
        given = info.data
        if "reseed" in given and "epoch" in given and given["epoch"] is None \
                and not given["reseed"]:
            raise refuse("epoch is missing: send the epoch of your last sync (or reseed: true)")
        return value


class NewThreadBody(Body):
    """``POST /v1/threads``: an id of the client's choosing, or none."""

    id: Annotated[str, BeforeValidator(string_id("thread", "id")), ID_SCHEMA] | None = None


class CancelBody(Body):
    """``POST …/runs/{id}/cancel``: who cancels, and what the user saw of the reply."""

    check_order = ("content_seen", "device_id")
    route_fills = ("device_id",)

    content_seen: str | None = Field(
        None, description="The text the user saw: what the thread keeps.")
    device_id: DeviceId


def _message(error: ErrorDetails) -> str:
    """The API's message for ``error`` (the first of a body's errors: :func:`_rank`)."""
    if error["type"] == OURS:
        return str((error.get("ctx") or {})["message"])
    where = tuple(str(part) for part in error["loc"][:2])
    if where == ("input", "content") and error["type"] == "string_pattern_mismatch":
        return "input.content is empty: send the user's message"
    if where[0] == "input":
        return 'input must be an object {"content": "…"} with the user\'s message'
    if where[0] == "params":
        if where == ("params", "max_tokens"):
            return f"params.max_tokens must be an integer between 1 and {MAX_TOKENS}"
        if where == ("params", "temperature"):
            return "params.temperature must be a number between 0 and 2"
        return 'params must be an object such as {"max_tokens": 256}'
    field = where[0]
    if field == "since":
        if error["type"] in ("greater_than_equal", "less_than_equal"):
            return f"since must be between 0 and {MAX_VERSION}, got {error['input']}"
        return "since must be an integer"
    if field in ("stream", "reseed"):
        return f"{field} must be a boolean"
    if field == "mutations":
        return "mutations must be a list of {mid, op, message} objects"
    if field == "content_seen":
        return "content_seen must be a string (the text the user saw)"
    if field == "device_id":  # missing where it has no default
        return "device_id must be a string id"
    return f"{field}: {error['msg']}"  # a field without a message of its own


def parse(model: type[M], body: Mapping[str, Any], **defaults: Any) -> M:
    """``body`` as ``model``, ``defaults`` standing in for fields it leaves out;
    UsageError with the API's message for the first thing wrong."""
    try:
        return model.model_validate({**defaults, **body})
    except ValidationError as exc:
        first = min(exc.errors(), key=lambda error: _rank(model.check_order, error))
        raise UsageError(_message(first)) from None


def _rank(order: tuple[str, ...], error: ErrorDetails) -> int:
    loc = tuple(str(part) for part in error["loc"][:2])
    name = "input.id" if loc == ("input", "id") else loc[0] if loc else ""
    return order.index(name) if name in order else len(order)
