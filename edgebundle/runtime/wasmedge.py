"""The real ``wasmedge`` binary: where it is, which environment it needs, what it says.

One resolution serves doctor, the launcher and the installer's env file, so what
doctor checks is exactly what ``run`` starts:

1. an explicit binary (``--wasmedge`` / ``EDGEBUNDLE_WASMEDGE``),
2. the installed runtime ``<home>/runtime/current/bin/wasmedge``,
3. ``wasmedge`` on ``PATH``.

Where WasmEdge then looks for plugins is :mod:`edgebundle.runtime.plugin_search`
(``WASMEDGE_PLUGIN_PATH`` in order, then one directory next to libwasmedge; the first
loadable copy of a plugin wins). The launcher always sets ``WASMEDGE_PLUGIN_PATH``
explicitly: the user's entries without the trailing ``:`` that would abort WasmEdge,
relative ones made absolute (``run`` starts wasmedge in another directory), or empty
when the user set none, so that WasmEdge's own default applies exactly as it would
for a bare ``wasmedge``. Doctor scans the same list itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edgebundle.layout import Layout

# PLUGIN_PATH_ENV is re-exported: the launcher and the installer name it through here.
from edgebundle.runtime.plugin_search import PLUGIN_PATH_ENV as PLUGIN_PATH_ENV
from edgebundle.runtime.plugin_search import parse_plugin_path

WASI_NN_LIBRARIES = ("libwasmedgePluginWasiNN.so", "libwasmedgePluginWasiNN.dylib")

_VERSION_LINE = re.compile(r"\bversion\s+v?(?P<version>\d+\.\d+\.\d+[^\s]*)")
_PLUGIN_LINE = re.compile(
    r'^\s*(?P<path>\S.*?)?\s*\(plugin\s+"(?P<name>[^"]+)"\)\s+version\s+(?P<version>[\d.]+)'
)


@dataclass(frozen=True)
class PluginInfo:
    name: str
    version: str
    path: Path | None


@dataclass(frozen=True)
class VersionInfo:
    """What ``wasmedge --version`` printed: the runtime version and one line per plugin."""

    version: str
    plugins: tuple[PluginInfo, ...] = ()

    def plugin(self, name: str) -> PluginInfo | None:
        return next((p for p in self.plugins if p.name == name), None)


def parse_version_output(text: str) -> VersionInfo | None:
    """Parse ``wasmedge --version``; None when no version line is found.

    Seen formats: ``wasmedge version 0.14.1`` (older) and
    ``/usr/bin/wasmedge version 0.17.0-3-gabcdef``, each followed by plugin lines like
    ``/p/libwasmedgePluginWasiNN.so (plugin "wasi_nn") version 0.1.34.0``.
    """
    version: str | None = None
    plugins: list[PluginInfo] = []
    for line in text.splitlines():
        plugin = _PLUGIN_LINE.match(line)
        if plugin:
            path = plugin.group("path")
            plugins.append(
                PluginInfo(plugin.group("name"), plugin.group("version"),
                           Path(path) if path else None)
            )
            continue
        if version is None:
            match = _VERSION_LINE.search(line)
            if match:
                version = match.group("version")
    if version is None:
        return None
    return VersionInfo(version=version, plugins=tuple(plugins))


def version_matches(reported: str, pinned: str) -> bool:
    """``0.14.1`` matches ``0.14.1`` and ``0.14.1-3-gabc`` (a build of that tag)."""
    return reported == pinned or reported.startswith(pinned + "-")


@dataclass(frozen=True)
class WasmEdgeSetup:
    """A located wasmedge binary and the environment to start it with."""

    binary: Path
    plugin_path: tuple[Path, ...]
    lib_dir: Path | None = None
    source: str = "PATH"  # explicit | installed | PATH
    env: Mapping[str, str] = field(default_factory=dict)

    def plugin_path_value(self) -> str:
        return os.pathsep.join(str(p) for p in self.plugin_path)

    def process_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The environment wasmedge runs with under ``run``: ``base`` plus what run sets."""
        return {**base, **self.env, PLUGIN_PATH_ENV: self.plugin_path_value()}


def runtime_env(prefix: Path, base: Mapping[str, str]) -> dict[str, str]:
    """PATH, LD_LIBRARY_PATH and WASMEDGE_PLUGIN_PATH for a runtime installed at ``prefix``."""
    lib = _lib_dir(prefix)
    path = f"{prefix / 'bin'}{os.pathsep}{base.get('PATH', '')}".rstrip(os.pathsep)
    ld = base.get("LD_LIBRARY_PATH", "")
    env = {
        "PATH": path,
        PLUGIN_PATH_ENV: str(prefix / "plugin"),
    }
    if lib is not None:
        env["LD_LIBRARY_PATH"] = f"{lib}{os.pathsep}{ld}".rstrip(os.pathsep)
    return env


def _lib_dir(prefix: Path) -> Path | None:
    for name in ("lib", "lib64"):
        if (prefix / name).is_dir():
            return prefix / name
    return None


def user_plugin_path(value: str | None) -> tuple[Path, ...]:
    """What ``run`` passes for the user's ``WASMEDGE_PLUGIN_PATH``: the entries WasmEdge
    would search (a trailing ``:``, on which WasmEdge aborts, dropped; doctor warns of it),
    made absolute against this directory, since wasmedge starts in another one."""
    return tuple(Path(os.path.abspath(entry)) for entry in parse_plugin_path(value).paths)


def locate(
    layout: Layout, explicit: Path | None = None, environ: Mapping[str, str] | None = None
) -> WasmEdgeSetup | None:
    """Find wasmedge and the environment ``run`` will give it; None if there is none."""
    env = os.environ if environ is None else environ
    if explicit is not None:
        if not explicit.exists():
            return None
        return _setup(explicit, user_plugin_path(env.get(PLUGIN_PATH_ENV)), "explicit")
    installed = layout.runtime_current / "bin" / "wasmedge"
    if installed.exists():
        prefix = layout.runtime_current
        return WasmEdgeSetup(
            binary=installed,
            plugin_path=(prefix / "plugin",),
            lib_dir=_lib_dir(prefix),
            source="installed",
            env=runtime_env(prefix, env),
        )
    found = shutil.which("wasmedge", path=env.get("PATH"))
    if found is None:
        return None
    return _setup(Path(found), user_plugin_path(env.get(PLUGIN_PATH_ENV)), "PATH")


def _setup(binary: Path, plugin_path: tuple[Path, ...], source: str) -> WasmEdgeSetup:
    return WasmEdgeSetup(
        binary=binary,
        plugin_path=plugin_path,
        source=source,
        env={PLUGIN_PATH_ENV: os.pathsep.join(str(p) for p in plugin_path)},
    )


@dataclass(frozen=True)
class VersionRun:
    """What ``wasmedge --version`` printed (stdout then stderr) and how it ended."""

    output: str
    returncode: int  # negative: killed by that signal (an abort is -6, exit 134 in a shell)


def query_version(
    setup: WasmEdgeSetup, base_env: Mapping[str, str], timeout: float = 5.0
) -> VersionRun:
    """Run ``wasmedge --version`` with the environment ``run`` gives it."""
    completed = subprocess.run(
        [str(setup.binary), "--version"],
        env=setup.process_env(base_env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return VersionRun(completed.stdout + completed.stderr, completed.returncode)
