"""doctor --manifest: this device compared with what a fleet manifest says it must run.

Real files only: a scripted GGUF model, the shipped edgechat.wasm, manifests written
as YAML and loaded by the real loader; the CLI as a real `python -m edgebundle` child.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.fleet.manifest import Manifest
from edgebundle.fleet.manifest_file import load_manifest
from tests.support.doctor_env import diagnose

MANIFEST_IDS = ("manifest.model", "manifest.template", "manifest.runtime", "manifest.app")


def write_manifest(path: Path, model_sha: str, *, template: str = "llama-3-chat",
                   runtime: str = "{kind: embedded}", devices: str = "{}") -> Manifest:
    path.write_text(f"""\
apiVersion: edgebundle/v1
kind: Fleet
metadata: {{name: shop}}
spec:
  runtime: {runtime}
  model:
    name: shop-model
    url: https://models.example/shop.gguf
    sha256: {model_sha}
    template: {template}
  devices: {devices}
""")
    return load_manifest(path)


def model_file(tmp_path: Path) -> tuple[Path, str]:
    path = write_scripted_model(tmp_path / "shop.gguf", ScriptedModelSpec(reply="Hi"))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_device_that_runs_what_the_manifest_says_passes(home: Path, tmp_path: Path) -> None:
    model, digest = model_file(tmp_path)
    manifest = write_manifest(tmp_path / "fleet.yaml", digest)
    report = diagnose(home, runtime="embedded", model=model, template="llama-3-chat",
                      manifest=manifest)
    assert {i: report.check(i).status for i in MANIFEST_IDS} == dict.fromkeys(MANIFEST_IDS, "ok")
    assert "shop-model of manifest shop" in report.check("manifest.model").summary


def test_each_drift_from_the_manifest_fails_with_a_fix(home: Path, tmp_path: Path) -> None:
    model, digest = model_file(tmp_path)
    other = hashlib.sha256(b"the model the fleet moved to").hexdigest()
    manifest = write_manifest(tmp_path / "fleet.yaml", other, template="chatml",
                              runtime='{kind: wasmedge, wasmedge: "0.14.1", '
                                      'plugin: {build: b5593}}')
    report = diagnose(home, runtime="embedded", model=model, template="llama-3-chat",
                      manifest=manifest)
    checks = {i: report.check(i) for i in MANIFEST_IDS}
    assert {i: c.status for i, c in checks.items()} == {
        "manifest.model": "fail", "manifest.template": "fail", "manifest.runtime": "fail",
        "manifest.app": "ok"}
    assert digest[:12] in checks["manifest.model"].summary
    assert other[:12] in checks["manifest.model"].summary
    assert "wants chatml" in checks["manifest.template"].summary
    assert checks["manifest.template"].fix == \
        "pass --template chatml (or set template in config.toml)"
    assert "wants wasmedge" in checks["manifest.runtime"].summary
    assert all(c.fix for c in checks.values() if c.status == "fail")
    assert not report.ok


def test_a_device_override_in_the_manifest_is_what_that_device_is_checked_against(
    home: Path, tmp_path: Path,
) -> None:
    model, digest = model_file(tmp_path)
    fleet_sha = hashlib.sha256(b"everyone else's model").hexdigest()
    manifest = write_manifest(tmp_path / "fleet.yaml", fleet_sha,
                              devices=f"{{kiosk-7: {{model: {{url: 'https://m.example/k7.gguf', "
                                      f"sha256: {digest}}}}}}}")
    mine = diagnose(home, runtime="embedded", model=model, template="llama-3-chat",
                    device_id="kiosk-7", manifest=manifest)
    assert mine.check("manifest.model").status == "ok"
    theirs = diagnose(home, runtime="embedded", model=model, template="llama-3-chat",
                      device_id="kiosk-8", manifest=manifest)
    assert theirs.check("manifest.model").status == "fail"


def test_without_a_manifest_there_are_no_manifest_checks(home: Path) -> None:
    report = diagnose(home, runtime="embedded")
    assert not [c for c in report.checks if c.id.startswith("manifest.")]


def doctor_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
    env["EDGEBUNDLE_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "edgebundle", "doctor", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_the_cli_reports_manifest_drift_and_refuses_a_malformed_manifest(
    home: Path, tmp_path: Path,
) -> None:
    model, digest = model_file(tmp_path)
    write_manifest(tmp_path / "fleet.yaml", digest, template="chatml")
    done = doctor_cli(home, "--json", "--runtime", "embedded", "--model", str(model),
                      "--template", "llama-3-chat", "--manifest", str(tmp_path / "fleet.yaml"))
    report = json.loads(done.stdout)
    by_id = {c["id"]: c for c in report["checks"]}
    assert by_id["manifest.template"]["status"] == "fail"
    assert by_id["manifest.model"]["status"] == "ok"
    assert done.returncode == 1

    (tmp_path / "bad.yaml").write_text("apiVersion: edgebundle/v1\nkind: Fleet\nspek: {}\n")
    bad = doctor_cli(home, "--manifest", str(tmp_path / "bad.yaml"))
    assert bad.returncode == 2
    assert f"{tmp_path / 'bad.yaml'}:3:1: spek" in bad.stderr
    assert "Traceback" not in bad.stderr
