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

This module is the steps (fetch, unpack, place, switch, fall back). What to install is
:mod:`edgebundle.install_plan`, who vouches for a sha256 :mod:`edgebundle.verification`,
safe unpacking :mod:`edgebundle.archives`, the runtime directories and ``current``
:mod:`edgebundle.installed_runtimes`, ``<home>/env`` :mod:`edgebundle.env_file`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgebundle.archives import extract_archive
from edgebundle.bundle import Bundle, open_bundle
from edgebundle.download import sha256_file
from edgebundle.env_file import write_env_file
from edgebundle.errors import (
    EdgebundleError,
    InstallError,
    PinError,
    UnverifiedPinError,
    UsageError,
)
from edgebundle.install_plan import AUTO, InstallPlan, make_plan, resolve_variant
from edgebundle.installed_runtimes import (
    MARKER,
    InstalledRuntime,
    current_name,
    link_current,
    list_runtimes,
    marker,
    marker_matches,
    place,
    read_marker,
)
from edgebundle.layout import Layout
from edgebundle.pins import Artifact, Asset
from edgebundle.progress import Log, ProgressFactory
from edgebundle.runtime.wasmedge import WASI_NN_LIBRARIES
from edgebundle.verification import Verification, expected_for

__all__ = [  # the installer's face: the plan and the runtime list are used through it
    "AUTO",
    "InstallPlan",
    "InstallResult",
    "InstalledRuntime",
    "Verification",
    "activate",
    "install",
    "install_runtime",
    "list_runtimes",
    "make_plan",
    "resolve_variant",
    "switch_current",
]


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
            previous = current_name(layout)
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
    active = current_name(layout)
    marker = read_marker(layout.runtime_current) if active else None
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
    wanted = marker(lock, variant, host, runtime_asset, plugin_asset)
    if marker_matches(read_marker(target), wanted):
        if make_current:
            log(f"{target.name} is already installed; activating it")
            link_current(layout, target.name)
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
    expected = {a.component: expected_for(a, plan, bundle) for a in (runtime_asset, plugin_asset)}
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
        place(tree, target, layout)
    except OSError as exc:
        raise InstallError(f"installing {target.name} failed: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if make_current:
        link_current(layout, target.name)
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
        link_current(layout, name)
    write_env_file(layout)


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
    expected_for(pin, plan, bundle).fetch(pin, dest, label=pin.name, layout=layout,
                                       progress=progress, downloaded=downloaded, log=log)
    return dest


def activate(layout: Layout, name: str) -> InstalledRuntime:
    """Make an installed runtime current (upgrade or rollback) and refresh the env file."""
    installed = [r for r in list_runtimes(layout) if r.wasmedge_version is not None]
    matches = [r for r in installed if r.name in (name, f"wasmedge-{name}")]
    if not matches:  # a bare version is fine when only one variant of it is installed
        matches = [r for r in installed if r.wasmedge_version == name]
    if len(matches) == 1:
        link_current(layout, matches[0].name)
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
