"""The rollout rules: what one controller pass decides, as pure functions of typed documents.

No Redis and no clock (``now`` is an argument), like :mod:`edgebundle.fleet.selection`
(which owns the phase, budget and per-device spec arithmetic these rules use).
:func:`decide` takes the stored :class:`~edgebundle.fleet.documents.RolloutState` (its
``policy`` is the manifest's :class:`~edgebundle.fleet.manifest.Rollout`, defaults filled
and durations in seconds by the schema), the devices as one pass read them, the
revisions it names and ``now``, and returns a :class:`Decision`: the
:class:`~edgebundle.fleet.documents.Move` of each device to move and what to do with the
RolloutState afterwards.
Per device, relative to the rollout's target revision (:func:`device_state`):

``old``      its desired state is not the target (or a failure from before this
             rollout): moved when its phase is open and it is online, within
             ``max_unavailable``;
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

Phases are cumulative. A phase opens ``after`` its predecessor completed and must make
progress within ``progress_deadline``: the clock starts when the phase opens and
restarts on every pass that moves devices or finds only offline devices to wait for (a
phase waiting for offline devices waits; it does not fail), so it runs out only on
online devices stuck short of healthy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from edgebundle.fleet import selection
from edgebundle.fleet.documents import DeviceView, Move, Revision, RolloutState
from edgebundle.fleet.manifest import Manifest

ACTIVE = ("progressing", "rolling_back")
FINISHED = ("complete", "rolled_back", "frozen", "failed")


@dataclass(frozen=True)
class Step:
    """What a pass does with the RolloutState once its moves are written: nothing but report
    ``message``, compare-and-set ``store``, or roll back (``rollback``, then ``message``
    is why)."""

    message: str
    store: RolloutState | None = None
    rollback: bool = False


@dataclass
class Decision:
    """One pass's decision: write ``pin_moves`` and ``moves`` (in that order), then take
    :meth:`after` (which depends on how many moves were written: a device someone else
    wrote in between is not moved this pass)."""

    rollout: RolloutState  # the stored one, its phase clamped when re-applied with fewer phases
    states: dict[str, str] = field(default_factory=dict)  # device -> its state (above)
    counts: dict[str, int] = field(default_factory=dict)  # devices per state
    pin_moves: list[Move] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)
    missing_pins: dict[str, str] = field(default_factory=dict)  # device -> unknown revision
    # what comes after the moves
    step: Step | None = None  # fixed before any move (a failure, a missing revision)
    complete: bool = False
    opens_at: float = 0.0
    waiting: list[str] = field(default_factory=list)  # in the phase, not yet healthy
    stuck: list[str] = field(default_factory=list)  # of those, online
    now: float = 0.0

    def after(self, moved: int) -> Step:
        """The Step once ``moved`` of :attr:`moves` were written."""
        if self.step is not None:
            return self.step
        rollout, now = self.rollout, self.now
        if self.complete:
            return Step("complete" + (f"; moved {moved} straggler(s)" if moved else ""))
        if now < self.opens_at:
            return Step(f"phase {rollout.phase} opens in {self.opens_at - now:.0f}s")
        if not self.waiting:
            return Step(rollout.message, store=advance(rollout, now))
        stuck = self.stuck
        if rollout.deadline_at and now > rollout.deadline_at and stuck and not moved:
            message = (f"progress deadline passed in phase {rollout.phase}: "
                       f"{len(stuck)} device(s) not healthy: {', '.join(stuck[:10])}")
            return on_failure(rollout, message, deadline=True)
        offline = len(self.waiting) - len(stuck)
        message = (f"phase {rollout.phase}: waiting for {len(stuck)} updating and "
                   f"{offline} offline device(s)")
        limit = progress_deadline(rollout)
        if limit and (moved or not stuck):
            # progress (a move), or only offline devices to wait for: the clock restarts
            return Step(message, store=replace(rollout, deadline_at=now + limit, message=message))
        return Step(message)


def decide(rollout: RolloutState, devices: Sequence[DeviceView], revisions: Mapping[str, Revision],
           now: float) -> Decision:
    """One pass over a progressing or complete rollout (see the module docstring).

    ``revisions`` holds at least the rollout's target and the revisions devices are
    pinned to (a missing target decides nothing; a missing pin is reported)."""
    decision = Decision(rollout=rollout, now=now)
    target = revisions.get(rollout.revision)
    if target is None:
        decision.step = Step(f"revision {rollout.revision} is missing from Redis: apply again")
        return decision
    decision.pin_moves, decision.missing_pins = pin_moves(rollout, devices, revisions)
    states = {view.id: device_state(view, rollout, target, now) for view in devices}
    decision.states = states
    for state in states.values():
        decision.counts[state] = decision.counts.get(state, 0) + 1
    by_id = {view.id: view for view in devices}
    rollable = [view.id for view in devices if states[view.id] != "pinned"]
    policy = rollout.policy
    window_phases = selection.cumulative_phases(
        policy.phases, rollout.groups, {view.id: view.labels for view in devices})
    complete = rollout.status == "complete"
    if not complete and rollout.phase >= len(window_phases):  # re-applied with fewer phases
        rollout = replace(rollout, phase=len(window_phases) - 1)
        decision.rollout = rollout
    in_phase = set(rollable) if complete else window_phases[rollout.phase] & set(rollable)

    if not complete:
        failed = sorted(device for device in in_phase if states[device] == "failed")
        tolerated = selection.count_or_percent(
            policy.health.failure_threshold, len(in_phase),
            "rollout.health.failure_threshold", round_up=False)
        if len(failed) > tolerated:
            message = (f"{len(failed)} device(s) failed in phase {rollout.phase} "
                       f"(tolerated {tolerated}): {', '.join(failed[:10])}")
            decision.step = on_failure(rollout, message, deadline=False)
            return decision

    opens_at = rollout.phase_started_at + (0.0 if complete else after(rollout, rollout.phase))
    if now >= opens_at:
        limit = selection.count_or_percent(
            policy.max_unavailable, len(rollable),
            "rollout.max_unavailable", round_up=True)
        unavailable = sum(1 for device in rollable if states[device] in ("updating", "failed"))
        candidates = [device for device in sorted(in_phase)
                      if states[device] == "old" and by_id[device].online]
        chosen = candidates[:max(0, max(limit, 1) - unavailable)]
        decision.moves = [Move(by_id[device], target,
                               selection.device_spec(target.spec, rollout.pins.get(device)))
                          for device in chosen]
    decision.complete, decision.opens_at = complete, opens_at
    skip_offline = policy.offline == "skip"
    # a device moved this pass was "old", so it is waited for either way
    decision.waiting = sorted(device for device in in_phase if states[device] != "healthy"
                              and not (skip_offline and not by_id[device].online))
    decision.stuck = [device for device in decision.waiting if by_id[device].online]
    return decision


def device_state(view: DeviceView, rollout: RolloutState, target: Revision, now: float) -> str:
    """The device's state in the rollout (see the module docstring)."""
    entry = rollout.pins.get(view.id)
    if selection.pinned_revision(entry) is not None:
        return "pinned"
    desired, actual = view.desired, view.actual
    if (desired is None or desired.revision != target.id
            or desired.spec != (selection.device_spec(target.spec, entry)
                                if entry is not None else target.spec)):
        return "old"
    current = actual is not None and actual.generation == desired.generation
    if current and actual is not None and actual.status == "failed":
        # a failure from before this rollout (re-applied): try again
        return "old" if desired.written_at < rollout.started_at else "failed"
    if not view.online:
        return "offline"
    if (current and actual is not None and actual.status == "healthy"
            and actual.revision == target.id and actual.doctor_ok
            and now - actual.running_since >= window(rollout)):
        return "healthy"
    return "updating"


def pin_moves(rollout: RolloutState, devices: Sequence[DeviceView],
              revisions: Mapping[str, Revision]) -> tuple[list[Move], dict[str, str]]:
    """Pinned devices whose desired state is not their pin yet; and the devices pinned to
    a revision this fleet never applied (left alone), with that revision."""
    moves: list[Move] = []
    missing: dict[str, str] = {}
    for view in devices:
        entry = rollout.pins.get(view.id)
        pin = selection.pinned_revision(entry)
        if pin is None:
            continue
        revision = revisions.get(pin)
        if revision is None:
            missing[view.id] = pin
            continue
        spec = selection.device_spec(revision.spec, entry)
        if view.desired is None or view.desired.revision != pin or view.desired.spec != spec:
            moves.append(Move(view, revision, spec))
    return moves, missing


def on_failure(rollout: RolloutState, message: str, *, deadline: bool) -> Step:
    """``on_failure: rollback`` rolls back (when there is a previous revision); otherwise
    the rollout stops: ``frozen`` (devices failed) or ``failed`` (deadline passed)."""
    if rollout.policy.on_failure == "rollback" and rollout.previous:
        return Step(message, rollback=True)
    if rollout.policy.on_failure == "rollback":
        message += "; nothing to roll back to (first revision of the fleet): frozen"
    status = "failed" if deadline else "frozen"
    return Step(message, store=replace(rollout, status=status, message=message))


def rollback_moves(rollout: RolloutState, devices: Sequence[DeviceView],
                   previous: Revision) -> list[Move]:
    """Every unpinned device whose desired state is the target goes back to ``previous``."""
    return [Move(view, previous, selection.device_spec(previous.spec, rollout.pins.get(view.id)))
            for view in devices
            if view.desired is not None and view.desired.revision == rollout.revision
            and selection.pinned_revision(rollout.pins.get(view.id)) is None]


def advance(rollout: RolloutState, now: float) -> RolloutState:
    """The rollout once its phase completed: the next phase opens, or it is complete."""
    if rollout.phase + 1 >= len(rollout.policy.phases):
        return replace(rollout, status="complete", phase_started_at=now, deadline_at=0.0,
                       message=f"complete: every device runs {rollout.revision}")
    updated = replace(rollout, phase=rollout.phase + 1, phase_started_at=now,
                      message=f"phase {rollout.phase} complete")
    return replace(updated, deadline_at=deadline(updated, now))


def needs_labels(rollout: RolloutState) -> bool:
    """Whether a phase selects devices by group (else a pass need not read labels)."""
    return any(phase.group is not None for phase in rollout.policy.phases)


# -- a new rollout ------------------------------------------------------------------------


def new_rollout(manifest: Manifest, now: float, revision: str,
                previous: str | None) -> RolloutState:
    """The RolloutState an apply starts from the manifest: phase 0, deadline set; a phase
    naming a group that ``spec.groups`` does not define is a UsageError."""
    spec = manifest.spec
    for phase in spec.rollout.phases:
        if phase.group is not None:
            selection.group_devices(phase.group, spec.groups, {})
    rollout = RolloutState(revision=revision, previous=previous, status="progressing", phase=0,
                           phase_started_at=now, started_at=now, policy=spec.rollout,
                           groups=tuple(spec.groups), pins=dict(spec.devices))
    return replace(rollout, deadline_at=deadline(rollout, now))


def previous_of(current: RolloutState | None, revision_id: str) -> str | None:
    """The revision the fleet ran before a new rollout: the last one that completed."""
    if current is None:
        return None
    if current.status == "complete" or current.previous is None:
        previous = current.revision
    else:
        previous = current.previous
    return current.revision if previous == revision_id and current.revision != revision_id \
        else previous


# -- the rollout's settings ------------------------------------------------------------------


def retries(rollout: RolloutState) -> int:
    return rollout.policy.retries


def window(rollout: RolloutState) -> float:
    return rollout.policy.health.window


def progress_deadline(rollout: RolloutState) -> float:
    return rollout.policy.progress_deadline


def deadline(rollout: RolloutState, phase_started_at: float) -> float:
    limit = progress_deadline(rollout)
    if limit <= 0:
        return 0.0
    return phase_started_at + after(rollout, rollout.phase) + limit


def after(rollout: RolloutState, phase: int) -> float:
    phases = rollout.policy.phases
    return phases[phase].after if phase < len(phases) else 0.0
