"""What to install: the pins (from files or a bundle), the variant, the apps and models.

Every name is checked against the pins when the plan is made, so a typo fails before
anything is fetched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from edgebundle import resources
from edgebundle.bundle import open_bundle
from edgebundle.errors import PinError, UsageError
from edgebundle.host import HostInfo
from edgebundle.pins import AppPins, RuntimeLock, load_app_pins, load_runtime_lock

AUTO = "auto"


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

