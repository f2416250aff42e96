"""The rollout rules as pure functions: typed documents in, moves and the next rollout out.

No Redis and no clock: every test builds the devices as one controller pass would read
them and passes ``now`` explicitly (the Redis side is in test_fleet_controller.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

import pytest

from edgebundle import keys
from edgebundle.errors import StateError, UsageError
from edgebundle.fleet import rules
from edgebundle.fleet.documents import (
    ActualState,
    DesiredState,
    DeviceView,
    Revision,
    RolloutState,
    dumps,
    loads,
    read_document,
)
from edgebundle.fleet.manifest import (
    App,
    Device,
    Group,
    Manifest,
    Model,
    RevisionSpec,
    Rollout,
)

T0 = 1_000_000.0
EDGECHAT = App(name="edgechat", url="builtin:edgechat", sha256="e" * 64)


def spec_of(model: str) -> RevisionSpec:
    return RevisionSpec(model=Model(name=model, url="file:///m.gguf", sha256="0" * 64),
                        app=EDGECHAT)


OLD = Revision(id="rev-000000000001", fleet="shops", spec=spec_of("a"))
NEW = Revision(id="rev-000000000002", fleet="shops", spec=spec_of("b"))
REVISIONS = {OLD.id: OLD, NEW.id: NEW}
CANARY_PHASES: list[dict[str, Any]] = [{"group": "canary"}, {"percent": 100, "after": 30.0}]


def rollout(**settings: Any) -> RolloutState:
    base: dict[str, Any] = {"phases": CANARY_PHASES, "max_unavailable": "100%",
                            "health": {"window": 20.0, "failure_threshold": 0},
                            "offline": "wait", "on_failure": "rollback",
                            "progress_deadline": 600.0}
    base.update(settings)
    return RolloutState(revision=NEW.id, previous=OLD.id, phase_started_at=T0, started_at=T0,
                        deadline_at=T0 + 600.0, policy=Rollout.model_validate(base),
                        groups=(Group(name="canary", selector={"ring": "canary"}),))


def device(device_id: str, *, on: Revision = OLD, status: str | None = "healthy",
           online: bool = True, since: float = T0 - 3600, written: float = T0 - 3600,
           generation: int = 1) -> DeviceView:
    ring = "canary" if device_id.startswith("c") else "main"
    desired = DesiredState(generation=generation, revision=on.id, spec=on.spec,
                           written_at=written)
    actual = None if status is None else ActualState(
        generation=generation, revision=on.id, status=status, doctor_ok=status == "healthy",
        running_since=since)
    return DeviceView(id=device_id, labels={"ring": ring}, desired=desired, actual=actual,
                      online=online)


FLEET = [device("c1"), device("d1"), device("d2")]


def test_phase_zero_moves_only_the_canary_and_waits_for_it() -> None:
    decision = rules.decide(rollout(), FLEET, REVISIONS, T0)
    assert [view.id for view, revision, _ in decision.moves] == ["c1"]
    assert all(revision is NEW for _, revision, _ in decision.moves)
    assert decision.counts == {"old": 3}
    step = decision.after(moved=1)
    assert step.store is not None and step.store.deadline_at == T0 + 600.0  # the clock restarts
    assert step.message == "phase 0: waiting for 1 updating and 0 offline device(s)"


def test_a_healthy_canary_completes_its_phase_and_the_next_opens_after_its_delay() -> None:
    fleet = [device("c1", on=NEW, written=T0, since=T0), device("d1"), device("d2")]
    assert rules.decide(rollout(), fleet, REVISIONS, T0 + 10).states["c1"] == "updating"
    step = rules.decide(rollout(), fleet, REVISIONS, T0 + 20).after(moved=0)
    assert step.store is not None
    assert (step.store.phase, step.store.phase_started_at, step.store.message) == (
        1, T0 + 20, "phase 0 complete")
    assert step.store.deadline_at == T0 + 20 + 30 + 600  # after + progress_deadline

    opened = step.store
    waiting = rules.decide(opened, fleet, REVISIONS, T0 + 40)
    assert waiting.moves == []
    assert waiting.after(moved=0).message == "phase 1 opens in 10s"
    later = rules.decide(opened, fleet, REVISIONS, T0 + 50)
    assert [view.id for view, _, _ in later.moves] == ["d1", "d2"]


def test_max_unavailable_counts_devices_already_updating() -> None:
    fleet = [device(f"d{n}") for n in range(5)]
    fleet[0] = device("d0", on=NEW, status="applying", written=T0)
    decided = rules.decide(rollout(phases=[{"percent": 100}], max_unavailable=2), fleet,
                           REVISIONS, T0 + 1)
    assert [view.id for view, _, _ in decided.moves] == ["d1"]


def test_failures_above_the_threshold_roll_back_or_freeze() -> None:
    fleet = [device("c1", on=NEW, status="failed", written=T0 + 1), device("d1")]
    decided = rules.decide(rollout(), fleet, REVISIONS, T0 + 5)
    assert decided.moves == []
    step = decided.after(moved=0)
    assert step.rollback and step.message.startswith("1 device(s) failed in phase 0")

    frozen = rules.decide(rollout(on_failure="freeze"), fleet, REVISIONS, T0 + 5).after(0)
    assert not frozen.rollback and frozen.store is not None
    assert frozen.store.status == "frozen"

    first = replace(rollout(), previous=None)
    nothing = rules.decide(first, fleet, REVISIONS, T0 + 5).after(0)
    assert nothing.store is not None and nothing.store.status == "frozen"
    assert nothing.message.endswith("nothing to roll back to (first revision of the fleet): frozen")


def test_a_failure_from_before_this_rollout_is_tried_again() -> None:
    fleet = [device("c1", on=NEW, status="failed", written=T0 - 10)]
    decided = rules.decide(rollout(), fleet, REVISIONS, T0)
    assert decided.states == {"c1": "old"}
    assert [view.id for view, _, _ in decided.moves] == ["c1"]


def test_the_progress_deadline_fails_only_on_online_devices_stuck_without_progress() -> None:
    stuck = [device("c1", on=NEW, status="applying", written=T0)]
    late = T0 + 601
    step = rules.decide(rollout(on_failure="freeze"), stuck, REVISIONS, late).after(0)
    assert step.store is not None and step.store.status == "failed"
    assert step.message.startswith("progress deadline passed in phase 0: 1 device(s)")

    offline = [device("c1", on=NEW, status="applying", written=T0, online=False)]
    waiting = rules.decide(rollout(on_failure="freeze"), offline, REVISIONS, late).after(0)
    assert waiting.store is not None and waiting.store.status == "progressing"
    assert waiting.store.deadline_at == late + 600  # waiting for offline devices restarts it


def test_offline_skip_does_not_wait_for_offline_devices() -> None:
    fleet = [device("c1", on=NEW, written=T0, since=T0), device("c2", online=False)]
    wait = rules.decide(rollout(), fleet, REVISIONS, T0 + 30).after(0)
    assert wait.message == "phase 0: waiting for 0 updating and 1 offline device(s)"
    skip = rules.decide(rollout(offline="skip"), fleet, REVISIONS, T0 + 30).after(0)
    assert skip.store is not None and skip.store.phase == 1


def test_pins_move_pinned_devices_and_keep_them_out_of_the_rollout() -> None:
    pinned = replace(rollout(), pins={"d1": Device(pin=OLD.id),
                                      "d2": Device(pin="rev-00000000dead")})
    fleet = [device("c1"), device("d1", on=NEW), device("d2")]
    decided = rules.decide(pinned, fleet, REVISIONS, T0)
    assert [(move.device.id, move.revision.id) for move in decided.pin_moves] == [("d1", OLD.id)]
    assert decided.missing_pins == {"d2": "rev-00000000dead"}
    assert decided.states == {"c1": "old", "d1": "pinned", "d2": "pinned"}


def test_a_complete_rollout_moves_stragglers_and_a_missing_target_decides_nothing() -> None:
    done = replace(rollout(), status="complete")
    fleet = [device("c1", on=NEW, since=T0), device("d1")]
    decided = rules.decide(done, fleet, REVISIONS, T0 + 100)
    assert [view.id for view, _, _ in decided.moves] == ["d1"]
    assert decided.after(moved=1).message == "complete; moved 1 straggler(s)"

    missing = rules.decide(done, fleet, {OLD.id: OLD}, T0)
    assert missing.moves == [] and missing.pin_moves == []
    assert missing.after(0).message == f"revision {NEW.id} is missing from Redis: apply again"


def test_rollback_moves_every_unpinned_device_on_the_target() -> None:
    pinned = replace(rollout(), pins={"d2": Device(pin=NEW.id)})
    fleet = [device("c1", on=NEW), device("d1"), device("d2", on=NEW)]
    moves = rules.rollback_moves(pinned, fleet, OLD)
    assert [(view.id, revision.id) for view, revision, _ in moves] == [("c1", OLD.id)]


def test_a_new_rollout_takes_the_last_completed_revision_as_previous() -> None:
    manifest = Manifest.model_validate({
        "apiVersion": "edgebundle/v1", "kind": "Fleet", "metadata": {"name": "shops"},
        "spec": {"model": {"name": "m", "url": "file:///m.gguf", "sha256": "0" * 64},
                 "rollout": {"progress_deadline": 60.0,
                             "phases": [{"percent": 100, "after": "1m"}]}}})
    started = rules.new_rollout(manifest, T0, NEW.id, rules.previous_of(None, NEW.id))
    assert (started.previous, started.deadline_at) == (None, T0 + 60 + 60)
    assert started.policy is manifest.spec.rollout  # the schema's defaults, not re-derived
    assert started.policy.retries == rules.retries(started) == 2
    complete = replace(rollout(), status="complete")
    assert rules.previous_of(complete, "rev-000000000003") == NEW.id
    assert rules.previous_of(replace(rollout(), status="rolled_back"), NEW.id) == OLD.id


def test_a_stored_document_that_cannot_be_read_is_a_state_error_not_a_usage_error() -> None:
    """Exit 1, the store's fault (the command line was right): rewrite it."""
    for raw in ("{not json", "[1, 2]"):
        with pytest.raises(StateError) as caught:
            loads(raw, "the rollout of fleet shops")
        assert not isinstance(caught.value, UsageError) and caught.value.exit_code == 1
    with pytest.raises(StateError, match="unknown device status 'dancing'"):
        ActualState.from_json({"generation": 1, "revision": "rev-1", "status": "dancing"})


@pytest.mark.parametrize(("raw", "why"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"previous": null}', "no 'revision'"),
    ('{"revision": "rev-1", "status": "dancing"}', "unknown rollout status 'dancing'"),
    ('{"revision": "rev-1", "rollout": {"max_unavailable": "lots"}}', "rollout.max_unavailable"),
    ('{"revision": "rev-1", "rollout": {"phases": [{"percent": 50, "color": "red"}]}}',
     "rollout.phases.0.color"),
    ('{"revision": "rev-1", "groups": [{"selector": {}}]}', "groups.0.name"),
    ('{"revision": "rev-1", "pins": ["d1"]}', "pins is list"),
    ('{"revision": "rev-1", "pins": {"d1": {"pin": "yesterday"}}}', "pins.d1.pin"),
])
def test_a_corrupt_rollout_document_is_a_state_error_naming_its_key(raw: str, why: str) -> None:
    key = "edgebundle:fleet:shops:rollout"
    with pytest.raises(StateError) as caught:
        read_document(raw, key, RolloutState.from_json)
    assert not isinstance(caught.value, UsageError) and caught.value.exit_code == 1
    assert key in str(caught.value) and why in str(caught.value), str(caught.value)
    assert read_document(None, key, RolloutState.from_json) is None


def test_the_rollout_document_is_the_manifests_normal_form_and_reads_back_typed() -> None:
    """The JSON keys stay what they were (``rollout``, ``groups``, ``pins``: the manifest's
    spec.rollout, spec.groups and spec.devices in normal form); reading it back gives the
    same typed document."""
    manifest = Manifest.model_validate({
        "apiVersion": "edgebundle/v1", "kind": "Fleet", "metadata": {"name": "shops"},
        "spec": {"model": {"name": "m", "url": "file:///m.gguf", "sha256": "0" * 64},
                 "groups": [{"name": "canary", "selector": {"ring": "canary"}}],
                 "rollout": {"phases": [{"group": "canary"}, {"percent": 100, "after": "1m"}],
                             "health": {"window": "20s"}, "max_unavailable": "25%"},
                 "devices": {"d1": {"pin": OLD.id}, "d2": {"model": {"ctx_size": 8192}}}}})
    state = rules.new_rollout(manifest, T0, NEW.id, OLD.id)
    data = state.to_json()
    assert sorted(data) == ["deadline_at", "groups", "message", "phase", "phase_started_at",
                            "pins", "previous", "revision", "rollout", "started_at", "status"]
    assert data["rollout"] == manifest.spec.rollout.to_json()
    assert data["rollout"]["phases"] == [{"group": "canary", "after": 0.0},
                                         {"percent": 100, "after": 60.0}]
    assert (data["groups"], data["pins"]) == (
        [group.to_json() for group in manifest.spec.groups],
        {device: entry.to_json() for device, entry in manifest.spec.devices.items()})
    assert data["pins"] == {"d1": {"pin": OLD.id}, "d2": {"model": {"ctx_size": 8192}}}
    assert RolloutState.from_json(json.loads(dumps(data))) == state
    assert RolloutState.from_json({"revision": NEW.id}).policy == Rollout()  # defaults filled


@pytest.mark.parametrize(("document", "why"), [
    ({"generation": 1, "revision": "rev-1"}, "no 'spec'"),
    ({"generation": 1, "revision": "rev-1", "spec": ["model"]}, "spec: Input should be"),
    ({"generation": 1, "revision": "rev-1", "spec": {"model": {"name": "a"}}}, "spec.model.url"),
    ({"generation": 1, "revision": "rev-1", "spec": {**spec_of("a").to_json(),
                                                     "runtime": {"kind": "docker"}}},
     "spec.runtime.kind"),
])
def test_a_mis_shaped_desired_state_is_a_state_error_naming_its_key(
        document: dict[str, Any], why: str) -> None:
    """The device's read (exit 1, like every stored document): its spec is validated by
    the manifest's schema, so the agent never reads a half-shaped one."""
    key = keys.desired("kiosk-1")
    with pytest.raises(StateError) as caught:
        read_document(dumps(document), key, DesiredState.from_json)
    assert not isinstance(caught.value, UsageError) and caught.value.exit_code == 1
    assert key in str(caught.value) and why in str(caught.value), str(caught.value)
    revision = {"id": "rev-1", "fleet": "shops", "spec": document.get("spec")}
    key = f"{keys.revisions('shops')} field rev-1"
    with pytest.raises(StateError, match=re.escape(key)):
        read_document(dumps(revision), key, Revision.from_json)


def test_desired_state_and_revision_store_the_spec_in_its_normal_form_and_read_it_back() -> None:
    desired = DesiredState(generation=2, revision=NEW.id, spec=NEW.spec, written_at=T0)
    data = json.loads(dumps(desired.to_json()))
    assert data["spec"] == NEW.spec.to_json() == {
        "runtime": {"kind": "embedded", "wasmedge": None, "plugin": None},
        "model": {"name": "b", "url": "file:///m.gguf", "sha256": "0" * 64,
                  "template": "llama-3-chat", "system_prompt": None, "ctx_size": 4096},
        "app": {"name": "edgechat", "url": "builtin:edgechat", "sha256": "e" * 64},
        "sync": {"redis_url": None, "session_ttl": 1800, "multitask": "enqueue"}}
    assert DesiredState.from_json(data) == desired
    assert Revision.from_json(json.loads(dumps(NEW.to_json()))) == NEW
    assert Revision.id_for(NEW.spec) == Revision.id_for(RevisionSpec.from_json(data["spec"]))
