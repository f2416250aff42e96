"""Offline bundles: everything a device needs to install, verified, in one directory.

An air-gapped device cannot reach GitHub or PyPI, so a connected machine runs
``edgebundle bundle build DIR`` and the directory travels (USB stick, rsync)::

    DIR/bundle.json                   {"schema": 1, "created", "edgebundle_version",
                                       "files": {relpath: sha256}}  -- every file below
    DIR/plugins/wasmedge.lock.toml    copy of the runtime lock, sha256s filled in
    DIR/wasm/pins.toml                copy of the app/model pins, sha256s filled in
    DIR/assets/<file>                 runtime + plugin archives, app wasm, models
    DIR/wheels/*.whl                  edgebundle and its dependencies; install.sh
                                      installs exactly the listed ones, hash-checked

Where a pin says ``verify = "release-sha256sum"``, the build checks the download
against the release's SHA256SUM (https) and records that value; where it says sha256
"unknown", the build trusts what it downloads on first use and says so loudly. Either
way the value goes into the bundle's lock copies (with ``sha256_origin`` saying where
it came from), so the device installing from the bundle verifies every byte, reads
nothing from the network and never needs ``--allow-unverified``. Installing from a
bundle checks each file against both ``bundle.json`` and the bundle's lock before
using it. The fleet agent trusts no
bundle on its own for a WasmEdge runtime: each archive's sha256 must also be pinned
by the revision (``spec.runtime.archives``) or the shipped lock.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgebundle import __version__
from edgebundle.download import fetch, sha256_file
from edgebundle.errors import ChecksumMismatchError, DownloadError, InstallError, UsageError
from edgebundle.files import write_text as write_atomic
from edgebundle.pins import (
    RELEASE_SHA256SUM,
    AppPins,
    Artifact,
    Asset,
    RuntimeLock,
    load_app_pins,
    load_runtime_lock,
)
from edgebundle.progress import Log, ProgressFactory, progress_for
from edgebundle.sha256sum import published_sha256

SCHEMA = 1
MANIFEST = "bundle.json"
LOCK_RELPATH = "plugins/wasmedge.lock.toml"
PINS_RELPATH = "wasm/pins.toml"
ASSETS = "assets"
WHEELS = "wheels"

Platform = tuple[str, str, str]
"""(os, arch, plugin variant), e.g. ("linux", "x86_64", "cpu")."""



@dataclass(frozen=True)
class BundleManifest:
    root: Path
    created: str
    edgebundle_version: str
    files: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "created": self.created,
            "edgebundle_version": self.edgebundle_version,
            "files": dict(sorted(self.files.items())),
        }


@dataclass(frozen=True)
class Bundle:
    """An opened bundle whose lock copies already matched ``bundle.json``."""

    manifest: BundleManifest
    lock: RuntimeLock
    app_pins: AppPins

    @property
    def root(self) -> Path:
        return self.manifest.root

    def asset(self, artifact: Artifact) -> tuple[Path, str]:
        """The bundled file for a pin and the sha256 it must have (manifest and lock agree)."""
        relpath = asset_relpath(artifact)
        listed = self.manifest.files.get(relpath)
        if listed is None:
            raise DownloadError(
                f"{self.root}: the bundle has no {relpath} ({artifact.name}); rebuild it with "
                "`edgebundle bundle build --all` or with this device's --variant"
            )
        if artifact.verified and listed != artifact.sha256:
            raise ChecksumMismatchError(
                f"{self.root}: {relpath} is listed with sha256 {listed} in {MANIFEST} but the "
                f"bundle's lock pins {artifact.sha256}; the bundle was altered: rebuild it"
            )
        return self.root / relpath, listed


def asset_relpath(artifact: Artifact) -> str:
    return f"{ASSETS}/{artifact.filename}"


def open_bundle(root: Path) -> Bundle:
    """Read ``bundle.json`` and the lock copies it lists, verifying them first."""
    manifest = read_manifest(root)
    for relpath in (LOCK_RELPATH, PINS_RELPATH):
        expected = manifest.files.get(relpath)
        path = root / relpath
        if expected is None or not path.is_file():
            raise UsageError(f"{root}: not a complete bundle ({relpath} missing); rebuild it")
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumMismatchError(
                f"{path}: sha256 mismatch: expected {expected} (from {MANIFEST}), got {actual}; "
                "the bundle was altered: rebuild it"
            )
    return Bundle(
        manifest=manifest,
        lock=load_runtime_lock(root / LOCK_RELPATH),
        app_pins=load_app_pins(root / PINS_RELPATH),
    )


def read_manifest(root: Path) -> BundleManifest:
    path = root / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"{root}: not a bundle directory (no {MANIFEST}); make one with "
            "`edgebundle bundle build DIR`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read bundle manifest ({exc})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(files, dict):
        raise UsageError(f"{path}: not a schema {SCHEMA} bundle manifest; rebuild the bundle")
    return BundleManifest(
        root=root,
        created=str(data.get("created", "")),
        edgebundle_version=str(data.get("edgebundle_version", "")),
        files={str(k): str(v) for k, v in files.items()},
    )


def build_bundle(
    dest: Path,
    lock: RuntimeLock,
    app_pins: AppPins,
    *,
    platforms: Sequence[Platform] | None,
    apps: Sequence[str] = (),
    models: Sequence[str] = (),
    wheels: bool = True,
    progress: ProgressFactory | None = None,
    log: Log = lambda line: None,
    project_dir: Path | None = None,
) -> BundleManifest:
    """Download and verify the chosen pins into ``dest``; ``platforms=None`` takes every asset."""
    assets = _chosen_assets(lock, platforms)
    chosen_apps = [app_pins.app(name) for name in apps]
    chosen_models = [app_pins.model(name) for name in models]
    artifacts: list[Artifact] = [*assets, *chosen_apps, *chosen_models]
    _check_unique_filenames(artifacts)
    if wheels:
        project = project_dir or _project_dir()
    previous = _previous_files(dest)
    partial = dest / ".partial"
    files: dict[str, str] = {}
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    # Pins without a quoted sha256 -> (the value used, where it came from)
    filled: dict[Artifact, tuple[str, str]] = {}
    for artifact in artifacts:
        relpath = asset_relpath(artifact)
        files[relpath], origin = _bundle_one(artifact, dest, previous, partial, progress, log)
        if not artifact.verified:
            filled[artifact] = (files[relpath], f"{origin}, by edgebundle bundle build {stamp}")
    shutil.rmtree(partial, ignore_errors=True)
    asset_shas = [filled.get(a) for a in lock.assets]
    app_shas = [filled.get(a) for a in app_pins.apps]
    model_shas = [filled.get(m) for m in app_pins.models]
    _write_pins_copy(lock.path, dest / LOCK_RELPATH, {"asset": asset_shas}, stamp)
    pins_shas = {"app": app_shas, "model": model_shas}
    _write_pins_copy(app_pins.path, dest / PINS_RELPATH, pins_shas, stamp)
    load_runtime_lock(dest / LOCK_RELPATH)  # what we wrote must load, or the bundle is useless
    load_app_pins(dest / PINS_RELPATH)
    files[LOCK_RELPATH] = sha256_file(dest / LOCK_RELPATH)
    files[PINS_RELPATH] = sha256_file(dest / PINS_RELPATH)
    if wheels:
        files.update(_build_wheels(project, dest / WHEELS, log))
    manifest = BundleManifest(root=dest, created=stamp, edgebundle_version=__version__, files=files)
    write_atomic(dest / MANIFEST, json.dumps(manifest.to_json(), indent=2) + "\n")
    log(f"bundle written to {dest}: {len(files)} files")
    return manifest


def _chosen_assets(lock: RuntimeLock, platforms: Sequence[Platform] | None) -> list[Asset]:
    if platforms is None:
        return list(lock.assets)
    chosen: list[Asset] = []
    for os_name, arch, variant in platforms:
        pair = (lock.runtime_for(os_name, arch, variant), lock.plugin_asset(os_name, arch, variant))
        for asset in pair:
            if asset not in chosen:
                chosen.append(asset)
    return chosen


def _check_unique_filenames(artifacts: Sequence[Artifact]) -> None:
    seen: dict[str, str] = {}
    for artifact in artifacts:
        other = seen.setdefault(artifact.filename, artifact.url)
        if other != artifact.url:
            raise UsageError(
                f"two pins download to the same file name {artifact.filename!r} "
                f"({other} and {artifact.url}); a bundle keeps one file per name"
            )


def _previous_files(dest: Path) -> Mapping[str, str]:
    """Files an earlier build of this bundle verified, so a rebuild can keep them."""
    try:
        return read_manifest(dest).files
    except UsageError:
        return {}


def _bundle_one(
    artifact: Artifact,
    dest: Path,
    previous: Mapping[str, str],
    partial: Path,
    progress: ProgressFactory | None,
    log: Log,
) -> tuple[str, str]:
    """Put one pinned file into the bundle; its sha256 and where that value came from."""
    relpath = asset_relpath(artifact)
    target = dest / relpath
    published: str | None = None  # what the pin or the publisher's SHA256SUM says
    origin = "pinned"
    if artifact.verified:
        published = artifact.sha256
    elif artifact.verify == RELEASE_SHA256SUM:
        published = published_sha256(artifact.sha256sum_url, artifact.filename)
        origin = f"checked against the release's {artifact.sha256sum_url}"
        log(f"{artifact.name}: {origin}: sha256 {published}")
    else:
        origin = "computed from the download (trust on first use)"
    expected = published or previous.get(relpath)
    if expected is not None and target.is_file() and sha256_file(target) == expected:
        log(f"{artifact.name}: already in the bundle ({relpath}, sha256 verified)")
        return expected, origin
    with progress_for(progress, artifact.name) as callback:
        got = fetch(
            artifact.url,
            target,
            sha256=published,
            downloads_dir=partial,
            progress=callback,
            expected_from=artifact.sha256sum_url if artifact.verify and published else None,
        )
    if published is None:
        log(
            f"WARNING: no published sha256 is pinned for {artifact.name} ({artifact.url}) and "
            f"the lock names no SHA256SUM; trusting this download on first use: sha256 "
            f"{got.sha256}. Compare it with a published value before shipping this bundle; "
            "devices will enforce it."
        )
    return got.sha256, origin


def _write_pins_copy(
    source: Path,
    target: Path,
    shas: Mapping[str, Sequence[tuple[str, str] | None]],
    stamp: str,
) -> None:
    """Copy a lock file as TOML, with the sha256s this build settled filled in."""
    data = tomllib.loads(source.read_text(encoding="utf-8"))
    for key, values in shas.items():
        rows = data.get(key, [])
        for row, filled in zip(rows, values, strict=False):
            if filled is not None:
                row["sha256"], row["sha256_origin"] = filled
                row.pop("verify", None)  # settled now: the device checks the recorded value
    header = (
        f"# Copied by `edgebundle bundle build` ({stamp}) from {source.name}.\n"
        "# Rows with sha256_origin quoted no published sha256: theirs was read from the\n"
        "# release's SHA256SUM (https) or, where there is none, computed from the file in\n"
        "# this bundle (trust on first use); sha256_origin says which.\n"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, header + dump_toml(data))


def _project_dir() -> Path:
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise UsageError(
            "cannot build wheels: edgebundle is not running from a source checkout; "
            "run `bundle build` from a checkout or pass --no-wheels"
        )
    return root


def _build_wheels(project: Path, wheel_dir: Path, log: Log) -> dict[str, str]:
    """Wheels for edgebundle and every dependency, so a device needs no index."""
    log(f"building wheels for {project} into {wheel_dir} (pip wheel)")
    wheel_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "wheel", "--quiet"]
    # With the embedded extra, so an offline device gets the zero-install runtime too.
    argv += ["--wheel-dir", str(wheel_dir), f"{project}[embedded]"]
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        lines = (completed.stderr or completed.stdout).strip().splitlines()
        raise InstallError(
            f"pip wheel failed (exit {completed.returncode}): {lines[-1] if lines else 'no output'}"
        )
    return {f"{WHEELS}/{p.name}": sha256_file(p) for p in sorted(wheel_dir.glob("*.whl"))}


# ---------------------------------------------------------------- a small TOML writer

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def dump_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """TOML for what lock files hold: scalars, tables, arrays of tables (no comments kept)."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, list[Mapping[str, Any]]]] = []
    for key, value in data.items():
        name = f"{prefix}{_key(key)}"
        if isinstance(value, Mapping):
            tables.append((name, value))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            arrays.append((name, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for name, table in tables:
        lines += ["", f"[{name}]", dump_toml(table, f"{name}.").strip("\n")]
    for name, rows in arrays:
        for row in rows:
            lines += ["", f"[[{name}]]", dump_toml(row, f"{name}.").strip("\n")]
    return "\n".join(lines).lstrip("\n") + "\n"


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise UsageError(f"cannot write {type(value).__name__} values into a lock file copy")


def _string(text: str) -> str:
    out = []
    for char in text:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'
