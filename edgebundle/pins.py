"""Pins: the exact runtime, plugin, apps and models a device may run.

Two lock files, both TOML (schema 1):

- ``plugins/wasmedge.lock.toml``: ``[wasmedge]`` version, ``[plugin]`` name, library,
  version and GGML build, and ``[[asset]]`` rows (component ``wasmedge`` or
  ``plugin``; os; arch; variant for plugins; dist; url; sha256 or verify; a plugin
  row's own GGML build where it differs from ``[plugin]``).
- ``wasm/pins.toml``: ``[[app]]`` rows (name, version, kind, url — or path, for a
  file shipped beside the pins —, sha256, model_alias) and ``[[model]]`` rows (name, url,
  sha256, template, ctx_size).

Each row says how its file is verified, one of:

- ``sha256 = "<64 lowercase hex digits>"``: pinned, quoted from a published source;
- ``verify = "release-sha256sum"``: no published value could be quoted, but the
  release the file belongs to publishes a ``SHA256SUM`` file beside it (same URL
  directory). The installer fetches that file over https at install time, checks
  the download against the line for its file name and records the value it used;
- ``sha256 = "unknown"``: neither. A checksum is never invented, so such a pin is
  refused at install time unless the caller allows unverified downloads.

Runtime and plugin rows may name their ``dist`` (``manylinux2014``, ``ubuntu20.04``,
``darwin``): the plugin uses WasmEdge's internal C++ API, so it only works with a
runtime built the same way, and the installer always takes the runtime of the
plugin's dist. A lock whose plugin has no runtime of its dist is refused when loaded.

Why it is over 400 lines: it is one file format (the two lock files' types, their
shared row reader and the checks of each row); split, the rules of a row would be
read in one module and applied in another.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgebundle.errors import PinError, UnverifiedPinError

UNKNOWN_SHA256 = "unknown"
RELEASE_SHA256SUM = "release-sha256sum"
VERIFY_METHODS = (RELEASE_SHA256SUM,)
SHA256SUM_NAME = "SHA256SUM"  # WasmEdge's name for it (releases since 0.11.2), no S
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
SCHEMA = 1
COMPONENTS = ("wasmedge", "plugin")
APP_KINDS = ("llama-api-server", "llama-chat", "edgechat")


@dataclass(frozen=True)
class Artifact:
    """Something to download: where from, and the sha256 it must have."""

    name: str
    url: str
    sha256: str
    source: str = ""
    # RELEASE_SHA256SUM: check against the release's SHA256SUM at install time (sha256
    # is then UNKNOWN_SHA256: no value is pinned). None: the sha256 field says it all.
    verify: str | None = None

    @property
    def verified(self) -> bool:
        """A sha256 is pinned (quoted from a published source, or recorded by a bundle)."""
        return self.sha256 != UNKNOWN_SHA256

    @property
    def checkable(self) -> bool:
        """Pinned, or verifiable against the publisher's SHA256SUM at install time."""
        return self.verified or self.verify is not None

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def sha256sum_url(self) -> str:
        """The release's own checksum file: ``SHA256SUM`` beside the file."""
        return self.url.rstrip("/").rsplit("/", 1)[0] + "/" + SHA256SUM_NAME

    def require_verified(self, allow_unverified: bool) -> None:
        if not self.checkable and not allow_unverified:
            raise UnverifiedPinError(
                f"{self.name}: no published sha256 is pinned for {self.url} and the lock "
                "names no SHA256SUM to verify it against; refusing to install it unverified "
                "(pass --allow-unverified, or install from a bundle made by "
                "`edgebundle bundle build`)"
            )


@dataclass(frozen=True)
class Asset(Artifact):
    component: str = "wasmedge"
    os: str = "linux"
    arch: str = "x86_64"
    variant: str | None = None
    archive_root: str | None = None
    # How the release was built (manylinux2014, ubuntu20.04, ...): a plugin runs only
    # on a runtime of its own dist (libstdc++ ABI). None: the lock does not say.
    dist: str | None = None
    # A plugin's GGML (llama.cpp) build; None for runtime rows.
    build: str | None = None


@dataclass(frozen=True)
class RuntimeLock:
    path: Path
    wasmedge_version: str
    plugin_name: str
    plugin_library: str
    plugin_version: str
    plugin_build: str
    assets: tuple[Asset, ...]
    # What `wasmedge --version` prints for the plugin ("0.1.25" for "0.1.25.0"); None
    # where no genuine transcript of this build was seen, so doctor cannot compare it.
    plugin_reported_version: str | None = None

    def variants(self, os_name: str, arch: str) -> list[str]:
        return [
            a.variant
            for a in self.assets
            if a.component == "plugin" and a.os == os_name and a.arch == arch and a.variant
        ]

    def runtime_asset(self, os_name: str, arch: str, dist: str | None = None) -> Asset:
        """The runtime row for this platform and dist (None: a row that names no dist)."""
        for asset in self.assets:
            if (
                asset.component == "wasmedge"
                and (asset.os, asset.arch, asset.dist) == (os_name, arch, dist)
            ):
                return asset
        of = f" ({dist})" if dist else ""
        raise PinError(f"{self.path}: no WasmEdge asset pinned for {os_name}/{arch}{of}")

    def runtime_for(self, os_name: str, arch: str, variant: str) -> Asset:
        """The runtime that goes with this variant's plugin: the one of the plugin's dist."""
        plugin = self.plugin_asset(os_name, arch, variant)
        return self.runtime_asset(os_name, arch, plugin.dist)

    def plugin_build_for(self, os_name: str, arch: str, variant: str | None) -> str:
        """The GGML build pinned for this platform's variant (the lock's default if none)."""
        for asset in self.assets:
            if (
                asset.component == "plugin"
                and (asset.os, asset.arch, asset.variant) == (os_name, arch, variant)
                and asset.build
            ):
                return asset.build
        return self.plugin_build

    def plugin_asset(self, os_name: str, arch: str, variant: str) -> Asset:
        for asset in self.assets:
            if (
                asset.component == "plugin"
                and asset.os == os_name
                and asset.arch == arch
                and asset.variant == variant
            ):
                return asset
        known = ", ".join(self.variants(os_name, arch)) or "none"
        raise PinError(
            f"{self.path}: no WASI-NN plugin pinned for {os_name}/{arch} variant "
            f"{variant!r} (pinned variants: {known})"
        )


@dataclass(frozen=True)
class AppPin(Artifact):
    version: str = ""
    kind: str = "llama-api-server"
    model_alias: str = "default"


@dataclass(frozen=True)
class ModelPin(Artifact):
    template: str = ""
    ctx_size: int = 4096


@dataclass(frozen=True)
class AppPins:
    path: Path
    apps: tuple[AppPin, ...]
    models: tuple[ModelPin, ...]

    def app(self, name: str) -> AppPin:
        for app in self.apps:
            if app.name == name:
                return app
        known = ", ".join(a.name for a in self.apps) or "none"
        raise PinError(f"{self.path}: no app pinned as {name!r} (pinned: {known})")

    def model(self, name: str) -> ModelPin:
        for model in self.models:
            if model.name == name:
                return model
        known = ", ".join(m.name for m in self.models) or "none"
        raise PinError(f"{self.path}: no model pinned as {name!r} (pinned: {known})")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PinError(f"{path}: lock file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PinError(f"{path}: cannot read lock file ({exc})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PinError(f"{path}: not valid TOML: {exc}") from None
    if data.get("schema") != SCHEMA:
        raise PinError(f"{path}: schema must be {SCHEMA}, found {data.get('schema')!r}")
    return data


class _Fields:
    """Typed access to one TOML table, with errors that name file and key path."""

    def __init__(self, path: Path, where: str, table: object) -> None:
        if not isinstance(table, Mapping):
            raise PinError(f"{path}: {where} must be a table")
        self.path, self.where, self.table = path, where, table

    def text(self, key: str, default: str | None = None) -> str:
        value = self.table.get(key, default)
        if not isinstance(value, str) or not value:
            raise PinError(f"{self.path}: {self.where}.{key} must be a non-empty string")
        return value

    def optional(self, key: str) -> str | None:
        return self.text(key) if key in self.table else None

    def integer(self, key: str, default: int) -> int:
        value = self.table.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise PinError(f"{self.path}: {self.where}.{key} must be a positive integer")
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.text(key)
        if value not in choices:
            raise PinError(
                f"{self.path}: {self.where}.{key} is {value!r}; "
                f"expected one of {', '.join(choices)}"
            )
        return value

    def url(self) -> str:
        if "path" in self.table and "url" not in self.table:
            # A file shipped beside the pins (our own guest): a file URL to it.
            return (self.path.parent / self.text("path")).resolve().as_uri()
        value = self.text("url")
        if not re.match(r"^(https?|file)://", value):
            raise PinError(f"{self.path}: {self.where}.url must be an http(s) or file URL")
        return value

    def sha256(self) -> str:
        """The pinned sha256, or UNKNOWN_SHA256 for a row verified some other way."""
        if "verify" in self.table:
            if "sha256" in self.table:
                raise PinError(
                    f"{self.path}: {self.where} has both sha256 and verify; keep sha256 when "
                    "a published value is quoted, verify when the release's SHA256SUM is "
                    "read at install time"
                )
            return UNKNOWN_SHA256
        if "sha256" not in self.table:
            raise PinError(
                f"{self.path}: {self.where} needs sha256 = \"<hex>\" (a published value), "
                f"verify = {RELEASE_SHA256SUM!r}, or sha256 = {UNKNOWN_SHA256!r}"
            )
        value = self.text("sha256")
        if value != UNKNOWN_SHA256 and not _SHA256.match(value):
            raise PinError(
                f"{self.path}: {self.where}.sha256 must be 64 lowercase hex digits or "
                f"{UNKNOWN_SHA256!r}"
            )
        return value

    def verify(self) -> str | None:
        if "verify" not in self.table:
            return None
        method = self.choice("verify", VERIFY_METHODS)
        if not self.url().startswith("https://"):
            # The publisher's file is only as good as the channel it came over.
            raise PinError(
                f"{self.path}: {self.where}.verify = {method!r} needs an https:// url "
                "(its SHA256SUM is read from beside it, over TLS only)"
            )
        return method


def _rows(path: Path, data: Mapping[str, Any], key: str) -> list[_Fields]:
    rows = data.get(key, [])
    if not isinstance(rows, list):
        raise PinError(f"{path}: {key} must be an array of tables ([[{key}]])")
    return [_Fields(path, f"{key}[{i}]", row) for i, row in enumerate(rows)]


def load_runtime_lock(path: Path) -> RuntimeLock:
    data = _read_toml(path)
    wasmedge = _Fields(path, "wasmedge", data.get("wasmedge"))
    plugin = _Fields(path, "plugin", data.get("plugin"))
    version = wasmedge.text("version")
    default_build = plugin.text("build")
    assets = []
    for row in _rows(path, data, "asset"):
        component = row.choice("component", COMPONENTS)
        variant = row.text("variant") if component == "plugin" else None
        dist = row.optional("dist")
        url = row.url()
        if dist is not None and f"-{dist}_" not in url.rsplit("/", 1)[-1]:
            raise PinError(
                f"{path}: {row.where}.dist is {dist!r} but the file name in its url does not "
                f"say -{dist}_<arch>; fix the dist or the url"
            )
        assets.append(
            Asset(
                name=f"{component} {row.text('os')}/{row.text('arch')}"
                + (f" {variant}" if variant else ""),
                url=url,
                sha256=row.sha256(),
                source=row.table.get("source", ""),
                verify=row.verify(),
                component=component,
                os=row.text("os"),
                arch=row.text("arch"),
                variant=variant,
                archive_root=row.optional("archive_root"),
                dist=dist,
                build=row.text("build", default_build) if component == "plugin" else None,
            )
        )
    if not any(a.component == "wasmedge" for a in assets):
        raise PinError(f"{path}: no [[asset]] with component = \"wasmedge\"")
    _check_pairing(path, assets)
    return RuntimeLock(
        path=path,
        wasmedge_version=version,
        plugin_name=plugin.text("name"),
        plugin_library=plugin.text("library"),
        plugin_version=plugin.text("version"),
        plugin_build=default_build,
        assets=tuple(assets),
        plugin_reported_version=plugin.optional("reported_version"),
    )


def _check_pairing(path: Path, assets: list[Asset]) -> None:
    """Each plugin has exactly one runtime of its os/arch/dist, so none is ever paired
    with a runtime of another libstdc++ ABI (it would crash or be skipped silently)."""
    runtimes: dict[tuple[str, str, str | None], Asset] = {}
    for asset in assets:
        if asset.component != "wasmedge":
            continue
        key = (asset.os, asset.arch, asset.dist)
        if key in runtimes:
            raise PinError(
                f"{path}: two WasmEdge assets for {asset.os}/{asset.arch}"
                + (f" dist {asset.dist}" if asset.dist else "")
                + "; keep one per platform and dist"
            )
        runtimes[key] = asset
    seen: set[tuple[str, str, str | None]] = set()
    for asset in assets:
        if asset.component != "plugin":
            continue
        platform = (asset.os, asset.arch, asset.variant)
        if platform in seen:
            raise PinError(
                f"{path}: two plugin assets for {asset.os}/{asset.arch} variant "
                f"{asset.variant!r}; keep one"
            )
        seen.add(platform)
        if (asset.os, asset.arch, asset.dist) not in runtimes:
            others = sorted(
                r.dist or "(none named)"
                for (os_name, arch, _), r in runtimes.items()
                if (os_name, arch) == (asset.os, asset.arch)
            )
            raise PinError(
                f"{path}: {asset.name} is built for dist {asset.dist or '(none named)'} but no "
                f"WasmEdge asset of that dist is pinned for {asset.os}/{asset.arch} "
                f"(pinned: {', '.join(others) or 'none'}); runtime and plugin must come from "
                "the same dist: pin the runtime of the plugin's dist"
            )


def load_app_pins(path: Path) -> AppPins:
    data = _read_toml(path)
    apps = tuple(
        AppPin(
            name=row.text("name"),
            url=row.url(),
            sha256=row.sha256(),
            source=row.table.get("source", ""),
            verify=row.verify(),
            version=row.text("version"),
            kind=row.choice("kind", APP_KINDS),
            model_alias=row.text("model_alias", "default"),
        )
        for row in _rows(path, data, "app")
    )
    models = tuple(
        ModelPin(
            name=row.text("name"),
            url=row.url(),
            sha256=row.sha256(),
            source=row.table.get("source", ""),
            verify=row.verify(),
            template=row.text("template"),
            ctx_size=row.integer("ctx_size", 4096),
        )
        for row in _rows(path, data, "model")
    )
    return AppPins(path=path, apps=apps, models=models)
