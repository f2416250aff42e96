"""Install the pinned WasmEdge runtime, WASI-NN plugin, apps and models under the home.

Runtimes live side by side, one directory per (version, variant), and ``current`` is a
symlink to the active one, so upgrade and rollback are one atomic link switch::

    <home>/runtime/wasmedge-0.14.1-cpu/{bin/wasmedge, lib/, plugin/libwasmedgePluginWasiNN.so,
                                        edgebundle-runtime.json}
    <home>/runtime/current -> wasmedge-0.14.1-cpu
    <home>/env                 PATH, LD_LIBRARY_PATH, WASMEDGE_PLUGIN_PATH via ``current``

Every archive is verified (sha256) before it is unpacked, unpacked into
``runtime/.tmp-*`` and renamed into place only when complete; any failure removes the
temp directory and leaves the previous ``current`` as it was. Where WasmEdge cannot be
installed (GitHub unreachable, no published checksum, a checksum mismatch) the
installer says so in one line and the device runs on the embedded runtime, unless
the plan requires WasmEdge.

The sha256 a file must have comes from one of (see :class:`Verification`): the lock
(``pinned``, quoted from a published source), the release's own SHA256SUM read over
https now (``release-sha256sum``; the lock says ``verify``), the bundle the device
installs from (``bundle``), or nowhere (``unverified``, only with --allow-unverified).
Every checksum is settled before the first archive byte is fetched, and the value
used is logged and recorded in the runtime's marker file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from edgebundle import files, resources
from edgebundle.bundle import Bundle, open_bundle
from edgebundle.download import (
    Log,
    ProgressFactory,
    fetch,
    progress_for,
    published_sha256,
    sha256_file,
)
from edgebundle.errors import (
    EdgebundleError,
    InstallError,
    PinError,
    UnverifiedPinError,
    UsageError,
)
from edgebundle.host import HostInfo
from edgebundle.layout import Layout
from edgebundle.pins import (
    RELEASE_SHA256SUM,
    AppPins,
    Artifact,
    Asset,
    RuntimeLock,
    load_app_pins,
    load_runtime_lock,
)
from edgebundle.runtime.wasmedge import PLUGIN_PATH_ENV, WASI_NN_LIBRARIES, runtime_env

MARKER = "edgebundle-runtime.json"
AUTO = "auto"

PINNED = "pinned"
BUNDLE = "bundle"
UNVERIFIED = "unverified"


@dataclass(frozen=True)
class Verification:
    """What vouched for one installed file's sha256.

    ``how``: ``pinned`` (the lock quotes a published value; ``source`` is the lock),
    ``release-sha256sum`` (the release's SHA256SUM, read over https at install time;
    ``source`` is its URL), ``bundle`` (the offline bundle's verified record; ``source``
    is the bundle) or ``unverified`` (nothing did: --allow-unverified).
    """

    file: str
    sha256: str
    how: str
    source: str

    def describe(self) -> str:
        if self.how == PINNED:
            return f"{self.file}: sha256 {self.sha256} pinned in {self.source}"
        if self.how == RELEASE_SHA256SUM:
            return (
                f"{self.file}: sha256 {self.sha256} verified against the publisher's "
                f"{self.source} (read now over https; not pinned)"
            )
        if self.how == BUNDLE:
            return f"{self.file}: sha256 {self.sha256} verified against the bundle {self.source}"
        return (
            f"{self.file}: installed unverified (sha256 {self.sha256}); nothing published "
            "vouches for it (--allow-unverified)"
        )

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "sha256": self.sha256, "how": self.how, "source": self.source}


@dataclass(frozen=True)
class _Expected:
    """Where to take a file from and the sha256 it must have, settled before fetching."""

    source: str  # URL or bundle path
    sha256: str | None  # None: unverified (allowed by the plan)
    how: str
    origin: str  # the lock, the SHA256SUM URL, the bundle, or ""

    def verification(self, artifact: Artifact, actual: str) -> Verification:
        return Verification(artifact.filename, actual, self.how, self.origin)

    def fetch(self, artifact: Artifact, dest: Path, *, label: str, layout: Layout,
              progress: ProgressFactory | None, downloaded: list[Verification],
              log: Log) -> tuple[Path, Verification]:
        """Download (or copy from the bundle) to ``dest``, checked against this sha256
        or the release's SHA256SUM; the verification is recorded and logged."""
        with progress_for(progress, label) as callback:
            got = fetch(
                self.source,
                dest,
                sha256=self.sha256,
                downloads_dir=layout.downloads,
                progress=callback,
                expected_from=self.origin if self.how == RELEASE_SHA256SUM else None,
            )
        verification = self.verification(artifact, got.sha256)
        downloaded.append(verification)
        log(("WARNING: " if self.sha256 is None else "") + verification.describe())
        return got.path, verification


@dataclass(frozen=True)
class InstallPlan:
    """What to install; ``variant`` is a pinned plugin variant or ``auto`` (resolved at install)."""

    lock: RuntimeLock
    app_pins: AppPins
    host: HostInfo
    variant: str = AUTO
    bundle: Path | None = None
    allow_unverified: bool = False
    require_wasmedge: bool = False
    runtime: bool = True
    apps: tuple[str, ...] = ()
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class InstallResult:
    runtime: str  # "wasmedge" (a runtime/current is active) or "embedded"
    active: str | None  # the directory runtime/current points at
    wasmedge_version: str | None
    variant: str | None
    unpacked: bool  # a runtime directory was (re)built in this run
    fallback_reason: str | None
    env_file: Path
    downloaded: tuple[str, ...] = ()
    apps: Mapping[str, Path] = field(default_factory=dict)
    models: Mapping[str, Path] = field(default_factory=dict)
    verified: tuple[Verification, ...] = ()  # every file fetched in this run

    def to_json(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "active": self.active,
            "wasmedge_version": self.wasmedge_version,
            "variant": self.variant,
            "unpacked": self.unpacked,
            "fallback_reason": self.fallback_reason,
            "env_file": str(self.env_file),
            "downloaded": list(self.downloaded),
            "apps": {k: str(v) for k, v in self.apps.items()},
            "models": {k: str(v) for k, v in self.models.items()},
            "verified": [v.to_json() for v in self.verified],
        }


@dataclass(frozen=True)
class InstalledRuntime:
    name: str
    path: Path
    active: bool
    wasmedge_version: str | None
    plugin_build: str | None
    variant: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "active": self.active,
            "wasmedge_version": self.wasmedge_version,
            "plugin_build": self.plugin_build,
            "variant": self.variant,
        }


# ---------------------------------------------------------------- planning


def make_plan(
    host: HostInfo,
    *,
    lock_file: Path | None = None,
    pins_file: Path | None = None,
    bundle: Path | None = None,
    variant: str = AUTO,
    allow_unverified: bool = False,
    require_wasmedge: bool = False,
    runtime: bool = True,
    apps: Sequence[str] = (),
    models: Sequence[str] = (),
) -> InstallPlan:
    """Load the pins (from the bundle when given) and check every name against them."""
    if bundle is not None:
        if lock_file is not None or pins_file is not None:
            raise UsageError("--bundle brings its own lock and pins files; drop --lock/--pins")
        opened = open_bundle(bundle)
        lock, app_pins = opened.lock, opened.app_pins
    else:
        lock = load_runtime_lock(lock_file or resources.runtime_lock_file())
        app_pins = load_app_pins(pins_file or resources.app_pins_file())
    for name in apps:
        app_pins.app(name)
    for name in models:
        app_pins.model(name)
    resolve_variant(lock, host, variant)  # reject an unpinned explicit variant now
    return InstallPlan(
        lock=lock,
        app_pins=app_pins,
        host=host,
        variant=variant,
        bundle=bundle,
        allow_unverified=allow_unverified,
        require_wasmedge=require_wasmedge,
        runtime=runtime,
        apps=tuple(apps),
        models=tuple(models),
    )


def resolve_variant(lock: RuntimeLock, host: HostInfo, requested: str) -> str:
    """``auto`` picks the host's variant; an explicit one must be pinned for this host."""
    pinned = lock.variants(host.os, host.arch)
    if requested == AUTO:
        chosen = host.auto_variant()
        if chosen == "cuda-12" and chosen not in pinned:
            chosen = replace(host, cuda12=False).auto_variant()  # CUDA box, no CUDA pin
        return chosen
    if requested not in pinned:
        raise PinError(
            f"variant {requested!r} is not pinned for {host.os}/{host.arch} in {lock.path}; "
            f"use --variant {AUTO} or one of: {', '.join(pinned) or 'none pinned'}"
        )
    return requested


# ---------------------------------------------------------------- install


def install(
    plan: InstallPlan,
    layout: Layout,
    *,
    progress: ProgressFactory | None = None,
    log: Log = lambda line: None,
) -> InstallResult:
    """Install the plan; WasmEdge failures fall back to the embedded runtime unless required."""
    variant = resolve_variant(plan.lock, plan.host, plan.variant)
    bundle = open_bundle(plan.bundle) if plan.bundle is not None else None
    downloaded: list[Verification] = []
    fallback: str | None = None
    unpacked = False
    if plan.runtime:
        try:
            unpacked = _install_runtime(plan, variant, layout, bundle, downloaded, progress, log)
        except EdgebundleError as exc:
            usage = isinstance(exc, UsageError) and not isinstance(exc, _NotPinned)
            if plan.require_wasmedge or usage:
                raise
            fallback = _short_reason(exc)
            previous = _current_name(layout)
            instead = f"the installed {previous}" if previous else "the embedded runtime"
            log(
                f"WasmEdge {plan.lock.wasmedge_version} not installed ({fallback}): continuing "
                f"with {instead}; pass --require-wasmedge to make this an error"
            )
    env_file = write_env_file(layout)
    apps: dict[str, Path] = {}
    for name in plan.apps:
        app = plan.app_pins.app(name)
        dest = layout.apps / f"{app.name}-{app.version}.wasm"
        apps[name] = _install_pinned_file(
            app, dest, plan, layout, bundle, downloaded, progress, log
        )
    models: dict[str, Path] = {}
    for name in plan.models:
        model = plan.app_pins.model(name)
        dest = layout.models / model.filename
        models[name] = _install_pinned_file(
            model, dest, plan, layout, bundle, downloaded, progress, log
        )
    active = _current_name(layout)
    marker = _read_marker(layout.runtime_current) if active else None
    return InstallResult(
        runtime="wasmedge" if active else "embedded",
        active=active,
        wasmedge_version=str(marker["wasmedge_version"]) if marker else None,
        variant=str(marker["variant"]) if marker else None,
        unpacked=unpacked,
        fallback_reason=fallback,
        env_file=env_file,
        downloaded=tuple(v.file for v in downloaded),
        apps=apps,
        models=models,
        verified=tuple(downloaded),
    )


class _NotPinned(PinError):
    """This machine's platform has no pinned asset (only reachable with variant auto)."""


def _short_reason(exc: EdgebundleError) -> str:
    """The error without its leading URL or path, so the fallback fits one line."""
    text = str(exc)
    return re.sub(r"^(?:[a-z]+://|/)\S*: ", "", text)


def _install_runtime(
    plan: InstallPlan,
    variant: str,
    layout: Layout,
    bundle: Bundle | None,
    downloaded: list[Verification],
    progress: ProgressFactory | None,
    log: Log,
    make_current: bool = True,
) -> bool:
    """Install (or reactivate) the pinned runtime; True when it was unpacked in this run.

    ``make_current=False`` only installs: the caller switches ``current`` itself (the
    fleet agent does, together with its revision link).
    """
    lock, host = plan.lock, plan.host
    try:
        # The runtime of the plugin's dist: a plugin built against another libstdc++ ABI
        # crashes or is skipped silently (see plugins/wasmedge.lock.toml).
        plugin_asset = lock.plugin_asset(host.os, host.arch, variant)
        runtime_asset = lock.runtime_for(host.os, host.arch, variant)
    except PinError as exc:
        raise _NotPinned(f"nothing pinned for this {host.os}/{host.arch} machine: {exc}") from None
    target = layout.runtime_dir(lock.wasmedge_version, variant)
    wanted = _marker(lock, variant, host, runtime_asset, plugin_asset)
    if _marker_matches(_read_marker(target), wanted):
        if make_current:
            log(f"{target.name} is already installed; activating it")
            _switch_current(layout, target.name)
        return False
    for asset in (runtime_asset, plugin_asset):
        if bundle is not None:
            bundle.asset(asset)  # "not in this bundle" says more than "no sha256 pinned"
        if not asset.checkable and not plan.allow_unverified:  # shorter than require_verified's
            raise UnverifiedPinError(
                f"{asset.filename}: no published sha256 is pinned and the lock names no "
                "SHA256SUM to verify it against; pass --allow-unverified, or install from a "
                "bundle made by `edgebundle bundle build`"
            )
    # Both checksums before any archive byte: a release whose SHA256SUM is missing or
    # silent about a file costs no download and leaves nothing behind.
    expected = {a.component: _expected(a, plan, bundle) for a in (runtime_asset, plugin_asset)}
    layout.runtime_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=layout.runtime_root))
    try:
        archives: dict[str, Path] = {}
        for asset, label in (
            (runtime_asset, f"WasmEdge {lock.wasmedge_version}"),
            (plugin_asset, f"WASI-NN plugin {plugin_asset.build} ({variant})"),
        ):
            archive, verification = expected[asset.component].fetch(
                asset, staging / "archives" / asset.filename, label=label, layout=layout,
                progress=progress, downloaded=downloaded, log=log)
            wanted["assets"][asset.component] = {
                "url": asset.url,
                "sha256": verification.sha256,
                "verified_by": verification.how,
                "verified_with": verification.source,
            }
            archives[asset.component] = archive
        tree = _unpack_runtime(archives["wasmedge"], staging, runtime_asset)
        _unpack_plugin(archives["plugin"], staging, tree, lock.plugin_library)
        (tree / MARKER).write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
        _place(tree, target, layout)
    except OSError as exc:
        raise InstallError(f"installing {target.name} failed: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if make_current:
        _switch_current(layout, target.name)
        log(f"installed {target.name} and made it current")
    else:
        log(f"installed {target.name}")
    return True


def install_runtime(
    plan: InstallPlan,
    layout: Layout,
    *,
    progress: ProgressFactory | None = None,
    log: Log = lambda line: None,
) -> tuple[Path, bool]:
    """Install the plan's runtime without making it current; no fallback, errors raise.

    Returns its versioned directory and whether it was unpacked now (False: it was
    already installed, nothing was fetched). Same checks as :func:`install`: every
    archive's sha256 is verified, an unknown pin is refused unless the bundle records
    it or ``allow_unverified`` is set.
    """
    variant = resolve_variant(plan.lock, plan.host, plan.variant)
    bundle = open_bundle(plan.bundle) if plan.bundle is not None else None
    unpacked = _install_runtime(
        plan, variant, layout, bundle, [], progress, log, make_current=False
    )
    return layout.runtime_dir(plan.lock.wasmedge_version, variant), unpacked


def switch_current(layout: Layout, name: str | None) -> None:
    """Point ``current`` at runtime dir ``name`` (None: remove the link), then rewrite env."""
    if name is None:
        if layout.runtime_current.is_symlink():
            layout.runtime_current.unlink()
    else:
        _switch_current(layout, name)
    write_env_file(layout)


def _expected(artifact: Artifact, plan: InstallPlan, bundle: Bundle | None) -> _Expected:
    """Where to take a pinned file from and the sha256 it must have, and who says so.

    A bundle carries its own verified value for every file (recorded when it was built),
    so nothing is read from the network then. Otherwise a pinned sha256 wins; a row that
    says ``verify`` gets its value from the release's SHA256SUM, over https, now.
    """
    if bundle is not None:
        path, listed = bundle.asset(artifact)
        return _Expected(str(path), listed, BUNDLE, str(bundle.root))
    if artifact.verified:
        return _Expected(artifact.url, artifact.sha256, PINNED, str(_pins_path(plan, artifact)))
    if artifact.verify == RELEASE_SHA256SUM:
        sums = artifact.sha256sum_url
        return _Expected(
            artifact.url, published_sha256(sums, artifact.filename), RELEASE_SHA256SUM, sums
        )
    artifact.require_verified(plan.allow_unverified)
    return _Expected(artifact.url, None, UNVERIFIED, "")


def _pins_path(plan: InstallPlan, artifact: Artifact) -> Path:
    """The lock file that pins ``artifact`` (runtime lock or app/model pins)."""
    return plan.lock.path if isinstance(artifact, Asset) else plan.app_pins.path


def _marker(
    lock: RuntimeLock, variant: str, host: HostInfo, runtime_asset: Asset, plugin_asset: Asset
) -> dict[str, Any]:
    return {
        "wasmedge_version": lock.wasmedge_version,
        "plugin_version": lock.plugin_version,
        "plugin_build": plugin_asset.build or lock.plugin_build,
        "variant": variant,
        "os": host.os,
        "arch": host.arch,
        "assets": {
            a.component: {"url": a.url, "sha256": a.sha256} for a in (runtime_asset, plugin_asset)
        },
    }


def _marker_matches(found: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> bool:
    """Same versions and platform, and (where pinned) the same archive checksums."""
    if found is None:
        return False
    keys = ("wasmedge_version", "plugin_version", "plugin_build", "variant", "os", "arch")
    if any(found.get(k) != wanted[k] for k in keys):
        return False
    found_assets = found.get("assets") or {}
    for component, pin in wanted["assets"].items():
        have = found_assets.get(component) or {}
        if pin["sha256"] != "unknown" and have.get("sha256") != pin["sha256"]:
            return False
        if pin["sha256"] == "unknown" and have.get("url") != pin["url"]:
            return False
    return True


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not (directory / "bin" / "wasmedge").exists():
        return None
    return data


# ---------------------------------------------------------------- unpacking


def _unpack_runtime(archive: Path, staging: Path, asset: Asset) -> Path:
    """Unpack a WasmEdge release so that ``<tree>/bin/wasmedge`` and ``<tree>/lib`` exist."""
    unpacked = staging / "runtime"
    extract_archive(archive, unpacked)
    root = _archive_root(unpacked, asset.archive_root)
    if not (root / "bin" / "wasmedge").is_file():
        raise InstallError(
            f"{asset.filename}: no bin/wasmedge inside (looked in "
            f"{root.relative_to(unpacked).as_posix() or 'the archive root'}); is the pin right?"
        )
    tree = staging / "tree"
    os.rename(root, tree)
    binary = tree / "bin" / "wasmedge"
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    if not (tree / "lib").exists() and (tree / "lib64").is_dir():
        (tree / "lib").symlink_to("lib64")  # one lib path in the env file for every release
    return tree


def _archive_root(unpacked: Path, archive_root: str | None) -> Path:
    """The pinned top directory, else a single top-level directory, else the archive root."""
    if archive_root and (unpacked / archive_root).is_dir():
        return unpacked / archive_root
    entries = list(unpacked.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return unpacked


def _unpack_plugin(archive: Path, staging: Path, tree: Path, library: str) -> None:
    """Copy the plugin library (and whatever sits beside it) into ``<tree>/plugin``."""
    unpacked = staging / "plugin"
    extract_archive(archive, unpacked)
    names = {library, *WASI_NN_LIBRARIES}
    found = sorted(p for p in unpacked.rglob("*") if p.name in names and p.is_file())
    if not found:
        raise InstallError(f"{archive.name}: no {library} inside; is the pin right?")
    plugin_dir = tree / "plugin"
    plugin_dir.mkdir(exist_ok=True)
    for item in sorted(found[0].parent.iterdir()):
        if item.is_file():
            shutil.copy2(item, plugin_dir / item.name, follow_symlinks=False)


def extract_archive(archive: Path, into: Path) -> None:
    """Unpack a .tar(.gz|.xz|.bz2) or .zip, refusing anything that would land outside."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, into)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    _check_member(archive, member)
                tar.extractall(into, filter="data")
        else:
            raise InstallError(f"{archive.name}: not a tar or zip archive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise InstallError(f"{archive.name}: unsafe or damaged archive ({exc})") from None


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise InstallError(
            f"{archive.name}: refusing archive entry {member.name!r} (outside the target)"
        )
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        base = name.parent if member.issym() else PurePosixPath()
        if target.is_absolute() or _escapes(base / target):
            raise InstallError(
                f"{archive.name}: refusing link {member.name!r} -> {member.linkname!r} "
                "(points outside the target)"
            )
    elif not (member.isfile() or member.isdir()):
        raise InstallError(f"{archive.name}: refusing special file {member.name!r}")


def _escapes(path: PurePosixPath) -> bool:
    depth = 0
    for part in path.parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in (".", ""):
            depth += 1
    return False


def _extract_zip(archive: Path, into: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = PurePosixPath(info.filename)
            if name.is_absolute() or ".." in name.parts or "\\" in info.filename:
                raise InstallError(f"{archive.name}: refusing archive entry {info.filename!r}")
        for info in zf.infolist():
            path = Path(zf.extract(info, into))
            mode = (info.external_attr >> 16) & 0o755
            if mode and not info.is_dir():
                path.chmod(mode | stat.S_IRUSR)


# ---------------------------------------------------------------- placing and switching


def _place(tree: Path, target: Path, layout: Layout) -> None:
    """Rename the finished tree to its versioned name, replacing a stale copy."""
    if target.exists():
        aside = layout.runtime_root / f".old-{secrets.token_hex(4)}"
        os.rename(target, aside)
        os.rename(tree, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tree, target)


def _switch_current(layout: Layout, name: str) -> None:
    """Point ``current`` at ``name`` atomically: a new link renamed over the old one."""
    current = layout.runtime_current
    if current.exists() and not current.is_symlink():
        raise InstallError(f"{current} is a directory, not a link; move it away and retry")
    try:
        files.switch_link(current, name)  # relative, so the home can be moved
    except OSError as exc:
        raise InstallError(f"cannot switch {current} to {name}: {exc}") from None


def _current_name(layout: Layout) -> str | None:
    current = layout.runtime_current
    if current.is_symlink() and (current / "bin" / "wasmedge").exists():
        return os.readlink(current)
    return None


def write_env_file(layout: Layout) -> Path:
    """Write ``<home>/env`` (bash). It names ``current``, so switching runtimes needs no edit."""
    home = layout.home
    lines = [
        "# Written by `edgebundle install`; load it with:  . " + shlex.quote(str(layout.env_file)),
        f"export EDGEBUNDLE_HOME={shlex.quote(str(home))}",
    ]
    prefix = [str(layout.venv / "bin")]
    if _current_name(layout) is not None:
        env = runtime_env(layout.runtime_current, {})
        prefix.append(env["PATH"])
        if "LD_LIBRARY_PATH" in env:
            lines.append(_prepend("LD_LIBRARY_PATH", env["LD_LIBRARY_PATH"]))
        lines.append(f"export {PLUGIN_PATH_ENV}={shlex.quote(env[PLUGIN_PATH_ENV])}")
    else:
        lines.append("# no WasmEdge installed: edgebundle uses its embedded runtime")
    lines.append(_prepend("PATH", os.pathsep.join(prefix)))
    files.write_text(layout.env_file, "\n".join(lines) + "\n")
    return layout.env_file


def _prepend(name: str, value: str) -> str:
    return f'export {name}={shlex.quote(value)}"${{{name}:+:${name}}}"'


# ---------------------------------------------------------------- apps and models


def _install_pinned_file(
    pin: Artifact,
    dest: Path,
    plan: InstallPlan,
    layout: Layout,
    bundle: Bundle | None,
    downloaded: list[Verification],
    progress: ProgressFactory | None,
    log: Log,
) -> Path:
    pin.require_verified(plan.allow_unverified)
    if dest.is_file():
        if not pin.verified:
            log(f"{pin.name}: {dest} already present (pin has no sha256; kept as is)")
            return dest
        if sha256_file(dest) == pin.sha256:
            log(f"{pin.name}: {dest} already installed (sha256 verified)")
            return dest
    _expected(pin, plan, bundle).fetch(pin, dest, label=pin.name, layout=layout,
                                       progress=progress, downloaded=downloaded, log=log)
    return dest


# ---------------------------------------------------------------- runtime list / use


def list_runtimes(layout: Layout) -> list[InstalledRuntime]:
    """Every installed runtime directory, with the active one marked."""
    if not layout.runtime_root.is_dir():
        return []
    active = _current_name(layout)
    found = []
    for path in sorted(layout.runtime_root.iterdir()):
        if path.name.startswith(".") or path.is_symlink() or not path.is_dir():
            continue
        marker = _read_marker(path) or {}
        found.append(
            InstalledRuntime(
                name=path.name,
                path=path,
                active=path.name == active,
                wasmedge_version=marker.get("wasmedge_version"),
                plugin_build=marker.get("plugin_build"),
                variant=marker.get("variant"),
            )
        )
    return found


def activate(layout: Layout, name: str) -> InstalledRuntime:
    """Make an installed runtime current (upgrade or rollback) and refresh the env file."""
    installed = [r for r in list_runtimes(layout) if r.wasmedge_version is not None]
    matches = [r for r in installed if r.name in (name, f"wasmedge-{name}")]
    if not matches:  # a bare version is fine when only one variant of it is installed
        matches = [r for r in installed if r.wasmedge_version == name]
    if len(matches) == 1:
        _switch_current(layout, matches[0].name)
        write_env_file(layout)
        return replace(matches[0], active=True)
    if matches:
        raise UsageError(
            f"{name!r} matches {', '.join(r.name for r in matches)}; name one of them"
        )
    usable = ", ".join(r.name for r in installed) or "none installed"
    raise UsageError(
        f"no installed runtime named {name!r} (installed: {usable}); see `edgebundle runtime list`"
    )
