"""Pure rollout arithmetic: which devices a phase covers, budgets, per-device specs.

No Redis and no clock here, so the controller's decisions can be read (and tested) as
plain functions of the registered devices and the manifest's typed parts
(:class:`~edgebundle.fleet.manifest.Phase`, :class:`~edgebundle.fleet.manifest.Group`,
:class:`~edgebundle.fleet.manifest.Device`; the schema fills their defaults and parses
their durations, so nothing here does).

- A group's devices: those whose labels contain every ``key: value`` of its selector
  (an empty selector matches everyone).
- A phase is ``{group: NAME}`` or ``{percent: P}``; phases are *cumulative*: phase k
  covers every device of phases 0..k. ``percent: P`` is the first ceil(N * P / 100)
  of all N registered devices sorted by id (a stable order, so a device keeps its
  place while the fleet grows at the end of the alphabet).
- A device's spec is the revision's spec with its ``spec.devices`` entry merged over it
  (``pin`` is not part of the spec: a pinned device is left out of rollouts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from edgebundle.errors import UsageError
from edgebundle.fleet.manifest import Device, Group, Phase, RevisionSpec


def count_or_percent(value: Any, total: int, what: str, *, round_up: bool) -> int:
    """An absolute count, or ``"25%"`` of ``total`` (rounded up or down)."""
    if isinstance(value, bool):
        raise UsageError(f"{what} must be a count or a percentage like 25%, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"{what} must not be negative (got {value})")
        return value
    text = str(value).strip()
    if not text.endswith("%"):
        raise UsageError(f"{what} must be a count or a percentage like 25%, not {value!r}")
    try:
        percent = float(text[:-1])
    except ValueError:
        raise UsageError(f"{what} must be a count or a percentage like 25%, "
                         f"not {value!r}") from None
    share = total * percent / 100.0
    return math.ceil(share) if round_up else math.floor(share)


def matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """True when every ``key: value`` of the selector is among the labels."""
    return all(labels.get(key) == value for key, value in selector.items())


def group_devices(group: str, groups: Sequence[Group],
                  labels: Mapping[str, Mapping[str, str]]) -> set[str]:
    """The devices (of ``labels``: id -> labels) a named group selects."""
    for entry in groups:
        if entry.name == group:
            return {device for device, device_labels in labels.items()
                    if matches(device_labels, entry.selector)}
    known = ", ".join(entry.name for entry in groups) or "none"
    raise UsageError(f"rollout phase names group {group!r}, which spec.groups does not define "
                     f"(groups: {known})")


def phase_devices(phase: Phase, groups: Sequence[Group],
                  labels: Mapping[str, Mapping[str, str]]) -> set[str]:
    """The devices one phase names on its own (not cumulative): its group's, or the first
    ``percent`` of all by id (the schema sees to it that a phase has one of the two)."""
    if phase.group is not None:
        return group_devices(phase.group, groups, labels)
    ordered = sorted(labels)
    return set(ordered[:math.ceil(len(ordered) * (phase.percent or 0) / 100.0)])


def cumulative_phases(phases: Sequence[Phase], groups: Sequence[Group],
                      labels: Mapping[str, Mapping[str, str]]) -> list[set[str]]:
    """For each phase k, every device of phases 0..k."""
    covered: set[str] = set()
    result = []
    for phase in phases:
        covered = covered | phase_devices(phase, groups, labels)
        result.append(set(covered))
    return result


def first_phase_of(device: str, cumulative: Sequence[set[str]]) -> int | None:
    """The index of the first phase that covers the device (None: no phase does)."""
    for index, devices in enumerate(cumulative):
        if device in devices:
            return index
    return None


def pinned_revision(device: Device | None) -> str | None:
    """The revision a ``spec.devices`` entry pins its device to (None: not pinned)."""
    return device.pin if device is not None else None


def device_spec(revision_spec: RevisionSpec, device: Device | None) -> RevisionSpec:
    """The revision's spec with the device's overrides (``spec.devices[id]``): a runtime
    override replaces the fleet's runtime whole (it is a complete runtime of its own
    kind); model, app and sync overrides are merged over the fleet's. Merged in JSON
    (normal form), then validated once by the schema."""
    overrides = device.to_json() if device is not None else {}
    overrides.pop("pin", None)
    if not overrides:
        return revision_spec
    spec = revision_spec.to_json()  # a fresh copy: merged in place
    for part, override in overrides.items():
        if part == "runtime":
            spec[part] = override
        else:
            spec[part].update(override)
    return RevisionSpec.from_json(spec)
