"""The fleet manifest's schema: what a manifest may say, its defaults and normal forms.

A manifest (``apiVersion: edgebundle/v1``, ``kind: Fleet``) says what every device of
a fleet runs (``spec.runtime``, ``spec.model``, ``spec.app``, ``spec.sync``), how the
devices are grouped by labels (``spec.groups``), how a change moves through them
(``spec.rollout``) and which devices differ (``spec.devices``: a pin to a revision,
or overrides of parts of the spec). Unknown keys are errors everywhere, because a
typo in a rollout policy that is silently ignored moves a fleet the wrong way.
:func:`cross_checks` are the rules that span keys. Reading a file (YAML with
``file:line:column`` problems) is :mod:`edgebundle.fleet.manifest_file`.

Why it is over 400 lines: it is one schema (the pydantic models with their
validators); split, a reader would have to put the manifest back together.

Normal forms (what the models' ``to_json`` give the agent, in the :class:`RevisionSpec`
of :meth:`Manifest.revision_spec`, and the stored rollout document, as plain JSON):
durations are seconds (float; ``session_ttl`` an int), a phase's percent an int
1..100, ``max_unavailable`` and ``failure_threshold`` an int count or an ``"N%"``
string (see :func:`edgebundle.fleet.selection.count_or_percent`). When ``spec.app`` is left out the
revision runs the built-in chat guest: ``{"name": "edgechat", "url":
"builtin:edgechat", "sha256": <sha256 of the shipped edgechat.wasm>}``.

Model and app URLs: ``https://…`` or ``http://…``, ``file:///absolute/path``, or
``bundle:relative/path`` (a file of the offline bundle directory the agent was given,
e.g. ``bundle:assets/m.gguf``, see :mod:`edgebundle.bundle`); apps also
``builtin:edgechat``. ``spec.sync.redis_url`` carries no password: each device logs
in as its own ACL user (``fleet provision``), with credentials kept on the device.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    model_validator,
)

from edgebundle.errors import UsageError
from edgebundle.fleet.durations import parse_duration
from edgebundle.fleet.wire import revision_id
from edgebundle.fleet.yaml_loader import KeyPath
from edgebundle.keys import check_id
from edgebundle.pins import load_app_pins
from edgebundle.resources import app_pins_file
from edgebundle.templates import DEFAULT_TEMPLATE, TEMPLATES

API_VERSION = "edgebundle/v1"
KIND = "Fleet"
BUILTIN_APP = "edgechat"
DEFAULT_RETRIES = 2  # an agent's attempts per generation when the manifest does not say
PluginVariant = Literal["cpu", "noavx", "cuda-12", "metal"]  # plugins/wasmedge.lock.toml
Multitask = Literal["enqueue", "reject", "interrupt"]  # edgebundle.sync.models


_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_REVISION = re.compile(r"^rev-[0-9a-f]{12}$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+(-[0-9A-Za-z.]+)?$")
_PLUGIN_BUILD = re.compile(r"^b\d+$")
_ARCHIVE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_./-]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.:-]{0,63}$")
_PERCENT = re.compile(r"^(\d+)%$")


# ---- value types: each raises ValueError with the sentence the user reads ----------


def _id(value: str) -> str:
    try:
        return check_id("", value)
    except UsageError:
        raise ValueError(
            f"{value!r} is not a valid id: use 1-128 letters, digits, '_', '.', ':' or '-'"
        ) from None


def _sha256(value: str) -> str:
    if not _SHA256.match(value):
        raise ValueError(f"{value!r} is not a sha256: expected 64 hex digits (sha256sum FILE)")
    return value.lower()


def _revision_id(value: str) -> str:
    if not _REVISION.match(value):
        raise ValueError(
            f"{value!r} is not a revision id: expected rev- and 12 lowercase hex digits "
            "(see edgebundle fleet status)"
        )
    return value


def _version(value: str) -> str:
    if not _VERSION.match(value):
        raise ValueError(f"{value!r} is not a WasmEdge version: expected e.g. \"0.14.1\"")
    return value


def _plugin_build(value: str) -> str:
    if not _PLUGIN_BUILD.match(value):
        raise ValueError(f"{value!r} is not a llama.cpp build: expected b and digits, e.g. b5593")
    return value


def _archive_name(value: str) -> str:
    if not _ARCHIVE_NAME.match(value) or ".." in value:
        raise ValueError(
            f"{value!r} is not an archive file name: use the release file's name, e.g. "
            "WasmEdge-0.14.1-ubuntu20.04_x86_64.tar.gz (no directories)")
    return value


def _template(value: str) -> str:
    if value not in TEMPLATES:
        raise ValueError(
            f"unknown prompt template {value!r}; known: {', '.join(sorted(TEMPLATES))}"
        )
    return value


def _label_key(value: str) -> str:
    if not _LABEL_KEY.match(value):
        raise ValueError(
            f"{value!r} is not a label key: 1-63 letters, digits, '_', '.', '/' or '-', "
            "starting and ending with a letter or digit"
        )
    return value


def _label_value(value: str) -> str:
    if not _LABEL_VALUE.match(value):
        raise ValueError(
            f"{value!r} is not a label value: up to 63 letters, digits, '_', '.', ':' or '-'"
        )
    return value


def _whole_seconds(value: Any) -> int:
    seconds = parse_duration(value)
    if seconds < 1 or seconds != int(seconds):
        raise ValueError(f"{value!r} must be a whole number of seconds, at least 1")
    return int(seconds)


def _phase_percent(value: Any) -> int:
    """A phase's share of the fleet: ``50`` or ``"50%"``, 1..100."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and (match := _PERCENT.match(value.strip())):
        number = int(match.group(1))
    if number is None or not 1 <= number <= 100:
        raise ValueError(f"{value!r} is not a percent: use 1..100 or \"1%\"..\"100%\"")
    return number


def _count_or_percent(minimum: int) -> Any:
    def check(value: Any) -> int | str:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < minimum:
                raise ValueError(f"{value!r} is too small: at least {minimum}")
            return value
        if isinstance(value, str) and (match := _PERCENT.match(value.strip())):
            number = int(match.group(1))
            if minimum <= number <= 100:
                return f"{number}%"
        raise ValueError(
            f"{value!r} is not a count or a percent: use a number (at least {minimum}) "
            f"or \"N%\" with N in {minimum}..100"
        )

    return check


def _url(*, builtin: bool) -> Any:
    schemes = "https://, http://, file:///absolute/path, bundle:relative/path" + (
        ", builtin:edgechat" if builtin else ""
    )

    def check(value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme in ("http", "https") and parts.netloc:
            return value
        local = parts.netloc in ("", "localhost")
        if parts.scheme == "file" and parts.path.startswith("/") and local:
            return value
        if parts.scheme == "bundle" and not value.startswith("bundle:/"):
            relpath = value[len("bundle:"):]
            if relpath and ".." not in relpath.split("/"):
                return value
            raise ValueError(
                f"{value!r}: a bundle: URL names a file inside the bundle directory, "
                "e.g. bundle:assets/m.gguf (no '..')"
            )
        if builtin and value == f"builtin:{BUILTIN_APP}":
            return value
        raise ValueError(f"{value!r} is not a usable URL: use {schemes}")

    return check


def _redis_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"{value!r} is not a Redis URL: use redis://host:6379/0 or rediss://…")
    if parts.password is not None or parts.username is not None:
        raise ValueError(
            "must not carry a user or password: every device logs in as its own ACL user "
            "(edgebundle fleet provision) with credentials kept on the device"
        )
    return value


Id = Annotated[str, AfterValidator(_id)]
Sha256 = Annotated[str, AfterValidator(_sha256)]
ArchiveName = Annotated[str, AfterValidator(_archive_name)]
RevisionId = Annotated[str, AfterValidator(_revision_id)]
Template = Annotated[str, AfterValidator(_template)]
ModelUrl = Annotated[str, AfterValidator(_url(builtin=False))]
AppUrl = Annotated[str, AfterValidator(_url(builtin=True))]
RedisUrl = Annotated[str, AfterValidator(_redis_url)]
Duration = Annotated[float, BeforeValidator(parse_duration)]
Seconds = Annotated[int, BeforeValidator(_whole_seconds)]
PhasePercent = Annotated[int, BeforeValidator(_phase_percent)]
CtxSize = Annotated[int, Field(ge=128, le=1_048_576)]
LabelKey = Annotated[str, AfterValidator(_label_key)]
LabelValue = Annotated[str, AfterValidator(_label_value)]


# ---- the schema ---------------------------------------------------------------------


class _Strict(BaseModel):
    # strict: YAML already typed every scalar, so "4096" (quoted) is not a number and
    # yes/no/on/off (YAML booleans) are not strings; the error says to quote or unquote.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


class Metadata(_Strict):
    name: Id


class Plugin(_Strict):
    name: Literal["wasi_nn-ggml"] = "wasi_nn-ggml"
    build: Annotated[str, AfterValidator(_plugin_build)]
    variant: PluginVariant = "cpu"


class Runtime(_Strict):
    """``embedded`` (wasmtime + llama.cpp in-process) or ``wasmedge`` (a pinned release).

    ``archives`` pins the sha256 of each WasmEdge and plugin release archive by file
    name (what the release's SHA256SUM says, or the sha256s a bundle build recorded in
    DIR/plugins/wasmedge.lock.toml once checked). A device installs an archive only
    when this or the shipped lock pins its sha256: an offline bundle's own lists never
    suffice, since whoever can alter a bundle can alter those too.
    """

    kind: Literal["embedded", "wasmedge"] = "embedded"
    wasmedge: Annotated[str, AfterValidator(_version)] | None = None
    plugin: Plugin | None = None
    archives: dict[ArchiveName, Sha256] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kind_fields(self) -> Runtime:
        if self.kind == "wasmedge" and (self.wasmedge is None or self.plugin is None):
            missing = [k for k in ("wasmedge", "plugin") if getattr(self, k) is None]
            raise ValueError(
                f"kind wasmedge needs {' and '.join(missing)} (e.g. wasmedge: \"0.14.1\", "
                "plugin: {build: b5593, variant: cpu})"
            )
        if self.kind == "embedded" and (self.wasmedge is not None or self.plugin is not None
                                        or self.archives):
            raise ValueError("wasmedge, plugin and archives only apply to kind wasmedge: "
                             "remove them")
        return self

    def to_json(self) -> dict[str, Any]:
        """Plain JSON; ``archives`` only when set, so a runtime without pins keeps the
        revision id it had before the field existed."""
        data = self.model_dump(mode="json")
        if not data["archives"]:
            del data["archives"]
        return data


class Model(_Strict):
    name: Id
    url: ModelUrl
    sha256: Sha256
    template: Template = DEFAULT_TEMPLATE
    system_prompt: str | None = None
    ctx_size: CtxSize = 4096


class App(_Strict):
    name: Id
    url: AppUrl
    sha256: Sha256


class Sync(_Strict):
    redis_url: RedisUrl | None = None  # None: the agent's own --redis-url
    session_ttl: Seconds = 1800
    multitask: Multitask = "enqueue"


class Group(_Strict):
    name: Id
    selector: dict[LabelKey, LabelValue] = Field(default_factory=dict)  # all must match

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Phase(_Strict):
    group: Id | None = None
    percent: PhasePercent | None = None  # cumulative share of all devices, by device id
    after: Duration = 0.0  # wait this long after the previous phase completed

    @model_validator(mode="after")
    def _one_target(self) -> Phase:
        if (self.group is None) == (self.percent is None):
            raise ValueError(
                "a phase names exactly one of group or percent, e.g. {group: canary} "
                "or {percent: 50}"
            )
        return self


class Health(_Strict):
    window: Duration = 30.0  # a device must run (doctor ok, heartbeating) this long
    failure_threshold: Annotated[int | str, BeforeValidator(_count_or_percent(0))] = 0


def _default_phases() -> list[Phase]:
    return [Phase(percent=100)]


class Rollout(_Strict):
    phases: list[Phase] = Field(default_factory=_default_phases, min_length=1)
    max_unavailable: Annotated[int | str, BeforeValidator(_count_or_percent(1))] = 1
    health: Health = Field(default_factory=Health)
    retries: Annotated[int, Field(ge=0, le=100)] = DEFAULT_RETRIES
    offline: Literal["wait", "skip"] = "wait"
    on_failure: Literal["rollback", "freeze"] = "rollback"
    progress_deadline: Duration = 600.0  # 0: no deadline

    def to_json(self) -> dict[str, Any]:
        """Normal form: seconds, int percents; a phase has only the keys it sets (group or
        percent)."""
        rollout = self.model_dump(mode="json")
        rollout["phases"] = [{k: v for k, v in phase.items() if v is not None}
                             for phase in rollout["phases"]]
        return rollout


class _SourceOverride(_Strict):
    @model_validator(mode="after")
    def _url_with_sha256(self) -> _SourceOverride:
        url, sha256 = getattr(self, "url", None), getattr(self, "sha256", None)
        if (url is None) != (sha256 is None):
            raise ValueError("override url and sha256 together (the sha256 is the url's file's)")
        return self


class ModelOverride(_SourceOverride):
    name: Id | None = None
    url: ModelUrl | None = None
    sha256: Sha256 | None = None
    template: Template | None = None
    system_prompt: str | None = None
    ctx_size: CtxSize | None = None


class AppOverride(_SourceOverride):
    name: Id | None = None
    url: AppUrl | None = None
    sha256: Sha256 | None = None


class SyncOverride(_Strict):
    redis_url: RedisUrl | None = None
    session_ttl: Seconds | None = None
    multitask: Multitask | None = None


class Device(_Strict):
    """One device that differs: ``pin`` to a revision, or overrides of spec parts.

    ``runtime`` replaces the fleet's runtime; ``model``, ``app`` and ``sync`` change
    only the keys they name.
    """

    pin: RevisionId | None = None
    runtime: Runtime | None = None
    model: ModelOverride | None = None
    app: AppOverride | None = None
    sync: SyncOverride | None = None

    @model_validator(mode="after")
    def _pin_or_override(self) -> Device:
        overrides = [k for k in ("runtime", "model", "app", "sync") if getattr(self, k) is not None]
        if self.pin is not None and overrides:
            raise ValueError(
                f"a pinned device runs that revision as it is: remove {', '.join(overrides)} "
                "or the pin"
            )
        if self.pin is None and not overrides:
            raise ValueError(
                "say how this device differs: pin: rev-… or overrides of runtime, model, "
                "app or sync"
            )
        return self

    def to_json(self) -> dict[str, Any]:
        """Plain JSON, only the keys it sets; a runtime override is whole (it replaces the
        fleet's), like :meth:`Manifest.revision_spec`'s."""
        entry = self.model_dump(mode="json", exclude_none=True)
        if self.runtime is not None:
            entry["runtime"] = self.runtime.to_json()
        return entry


class FleetSpec(_Strict):
    runtime: Runtime = Field(default_factory=Runtime)
    model: Model
    app: App | None = None  # None: the built-in edgechat guest
    sync: Sync = Field(default_factory=Sync)
    groups: list[Group] = Field(default_factory=list)
    rollout: Rollout = Field(default_factory=Rollout)
    devices: dict[Id, Device] = Field(default_factory=dict)


class Manifest(_Strict):
    api_version: Literal["edgebundle/v1"] = Field(alias="apiVersion")
    kind: Literal["Fleet"]
    metadata: Metadata
    spec: FleetSpec
    _source: str = PrivateAttr(default="")

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def source(self) -> str:
        """The file it was read from ("" when built in code)."""
        return self._source

    def revision_spec(self) -> RevisionSpec:
        """What every device runs, defaults filled (Revision.spec)."""
        spec = self.spec
        return RevisionSpec(runtime=spec.runtime, model=spec.model,
                            app=spec.app or builtin_app(), sync=spec.sync)

    def revision_id(self) -> str:
        return revision_id(self.revision_spec().to_json())


class RevisionSpec(_Strict):
    """What a revision runs: the manifest's ``spec.runtime``, ``spec.model``, ``spec.app``
    (the built-in edgechat when the manifest has none) and ``spec.sync``, defaults filled.

    Stored (in the revision, each device's desired state and the device's placed
    ``revision.json``) as :meth:`to_json`, the normal form whose hash is the revision's
    id (:func:`~edgebundle.fleet.wire.revision_id`); read back by :meth:`from_json`,
    which validates it by the manifest's own schema.
    """

    runtime: Runtime = Field(default_factory=Runtime)
    model: Model
    app: App
    sync: Sync = Field(default_factory=Sync)

    def to_json(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime.to_json(),
            "model": self.model.model_dump(mode="json"),
            "app": self.app.model_dump(mode="json"),
            "sync": self.sync.model_dump(mode="json"),
        }

    @classmethod
    def from_json(cls, data: Any) -> RevisionSpec:
        """The spec of stored JSON; pydantic's ValidationError (a ValueError) if it does
        not fit the schema."""
        return cls.model_validate(data)


def builtin_app() -> App:
    """The app a revision runs when the manifest has no spec.app: the shipped edgechat."""
    return App(name=BUILTIN_APP, url=f"builtin:{BUILTIN_APP}", sha256=_builtin_sha256())


@functools.cache
def _builtin_sha256() -> str:
    return load_app_pins(app_pins_file()).app(BUILTIN_APP).sha256


def cross_checks(data: Mapping[str, Any]) -> list[tuple[KeyPath, str]]:
    """Problems that span keys (group references, duplicates, percent order).

    Works on the raw data so they are reported together with the schema's problems;
    parts whose type is wrong are skipped (the schema reports those).
    """
    problems: list[tuple[KeyPath, str]] = []
    spec = data.get("spec")
    if not isinstance(spec, dict):
        return problems
    groups = spec.get("groups", [])
    names: dict[str, int] = {}
    if isinstance(groups, list):
        for index, group in enumerate(groups):
            name = group.get("name") if isinstance(group, dict) else None
            if not isinstance(name, str):
                continue
            if name in names:
                problems.append((("spec", "groups", index, "name"),
                                 f"duplicate group name {name!r}: it is also "
                                 f"spec.groups[{names[name]}]; group names are unique"))
            else:
                names[name] = index
    rollout = spec.get("rollout")
    phases = rollout.get("phases") if isinstance(rollout, dict) else None
    if not isinstance(phases, list):
        return problems
    previous: tuple[int, int] | None = None  # (phase index, percent)
    phase_of_group: dict[str, int] = {}
    for index, phase in enumerate(phases):
        if not isinstance(phase, dict):
            continue
        group = phase.get("group")
        where: KeyPath = ("spec", "rollout", "phases", index)
        if isinstance(group, str) and isinstance(groups, list):
            if group not in names:
                known = ", ".join(names) or "none: add spec.groups"
                problems.append(((*where, "group"),
                                 f"no group named {group!r} in spec.groups (known: {known})"))
            elif group in phase_of_group:
                problems.append(((*where, "group"), f"group {group!r} is already phase "
                                 f"{phase_of_group[group]}: each group is one phase"))
            else:
                phase_of_group[group] = index
        try:
            percent = _phase_percent(phase["percent"]) if "percent" in phase else None
        except ValueError:
            percent = None
        if percent is None:
            continue
        if previous is not None and percent <= previous[1]:
            problems.append(((*where, "percent"),
                             f"{percent}% does not grow past phase {previous[0]}'s "
                             f"{previous[1]}%: percents are cumulative, so each is larger"))
        previous = (index, percent)
    return problems
