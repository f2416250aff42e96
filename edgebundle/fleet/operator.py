"""The operator's fleet API: plan, apply, status, pause, resume, rollback, and waiting.

Owns what ``edgebundle fleet …`` does to a fleet's Redis documents, without the CLI:
:func:`plan` says what an apply would change, per device; :func:`apply` stores the
manifest's :class:`~edgebundle.fleet.documents.Revision` and starts a RolloutState (applying the
revision that is already rolling out or rolled out changes nothing and says so);
:func:`wait` follows a rollout until it finishes. The controller's run loop
(:mod:`edgebundle.fleet.controller`) moves the devices. Manifests are the validated
:class:`~edgebundle.fleet.manifest.Manifest` (a script holding a plain dict validates it
with ``Manifest.model_validate``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from edgebundle.errors import ConfigError, UsageError
from edgebundle.fleet import rules, selection
from edgebundle.fleet.controller import Controller, TickSummary
from edgebundle.fleet.documents import Revision, RolloutState
from edgebundle.fleet.manifest import Manifest
from edgebundle.fleet.rules import FINISHED
from edgebundle.fleet.store import FleetStore, read_devices
from edgebundle.sync.client import Client

CAS_ATTEMPTS = 5  # an operator command retries its compare-and-set this often
WAIT_POLL = 2.0  # s between status reads of wait()

@dataclass
class PlannedChange:
    device: str
    current: str | None  # its desired revision now
    new: str | None  # the revision it will get (its pin when pinned)
    phase: int | None  # the first phase that covers it (None: pinned or no phase)
    action: str  # "update", "none" or "pin"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    fleet: str
    revision: str
    previous: str | None
    noop: bool  # the revision is already the fleet's rollout target
    message: str
    changes: list[PlannedChange]

    def to_json(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "revision": self.revision, "previous": self.previous,
                "noop": self.noop, "message": self.message,
                "changes": [change.to_json() for change in self.changes]}


@dataclass
class ApplyResult:
    fleet: str
    revision: str
    previous: str | None
    changed: bool
    message: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeviceStatus:
    """One device in ``fleet status`` (its JSON keys are the wire format)."""

    device: str
    labels: dict[str, str]
    online: bool
    state: str | None  # its state in the rollout (rules.device_state); None: no rollout
    desired_revision: str | None
    desired_generation: int | None
    actual_revision: str | None
    actual_generation: int | None
    actual_status: str | None
    attempts: int
    last_error: str | None
    doctor_ok: bool | None
    doctor_failed: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceStatus:
        """From its JSON (what ``fleet status --json`` prints); KeyError if a key is missing."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass
class FleetStatus:
    fleet: str
    state: RolloutState | None  # the fleet's rollout document (None: nothing applied yet)
    paused: bool
    devices: list[DeviceStatus]
    ignored: dict[str, str] = field(default_factory=dict)  # set members left out, and why

    def to_json(self) -> dict[str, Any]:
        """``fleet status --json``: the rollout document as stored, and each device."""
        return {"fleet": self.fleet,
                "rollout": self.state.to_json() if self.state is not None else None,
                "paused": self.paused,
                "devices": [device.to_json() for device in self.devices],
                "ignored": dict(self.ignored)}


@dataclass(frozen=True)
class WaitResult:
    """How :func:`wait` ended: a finished rollout's status (complete, rolled_back, frozen,
    failed), "replaced" or "timeout"; and why."""

    status: str
    message: str


# -- the manifest ------------------------------------------------------------------------


def redis_url(flag: str | None, manifest: Manifest | None = None) -> str:
    """The fleet's Redis: the flag (or EDGEBUNDLE_REDIS_URL, which the CLI reads into
    it), else the manifest's ``spec.sync.redis_url``."""
    if flag:
        return flag
    if manifest is not None and manifest.spec.sync.redis_url:
        return str(manifest.spec.sync.redis_url)
    raise ConfigError("no Redis for the fleet: pass --redis-url or set EDGEBUNDLE_REDIS_URL")


# -- the commands ------------------------------------------------------------------------


async def plan(redis: Client, manifest: Manifest) -> Plan:
    """What :func:`apply` would change: per registered device, its desired revision now,
    the one it will get, and the first phase that covers it."""
    fleet = manifest.name
    spec = manifest.revision_spec()
    revision_id = Revision.id_for(spec)
    _, current = await FleetStore(redis, fleet).read_rollout()
    previous = rules.previous_of(current, revision_id)
    rollout = rules.new_rollout(manifest, 0.0, revision_id, previous)
    views, _ = await read_devices(redis, fleet)
    cumulative = selection.cumulative_phases(rollout.policy.phases, rollout.groups,
                                             {v.id: v.labels for v in views})
    changes = []
    for view in views:
        current_rev = view.desired.revision if view.desired else None
        entry = rollout.pins.get(view.id)
        pin = selection.pinned_revision(entry)
        if pin is not None:
            changes.append(PlannedChange(view.id, current_rev, pin, None,
                                         "none" if current_rev == pin else "pin"))
            continue
        wanted = selection.device_spec(spec, entry)
        same = view.desired is not None and view.desired.revision == revision_id \
            and view.desired.spec == wanted
        changes.append(PlannedChange(view.id, current_rev, revision_id,
                                     selection.first_phase_of(view.id, cumulative),
                                     "none" if same else "update"))
    noop = current is not None and current.revision == revision_id \
        and current.status in ("progressing", "complete")
    updates = sum(1 for change in changes if change.action != "none")
    message = (f"{revision_id} is already the rollout target ({current.status})"
               if noop and current is not None
               else f"{updates} of {len(changes)} device(s) would change to {revision_id}")
    return Plan(fleet, revision_id, previous, noop, message, changes)


async def apply(redis: Client, manifest: Manifest, *, now: float | None = None,
                source: str = "") -> ApplyResult:
    """Store the manifest's revision and start its rollout (phase 0, deadline set).

    Applying the revision that is already progressing or complete starts nothing (the
    rollout's settings, groups and per-device entries are updated in place); after a
    rollback, freeze or failure it starts the rollout again.
    """
    now = time.time() if now is None else now
    fleet = manifest.name
    spec = manifest.revision_spec()
    revision = Revision(id=Revision.id_for(spec), fleet=fleet, spec=spec, created_at=now,
                        manifest=source)
    store = FleetStore(redis, fleet)
    for _ in range(CAS_ATTEMPTS):
        raw, current = await store.read_rollout()
        fresh = rules.new_rollout(manifest, now, revision.id,
                                  rules.previous_of(current, revision.id))
        if current is not None and current.revision == revision.id \
                and current.status in ("progressing", "complete"):
            updated = replace(current, policy=fresh.policy, groups=fresh.groups, pins=fresh.pins)
            if updated == current:
                return ApplyResult(fleet, revision.id, current.previous, False,
                                   f"no change: {revision.id} is already {current.status}")
            if await store.write_rollout(raw, updated, revision=revision) == "ok":
                return ApplyResult(fleet, revision.id, current.previous, True,
                                   f"{revision.id} unchanged ({current.status}); "
                                   "rollout settings updated")
            continue
        if await store.write_rollout(raw, fresh, revision=revision) == "ok":
            return ApplyResult(fleet, revision.id, fresh.previous, True,
                               f"rolling out {revision.id}"
                               + (f" (previous {fresh.previous})" if fresh.previous else ""))
    raise UsageError(f"the rollout of fleet {fleet} kept changing while applying: try again")


async def status(redis: Client, fleet: str, *, now: float | None = None) -> FleetStatus:
    """Per device: desired revision/generation, actual revision/status/attempts/error,
    online, doctor, and its state in the rollout; plus the rollout itself."""
    now = time.time() if now is None else now
    store = FleetStore(redis, fleet)
    _, rollout = await store.read_rollout()
    paused = await store.is_paused()
    views, ignored = await read_devices(redis, fleet)
    target = None
    if rollout is not None:
        target = (await store.revisions([rollout.revision])).get(rollout.revision)
    devices: list[DeviceStatus] = []
    for view in views:
        desired, actual = view.desired, view.actual
        state = (rules.device_state(view, rollout, target, now)
                 if rollout is not None and target is not None else None)
        devices.append(DeviceStatus(
            device=view.id, labels=view.labels, online=view.online, state=state,
            desired_revision=desired.revision if desired else None,
            desired_generation=desired.generation if desired else None,
            actual_revision=actual.revision if actual else None,
            actual_generation=actual.generation if actual else None,
            actual_status=actual.status if actual else None,
            attempts=actual.attempts if actual else 0,
            last_error=(actual.last_error if actual else None) or view.unreadable,
            doctor_ok=actual.doctor_ok if actual else None,
            doctor_failed=list(actual.doctor_failed) if actual else []))
    return FleetStatus(fleet, rollout, paused, devices, ignored)


async def pause(redis: Client, fleet: str, *, now: float | None = None) -> bool:
    """Pause the fleet's rollout (ticks move nothing); False if it was paused already."""
    now = time.time() if now is None else now
    return await FleetStore(redis, fleet).pause(now)


async def resume(redis: Client, fleet: str, *, now: float | None = None) -> bool:
    """Resume; the progress deadline and the phase's ``after`` are shifted by the pause
    (so time spent paused counts against neither). False if it was not paused."""
    now = time.time() if now is None else now
    store = FleetStore(redis, fleet)
    for _ in range(CAS_ATTEMPTS):
        paused_at = await store.paused_at()
        if paused_at is None:
            return False
        raw, rollout = await store.read_rollout()
        if rollout is None:
            await store.unpause()
            return True
        shift = max(0.0, now - float(paused_at))
        updated = replace(rollout, phase_started_at=rollout.phase_started_at + shift,
                          deadline_at=rollout.deadline_at + shift if rollout.deadline_at else 0.0)
        if await store.write_rollout(raw, updated, resume=True) == "ok":
            return True
    raise UsageError(f"the rollout of fleet {fleet} kept changing while resuming: try again")


async def rollback(redis: Client, fleet: str, *, now: float | None = None) -> TickSummary:
    """The operator's rollback: every device on the rollout's target goes back to the
    previous revision (new generation), as an automatic rollback does."""
    now = time.time() if now is None else now
    controller = Controller(redis, fleet)
    raw, rollout = await controller.store.read_rollout()
    if rollout is None:
        raise UsageError(f"fleet {fleet} has no rollout to roll back: apply a manifest first")
    if not rollout.previous:
        raise UsageError(f"fleet {fleet} has no previous revision to roll back to "
                         f"({rollout.revision} is its first)")
    views, ignored = await read_devices(redis, fleet)
    summary = TickSummary(fleet=fleet, acted=True, status=rollout.status, phase=rollout.phase,
                          ignored=ignored)
    message = rollout.message if rollout.status in ("rolling_back", "rolled_back") \
        else "rolled back by the operator"
    return await controller.roll_back(raw, rollout, views, now, summary, message)


async def wait(redis: Client, fleet: str, revision: str, timeout: float, *,
               poll: float = WAIT_POLL) -> WaitResult:
    """Follow the rollout of ``revision`` until it finishes, another revision replaces it
    (status "replaced") or ``timeout`` s pass (status "timeout"; 0 = no limit)."""
    deadline = time.monotonic() + timeout if timeout > 0 else None
    while True:
        rollout = (await status(redis, fleet)).state
        if rollout is None or rollout.revision != revision:
            return WaitResult("replaced", "another revision was applied: "
                                          f"{rollout.revision if rollout else None}")
        if rollout.status in FINISHED:
            return WaitResult(rollout.status, rollout.message)
        if deadline is not None and time.monotonic() > deadline:
            return WaitResult("timeout", f"still {rollout.status} after {timeout:g}s "
                                         f"(phase {rollout.phase})")
        await asyncio.sleep(poll)
