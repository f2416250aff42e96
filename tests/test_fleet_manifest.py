"""The fleet manifest: schema, file:line:column errors, `fleet validate`, plan helpers.

Malformed manifests are the base manifest below with one line changed, so each
expected position can be read off the text: line and column of the offending key
or value (of the mapping that lacks a key, for a missing one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from edgebundle.errors import ManifestError, UsageError
from edgebundle.fleet import selection
from edgebundle.fleet.documents import Revision
from edgebundle.fleet.manifest import Device, Group, Multitask, Phase, RevisionSpec, Runtime
from edgebundle.fleet.manifest_file import load_manifest, parse_manifest
from edgebundle.sync.models import MULTITASK_POLICIES

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "manifests").glob("*.yaml"))
SHA = "ab" * 32

BASE = f"""\
apiVersion: edgebundle/v1
kind: Fleet
metadata:
  name: shops
spec:
  model:
    name: m
    url: https://example.com/m.gguf
    sha256: {SHA}
  groups:
    - name: canary
      selector: {{ring: canary}}
  rollout:
    phases:
      - group: canary
      - percent: 50
        after: 30s
      - percent: 100
    health:
      window: 20s
"""


def _edit(old: str, new: str) -> str:
    assert BASE.count(old) == 1, old
    return BASE.replace(old, new)


def _problems(text: str) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, "f.yaml")
    lines = str(caught.value).splitlines()
    assert lines == [str(p) for p in caught.value.problems]
    return lines


# ---- the examples and the normal form ------------------------------------------------


def test_there_are_the_three_examples() -> None:
    assert {p.name for p in EXAMPLES} == {"one-device.yaml", "canary-waves.yaml",
                                          "air-gapped.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_manifest_validates(path: Path) -> None:
    manifest = load_manifest(path)
    spec = manifest.revision_spec().to_json()
    assert set(spec) == {"runtime", "model", "app", "sync"}
    assert json.loads(json.dumps(spec)) == spec  # plain JSON
    assert RevisionSpec.from_json(spec) == manifest.revision_spec()  # reads back the same
    assert manifest.revision_id() == Revision.id_for(manifest.revision_spec())
    assert manifest.source == str(path)


def test_air_gapped_example_takes_every_file_from_the_bundle() -> None:
    spec = load_manifest(REPO / "manifests" / "air-gapped.yaml").revision_spec().to_json()
    assert spec["model"]["url"].startswith("bundle:assets/")
    assert spec["app"]["url"].startswith("bundle:assets/")
    assert len(spec["runtime"]["archives"]) == 2  # the runtime is pinned, not the bundle's


def test_runtime_archives_are_pinned_by_file_name_and_sha256() -> None:
    wasmedge = ('  runtime:\n    kind: wasmedge\n    wasmedge: "0.14.1"\n'
                '    plugin: {build: b5593}\n')
    pinned = parse_manifest(BASE.replace("spec:\n", "spec:\n" + wasmedge + (
        f"    archives: {{WasmEdge-0.14.1-ubuntu20.04_x86_64.tar.gz: {SHA.upper()}}}\n")),
        "f.yaml")
    assert pinned.revision_spec().to_json()["runtime"]["archives"] == {
        "WasmEdge-0.14.1-ubuntu20.04_x86_64.tar.gz": SHA}
    # A runtime without pins keeps its normal form (and so its revision id).
    bare = parse_manifest(BASE.replace("spec:\n", "spec:\n" + wasmedge), "f.yaml")
    assert "archives" not in bare.revision_spec().to_json()["runtime"]
    assert bare.revision_id() != pinned.revision_id()
    bad = _problems(BASE.replace("spec:\n", "spec:\n" + wasmedge + (
        "    archives: {../evil.tar.gz: abc}\n")))
    assert any("not an archive file name" in line for line in bad)
    assert any("is not a sha256" in line for line in bad)
    embedded = _problems(BASE.replace("spec:\n", "spec:\n  runtime:\n    kind: embedded\n"
                                      f"    archives: {{a.tar.gz: {SHA}}}\n"))
    assert any("only apply to kind wasmedge" in line for line in embedded)


def test_base_manifest_is_valid_and_defaults_are_filled() -> None:
    manifest = parse_manifest(BASE, "f.yaml")
    spec = manifest.revision_spec().to_json()
    assert spec["runtime"] == {"kind": "embedded", "wasmedge": None, "plugin": None}
    assert spec["model"] == {"name": "m", "url": "https://example.com/m.gguf", "sha256": SHA,
                             "template": "llama-3-chat", "system_prompt": None,
                             "ctx_size": 4096}
    assert spec["app"]["name"] == "edgechat" and spec["app"]["url"] == "builtin:edgechat"
    assert len(spec["app"]["sha256"]) == 64
    assert spec["sync"] == {"redis_url": None, "session_ttl": 1800, "multitask": "enqueue"}
    rollout = manifest.spec.rollout.to_json()
    assert rollout["phases"] == [{"group": "canary", "after": 0.0},
                                 {"percent": 50, "after": 30.0},
                                 {"percent": 100, "after": 0.0}]
    assert rollout["health"] == {"window": 20.0, "failure_threshold": 0}
    assert (rollout["max_unavailable"], rollout["retries"], rollout["offline"],
            rollout["on_failure"], rollout["progress_deadline"]) == (1, 2, "wait", "rollback",
                                                                     600.0)
    assert [group.to_json() for group in manifest.spec.groups] == [
        {"name": "canary", "selector": {"ring": "canary"}}]
    assert manifest.spec.devices == {}


def test_normal_forms_of_durations_percents_and_pins() -> None:
    text = _edit("      window: 20s\n",
                 "      window: 1h30m\n      failure_threshold: \"10%\"\n"
                 "    max_unavailable: 25%\n    progress_deadline: 90\n"
                 "  sync: {session_ttl: 2h}\n"
                 "  devices:\n    kiosk-7: {pin: rev-0123456789ab}\n"
                 "    kiosk-9: {model: {ctx_size: 2048}}\n"
                 "    kiosk-11: {runtime: {kind: embedded}}\n")
    text = text.replace("percent: 50", 'percent: "50%"')
    manifest = parse_manifest(text, "f.yaml")
    rollout = manifest.spec.rollout.to_json()
    assert rollout["health"] == {"window": 5400.0, "failure_threshold": "10%"}
    assert rollout["max_unavailable"] == "25%" and rollout["progress_deadline"] == 90.0
    assert rollout["phases"][1]["percent"] == 50
    assert manifest.revision_spec().sync.session_ttl == 7200
    pins = {device: entry.to_json() for device, entry in manifest.spec.devices.items()}
    assert pins == {"kiosk-7": {"pin": "rev-0123456789ab"},
                    "kiosk-9": {"model": {"ctx_size": 2048}},
                    "kiosk-11": {"runtime": {"kind": "embedded", "wasmedge": None,
                                             "plugin": None}}}


def test_same_spec_is_same_revision_and_a_change_is_a_new_one() -> None:
    first = parse_manifest(BASE, "a.yaml").revision_id()
    # Rollout policy and groups are not part of what a device runs.
    assert parse_manifest(BASE.replace("20s", "40s"), "b.yaml").revision_id() == first
    changed = parse_manifest(_edit("    name: m\n", "    name: m2\n"), "c.yaml").revision_id()
    assert changed != first and changed.startswith("rev-")


def test_multitask_choices_are_the_sync_policies() -> None:
    assert get_args(Multitask) == MULTITASK_POLICIES


# ---- malformed manifests: file:line:column: key.path: message ---------------------------

MALFORMED = {
    "unknown key at top": (
        BASE + "colour: red\n",
        "f.yaml:21:1: colour: unknown key; allowed: apiVersion, kind, metadata, spec"),
    "unknown nested key, with a suggestion": (
        _edit("      window: 20s", "      windw: 20s"),
        "f.yaml:20:7: spec.rollout.health.windw: unknown key (did you mean window?); "
        "allowed: window, failure_threshold"),
    "unknown key in a list item": (
        _edit("      selector: {ring: canary}", "      selectr: {ring: canary}"),
        "f.yaml:12:7: spec.groups[0].selectr: unknown key (did you mean selector?); "
        "allowed: name, selector"),
    "unknown key in a device entry": (
        BASE + "  devices:\n    kiosk-7: {pin: rev-0123456789ab, pinned: true}\n",
        "f.yaml:22:38: spec.devices.kiosk-7.pinned: unknown key (did you mean pin?); "
        "allowed: pin, runtime, model, app, sync"),
    "bad max_unavailable percent": (
        _edit("    health:\n", "    max_unavailable: 0%\n    health:\n"),
        "f.yaml:19:22: spec.rollout.max_unavailable: '0%' is not a count or a percent: use a "
        "number (at least 1) or \"N%\" with N in 1..100"),
    "wrong type (a number for a string)": (
        _edit("  name: shops", "  name: 12"),
        "f.yaml:4:9: metadata.name: expected a string, got 12 (YAML reads it as a number: "
        "quote it)"),
    "wrong type (a list for a mapping)": (
        _edit("    health:\n      window: 20s\n", "    health: [20s]\n"),
        "f.yaml:19:13: spec.rollout.health: expected a mapping (key: value), got a list"),
    "YAML boolean where a label value is needed": (
        _edit("{ring: canary}", "{ring: yes}"),
        "f.yaml:12:24: spec.groups[0].selector.ring: expected a string, got yes (YAML reads "
        "yes/no/on/off/true/false as booleans: quote it)"),
    "missing required key (at the mapping that lacks it)": (
        _edit(f"    sha256: {SHA}\n", ""),
        "f.yaml:6:3: spec.model.sha256: required key is missing"),
    "bad sha256": (
        _edit(f"sha256: {SHA}", "sha256: abc123"),
        "f.yaml:9:13: spec.model.sha256: 'abc123' is not a sha256: expected 64 hex digits "
        "(sha256sum FILE)"),
    "bad duration": (
        _edit("after: 30s", "after: 30 sec"),
        "f.yaml:17:16: spec.rollout.phases[1].after: '30 sec' is not a duration: use e.g. "
        "30s, 5m, 1h or seconds"),
    "bad percent": (
        _edit("percent: 100", "percent: 120%"),
        "f.yaml:18:18: spec.rollout.phases[2].percent: '120%' is not a percent: use 1..100 "
        "or \"1%\"..\"100%\""),
    "phase with both group and percent": (
        _edit("      - group: canary", "      - {group: canary, percent: 10}"),
        "f.yaml:15:9: spec.rollout.phases[0]: a phase names exactly one of group or percent, "
        "e.g. {group: canary} or {percent: 50}"),
    "phase naming an unknown group": (
        _edit("      - group: canary", "      - group: canari"),
        "f.yaml:15:16: spec.rollout.phases[0].group: no group named 'canari' in spec.groups "
        "(known: canary)"),
    "duplicate group": (
        _edit("      selector: {ring: canary}\n",
              "      selector: {ring: canary}\n    - name: canary\n"),
        "f.yaml:13:13: spec.groups[1].name: duplicate group name 'canary': it is also "
        "spec.groups[0]; group names are unique"),
    "bad apiVersion": (
        _edit("apiVersion: edgebundle/v1", "apiVersion: edgebundle/v2"),
        "f.yaml:1:13: apiVersion: 'edgebundle/v2' is not allowed: use 'edgebundle/v1'"),
    "bad kind": (
        _edit("kind: Fleet", "kind: Fleets"),
        "f.yaml:2:7: kind: 'Fleets' is not allowed: use 'Fleet'"),
    "invalid YAML syntax": (
        _edit("      selector: {ring: canary}\n", "      selector: {ring: canary\n"),
        "f.yaml:13:10: invalid YAML: expected ',' or '}', but got ':' (while parsing a flow "
        "mapping at 12:17)"),
    "bad id characters": (
        _edit("  name: shops", "  name: shops!"),
        "f.yaml:4:9: metadata.name: 'shops!' is not a valid id: use 1-128 letters, digits, "
        "'_', '.', ':' or '-'"),
    "bad device id (a key)": (
        BASE + "  devices:\n    kiosk 7: {pin: rev-0123456789ab}\n",
        "f.yaml:22:5: spec.devices.kiosk 7: 'kiosk 7' is not a valid id: use 1-128 letters, "
        "digits, '_', '.', ':' or '-'"),
    "percent not increasing": (
        _edit("percent: 100", "percent: 40"),
        "f.yaml:18:18: spec.rollout.phases[2].percent: 40% does not grow past phase 1's 50%: "
        "percents are cumulative, so each is larger"),
    "pin to a malformed revision id": (
        BASE + "  devices:\n    kiosk-7: {pin: rev-12}\n",
        "f.yaml:22:20: spec.devices.kiosk-7.pin: 'rev-12' is not a revision id: expected "
        "rev- and 12 lowercase hex digits (see edgebundle fleet status)"),
    "pin and overrides together": (
        BASE + "  devices:\n    kiosk-7: {pin: rev-0123456789ab, model: {ctx_size: 2048}}\n",
        "f.yaml:22:14: spec.devices.kiosk-7: a pinned device runs that revision as it is: "
        "remove model or the pin"),
    "duplicate YAML key": (
        _edit("kind: Fleet\n", "kind: Fleet\nkind: Fleet\n"),
        "f.yaml:3:1: kind: duplicate key: it was already set above"),
    "wasmedge runtime without its plugin": (
        _edit("spec:\n", "spec:\n  runtime: {kind: wasmedge, wasmedge: \"0.14.1\"}\n"),
        "f.yaml:6:12: spec.runtime: kind wasmedge needs plugin (e.g. wasmedge: \"0.14.1\", "
        "plugin: {build: b5593, variant: cpu})"),
    "Redis URL with a password": (
        _edit("spec:\n", "spec:\n  sync: {redis_url: \"redis://:pw@r:6379/0\"}\n"),
        "f.yaml:6:21: spec.sync.redis_url: must not carry a user or password: every device "
        "logs in as its own ACL user (edgebundle fleet provision) with credentials kept on "
        "the device"),
    "unknown template": (
        _edit("    name: m\n", "    name: m\n    template: llama-9\n"),
        "f.yaml:8:15: spec.model.template: unknown prompt template 'llama-9'; known: "),
    "model url scheme": (
        _edit("url: https://example.com/m.gguf", "url: ftp://example.com/m.gguf"),
        "f.yaml:8:10: spec.model.url: 'ftp://example.com/m.gguf' is not a usable URL: use "
        "https://, http://, file:///absolute/path, bundle:relative/path"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_manifest_reports_position_path_and_reason(case: str) -> None:
    text, expected = MALFORMED[case]
    problems = _problems(text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), (problems[0], expected)


def test_every_problem_is_listed_in_file_order() -> None:
    text = (_edit("kind: Fleet", "kind: Fleets")
            .replace(f"sha256: {SHA}", "sha256: nope")
            .replace("      - group: canary", "      - group: canari")
            .replace("      window: 20s", "      window: 20s\n      extra: 1"))
    problems = _problems(text)
    assert [p.split(": ")[0] for p in problems] == ["f.yaml:2:7", "f.yaml:9:13",
                                                    "f.yaml:15:16", "f.yaml:21:7"]
    assert problems[3].startswith("f.yaml:21:7: spec.rollout.health.extra: unknown key")


def test_numbers_are_shown_as_written() -> None:
    # YAML 1.1 reads 0123 as octal 83; the user wrote 0123.
    problems = _problems(_edit(f"sha256: {SHA}", "sha256: 0123"))
    assert problems == ["f.yaml:9:13: spec.model.sha256: expected a string, got 0123 "
                        "(YAML reads it as a number: quote it)"]


def test_missing_unreadable_and_empty_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ManifestError, match=r"nope\.yaml: cannot read the manifest: No such"):
        load_manifest(missing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ManifestError, match=r"empty\.yaml:1:1: the file is empty"):
        load_manifest(empty)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ManifestError, match=r"list\.yaml:1:1: a manifest is a mapping"):
        load_manifest(listing)


def test_manifest_error_is_a_usage_error() -> None:
    with pytest.raises(UsageError) as caught:
        parse_manifest("kind: Fleet\n", "x.yaml")
    assert caught.value.exit_code == 2


# ---- the CLI ------------------------------------------------------------------------------


def _edgebundle(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
    return subprocess.run([sys.executable, "-m", "edgebundle", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_validate_ok_prints_a_summary_per_file_and_exits_0() -> None:
    result = _edgebundle("fleet", "validate", *(str(p) for p in EXAMPLES), cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(EXAMPLES)
    for path, line in zip(EXAMPLES, lines, strict=True):
        manifest = load_manifest(path)
        phases = len(manifest.spec.rollout.phases)
        assert line == (f"{path}: ok (fleet {manifest.name}, {phases} "
                        f"phase{'s' if phases != 1 else ''}, revision {manifest.revision_id()})")


def test_cli_validate_lists_every_problem_of_every_file_and_exits_1(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(BASE)
    bad = tmp_path / "bad.yaml"
    bad.write_text(_edit("kind: Fleet", "kind: Fleets").replace("after: 30s", "after: soon"))
    result = _edgebundle("fleet", "validate", "bad.yaml", "good.yaml", "gone.yaml", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0] == "bad.yaml:2:7: kind: 'Fleets' is not allowed: use 'Fleet'"
    assert lines[1].startswith("bad.yaml:17:16: spec.rollout.phases[1].after: 'soon' is not")
    assert lines[2].startswith("good.yaml: ok (fleet shops, 3 phases, revision rev-")
    assert lines[3] == "gone.yaml: cannot read the manifest: No such file or directory"
    assert len(lines) == 4 and "Traceback" not in result.stderr


def test_cli_validate_json(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(BASE)
    (tmp_path / "bad.yaml").write_text(BASE + "colour: red\n")
    result = _edgebundle("fleet", "validate", "--json", "good.yaml", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    good, bad = report["files"]
    revision = parse_manifest(BASE).revision_id()
    assert good == {"file": "good.yaml", "ok": True, "fleet": "shops", "phases": 3,
                    "revision": revision, "errors": []}
    assert bad["ok"] is False and bad["fleet"] is None and bad["revision"] is None
    assert bad["errors"] == [{"file": "bad.yaml", "line": 21, "column": 1, "path": "colour",
                              "message": "unknown key; allowed: apiVersion, kind, metadata, "
                                         "spec"}]
    ok = _edgebundle("fleet", "validate", "--json", "good.yaml", cwd=tmp_path)
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True


def test_cli_validate_without_a_file_is_a_usage_error(tmp_path: Path) -> None:
    result = _edgebundle("fleet", "validate", cwd=tmp_path)
    assert result.returncode == 2
    assert "Missing argument" in result.stderr


# ---- selection.py: the controller's pure helpers, on what the manifest gives ---------

LABELS = {
    "d05": {"ring": "canary", "site": "north"},
    "d01": {"site": "north"},
    "d03": {"site": "south"},
    "d02": {"ring": "canary", "site": "south"},
    "d04": {"site": "north"},
}
GROUPS = [Group(name="canary", selector={"ring": "canary"}),
          Group(name="north-canary", selector={"ring": "canary", "site": "north"}),
          Group(name="everyone")]
PHASES = [Phase(group="canary"), Phase(percent=50, after=30.0), Phase(percent=100, after=30.0)]


def test_group_selection_needs_every_label() -> None:
    assert selection.group_devices("canary", GROUPS, LABELS) == {"d02", "d05"}
    assert selection.group_devices("north-canary", GROUPS, LABELS) == {"d05"}
    assert selection.group_devices("everyone", GROUPS, LABELS) == set(LABELS)
    assert not selection.matches({"ring": "Canary"}, {"ring": "canary"})
    with pytest.raises(UsageError, match="does not define"):
        selection.group_devices("west", GROUPS, LABELS)


def test_percent_phases_are_stable_and_cumulative() -> None:
    half = selection.phase_devices(PHASES[1], GROUPS, LABELS)
    assert half == {"d01", "d02", "d03"}  # 50% of 5, rounded up, first by id
    shuffled = dict(reversed(list(LABELS.items())))
    assert selection.phase_devices(PHASES[1], GROUPS, shuffled) == half
    cumulative = selection.cumulative_phases(PHASES, GROUPS, LABELS)
    assert cumulative == [{"d02", "d05"}, {"d01", "d02", "d03", "d05"}, set(LABELS)]
    assert selection.first_phase_of("d03", cumulative) == 1
    # A new device joins: earlier picks by id stay picked unless it sorts before them.
    grown = {**LABELS, "d06": {}}
    assert selection.phase_devices(PHASES[1], GROUPS, grown) == {"d01", "d02", "d03"}
    assert selection.phase_devices(PHASES[1], GROUPS, {}) == set()


def test_counts_of_numbers_and_percents() -> None:
    assert selection.count_or_percent(3, 100, "max_unavailable", round_up=False) == 3
    assert selection.count_or_percent("25%", 10, "max_unavailable", round_up=False) == 2
    assert selection.count_or_percent("25%", 10, "max_unavailable", round_up=True) == 3
    assert selection.count_or_percent("0%", 5, "failure_threshold", round_up=False) == 0


def test_a_device_spec_applies_its_overrides_and_pins_are_read() -> None:
    fleet_spec = parse_manifest(BASE).revision_spec()
    wasmedge = {"kind": "wasmedge", "wasmedge": "0.14.1",
                "plugin": {"name": "wasi_nn-ggml", "build": "b5593", "variant": "cpu"}}
    entry = Device.model_validate({"model": {"ctx_size": 2048}, "runtime": wasmedge})
    spec = selection.device_spec(fleet_spec, entry)
    assert spec.model == fleet_spec.model.model_copy(update={"ctx_size": 2048})
    assert spec.runtime.to_json() == wasmedge and spec.app == fleet_spec.app
    assert fleet_spec.model.ctx_size == 4096  # the fleet's spec is not changed
    assert selection.device_spec(fleet_spec, None) == fleet_spec
    back = selection.device_spec(spec, Device(runtime=Runtime()))
    assert back.runtime == Runtime()  # replaced whole, nothing left over
    assert back.runtime.kind == "embedded" and back.runtime.plugin is None
    assert selection.pinned_revision(Device(pin="rev-0123456789ab")) == "rev-0123456789ab"
    assert selection.pinned_revision(entry) is None and selection.pinned_revision(None) is None


def test_manifest_overrides_feed_the_device_spec_unchanged() -> None:
    text = BASE + ("  devices:\n    kiosk-9:\n      model: {url: \"bundle:assets/b.gguf\", "
                   f"sha256: \"{'cd' * 32}\"}}\n")
    manifest = parse_manifest(text)
    desired = selection.device_spec(manifest.revision_spec(), manifest.spec.devices["kiosk-9"])
    assert desired.model.url == "bundle:assets/b.gguf"
    assert desired.model.sha256 == "cd" * 32 and desired.model.name == "m"
