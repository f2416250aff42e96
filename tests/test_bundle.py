"""Offline bundles: build from the pins on a connected machine, install with no network.

GitHub releases are unreachable here, so a local HTTP server on 127.0.0.1 serves
fabricated release archives (tests/support/release_server.py); it is stopped before
installing from the bundle, which proves the install needs no network. Everything else
is real: downloads, sha256 checks, TOML written and re-read, tar extraction, symlinks,
and the `edgebundle` CLI as a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from edgebundle import bundle, installer
from edgebundle.errors import ChecksumMismatchError, DownloadError, UsageError
from edgebundle.host import HostInfo, detect
from edgebundle.layout import Layout
from edgebundle.pins import load_app_pins, load_runtime_lock
from tests.support.release_server import Release, ReleaseServer, publish_release, sha256

HOST = detect()
AVX_HOST = HostInfo(os=HOST.os, arch=HOST.arch, flags=frozenset({"avx"}))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
    return subprocess.run(
        [sys.executable, "-m", "edgebundle", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def build(
    release: Release, dest: Path, **options: object
) -> tuple[bundle.BundleManifest, list[str]]:
    log: list[str] = []
    manifest = bundle.build_bundle(
        dest,
        load_runtime_lock(release.lock),
        load_app_pins(release.pins),
        platforms=[(HOST.os, HOST.arch, "cpu")],
        apps=["llama-chat"],
        models=["tiny"],
        wheels=False,
        log=log.append,
        **options,  # type: ignore[arg-type]
    )
    return manifest, log


def test_build_fills_unknown_sha_then_installs_offline(
    release_server: ReleaseServer, tmp_path: Path
) -> None:
    release = publish_release(release_server, tmp_path, known_sha=False)
    dest = tmp_path / "bundle"
    done = cli(
        "bundle",
        "build",
        str(dest),
        "--no-wheels",
        "--variant",
        "cpu",
        "--app",
        "llama-chat",
        "--model",
        "tiny",
        "--lock",
        str(release.lock),
        "--pins",
        str(release.pins),
    )
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 4  # runtime, plugin, app, model: each trusted on first use, loudly
    assert f"sha256 {sha256(release.runtime)}" in "\n".join(warnings)

    lock = load_runtime_lock(dest / "plugins" / "wasmedge.lock.toml")
    by_name = {a.filename: a.sha256 for a in lock.assets}
    assert by_name[release.runtime.name] == sha256(release.runtime)
    assert by_name[release.plugin.name] == sha256(release.plugin)
    noavx = next(a for a in lock.assets if a.variant == "noavx")
    assert noavx.sha256 == "unknown"  # not downloaded, so not vouched for
    raw = tomllib.loads((dest / "plugins" / "wasmedge.lock.toml").read_text())
    assert raw["wasmedge"]["source"] == "fabricated for tests"  # source fields kept
    assert raw["asset"][0]["archive_root"] == "WasmEdge-0.14.1-Linux"
    pins = load_app_pins(dest / "wasm" / "pins.toml")
    assert pins.app("llama-chat").verified and pins.model("tiny").verified

    manifest = json.loads((dest / "bundle.json").read_text())
    assert manifest["schema"] == 1 and manifest["edgebundle_version"]
    for relpath, digest in manifest["files"].items():
        assert sha256(dest / relpath) == digest
    assert f"assets/{release.runtime.name}" in manifest["files"]

    release_server.stop()  # the device is offline from here on
    home = tmp_path / "home"
    done = cli(
        "--home",
        str(home),
        "install",
        "--bundle",
        str(dest),
        "--app",
        "llama-chat",
        "--model",
        "tiny",
        "--require-wasmedge",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["runtime"] == "wasmedge" and result["active"] == "wasmedge-0.14.1-cpu"
    assert "WARNING" not in done.stderr  # every file verified: no --allow-unverified needed
    marker = json.loads((home / "runtime" / "current" / "edgebundle-runtime.json").read_text())
    assert marker["assets"]["wasmedge"]["sha256"] == sha256(release.runtime)
    assert (home / "apps" / "llama-chat-0.14.1.wasm").read_bytes() == (
        release_server.root / "llama-chat-0.14.1.wasm"
    ).read_bytes()


def test_rebuild_reuses_verified_files(release_server: ReleaseServer, tmp_path: Path) -> None:
    release = publish_release(release_server, tmp_path, known_sha=False)
    first, _ = build(release, tmp_path / "b")
    fetched = len(release_server.gets())
    again, log = build(release, tmp_path / "b")
    assert len(release_server.gets()) == fetched
    assert again.files == first.files
    assert sum("already in the bundle" in line for line in log) == 4


def test_tampered_bundle_file_is_refused(release_server: ReleaseServer, tmp_path: Path) -> None:
    release = publish_release(release_server, tmp_path)
    dest = tmp_path / "bundle"
    build(release, dest)
    release_server.stop()
    archive = dest / "assets" / release.runtime.name
    archive.write_bytes(archive.read_bytes() + b"tampered")
    home = tmp_path / "home"
    plan = installer.make_plan(AVX_HOST, bundle=dest, require_wasmedge=True)
    with pytest.raises(ChecksumMismatchError, match="sha256 mismatch"):
        installer.install(plan, Layout(home))
    assert not (home / "runtime").exists() or sorted((home / "runtime").iterdir()) == []

    done = cli("--home", str(home), "install", "--bundle", str(dest))
    assert done.returncode == 0  # without --require-wasmedge: refused, said, embedded
    (line,) = [x for x in done.stderr.splitlines() if "%" not in x]  # minus progress lines
    assert "not installed (" in line and "sha256 mismatch" in line and "embedded runtime" in line


def test_tampered_bundle_lock_is_refused(release_server: ReleaseServer, tmp_path: Path) -> None:
    release = publish_release(release_server, tmp_path)
    dest = tmp_path / "bundle"
    build(release, dest)
    lock = dest / "plugins" / "wasmedge.lock.toml"
    lock.write_text(lock.read_text().replace("b0001", "b0002"))
    done = cli("--home", str(tmp_path / "home"), "install", "--bundle", str(dest))
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"edgebundle: error: {lock}: sha256 mismatch")


def test_manifest_and_lock_must_agree(release_server: ReleaseServer, tmp_path: Path) -> None:
    release = publish_release(release_server, tmp_path)
    dest = tmp_path / "bundle"
    build(release, dest)
    data = json.loads((dest / "bundle.json").read_text())
    data["files"][f"assets/{release.runtime.name}"] = "a" * 64
    (dest / "bundle.json").write_text(json.dumps(data))
    opened = bundle.open_bundle(dest)
    runtime = opened.lock.runtime_asset(HOST.os, HOST.arch)
    with pytest.raises(ChecksumMismatchError, match="the bundle's lock pins"):
        opened.asset(runtime)


def test_bundle_without_this_variant_says_rebuild(
    release_server: ReleaseServer, tmp_path: Path
) -> None:
    release = publish_release(release_server, tmp_path)
    dest = tmp_path / "bundle"
    build(release, dest)
    plan = installer.make_plan(AVX_HOST, bundle=dest, variant="noavx", require_wasmedge=True)
    with pytest.raises(DownloadError, match="the bundle has no assets/.*noavx.*rebuild it"):
        installer.install(plan, Layout(tmp_path / "home"))


def test_not_a_bundle_and_lock_with_bundle_are_usage_errors(tmp_path: Path) -> None:
    done = cli("--home", str(tmp_path / "home"), "install", "--bundle", str(tmp_path / "nothing"))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"edgebundle: error: {tmp_path / 'nothing'}: not a bundle directory (no bundle.json); "
        "make one with `edgebundle bundle build DIR`"
    )
    with pytest.raises(UsageError, match="drop --lock/--pins"):
        installer.make_plan(AVX_HOST, bundle=tmp_path, lock_file=tmp_path / "x.toml")


def test_all_takes_every_pinned_asset(release_server: ReleaseServer, tmp_path: Path) -> None:
    release = publish_release(release_server, tmp_path)
    manifest = bundle.build_bundle(
        tmp_path / "b",
        load_runtime_lock(release.lock),
        load_app_pins(release.pins),
        platforms=None,
        wheels=False,
    )
    assets = sorted(k for k in manifest.files if k.startswith("assets/"))
    assert len(assets) == 3  # runtime + cpu plugin + noavx plugin


def test_toml_writer_round_trips() -> None:
    data = {
        "schema": 1,
        "wasmedge": {"version": "0.14.1", "source": 'quote " back\\slash\nnewline\ttab \x7f é'},
        "flags": [1, 2],
        "on": True,
        "asset": [{"component": "wasmedge", "sha256": "unknown"}, {"odd key": "x"}],
    }
    assert tomllib.loads(bundle.dump_toml(data)) == data


def test_build_checks_verify_rows_against_sha256sum_and_the_bundle_carries_the_value(
    https_release_server: ReleaseServer, tmp_path: Path
) -> None:
    """A verify row is checked against the release's SHA256SUM when the bundle is built;
    the device then checks the value the bundle carries and reads nothing online."""
    release = publish_release(https_release_server, tmp_path, verify=["wasmedge", "plugin"])
    dest = tmp_path / "bundle"
    _, log = build(release, dest)
    sums_url = https_release_server.url("SHA256SUM")
    assert f"{release.plugin.name}" not in "\n".join(x for x in log if x.startswith("WARNING"))
    assert any(f"checked against the release's {sums_url}" in line for line in log)
    raw = tomllib.loads((dest / "plugins" / "wasmedge.lock.toml").read_text())
    runtime_row = raw["asset"][0]
    assert "verify" not in runtime_row and runtime_row["sha256"] == sha256(release.runtime)
    assert runtime_row["sha256_origin"].startswith(f"checked against the release's {sums_url}")
    noavx = next(row for row in raw["asset"] if row.get("variant") == "noavx")
    assert noavx["verify"] == "release-sha256sum"  # not bundled: left as the lock says

    https_release_server.stop()  # offline from here on
    plan = installer.make_plan(AVX_HOST, bundle=dest, require_wasmedge=True)
    result = installer.install(plan, Layout(tmp_path / "home"))
    assert [(v.file, v.how, v.source) for v in result.verified] == [
        (release.runtime.name, "bundle", str(dest)),
        (release.plugin.name, "bundle", str(dest)),
    ]


def test_build_refuses_a_download_that_differs_from_sha256sum(
    https_release_server: ReleaseServer, tmp_path: Path
) -> None:
    release = publish_release(https_release_server, tmp_path, verify=["plugin"])
    (https_release_server.root / "SHA256SUM").write_text(
        f"{sha256(release.runtime)}  {release.runtime.name}\n{'0' * 64}  {release.plugin.name}\n"
    )
    with pytest.raises(ChecksumMismatchError, match=f"SHA256SUM lists {'0' * 64}"):
        build(release, tmp_path / "bundle")
    assert not (tmp_path / "bundle" / "bundle.json").exists()
