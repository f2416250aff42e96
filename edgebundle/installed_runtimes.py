"""The installed WasmEdge runtimes under ``<home>/runtime`` and the ``current`` link.

Each runtime is one directory per (version, variant) with a marker file
(``edgebundle-runtime.json``) saying what was installed and from which verified
archives; ``current`` is a relative symlink to the active one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgebundle import files
from edgebundle.errors import InstallError
from edgebundle.host import HostInfo
from edgebundle.layout import Layout
from edgebundle.pins import Asset, RuntimeLock

MARKER = "edgebundle-runtime.json"


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


def marker(
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


def marker_matches(found: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> bool:
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


def read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not (directory / "bin" / "wasmedge").exists():
        return None
    return data


def place(tree: Path, target: Path, layout: Layout) -> None:
    """Rename the finished tree to its versioned name, replacing a stale copy."""
    if target.exists():
        aside = layout.runtime_root / f".old-{secrets.token_hex(4)}"
        os.rename(target, aside)
        os.rename(tree, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tree, target)


def link_current(layout: Layout, name: str) -> None:
    """Point ``current`` at ``name`` atomically: a new link renamed over the old one."""
    current = layout.runtime_current
    if current.exists() and not current.is_symlink():
        raise InstallError(f"{current} is a directory, not a link; move it away and retry")
    try:
        files.switch_link(current, name)  # relative, so the home can be moved
    except OSError as exc:
        raise InstallError(f"cannot switch {current} to {name}: {exc}") from None


def current_name(layout: Layout) -> str | None:
    current = layout.runtime_current
    if current.is_symlink() and (current / "bin" / "wasmedge").exists():
        return os.readlink(current)
    return None


def list_runtimes(layout: Layout) -> list[InstalledRuntime]:
    """Every installed runtime directory, with the active one marked."""
    if not layout.runtime_root.is_dir():
        return []
    active = current_name(layout)
    found = []
    for path in sorted(layout.runtime_root.iterdir()):
        if path.name.startswith(".") or path.is_symlink() or not path.is_dir():
            continue
        marker = read_marker(path) or {}
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


