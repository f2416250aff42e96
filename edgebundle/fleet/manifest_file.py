"""Reading a fleet manifest file: YAML to a validated Manifest, every problem located.

Owns :func:`load_manifest` / :func:`parse_manifest` (YAML read by
:mod:`edgebundle.fleet.yaml_loader`, validated by the schema in
:mod:`edgebundle.fleet.manifest` plus its :func:`~edgebundle.fleet.manifest.cross_checks`),
:class:`Problem` (``file:line:column: key.path: what is wrong``: pydantic's errors
turned into words a person fixing YAML can act on) and :func:`validate_files`
(``fleet validate``). Raises :class:`~edgebundle.errors.ManifestError` listing EVERY
problem.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from edgebundle.doctor.manifest_checks import DeviceTarget
from edgebundle.errors import ManifestError, ManifestProblem
from edgebundle.fleet.manifest import Manifest, cross_checks
from edgebundle.fleet.selection import device_spec
from edgebundle.fleet.yaml_loader import KeyPath, Position, dotted, read_yaml


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, where it is (1-based; None: the whole file)."""

    source: str
    line: int | None
    column: int | None
    path: str  # dotted key path, e.g. spec.rollout.phases[1].percent ("" = the file)
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"file": self.source, "line": self.line, "column": self.column,
                "path": self.path, "message": self.message}


def parse_manifest(text: str, source: str = "<manifest>") -> Manifest:
    """A validated Manifest from YAML text; ManifestError lists every problem."""
    loaded = read_yaml(text)
    if loaded.unreadable is not None:
        (line, column), what = loaded.unreadable
        raise _error(source, [Problem(source, line, column, "", f"invalid YAML: {what}")])
    if loaded.empty:
        raise _error(source, [Problem(source, 1, 1, "", "the file is empty: a manifest "
                                      "has apiVersion, kind, metadata and spec")])
    data = loaded.data

    problems = [Problem(source, line, column, dotted(path), message)
                for path, (line, column), message in loaded.problems]
    manifest: Manifest | None = None
    if not isinstance(data, dict):
        problems.append(Problem(source, *loaded.positions[()].value, "",
                                "a manifest is a mapping with apiVersion, kind, metadata "
                                "and spec"))
    else:
        try:
            manifest = Manifest.model_validate(data)
        except ValidationError as exc:
            problems.extend(_problem(source, loaded.positions, error) for error in exc.errors())
        for path, message in cross_checks(data):
            position = _find(loaded.positions, path)[1]
            problems.append(Problem(source, *position.value, dotted(path), message))
    if problems or manifest is None:
        raise _error(source, problems)
    manifest._source = source
    return manifest


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file; ManifestError (exit 2) lists every problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise _error(source, [Problem(source, None, None, "",
                                      f"cannot read the manifest: {reason}")]) from None
    return parse_manifest(text, source)


def _error(source: str, problems: list[Problem]) -> ManifestError:
    ordered = sorted(problems, key=lambda p: (p.line or 0, p.column or 0, p.path, p.message))
    return ManifestError("\n".join(str(p) for p in ordered), ordered)


def _find(positions: Mapping[KeyPath, Position],
          loc: Sequence[str | int]) -> tuple[KeyPath, Position]:
    """The deepest prefix of ``loc`` that is in the file, and its position."""
    path: KeyPath = ()
    for part in loc:
        if (*path, part) not in positions:
            break
        path = (*path, part)
    return path, positions[path]


def _problem(source: str, positions: Mapping[KeyPath, Position],
             error: Mapping[str, Any]) -> Problem:
    loc: list[str | int] = list(error["loc"])
    kind = error["type"]
    on_key = bool(loc) and loc[-1] == "[key]"  # a dict key failed (pydantic's marker)
    if on_key:
        loc.pop()
    found, position = _find(positions, loc)
    message = _message(error, loc, position.text if found == tuple(loc) else None)
    if on_key or kind == "extra_forbidden":
        where = position.anchor
    elif len(found) < len(loc):  # missing: point at the mapping that lacks the key
        where = position.anchor
    else:
        where = position.value
    return Problem(source, *where, dotted(loc), message)


def _message(error: Mapping[str, Any], loc: Sequence[str | int], written: str | None) -> str:
    kind, given = error["type"], error.get("input")
    shown = written if written is not None and not isinstance(given, str) else _yaml_repr(given)
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        listed = f"; allowed: {', '.join(allowed)}" if allowed else ""
        return f"unknown key{hint}{listed}"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind == "literal_error":
        return f"{given!r} is not allowed: use {error['ctx']['expected']}"
    if kind in ("string_type", "str_type"):
        return f"expected a string, got {shown}{_quote_hint(given)}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"expected a whole number, got {shown}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping (key: value), got {shown}"
    if kind == "list_type":
        return f"expected a list (- item), got {shown}"
    if kind == "too_short":
        return "must not be empty"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return f"{given!r} is out of range: {error['msg'].lower().removeprefix('input ')}"
    return f"{error['msg']} (got {shown})"


def _yaml_repr(value: Any) -> str:
    if value is None:
        return "null (nothing)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _quote_hint(value: Any) -> str:
    if isinstance(value, bool):
        return " (YAML reads yes/no/on/off/true/false as booleans: quote it)"
    if isinstance(value, int | float):
        return " (YAML reads it as a number: quote it)"
    if value is None:
        return " (an empty value is null to YAML: write a value or quote it)"
    return ""


def _allowed_keys(loc: Sequence[str | int]) -> list[str]:
    """The keys the schema allows in the mapping at ``loc`` (for unknown-key hints)."""
    current: Any = Manifest
    for part in loc:
        current = _unwrap(current)
        origin = get_origin(current)
        if origin is list and isinstance(part, int) or origin is dict:
            current = get_args(current)[-1]  # a list's item, a dict's value
        elif isinstance(current, type) and issubclass(current, BaseModel):
            field = next((f for n, f in current.model_fields.items()
                          if (f.alias or n) == part), None)
            if field is None:
                return []
            current = field.annotation
        else:
            return []
    model = _unwrap(current)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    return [field.alias or name for name, field in model.model_fields.items()]


def _unwrap(annotation: Any) -> Any:
    """``annotation`` without Annotated[...] and Optional: a model, list[...] or dict[...]."""
    if get_origin(annotation) in (list, dict) or isinstance(annotation, type):
        return annotation
    for arg in get_args(annotation):
        if arg is type(None):
            continue
        found = _unwrap(arg)
        if get_origin(found) in (list, dict) or (
            isinstance(found, type) and issubclass(found, BaseModel)
        ):
            return found
    return annotation


@dataclass(frozen=True)
class Validation:
    """The outcome of validating one manifest file (``fleet validate``)."""

    file: str
    manifest: Manifest | None
    problems: Sequence[ManifestProblem]

    @property
    def ok(self) -> bool:
        return self.manifest is not None and not self.problems

    def summary(self) -> str:
        if self.manifest is None:
            return "\n".join(str(p) for p in self.problems)
        phases = len(self.manifest.spec.rollout.phases)
        return (f"{self.file}: ok (fleet {self.manifest.name}, {phases} "
                f"phase{'s' if phases != 1 else ''}, revision {self.manifest.revision_id()})")

    def to_json(self) -> dict[str, Any]:
        manifest = self.manifest
        return {
            "file": self.file,
            "ok": self.ok,
            "fleet": manifest.name if manifest else None,
            "phases": len(manifest.spec.rollout.phases) if manifest else None,
            "revision": manifest.revision_id() if manifest else None,
            "errors": [p.to_json() for p in self.problems],
        }


def validate_files(paths: Sequence[str | Path]) -> list[Validation]:
    """Validate each manifest file; every file is read, whatever the others hold."""
    results: list[Validation] = []
    for path in paths:
        try:
            results.append(Validation(str(path), load_manifest(path), ()))
        except ManifestError as exc:
            results.append(Validation(str(path), None, tuple(exc.problems)))
    return results


def device_target(manifest: Manifest, device_id: str | None) -> DeviceTarget:
    """What ``manifest`` says the device ``device_id`` must run (the fleet's revision
    spec with that device's overrides), for doctor's ``manifest.*`` checks."""
    spec = device_spec(manifest.revision_spec(), manifest.spec.devices.get(device_id or ""))
    return DeviceTarget(f"manifest {manifest.metadata.name}", spec.to_json())
