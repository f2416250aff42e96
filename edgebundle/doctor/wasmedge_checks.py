"""Checks of the wasmedge binary and its WASI-NN plugin, as ``run`` would start them.

WasmEdge searches WASMEDGE_PLUGIN_PATH in order, then the plugin directory next to
its own library; the first WASI-NN plugin wins and any later copy is dropped without
a word, and a plugin built for another WasmEdge is skipped silently too
(WasmEdge: lib/plugin/plugin.cpp). So doctor scans the same path itself and names
the copy that wins.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from edgebundle.doctor.context import Context
from edgebundle.doctor.report import CheckResult, fail, ok, skip, warn
from edgebundle.elf import read_elf_header
from edgebundle.runtime.wasmedge import (
    PLUGIN_PATH_ENV,
    WASI_NN_LIBRARIES,
    WasmEdgeSetup,
    default_plugin_dirs,
    find_plugins,
    parse_version_output,
    query_version,
    split_plugin_path,
    version_matches,
)

BINARY, VERSION, PLUGIN_PATH, PLUGIN, DUPLICATES = (
    "wasmedge.binary",
    "wasmedge.version",
    "wasmedge.plugin_path",
    "wasmedge.plugin",
    "wasmedge.plugin_duplicates",
)
_REST = (VERSION, PLUGIN_PATH, PLUGIN, DUPLICATES)
LIBRARY = WASI_NN_LIBRARIES[0]
INSTALL_FIX = (
    "run ./install.sh, or put wasmedge on PATH / pass --wasmedge PATH / set EDGEBUNDLE_WASMEDGE"
)


def plugin_version_matches(reported: str, pinned: str) -> bool:
    """``0.14.1.0`` (what --version prints) matches the pin ``0.14.1``: prefix on dots."""
    return reported == pinned or reported.startswith(pinned + ".")


def search_path(setup: WasmEdgeSetup) -> list[Path]:
    """The directories WasmEdge scans, in order: the plugin path, then its default dir."""
    dirs = list(setup.plugin_path)
    seen = {_real(d) for d in dirs}
    for extra in default_plugin_dirs(setup.binary):
        if _real(extra) not in seen:
            seen.add(_real(extra))
            dirs.append(extra)
    return dirs


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path


def checks(ctx: Context) -> list[CheckResult]:
    if ctx.requested == "embedded":
        return [skip(i, "not used: runtime is embedded") for i in (BINARY, *_REST)]
    setup = ctx.setup
    if setup is None:
        return [_missing_binary(ctx), *(skip(i, "no wasmedge binary") for i in _REST)]
    plugins = find_plugins(search_path(setup))
    return [
        ok(BINARY, f"{setup.binary} ({setup.source})"),
        _version(ctx, setup, plugins),
        _plugin_path(ctx, setup),
        _plugin(ctx, setup, plugins),
        _duplicates(plugins),
    ]


def _missing_binary(ctx: Context) -> CheckResult:
    explicit = ctx.settings.wasmedge
    if explicit is not None:
        # Asked for by name: wrong whatever the runtime, never silently replaced.
        return fail(
            BINARY,
            f"--wasmedge {explicit} does not exist",
            "point --wasmedge / EDGEBUNDLE_WASMEDGE at the wasmedge binary, or run ./install.sh",
        )
    where = f"looked in {ctx.layout.runtime_current / 'bin'} and on PATH"
    if ctx.requested == "auto":
        return warn(
            BINARY,
            f"wasmedge is not installed ({where}); run will use the embedded runtime",
            "to use WasmEdge instead: " + INSTALL_FIX,
        )
    return fail(BINARY, f"wasmedge not found ({where})", INSTALL_FIX)


def _version(ctx: Context, setup: WasmEdgeSetup, plugins: list[Path]) -> CheckResult:
    lock = ctx.lock
    try:
        output = query_version(setup, ctx.environ, timeout=ctx.version_timeout)
    except subprocess.TimeoutExpired:
        return fail(
            VERSION,
            f"`{setup.binary} --version` did not answer within {ctx.version_timeout:g} s",
            INSTALL_FIX,
        )
    except OSError as exc:
        return fail(VERSION, f"cannot start {setup.binary}: {exc.strerror or exc}", INSTALL_FIX)
    info = parse_version_output(output)
    if info is None:
        shown = output.strip()[:200] or "nothing"
        return fail(
            VERSION,
            f"`wasmedge --version` printed no version: {shown!r}",
            f"reinstall the pinned WasmEdge {lock.wasmedge_version}: run ./install.sh",
        )
    if not version_matches(info.version, lock.wasmedge_version):
        return fail(
            VERSION,
            f"wasmedge {info.version} is installed, the pin is {lock.wasmedge_version}",
            f"run ./install.sh to install the pinned WasmEdge {lock.wasmedge_version}",
        )
    summary = f"wasmedge {info.version} (pinned {lock.wasmedge_version})"
    marker = ctx.marker
    build = lock.plugin_build
    if marker is not None and marker.os and marker.arch:
        # The build pinned for the installed variant: variants may come from different
        # releases (the lock's manylinux2014 CPU plugin is WasmEdge's own, others are not).
        build = lock.plugin_build_for(marker.os, marker.arch, marker.variant)
    if marker is not None and marker.plugin_build and marker.plugin_build != build:
        return fail(
            VERSION,
            f"{summary}, but the installed plugin is GGML build {marker.plugin_build}, "
            f"the pin is {build}",
            f"run ./install.sh to install the pinned plugin build {build}",
        )
    nn = info.plugin(lock.plugin_name)
    if nn is None:
        if plugins:
            return fail(
                VERSION,
                f"{summary}, but it did not load the {lock.plugin_name} plugin at {plugins[0]}: "
                "WasmEdge silently skips a plugin built for another WasmEdge version",
                f"run ./install.sh to install the plugin for WasmEdge {lock.wasmedge_version}",
            )
        return ok(VERSION, f"{summary}; no {lock.plugin_name} plugin loaded (see wasmedge.plugin)")
    if lock.plugin_reported_version is None:
        # The lock does not say what this build prints, so there is nothing to compare.
        return ok(
            VERSION,
            f"{summary}; {lock.plugin_name} plugin {nn.version} (the lock records no reported "
            f"version for build {build}, so it is not compared)",
        )
    if not plugin_version_matches(nn.version, lock.plugin_reported_version):
        return fail(
            VERSION,
            f"{summary}, but the {lock.plugin_name} plugin at {nn.path or 'built-in'} is version "
            f"{nn.version}, the pin is {lock.plugin_reported_version} (build {build})",
            f"run ./install.sh to install the pinned plugin build {build}",
        )
    return ok(VERSION, f"{summary}; {lock.plugin_name} plugin {nn.version}")


def _plugin_path(ctx: Context, setup: WasmEdgeSetup) -> CheckResult:
    export_fix = f"export {PLUGIN_PATH_ENV}=<dir holding {LIBRARY}>, or `. {ctx.layout.env_file}`"
    if setup.source == "installed":
        value = setup.plugin_path_value()
        missing = [p for p in setup.plugin_path if not p.is_dir()]
        if missing:
            return fail(
                PLUGIN_PATH,
                f"{PLUGIN_PATH_ENV}={value}: {missing[0]} does not exist",
                "run ./install.sh to repair the installed runtime",
            )
        return ok(PLUGIN_PATH, f"run sets {PLUGIN_PATH_ENV}={value}")
    raw = ctx.environ.get(PLUGIN_PATH_ENV, "")
    entries = split_plugin_path(raw)
    if not entries:
        defaults = default_plugin_dirs(setup.binary)
        shown = ":".join(str(d) for d in defaults)
        if find_plugins(defaults):
            return warn(
                PLUGIN_PATH,
                f"{PLUGIN_PATH_ENV} is not set; run will set it to {shown}, where the plugin is, "
                "but a bare `wasmedge` relies on its built-in default",
                export_fix,
            )
        return fail(
            PLUGIN_PATH,
            f"{PLUGIN_PATH_ENV} is not set and {shown} holds no {LIBRARY}",
            export_fix,
        )
    missing = [p for p in entries if not p.is_dir()]
    if missing:
        return fail(
            PLUGIN_PATH,
            f"{PLUGIN_PATH_ENV}={raw}: {missing[0]} does not exist",
            f"remove {missing[0]} from {PLUGIN_PATH_ENV}, "
            f"or run ./install.sh and `. {ctx.layout.env_file}`",
        )
    return ok(PLUGIN_PATH, f"{PLUGIN_PATH_ENV}={raw}")


def _plugin(ctx: Context, setup: WasmEdgeSetup, plugins: list[Path]) -> CheckResult:
    if not plugins:
        where = ":".join(str(p) for p in search_path(setup))
        return fail(
            PLUGIN,
            f"{LIBRARY} not found in {PLUGIN_PATH_ENV}={where} "
            '(wasmedge will say "unknown option: nn-preload")',
            f"run ./install.sh, or point {PLUGIN_PATH_ENV} at the directory holding {LIBRARY}",
        )
    winner = plugins[0]
    try:
        header = read_elf_header(winner)
    except OSError as exc:
        return fail(PLUGIN, f"cannot read {winner}: {exc.strerror or exc}", "run ./install.sh")
    if header is None:
        if ctx.host.os == "linux":
            return fail(
                PLUGIN,
                f"{winner} is not an ELF shared library",
                "run ./install.sh to reinstall the plugin",
            )
        return ok(PLUGIN, f"{winner} (not ELF; architecture not checked on {ctx.host.os})")
    matches = header.matches_host(ctx.host.arch)
    if matches is False:
        return fail(
            PLUGIN,
            f"{winner} is built for {header.describe()}, this host is {ctx.host.arch}",
            f"install the {ctx.host.arch} plugin: run ./install.sh",
        )
    if matches is None:
        return ok(PLUGIN, f"{winner} ({header.describe()}; host arch {ctx.host.arch} not checked)")
    return ok(PLUGIN, f"{winner} ({header.describe()})")


def _duplicates(plugins: list[Path]) -> CheckResult:
    if not plugins:
        return skip(DUPLICATES, "no plugin found")
    if len(plugins) == 1:
        return ok(DUPLICATES, f"one copy of {LIBRARY}")
    first, rest = plugins[0], plugins[1:]
    dropped = ", ".join(str(p) for p in rest)
    return fail(
        DUPLICATES,
        f"{len(plugins)} copies of {LIBRARY}: WasmEdge loads {first} and silently drops {dropped}",
        f"remove {dropped} or reorder {PLUGIN_PATH_ENV} so the copy you want comes first",
    )
