"""Which devices a rollout phase moves, and what each device must run: pure functions.

They take the plain JSON the controller keeps in Redis (the Rollout document's
``groups``, ``rollout`` and ``pins``, in the normal form of
:mod:`edgebundle.fleet.manifest`) and the registered devices as ``{device id:
labels}``, so a restarted controller computes the same answer from Redis alone.

Order is stable: devices are sorted by id, so "the first 50%" is the same devices on
every tick and every controller, and percent phases are cumulative (50% then 100%
means the second phase adds the other half).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

from edgebundle.errors import UsageError

Labels = Mapping[str, str]
Devices = Mapping[str, Labels]  # device id -> its labels
OVERRIDABLE = ("runtime", "model", "app", "sync")


def matches(selector: Labels, labels: Labels) -> bool:
    """True when the device has every label of the selector (an empty one matches all)."""
    return all(labels.get(key) == value for key, value in selector.items())


def group_devices(groups: Sequence[Mapping[str, Any]], name: str, devices: Devices) -> list[str]:
    """The ids of the devices of group ``name``, sorted."""
    for group in groups:
        if group.get("name") == name:
            selector = group.get("selector") or {}
            return sorted(d for d, labels in devices.items() if matches(selector, labels))
    raise UsageError(f"the rollout names group {name!r} but the manifest has no such group: "
                     "fix spec.groups and run fleet apply again")


def percent_count(percent: int, total: int) -> int:
    """How many of ``total`` devices ``percent`` % is: rounded up, so 1% of 10 is 1."""
    return min(total, math.ceil(total * percent / 100))


def resolve_count(value: int | str, total: int, *, at_least: int = 0) -> int:
    """A count from a manifest's ``3`` or ``"25%"`` (of ``total``, rounded down).

    ``at_least`` keeps a percent from rounding to nothing (max_unavailable: 1, so a
    rollout of "10%" of 5 devices still moves one device at a time).
    """
    if isinstance(value, str):
        if not value.endswith("%") or not value[:-1].isdigit():
            raise UsageError(f"{value!r} is not a count or a percent: fix the manifest")
        count = math.floor(total * int(value[:-1]) / 100)
    else:
        count = int(value)
    return max(count, at_least)


def phase_devices(rollout: Mapping[str, Any], groups: Sequence[Mapping[str, Any]],
                  devices: Devices, index: int) -> list[str]:
    """The devices phase ``index`` names by itself: its group, or its first N% by id."""
    phases = rollout.get("phases") or []
    if not 0 <= index < len(phases):
        raise UsageError(f"the rollout has no phase {index} (it has {len(phases)})")
    phase = phases[index]
    if phase.get("group") is not None:
        return group_devices(groups, str(phase["group"]), devices)
    ordered = sorted(devices)
    return ordered[: percent_count(int(phase["percent"]), len(ordered))]


def devices_through(rollout: Mapping[str, Any], groups: Sequence[Mapping[str, Any]],
                    devices: Devices, index: int) -> list[str]:
    """Every device phases 0..``index`` move (they are cumulative), sorted."""
    chosen: set[str] = set()
    for phase in range(index + 1):
        chosen.update(phase_devices(rollout, groups, devices, phase))
    return sorted(chosen)


def pinned_revision(pins: Mapping[str, Any], device_id: str) -> str | None:
    """The revision ``device_id`` is pinned to, None when it follows the fleet."""
    entry = pins.get(device_id) or {}
    pin = entry.get("pin")
    return str(pin) if pin else None


def apply_overrides(spec: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with one device's overrides: runtime replaced, model/app/sync merged."""
    result = copy.deepcopy(dict(spec))
    for part in OVERRIDABLE:
        override = entry.get(part)
        if not override:
            continue
        if part == "runtime":
            result[part] = copy.deepcopy(dict(override))
        else:
            result[part] = {**(result.get(part) or {}), **copy.deepcopy(dict(override))}
    return result


def desired_for(device_id: str, revision: str, spec: Mapping[str, Any],
                pins: Mapping[str, Any],
                known: Mapping[str, Mapping[str, Any]]) -> tuple[str, dict[str, Any]]:
    """(revision id, spec) device ``device_id`` must run when the fleet runs ``revision``.

    A pinned device gets its pinned revision's spec from ``known`` (revision id ->
    spec, the fleet's revs hash); a device with overrides gets the fleet's revision id
    with its overrides applied to the spec; any other device the revision as it is.
    """
    pin = pinned_revision(pins, device_id)
    if pin is not None:
        if pin not in known:
            raise UsageError(f"device {device_id} is pinned to {pin}, which this fleet never "
                             "applied: pin a revision from fleet status, or remove the pin")
        return pin, copy.deepcopy(dict(known[pin]))
    return revision, apply_overrides(spec, pins.get(device_id) or {})
