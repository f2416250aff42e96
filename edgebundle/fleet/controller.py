"""The rollout controller: moves a fleet to a new revision in phases; stops when devices get sick.

Everything it knows lives in Redis (keys in :mod:`edgebundle.fleet.keys`, documents in
:mod:`edgebundle.fleet.state`), so a controller that restarts, or another one that
takes over the lease, continues where the last one stopped. The core functions take a
``redis.asyncio`` client and, for decisions, an explicit clock ``now`` (seconds), so
the rules can be driven step by step:

- :func:`plan` says what an apply would change, per device; :func:`apply` stores the
  manifest's :class:`Revision` and starts a :class:`Rollout` (applying the revision
  that is already rolling out or rolled out changes nothing and says so).
- :meth:`Controller.tick` is ONE pass over every device of the fleet, read in batched
  round trips (MGET in chunks plus one pipelined HMGET per device, no per-device round
  trip). The fleet's device set is written by ``fleet provision``; a member whose id is
  invalid, that never registered, or that registered for another fleet is left out and
  reported (:func:`read_devices`), never a reason for a pass to fail. Per device,
  relative to the rollout's target revision:

  ``old``      its desired state is not the target (or a failure from before this
               rollout): the controller moves it when its phase is open and it is
               online, within ``max_unavailable``;
  ``updating`` moved, online, not yet healthy for the whole health window (applying,
               or healthy for less than ``health.window``): counts against
               ``max_unavailable``;
  ``healthy``  the agent reports the target at the desired generation, status healthy,
               doctor ok, running since at least ``health.window`` and heartbeating;
  ``failed``   the agent gave up on the desired generation (after its retries);
               failures above ``health.failure_threshold`` in the phase trigger
               ``on_failure`` (rollback: every device on the target goes back to the
               previous revision with a new generation; freeze: nothing moves any more);
  ``offline``  no heartbeat: pending, never failed. Offline devices are not moved (so
               a crowd coming back cannot exceed ``max_unavailable``); with
               ``offline: wait`` the phase waits for them, with ``skip`` it does not,
               and either way they are moved when they come back;
  ``pinned``   ``spec.devices[id].pin``: kept on that revision, outside the rollout.

  Phases are cumulative (:mod:`edgebundle.fleet.selection`). A phase opens ``after``
  its predecessor completed and must make progress within ``progress_deadline``: the
  clock starts when the phase opens and restarts on every pass that moves devices or
  finds only offline devices to wait for (a phase waiting for offline devices waits;
  it does not fail), so it runs out only on online devices stuck short of healthy.
  A pause (the ``paused`` key) makes a tick do nothing; resume shifts the deadline by
  the time spent paused.
- :func:`run_controller` ticks in a loop while holding the lease ``controller_lock``
  (``SET NX PX``, renewed each pass), so two controllers never act at once: every
  Rollout write checks the lease in the same Redis function, and every DesiredState
  write is a compare-and-set on the generation the controller read (the functions are
  the fleet part of the library in :mod:`edgebundle.sync.lua`).
- :func:`status`, :func:`pause`, :func:`resume`, :func:`rollback` are the operator's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError as _RedisPyError

from edgebundle.errors import EdgebundleError, UsageError
from edgebundle.fleet import keys, selection
from edgebundle.fleet.manifest import builtin_app
from edgebundle.fleet.state import (
    DEFAULT_RETRIES,
    ActualState,
    DesiredState,
    Revision,
    Rollout,
    dumps,
    loads,
)
from edgebundle.sync import lua
from edgebundle.sync.client import Client
from edgebundle.sync.keys import check_id

log = logging.getLogger(__name__)

LEASE_MS = 15_000  # the controller's lease; renewed every pass (TICK_INTERVAL)
TICK_INTERVAL = 2.0  # s between passes of run_controller
READ_CHUNK = 1000  # keys per MGET when reading the fleet
DEFAULT_MAX_UNAVAILABLE = 1
CLUSTER_CONCURRENCY = 200  # function calls in flight at once on a Redis Cluster
CAS_ATTEMPTS = 5  # an operator command retries its compare-and-set this often
ACTIVE = ("progressing", "rolling_back")
FINISHED = ("complete", "rolled_back", "frozen", "failed")

@dataclass
class DeviceView:
    """One device of the fleet as the controller read it in one pass."""

    id: str
    labels: dict[str, str]
    desired: DesiredState | None
    actual: ActualState | None
    online: bool
    unreadable: str | None = None  # why a document could not be read (it is ignored)


@dataclass
class TickSummary:
    fleet: str
    acted: bool  # False: no rollout, paused, or another controller holds the lease
    status: str | None = None  # the rollout's status after this pass
    phase: int | None = None
    moved: list[str] = field(default_factory=list)  # got the target revision this pass
    rolled_back: list[str] = field(default_factory=list)  # got the previous revision
    pinned: list[str] = field(default_factory=list)  # got their pinned revision
    counts: dict[str, int] = field(default_factory=dict)  # devices per state
    message: str = ""
    ignored: dict[str, str] = field(default_factory=dict)  # set members left out, and why

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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


@dataclass
class FleetStatus:
    fleet: str
    rollout: dict[str, Any] | None
    paused: bool
    devices: list[dict[str, Any]]
    ignored: dict[str, str] = field(default_factory=dict)  # set members left out, and why

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- the manifest (plain dict until the schema lands) ---------------------------------


def fleet_name(manifest: Mapping[str, Any]) -> str:
    try:
        return str(manifest["metadata"]["name"])
    except (KeyError, TypeError):
        raise UsageError("the manifest has no metadata.name: name the fleet") from None


def revision_spec(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The revision's spec: the manifest's runtime, model, app and sync. A validated
    manifest (Manifest.document()) has every default filled; for a bare dict the
    runtime and app default as the manifest schema's do."""
    spec = manifest.get("spec") or {}
    if "model" not in spec:
        raise UsageError("the manifest has no spec.model: say which model the fleet runs")
    return {"runtime": spec.get("runtime") or {"kind": "embedded"},
            "model": spec["model"],
            "app": spec.get("app") or builtin_app(),
            "sync": spec.get("sync") or {}}


def _manifest_rollout(manifest: Mapping[str, Any], now: float, revision: str,
                      previous: str | None) -> Rollout:
    spec = manifest.get("spec") or {}
    settings = dict(spec.get("rollout") or {})
    groups = [dict(group) for group in spec.get("groups") or []]
    for phase in selection.rollout_phases(settings):
        if "group" in phase:
            selection.group_devices(str(phase["group"]), groups, {})
    rollout = Rollout(revision=revision, previous=previous, status="progressing", phase=0,
                      phase_started_at=now, started_at=now, rollout=settings, groups=groups,
                      pins=dict(spec.get("devices") or {}))
    return replace(rollout, deadline_at=_deadline(rollout, now))


def _retries(rollout: Rollout) -> int:
    return int(rollout.rollout.get("retries", DEFAULT_RETRIES))


def _window(rollout: Rollout) -> float:
    return selection.duration_seconds((rollout.rollout.get("health") or {}).get("window"),
                                      "rollout.health.window")


def _progress_deadline(rollout: Rollout) -> float:
    return selection.duration_seconds(rollout.rollout.get("progress_deadline"),
                                      "rollout.progress_deadline")


def _deadline(rollout: Rollout, phase_started_at: float) -> float:
    limit = _progress_deadline(rollout)
    if limit <= 0:
        return 0.0
    return phase_started_at + _after(rollout, rollout.phase) + limit


def _after(rollout: Rollout, phase: int) -> float:
    phases = selection.rollout_phases(rollout.rollout)
    if phase >= len(phases):
        return 0.0
    return selection.duration_seconds(phases[phase].get("after"), f"rollout.phases[{phase}].after")


# -- reading the fleet -------------------------------------------------------------------


async def _get_many(redis: Client, names: Sequence[str]) -> list[str | None]:
    """Values of many string keys in few round trips (MGET chunks; per-key GETs on a cluster,
    where the client's pipeline batches them per node)."""
    if not names:
        return []
    pipe = redis.pipeline(transaction=False)
    if isinstance(redis, RedisCluster):
        for name in names:
            pipe.get(name)
        return list(await pipe.execute())
    for start in range(0, len(names), READ_CHUNK):
        pipe.mget(list(names[start:start + READ_CHUNK]))
    values: list[str | None] = []
    for chunk in await pipe.execute():
        values.extend(chunk)
    return values


ParseMemo = dict[tuple[str, str], tuple[str, Any]]  # (kind, device) -> (raw JSON, parsed)


async def read_devices(redis: Client, fleet: str, *, labels: bool = True,
                       memo: ParseMemo | None = None
                       ) -> tuple[list[DeviceView], dict[str, str]]:
    """Every device of the fleet, sorted by id, in a handful of round trips
    (``labels=False``: without their labels, when no group selects devices); and the
    members of the fleet's set that are ignored, with why.

    A member is a device of this fleet when its id is valid and its agent registered
    it for this fleet (its info hash says so). Ignored, so that one bad member cannot
    stop, stall or hijack a rollout: an invalid id (``bad}id`` names no keys), an id
    whose device never registered (a ghost: it would be waited for forever), and a
    device registered for another fleet (it must not get this fleet's revision). The
    set itself is written by ``fleet provision`` (devices may not write it).

    ``memo`` (kept by a long-running controller) skips re-parsing documents whose JSON
    did not change since the last pass: most of them, most of the time.
    """
    ignored: dict[str, str] = {}
    ids = []
    for member in sorted(str(device) for device in
                         await redis.smembers(keys.fleet_devices(fleet))):
        try:
            ids.append(check_id("device", member))
        except UsageError:
            ignored[member] = "not a valid device id"
    pipe = redis.pipeline(transaction=False)
    for device in ids:
        pipe.hmget(keys.device_info(device), ["fleet", "labels"] if labels else ["fleet"])
    info, desired_raw, actual_raw, heartbeat_raw = await asyncio.gather(
        pipe.execute(),
        _get_many(redis, [keys.desired(device) for device in ids]),
        _get_many(redis, [keys.actual(device) for device in ids]),
        _get_many(redis, [keys.heartbeat(device) for device in ids]),
    )
    memo = {} if memo is None else memo
    fresh: ParseMemo = {}

    def parsed(kind: str, device: str, raw: str | None, parse: Callable[[str], Any]) -> Any:
        if raw is None:
            return None
        known = memo.get((kind, device))
        value = known[1] if known is not None and known[0] == raw else parse(raw)
        fresh[(kind, device)] = (raw, value)
        return value

    views = []
    for index, device in enumerate(ids):
        registered = info[index][0]
        if registered != fleet:
            ignored[device] = ("never registered: no agent has run as this device"
                               if registered is None else f"registered for fleet {registered}")
            continue
        view = DeviceView(id=device, labels={}, desired=None, actual=None,
                          online=heartbeat_raw[index] is not None)
        try:
            if labels:
                view.labels = parsed("labels", device, info[index][1], _labels) or {}
            view.desired = parsed("desired", device, desired_raw[index], _desired)
            view.actual = parsed("actual", device, actual_raw[index], _actual)
        except (UsageError, KeyError, ValueError, TypeError) as exc:
            view.unreadable = f"{device}: {exc}"
        views.append(view)
    memo.clear()
    memo.update(fresh)
    return views, ignored


def _desired(raw: str) -> DesiredState:
    return DesiredState.from_json(loads(raw, "desired state") or {})


def _actual(raw: str) -> ActualState:
    return ActualState.from_json(loads(raw, "actual state") or {})


def _labels(raw: str) -> dict[str, str]:
    value = loads(raw, "device labels")
    return {str(key): str(item) for key, item in (value or {}).items()}


# -- the controller ---------------------------------------------------------------------


class Controller:
    """One fleet's controller; ``token`` is its lease token (None: acts without a lease,
    as the operator's commands do)."""

    def __init__(self, redis: Client, fleet: str, token: str | None = None,
                 lease_ms: int = LEASE_MS) -> None:
        self.redis = redis
        self.fleet = fleet
        self.token = token
        self.lease_ms = lease_ms
        self._functions = lua.Functions(redis)
        self._write_desired = lua.Function(self._functions, "write_desired")
        self._write_rollout = lua.Function(self._functions, "write_rollout")
        self._hold_lease = lua.Function(self._functions, "hold_lease")
        self._release_lease = lua.Function(self._functions, "release_lease")
        self.last_rollout_raw = ""  # the Rollout JSON this controller last wrote
        self._memo: ParseMemo = {}  # parsed device documents of the last pass

    # lease

    async def hold_lease(self) -> bool:
        """Take or renew the lease; False when another controller holds it."""
        if self.token is None:
            raise UsageError("this controller has no lease token")
        held = await self._hold_lease(keys=[keys.controller_lock(self.fleet)],
                                      args=[self.token, self.lease_ms])
        return bool(int(held))

    async def release_lease(self) -> None:
        if self.token is not None:
            await self._release_lease(keys=[keys.controller_lock(self.fleet)], args=[self.token])

    # documents

    async def read_rollout(self) -> tuple[str, Rollout | None]:
        raw = await self.redis.get(keys.rollout(self.fleet))
        data = loads(raw, f"the rollout of fleet {self.fleet}")
        return str(raw or ""), (Rollout.from_json(data) if data else None)

    async def write_rollout(self, expected: str, rollout: Rollout, *,
                            revision: Revision | None = None, resume: bool = False) -> str:
        """Compare-and-set the Rollout: 'ok' (then :attr:`last_rollout_raw` is what was
        written), 'changed' or 'lease'."""
        raw = dumps(rollout.to_json())
        reply = await self._write_rollout(
            keys=[keys.rollout(self.fleet), keys.controller_lock(self.fleet),
                  keys.revisions(self.fleet), keys.paused(self.fleet)],
            args=[expected, raw, self.token or "", revision.id if revision else "",
                  dumps(revision.to_json()) if revision else "", "resume" if resume else ""])
        if reply == "ok":
            self.last_rollout_raw = raw
        return str(reply)

    async def revisions(self, ids: Sequence[str | None]) -> dict[str, Revision]:
        wanted = sorted({rev for rev in ids if rev})
        if not wanted:
            return {}
        raws = await self.redis.hmget(keys.revisions(self.fleet), wanted)
        found = {}
        for rev, raw in zip(wanted, raws, strict=True):
            data = loads(raw, f"revision {rev}")
            if data:
                found[rev] = Revision.from_json(data)
        return found

    async def write_desired(self, moves: Sequence[tuple[DeviceView, Revision, dict[str, Any]]],
                            now: float, retries: int = DEFAULT_RETRIES) -> list[str]:
        """Give each device its revision (generation + 1, compare-and-set) and nudge it;
        the ids written (a device someone else wrote in between is left for next pass)."""
        if not moves:
            return []
        calls: list[tuple[list[str], list[str | int]]] = []
        for view, revision, spec in moves:
            generation = view.desired.generation if view.desired else 0
            document = DesiredState(generation=generation + 1, revision=revision.id, spec=spec,
                                    written_at=now, retries=retries)
            calls.append(([keys.desired(view.id)],
                          [generation, dumps(document.to_json()), keys.nudge(view.id)]))
        if isinstance(self.redis, RedisCluster):
            # concurrent calls, a chunk at a time (routed per key by the cluster client)
            results: list[Any] = []
            for start in range(0, len(calls), CLUSTER_CONCURRENCY):
                results.extend(await asyncio.gather(*(
                    self._write_desired(keys=call_keys, args=call_args)
                    for call_keys, call_args in calls[start:start + CLUSTER_CONCURRENCY])))
        else:
            await self._functions.ensure_loaded()  # a pipeline cannot load half-way
            pipe = self.redis.pipeline(transaction=False)
            for call_keys, call_args in calls:
                pipe.fcall(self._write_desired.name, len(call_keys), *call_keys, *call_args)
            results = await pipe.execute()
        return [view.id for (view, _, _), ok in zip(moves, results, strict=True) if int(ok) == 1]

    # one pass

    async def tick(self, now: float | None = None) -> TickSummary:
        """One pass over the fleet: decide and write; see the module docstring for the rules."""
        now = time.time() if now is None else now
        summary = TickSummary(fleet=self.fleet, acted=False)
        if self.token is not None and not await self.hold_lease():
            summary.message = "another controller holds the lease"
            return summary
        raw, rollout = await self.read_rollout()
        if rollout is None:
            summary.message = "no rollout: run `edgebundle fleet apply MANIFEST`"
            return summary
        summary.status, summary.phase = rollout.status, rollout.phase
        if await self.redis.exists(keys.paused(self.fleet)):
            summary.message = "paused: `edgebundle fleet resume` continues"
            return summary
        grouped = any("group" in phase for phase in selection.rollout_phases(rollout.rollout))
        views, summary.ignored = await read_devices(self.redis, self.fleet, labels=grouped,
                                                    memo=self._memo)
        summary.acted = True
        if rollout.status in ("rolling_back", "rolled_back"):
            return await self._roll_back(raw, rollout, views, now, summary, rollout.message)
        if rollout.status not in ("progressing", "complete"):
            summary.message = rollout.message
            return summary
        return await self._progress(raw, rollout, views, now, summary)

    async def _progress(self, raw: str, rollout: Rollout, views: list[DeviceView], now: float,
                        summary: TickSummary) -> TickSummary:
        revs = await self.revisions([rollout.revision, *(selection.pinned_revision(entry)
                                                         for entry in rollout.pins.values())])
        target = revs.get(rollout.revision)
        if target is None:
            summary.message = f"revision {rollout.revision} is missing from Redis: apply again"
            return summary
        summary.pinned = await self._apply_pins(rollout, views, revs, now)
        states = {view.id: self.device_state(view, rollout, target, now) for view in views}
        for state in states.values():
            summary.counts[state] = summary.counts.get(state, 0) + 1
        by_id = {view.id: view for view in views}
        rollable = [view.id for view in views if states[view.id] != "pinned"]
        settings = rollout.rollout
        health = settings.get("health") or {}
        window_phases = selection.cumulative_phases(
            selection.rollout_phases(settings), rollout.groups,
            {view.id: view.labels for view in views})
        complete = rollout.status == "complete"
        if not complete and rollout.phase >= len(window_phases):  # re-applied with fewer phases
            rollout = replace(rollout, phase=len(window_phases) - 1)
        in_phase = set(rollable) if complete else window_phases[rollout.phase] & set(rollable)

        if not complete:
            failed = sorted(device for device in in_phase if states[device] == "failed")
            tolerated = selection.count_or_percent(
                health.get("failure_threshold", 0), len(in_phase),
                "rollout.health.failure_threshold", round_up=False)
            if len(failed) > tolerated:
                message = (f"{len(failed)} device(s) failed in phase {rollout.phase} "
                           f"(tolerated {tolerated}): {', '.join(failed[:10])}")
                return await self._on_failure(raw, rollout, views, now, summary, message,
                                              deadline=False)

        opens_at = rollout.phase_started_at + (0.0 if complete else _after(rollout, rollout.phase))
        if now >= opens_at:
            limit = selection.count_or_percent(
                settings.get("max_unavailable", DEFAULT_MAX_UNAVAILABLE), len(rollable),
                "rollout.max_unavailable", round_up=True)
            unavailable = sum(1 for device in rollable if states[device] in ("updating", "failed"))
            candidates = [device for device in sorted(in_phase)
                          if states[device] == "old" and by_id[device].online]
            chosen = candidates[:max(0, max(limit, 1) - unavailable)]
            moves = [(by_id[device], target,
                      selection.device_spec(target.spec, rollout.pins.get(device)))
                     for device in chosen]
            summary.moved = await self.write_desired(moves, now, _retries(rollout))
            for device in summary.moved:
                states[device] = "updating"
        if complete:
            summary.message = "complete" + (f"; moved {len(summary.moved)} straggler(s)"
                                            if summary.moved else "")
            return summary

        skip_offline = settings.get("offline", "wait") == "skip"
        waiting = sorted(device for device in in_phase if states[device] != "healthy"
                         and not (skip_offline and not by_id[device].online))
        if now < opens_at:
            summary.message = f"phase {rollout.phase} opens in {opens_at - now:.0f}s"
            return summary
        if not waiting:
            return await self._advance(raw, rollout, now, summary)
        stuck = [device for device in waiting if by_id[device].online]
        if rollout.deadline_at and now > rollout.deadline_at and stuck and not summary.moved:
            message = (f"progress deadline passed in phase {rollout.phase}: "
                       f"{len(stuck)} device(s) not healthy: {', '.join(stuck[:10])}")
            return await self._on_failure(raw, rollout, views, now, summary, message, deadline=True)
        offline = len(waiting) - len(stuck)
        message = (f"phase {rollout.phase}: waiting for {len(stuck)} updating and "
                   f"{offline} offline device(s)")
        progress_deadline = _progress_deadline(rollout)
        if progress_deadline and (summary.moved or not stuck):
            # progress (a move), or only offline devices to wait for: the clock restarts
            return await self._store(raw, replace(rollout, deadline_at=now + progress_deadline,
                                                  message=message), summary)
        summary.message = message
        return summary

    def device_state(self, view: DeviceView, rollout: Rollout, target: Revision,
                     now: float) -> str:
        entry = rollout.pins.get(view.id)
        if selection.pinned_revision(entry):
            return "pinned"
        desired, actual = view.desired, view.actual
        if (desired is None or desired.revision != target.id
                or desired.spec != (selection.device_spec(target.spec, entry) if entry
                                    else target.spec)):
            return "old"
        current = actual is not None and actual.generation == desired.generation
        if current and actual is not None and actual.status == "failed":
            # a failure from before this rollout (re-applied): try again
            return "old" if desired.written_at < rollout.started_at else "failed"
        if not view.online:
            return "offline"
        if (current and actual is not None and actual.status == "healthy"
                and actual.revision == target.id and actual.doctor_ok
                and now - actual.running_since >= _window(rollout)):
            return "healthy"
        return "updating"

    async def _apply_pins(self, rollout: Rollout, views: list[DeviceView],
                          revs: Mapping[str, Revision], now: float) -> list[str]:
        moves = []
        for view in views:
            entry = rollout.pins.get(view.id)
            pin = selection.pinned_revision(entry)
            if pin is None:
                continue
            revision = revs.get(pin)
            if revision is None:
                log.warning("device %s is pinned to %s, which this fleet never applied",
                            view.id, pin)
                continue
            spec = selection.device_spec(revision.spec, entry)
            if view.desired is None or view.desired.revision != pin or view.desired.spec != spec:
                moves.append((view, revision, spec))
        return await self.write_desired(moves, now, _retries(rollout))

    async def _advance(self, raw: str, rollout: Rollout, now: float,
                       summary: TickSummary) -> TickSummary:
        phases = selection.rollout_phases(rollout.rollout)
        if rollout.phase + 1 >= len(phases):
            updated = replace(rollout, status="complete", phase_started_at=now, deadline_at=0.0,
                              message=f"complete: every device runs {rollout.revision}")
        else:
            updated = replace(rollout, phase=rollout.phase + 1, phase_started_at=now,
                              message=f"phase {rollout.phase} complete")
            updated = replace(updated, deadline_at=_deadline(updated, now))
        return await self._store(raw, updated, summary)

    async def _store(self, raw: str, updated: Rollout, summary: TickSummary) -> TickSummary:
        reply = await self.write_rollout(raw, updated)
        if reply == "ok":
            summary.status, summary.phase, summary.message = (updated.status, updated.phase,
                                                              updated.message)
        else:
            summary.message = _not_written(reply)
        return summary

    async def _on_failure(self, raw: str, rollout: Rollout, views: list[DeviceView], now: float,
                          summary: TickSummary, message: str, *, deadline: bool) -> TickSummary:
        if rollout.rollout.get("on_failure", "rollback") == "rollback" and rollout.previous:
            return await self._roll_back(raw, rollout, views, now, summary, message)
        if rollout.rollout.get("on_failure", "rollback") == "rollback":
            message += "; nothing to roll back to (first revision of the fleet): frozen"
        status = "failed" if deadline else "frozen"
        return await self._store(raw, replace(rollout, status=status, message=message), summary)

    async def _roll_back(self, raw: str, rollout: Rollout, views: list[DeviceView], now: float,
                         summary: TickSummary, message: str) -> TickSummary:
        """Every device whose desired state is the target goes back to the previous revision
        (new generation), all at once; 'rolling_back' is stored first so a controller that
        dies half-way is continued by the next one."""
        if rollout.status != "rolling_back":
            started = replace(rollout, status="rolling_back", message=message)
            reply = await self.write_rollout(raw, started)
            if reply != "ok":
                summary.message = _not_written(reply)
                return summary
            raw, rollout = self.last_rollout_raw, started
        if not rollout.previous:
            return await self._store(raw, replace(rollout, status="frozen"), summary)
        revs = await self.revisions([rollout.previous])
        previous = revs.get(rollout.previous)
        if previous is None:
            summary.message = f"previous revision {rollout.previous} is missing from Redis"
            return summary
        moves = [(view, previous, selection.device_spec(previous.spec, rollout.pins.get(view.id)))
                 for view in views
                 if view.desired is not None and view.desired.revision == rollout.revision
                 and not selection.pinned_revision(rollout.pins.get(view.id))]
        summary.rolled_back = await self.write_desired(moves, now, _retries(rollout))
        if len(summary.rolled_back) < len(moves):  # someone wrote in between: next pass
            summary.status, summary.message = rollout.status, rollout.message
            return summary
        if rollout.status == "rolled_back":
            summary.status, summary.message = rollout.status, rollout.message
            return summary
        done = replace(rollout, status="rolled_back",
                       message=f"{rollout.message}; rolled back to {rollout.previous}")
        return await self._store(raw, done, summary)


def _not_written(reply: str) -> str:
    return ("lost the lease: nothing more written" if reply == "lease"
            else "the rollout changed meanwhile: the next pass decides again")


# -- operator functions -----------------------------------------------------------------


async def plan(redis: Client, manifest: Mapping[str, Any]) -> Plan:
    """What :func:`apply` would change: per registered device, its desired revision now,
    the one it will get, and the first phase that covers it."""
    fleet = fleet_name(manifest)
    spec = revision_spec(manifest)
    revision_id = Revision.id_for(spec)
    controller = Controller(redis, fleet)
    _, current = await controller.read_rollout()
    previous = _previous(current, revision_id)
    rollout = _manifest_rollout(manifest, 0.0, revision_id, previous)
    views, _ = await read_devices(redis, fleet)
    cumulative = selection.cumulative_phases(selection.rollout_phases(rollout.rollout),
                                             rollout.groups, {v.id: v.labels for v in views})
    target = Revision(id=revision_id, fleet=fleet, spec=spec)
    changes = []
    for view in views:
        current_rev = view.desired.revision if view.desired else None
        entry = rollout.pins.get(view.id)
        pin = selection.pinned_revision(entry)
        if pin:
            changes.append(PlannedChange(view.id, current_rev, pin, None,
                                         "none" if current_rev == pin else "pin"))
            continue
        wanted = selection.device_spec(spec, entry)
        same = view.desired is not None and view.desired.revision == target.id \
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


def _previous(current: Rollout | None, revision_id: str) -> str | None:
    """The revision the fleet ran before a new rollout: the last one that completed."""
    if current is None:
        return None
    if current.status == "complete" or current.previous is None:
        previous = current.revision
    else:
        previous = current.previous
    return current.revision if previous == revision_id and current.revision != revision_id \
        else previous


async def apply(redis: Client, manifest: Mapping[str, Any], *, now: float | None = None,
                source: str = "") -> ApplyResult:
    """Store the manifest's revision and start its rollout (phase 0, deadline set).

    Applying the revision that is already progressing or complete starts nothing (the
    rollout's settings, groups and per-device entries are updated in place); after a
    rollback, freeze or failure it starts the rollout again.
    """
    now = time.time() if now is None else now
    fleet = fleet_name(manifest)
    spec = revision_spec(manifest)
    revision = Revision(id=Revision.id_for(spec), fleet=fleet, spec=spec, created_at=now,
                        manifest=source)
    controller = Controller(redis, fleet)
    for _ in range(CAS_ATTEMPTS):
        raw, current = await controller.read_rollout()
        fresh = _manifest_rollout(manifest, now, revision.id, _previous(current, revision.id))
        if current is not None and current.revision == revision.id \
                and current.status in ("progressing", "complete"):
            updated = replace(current, rollout=fresh.rollout, groups=fresh.groups, pins=fresh.pins)
            if updated == current:
                return ApplyResult(fleet, revision.id, current.previous, False,
                                   f"no change: {revision.id} is already {current.status}")
            if await controller.write_rollout(raw, updated, revision=revision) == "ok":
                return ApplyResult(fleet, revision.id, current.previous, True,
                                   f"{revision.id} unchanged ({current.status}); "
                                   "rollout settings updated")
            continue
        if await controller.write_rollout(raw, fresh, revision=revision) == "ok":
            return ApplyResult(fleet, revision.id, fresh.previous, True,
                               f"rolling out {revision.id}"
                               + (f" (previous {fresh.previous})" if fresh.previous else ""))
    raise UsageError(f"the rollout of fleet {fleet} kept changing while applying: try again")


async def status(redis: Client, fleet: str, *, now: float | None = None) -> FleetStatus:
    """Per device: desired revision/generation, actual revision/status/attempts/error,
    online, doctor, and its state in the rollout; plus the rollout itself."""
    now = time.time() if now is None else now
    controller = Controller(redis, fleet)
    _, rollout = await controller.read_rollout()
    paused = bool(await redis.exists(keys.paused(fleet)))
    views, ignored = await read_devices(redis, fleet)
    target = None
    if rollout is not None:
        target = (await controller.revisions([rollout.revision])).get(rollout.revision)
    devices = []
    for view in views:
        desired, actual = view.desired, view.actual
        state = (controller.device_state(view, rollout, target, now)
                 if rollout is not None and target is not None else None)
        devices.append({
            "device": view.id, "labels": view.labels, "online": view.online, "state": state,
            "desired_revision": desired.revision if desired else None,
            "desired_generation": desired.generation if desired else None,
            "actual_revision": actual.revision if actual else None,
            "actual_generation": actual.generation if actual else None,
            "actual_status": actual.status if actual else None,
            "attempts": actual.attempts if actual else 0,
            "last_error": (actual.last_error if actual else None) or view.unreadable,
            "doctor_ok": actual.doctor_ok if actual else None,
            "doctor_failed": actual.doctor_failed if actual else [],
        })
    return FleetStatus(fleet, rollout.to_json() if rollout else None, paused, devices, ignored)


async def pause(redis: Client, fleet: str, *, now: float | None = None) -> bool:
    """Pause the fleet's rollout (ticks move nothing); False if it was paused already."""
    now = time.time() if now is None else now
    return bool(await redis.set(keys.paused(fleet), repr(now), nx=True))


async def resume(redis: Client, fleet: str, *, now: float | None = None) -> bool:
    """Resume; the progress deadline and the phase's ``after`` are shifted by the pause
    (so time spent paused counts against neither). False if it was not paused."""
    now = time.time() if now is None else now
    controller = Controller(redis, fleet)
    for _ in range(CAS_ATTEMPTS):
        paused_at = await redis.get(keys.paused(fleet))
        if paused_at is None:
            return False
        raw, rollout = await controller.read_rollout()
        if rollout is None:
            await redis.delete(keys.paused(fleet))
            return True
        shift = max(0.0, now - float(paused_at))
        updated = replace(rollout, phase_started_at=rollout.phase_started_at + shift,
                          deadline_at=rollout.deadline_at + shift if rollout.deadline_at else 0.0)
        if await controller.write_rollout(raw, updated, resume=True) == "ok":
            return True
    raise UsageError(f"the rollout of fleet {fleet} kept changing while resuming: try again")


async def rollback(redis: Client, fleet: str, *, now: float | None = None) -> TickSummary:
    """The operator's rollback: every device on the rollout's target goes back to the
    previous revision (new generation), as an automatic rollback does."""
    now = time.time() if now is None else now
    controller = Controller(redis, fleet)
    raw, rollout = await controller.read_rollout()
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
    return await controller._roll_back(raw, rollout, views, now, summary, message)


async def run_controller(redis: Client, fleet: str, *, interval: float = TICK_INTERVAL,
                         lease_ms: int = LEASE_MS, stop: asyncio.Event | None = None,
                         clock: Callable[[], float] = time.time,
                         on_tick: Callable[[TickSummary], None] | None = None) -> None:
    """Tick every ``interval`` s while holding the fleet's lease, until ``stop`` is set.

    Without the lease (another controller acts) it only tries to take it each pass.
    A pass that fails (Redis unreachable, a corrupt document) is logged and retried next pass.
    """
    controller = Controller(redis, fleet, token=secrets.token_hex(16), lease_ms=lease_ms)
    stop = stop or asyncio.Event()
    try:
        while not stop.is_set():
            try:
                summary = await controller.tick(now=clock())
                if on_tick is not None:
                    on_tick(summary)
            except (_RedisPyError, OSError) as exc:
                log.warning("fleet %s: pass failed, retrying: %s", fleet, exc)
            except EdgebundleError as exc:  # e.g. a corrupt document: fixed by a new apply
                log.error("fleet %s: pass failed, retrying: %s", fleet, exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
    finally:
        with contextlib.suppress(_RedisPyError, OSError):
            await controller.release_lease()
