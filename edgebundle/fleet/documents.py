"""The fleet's documents in Redis (JSON only), shared by the agent and the controller.

- :class:`Revision`: one immutable version of what a fleet runs (the manifest's
  ``spec.runtime``, ``spec.model``, ``spec.app``, ``spec.sync``: a
  :class:`~edgebundle.fleet.manifest.RevisionSpec`, stored in its normal form), named
  by a hash of its content, so applying the same manifest twice is the same revision.
- :class:`DesiredState` (per device, written by the controller): the revision the
  device must run and a ``generation`` that grows by one on every change, so the
  agent and the controller can tell "not yet seen" from "tried and failed" without
  clocks. Durable: the nudge on pub/sub is only a hint, agents also re-read it.
- :class:`ActualState` (per device, written by the agent): the generation it last
  worked on, the revision it runs, its status, attempts, last error and doctor result.
- :class:`Heartbeat` (per device, with a TTL): the device is online while it exists.
- :class:`RolloutState` (per fleet, written by the controller): where a rollout is, so a
  controller that restarts continues where the last one stopped. (Not the manifest's
  ``spec.rollout``, :class:`edgebundle.fleet.manifest.Rollout`: that is the policy,
  the attribute :attr:`RolloutState.policy`, stored under the key ``rollout``; its
  ``groups`` and ``pins`` are the manifest's :class:`~edgebundle.fleet.manifest.Group`
  and :class:`~edgebundle.fleet.manifest.Device` entries, typed by the same schema.)
- :class:`DeviceView` (not stored): one device's documents as one pass read them, and
  :class:`Move`, a device's next desired revision and spec.

JSON keys are the wire format: add keys freely, never rename them. Every document is
read with :func:`read_document`: a corrupt one is a :class:`~edgebundle.errors.StateError`
naming its Redis key.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple, TypeVar

from pydantic import ValidationError

from edgebundle.errors import StateError
from edgebundle.fleet.manifest import DEFAULT_RETRIES as DEFAULT_RETRIES  # re-exported
from edgebundle.fleet.manifest import Device, Group, RevisionSpec, Rollout
from edgebundle.fleet.wire import dumps as dumps  # re-exported: one encoding for every document
from edgebundle.fleet.wire import revision_id

DEVICE_STATUSES = ("pending", "applying", "healthy", "failed")
ROLLOUT_STATUSES = ("progressing", "paused", "complete", "rolling_back", "rolled_back",
                    "frozen", "failed")
HEARTBEAT_INTERVAL = 5.0  # s between an agent's heartbeats
HEARTBEAT_TTL = 15  # s a heartbeat lives: three missed beats = offline
T = TypeVar("T")


def shallow_json(document: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict for serialising, nested values shared, not copied:
    dataclasses.asdict deep-copies every spec, which costs a controller pass over
    thousands of devices more than the JSON encoding itself."""
    return {f.name: getattr(document, f.name) for f in fields(document)}


def loads(raw: str | bytes | None, what: str) -> dict[str, Any] | None:
    """A JSON object from Redis, None if the key is missing; StateError if corrupt."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        raise StateError(f"{what} in Redis is not valid JSON: rewrite it (fleet apply)") from None
    if not isinstance(value, dict):
        raise StateError(f"{what} in Redis is not a JSON object: rewrite it (fleet apply)")
    return value


def read_document(raw: str | bytes | None, key: str,
                  parse: Callable[[dict[str, Any]], T]) -> T | None:
    """The document stored at Redis key ``key`` (None if missing), parsed by ``parse``
    (a ``from_json``); StateError naming the key if it is corrupt or of the wrong shape."""
    data = loads(raw, key)
    if data is None:
        return None
    try:
        return parse(data)
    except StateError as exc:
        raise StateError(f"{key}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"{key} in Redis is not a valid document ({_why(exc)}): rewrite it "
                         "(fleet apply)") from None


def _why(exc: Exception) -> str:
    return f"no {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)


def _validated(name: str, parse: Callable[[Any], T], value: Any) -> T:
    """``parse(value)`` (a pydantic ``model_validate``); ValueError located under ``name``
    (the document's key) if the value does not fit the manifest's schema."""
    try:
        return parse(value)
    except ValidationError as exc:
        raise ValueError("; ".join(
            f"{'.'.join(str(part) for part in (name, *error['loc']))}: {error['msg']}"
            for error in exc.errors()[:3])) from None


def _spec(value: Any) -> RevisionSpec:
    """A stored revision spec, validated by the manifest's schema (ValueError if not)."""
    return _validated("spec", RevisionSpec.from_json, value)


def _known_status(status: Any, known: Sequence[str], what: str) -> str:
    if status not in known:
        raise StateError(f"unknown {what} status {status!r} in Redis: a newer edgebundle "
                         "wrote it, or it was changed by hand")
    return str(status)


@dataclass(frozen=True)
class Revision:
    """What a fleet runs: ``spec``, the manifest's runtime, model, app and sync."""

    id: str
    fleet: str
    spec: RevisionSpec
    created_at: float = 0.0
    manifest: str = ""  # where it came from (file name), for people reading status

    @staticmethod
    def id_for(spec: RevisionSpec) -> str:
        return revision_id(spec.to_json())

    def to_json(self) -> dict[str, Any]:
        return {**shallow_json(self), "spec": self.spec.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Revision:
        return cls(id=data["id"], fleet=data["fleet"], spec=_spec(data["spec"]),
                   created_at=float(data.get("created_at", 0.0)),
                   manifest=str(data.get("manifest", "")))


@dataclass(frozen=True)
class DesiredState:
    generation: int
    revision: str
    spec: RevisionSpec  # the revision's spec, with this device's overrides applied
    written_at: float = 0.0
    retries: int = DEFAULT_RETRIES  # the agent's attempts at this generation (spec.rollout.retries)

    def to_json(self) -> dict[str, Any]:
        return {**shallow_json(self), "spec": self.spec.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DesiredState:
        return cls(generation=int(data["generation"]), revision=str(data["revision"]),
                   spec=_spec(data["spec"]), written_at=float(data.get("written_at", 0.0)),
                   retries=int(data.get("retries", DEFAULT_RETRIES)))


@dataclass(frozen=True)
class ActualState:
    generation: int = 0  # the desired generation this report is about
    revision: str | None = None  # the revision running now (None: nothing yet)
    status: str = "pending"  # DEVICE_STATUSES
    attempts: int = 0  # tries of this generation so far
    last_error: str | None = None
    doctor_ok: bool | None = None
    doctor_failed: list[str] = field(default_factory=list)  # ids of failing checks
    running_since: float = 0.0  # when the running revision started
    updated_at: float = 0.0
    # What the running revision runs on: "embedded" or the WasmEdge dir that
    # <home>/runtime/current points at (e.g. "wasmedge-0.14.1-cpu"); None: nothing yet.
    runtime: str | None = None

    def to_json(self) -> dict[str, Any]:
        return shallow_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ActualState:
        status = _known_status(data.get("status", "pending"), DEVICE_STATUSES, "device")
        return cls(generation=int(data.get("generation", 0)), revision=data.get("revision"),
                   status=status, attempts=int(data.get("attempts", 0)),
                   last_error=data.get("last_error"), doctor_ok=data.get("doctor_ok"),
                   doctor_failed=list(data.get("doctor_failed", [])),
                   running_since=float(data.get("running_since", 0.0)),
                   updated_at=float(data.get("updated_at", 0.0)),
                   runtime=data.get("runtime"))


@dataclass(frozen=True)
class Heartbeat:
    at: float
    generation: int = 0
    revision: str | None = None
    doctor_ok: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return shallow_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Heartbeat:
        return cls(at=float(data["at"]), generation=int(data.get("generation", 0)),
                   revision=data.get("revision"), doctor_ok=data.get("doctor_ok"))


@dataclass(frozen=True)
class RolloutState:
    revision: str  # rolling out to this
    previous: str | None  # what the fleet ran before (the rollback target)
    status: str = "progressing"  # ROLLOUT_STATUSES
    phase: int = 0  # index into the manifest's rollout phases
    phase_started_at: float = 0.0
    started_at: float = 0.0
    deadline_at: float = 0.0  # progress deadline (0 = none)
    policy: Rollout = field(default_factory=Rollout)  # the manifest's spec.rollout ("rollout")
    groups: tuple[Group, ...] = ()  # the manifest's spec.groups
    pins: Mapping[str, Device] = field(default_factory=dict)  # the manifest's spec.devices
    message: str = ""  # why it stopped, for status

    def to_json(self) -> dict[str, Any]:
        data = shallow_json(self)
        del data["policy"]
        data.update(rollout=self.policy.to_json(),
                    groups=[group.to_json() for group in self.groups],
                    pins={device: entry.to_json() for device, entry in self.pins.items()})
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutState:
        status = _known_status(data.get("status", "progressing"), ROLLOUT_STATUSES, "rollout")
        pins = data.get("pins", {})
        if not isinstance(pins, dict):
            raise TypeError(f"pins is {type(pins).__name__}, not an object")
        return cls(revision=str(data["revision"]), previous=data.get("previous"), status=status,
                   phase=int(data.get("phase", 0)),
                   phase_started_at=float(data.get("phase_started_at", 0.0)),
                   started_at=float(data.get("started_at", 0.0)),
                   deadline_at=float(data.get("deadline_at", 0.0)),
                   policy=_validated("rollout", Rollout.model_validate, data.get("rollout", {})),
                   groups=tuple(_validated(f"groups.{index}", Group.model_validate, group)
                                for index, group in enumerate(data.get("groups", []))),
                   pins={str(device): _validated(f"pins.{device}", Device.model_validate, entry)
                         for device, entry in pins.items()},
                   message=str(data.get("message", "")))


@dataclass
class DeviceView:
    """One device of the fleet as the controller read it in one pass (not stored: the
    registration, desired, actual and heartbeat documents of one device, together)."""

    id: str
    labels: dict[str, str]
    desired: DesiredState | None
    actual: ActualState | None
    online: bool
    unreadable: str | None = None  # why a document could not be read (it is ignored)


class Move(NamedTuple):
    """A device's next desired state: its revision and its spec (the revision's, with the
    device's ``spec.devices`` entry applied)."""

    device: DeviceView
    revision: Revision
    spec: RevisionSpec
