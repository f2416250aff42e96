"""The fleet's documents in Redis (JSON only), shared by the agent and the controller.

- :class:`Revision`: one immutable version of what a fleet runs (the manifest's
  ``spec.runtime``, ``spec.model``, ``spec.app``, ``spec.sync`` as plain JSON), named
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
  kept in this document's ``rollout`` field.)
- :class:`DeviceView` (not stored): one device's documents as one pass read them, and
  :data:`Move`, a device's next desired revision and spec.

Field names are the wire format: add fields freely, never rename them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from edgebundle.errors import StateError

DEVICE_STATUSES = ("pending", "applying", "healthy", "failed")
ROLLOUT_STATUSES = ("progressing", "paused", "complete", "rolling_back", "rolled_back",
                    "frozen", "failed")
HEARTBEAT_INTERVAL = 5.0  # s between an agent's heartbeats
HEARTBEAT_TTL = 15  # s a heartbeat lives: three missed beats = offline
DEFAULT_RETRIES = 2  # an agent's attempts per generation when the manifest does not say


def shallow_json(document: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict for serialising, nested values shared, not copied:
    dataclasses.asdict deep-copies every spec, which costs a controller pass over
    thousands of devices more than the JSON encoding itself."""
    return {f.name: getattr(document, f.name) for f in fields(document)}


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


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


def _known_status(status: Any, known: Sequence[str], what: str) -> str:
    if status not in known:
        raise StateError(f"unknown {what} status {status!r} in Redis: a newer edgebundle "
                         "wrote it, or it was changed by hand")
    return str(status)


@dataclass(frozen=True)
class Revision:
    """What a fleet runs: ``spec`` = {"runtime", "model", "app", "sync"} of the manifest."""

    id: str
    fleet: str
    spec: dict[str, Any]
    created_at: float = 0.0
    manifest: str = ""  # where it came from (file name), for people reading status

    @staticmethod
    def id_for(spec: dict[str, Any]) -> str:
        return "rev-" + hashlib.sha256(dumps(spec).encode()).hexdigest()[:12]

    def to_json(self) -> dict[str, Any]:
        return shallow_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Revision:
        return cls(id=data["id"], fleet=data["fleet"], spec=data["spec"],
                   created_at=float(data.get("created_at", 0.0)),
                   manifest=str(data.get("manifest", "")))


@dataclass(frozen=True)
class DesiredState:
    generation: int
    revision: str
    spec: dict[str, Any]  # the revision's spec, with this device's pins applied
    written_at: float = 0.0
    retries: int = DEFAULT_RETRIES  # the agent's attempts at this generation (spec.rollout.retries)

    def to_json(self) -> dict[str, Any]:
        return shallow_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DesiredState:
        return cls(generation=int(data["generation"]), revision=str(data["revision"]),
                   spec=dict(data["spec"]), written_at=float(data.get("written_at", 0.0)),
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
    rollout: dict[str, Any] = field(default_factory=dict)  # the manifest's spec.rollout
    groups: list[dict[str, Any]] = field(default_factory=list)  # the manifest's spec.groups
    pins: dict[str, Any] = field(default_factory=dict)  # the manifest's spec.devices
    message: str = ""  # why it stopped, for status

    def to_json(self) -> dict[str, Any]:
        return shallow_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutState:
        status = _known_status(data.get("status", "progressing"), ROLLOUT_STATUSES, "rollout")
        return cls(revision=data["revision"], previous=data.get("previous"), status=status,
                   phase=int(data.get("phase", 0)),
                   phase_started_at=float(data.get("phase_started_at", 0.0)),
                   started_at=float(data.get("started_at", 0.0)),
                   deadline_at=float(data.get("deadline_at", 0.0)),
                   rollout=dict(data.get("rollout", {})), groups=list(data.get("groups", [])),
                   pins=dict(data.get("pins", {})), message=str(data.get("message", "")))


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


Move = tuple[DeviceView, Revision, dict[str, Any]]  # a device, its new revision and spec
