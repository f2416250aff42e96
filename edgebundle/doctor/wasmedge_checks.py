"""Checks of the wasmedge binary and its WASI-NN plugin, as ``run`` would start them.

Where WasmEdge looks for plugins and which copy it loads is modelled in
:mod:`edgebundle.runtime.plugin_search` (WasmEdge 0.17.1 lib/plugin/plugin.cpp:
``getDefaultPluginPaths``, ``load``, ``loadFile``): ``WASMEDGE_PLUGIN_PATH`` in order
(entries that do not exist skipped, a plugin file itself loaded, a trailing ``:``
fatal), then one directory next to libwasmedge; the first copy ``dlopen`` accepts
wins, a broken copy only logs ``load library failed``. ``wasmedge --version`` lists
the winner and nothing else, so doctor scans the search itself, names the copy that
loads, the broken and the dropped ones, and compares that with what --version lists.

Fixes say what works on this device: "run ./install.sh" only where install.sh can
install a verified WasmEdge (:mod:`edgebundle.runtime.install_hint`).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from edgebundle.doctor.context import Context
from edgebundle.doctor.report import CheckResult, fail, ok, skip, warn
from edgebundle.elf import read_elf_header
from edgebundle.runtime.install_hint import install_sh_works, wasmedge_install_hint
from edgebundle.runtime.plugin_search import (
    Libwasmedge,
    PluginScan,
    SearchEntry,
    find_libwasmedge,
    library_extension,
    parse_plugin_path,
    scan,
    search_entries,
)
from edgebundle.runtime.wasmedge import (
    PLUGIN_PATH_ENV,
    VersionRun,
    WasmEdgeSetup,
    parse_version_output,
    query_version,
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
LOAD_ERROR = "load library failed"  # what WasmEdge logs on stdout for a broken copy


def plugin_version_matches(reported: str, pinned: str) -> bool:
    """``0.14.1.0`` (what --version prints) matches the pin ``0.14.1``: prefix on dots."""
    return reported == pinned or reported.startswith(pinned + ".")


def plugin_library(ctx: Context) -> str:
    """The plugin's file name on this host (``.dylib`` on macOS)."""
    return Path(ctx.lock.plugin_library).stem + library_extension(ctx.host.os)


def install_fix(ctx: Context, variant: str | None = None) -> str:
    """How to get the pinned WasmEdge here, and what runs meanwhile."""
    hint = wasmedge_install_hint(ctx.lock, ctx.host, variant)
    if ctx.app_kind != "edgechat" or install_sh_works(ctx.lock, ctx.host, variant):
        return hint
    if ctx.requested == "wasmedge":
        return f"{hint}; or drop --runtime wasmedge: --runtime auto runs on the embedded runtime"
    return f"{hint}; until then run uses the embedded runtime (--runtime auto)"


def checks(ctx: Context) -> list[CheckResult]:
    if ctx.requested == "embedded":
        return [skip(i, "not used: runtime is embedded") for i in (BINARY, *_REST)]
    setup = ctx.setup
    if setup is None:
        return [_missing_binary(ctx), *(skip(i, "no wasmedge binary") for i in _REST)]
    lib = find_libwasmedge(setup.binary, setup.process_env(ctx.environ))
    search = search_entries([str(p) for p in setup.plugin_path], lib)
    plugins = scan(search, plugin_library(ctx), ctx.host)
    ran = _query(ctx, setup)
    info = parse_version_output(ran.output) if isinstance(ran, VersionRun) else None
    version = _version(ctx, setup, ran, plugins)
    if info is not None and version_matches(info.version, ctx.lock.wasmedge_version):
        # What the runtime lists has the last word on which copy it registered.
        nn = info.plugin(ctx.lock.plugin_name)
        plugins = plugins.registered(
            nn.path if nn is not None else None,
            f"not registered by wasmedge {info.version} as {ctx.lock.plugin_name} (not a "
            "plugin, or one for another WasmEdge)",
        )
    return [
        ok(BINARY, f"{setup.binary} ({setup.source})"),
        version,
        _plugin_path(ctx, setup, lib, plugins),
        _plugin(ctx, plugins),
        _duplicates(plugins),
    ]


def _missing_binary(ctx: Context) -> CheckResult:
    explicit = ctx.settings.wasmedge
    if explicit is not None:
        # Asked for by name: wrong whatever the runtime, never silently replaced.
        return fail(
            BINARY,
            f"--wasmedge {explicit} does not exist",
            f"point --wasmedge / EDGEBUNDLE_WASMEDGE at the wasmedge binary; {install_fix(ctx)}",
        )
    where = f"looked in {ctx.layout.runtime_current / 'bin'} and on PATH"
    if ctx.requested == "auto" and ctx.app_kind == "edgechat":
        return warn(
            BINARY,
            f"wasmedge is not installed ({where}); run will use the embedded runtime",
            "to use WasmEdge instead: " + wasmedge_install_hint(ctx.lock, ctx.host),
        )
    if ctx.requested == "auto" and ctx.app_kind is not None:
        return fail(BINARY, f"wasmedge not found ({where}); {ctx.app_kind} runs only on WasmEdge",
                    install_fix(ctx))  # fmt: skip
    return fail(BINARY, f"wasmedge not found ({where})", install_fix(ctx))


# ---------------------------------------------------------------- wasmedge.version


def _query(ctx: Context, setup: WasmEdgeSetup) -> VersionRun | CheckResult:
    """``wasmedge --version`` as run would start it, or the failed check saying why not."""
    try:
        return query_version(setup, ctx.environ, timeout=ctx.version_timeout)
    except subprocess.TimeoutExpired:
        return fail(
            VERSION,
            f"`{setup.binary} --version` did not answer within {ctx.version_timeout:g} s",
            install_fix(ctx),
        )
    except OSError as exc:
        return fail(
            VERSION, f"cannot start {setup.binary}: {exc.strerror or exc}", install_fix(ctx)
        )


def _version(
    ctx: Context, setup: WasmEdgeSetup, ran: VersionRun | CheckResult, plugins: PluginScan
) -> CheckResult:
    lock = ctx.lock
    if isinstance(ran, CheckResult):
        return ran
    info = parse_version_output(ran.output)
    if info is None:
        shown = ran.output.strip()[:200] or "nothing"
        return fail(
            VERSION,
            f"`wasmedge --version` printed no version{_how_it_ended(ran)}: {shown!r}",
            install_fix(ctx),
        )
    if not version_matches(info.version, lock.wasmedge_version):
        return fail(
            VERSION,
            f"wasmedge {info.version} is installed, the pin is {lock.wasmedge_version}",
            install_fix(ctx),
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
            install_fix(ctx, marker.variant),
        )
    nn = info.plugin(lock.plugin_name)
    expected = plugins.loaded
    if nn is None:
        if expected is not None:
            return fail(
                VERSION,
                f"{summary}, but it did not load the {lock.plugin_name} plugin at "
                f"{expected.path}: WasmEdge silently skips a plugin built for another WasmEdge "
                "version",
                install_fix(ctx),
            )
        return ok(VERSION, f"{summary}; no {lock.plugin_name} plugin loaded (see wasmedge.plugin)")
    if nn.path is not None and not any(_same_file(nn.path, c.path) for c in plugins.copies):
        return warn(
            VERSION,
            f"{summary}; it loads the {lock.plugin_name} plugin from {nn.path}, a file not "
            f"named {plugin_library(ctx)}, which doctor's plugin checks cannot see",
            f"rename it to {plugin_library(ctx)} so doctor checks the plugin WasmEdge uses",
        )
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
            install_fix(ctx),
        )
    return ok(VERSION, f"{summary}; {lock.plugin_name} plugin {nn.version}")


def _how_it_ended(ran: VersionRun) -> str:
    code = ran.returncode
    if code == 0:
        return ""
    if code == -signal.SIGABRT or code == 128 + signal.SIGABRT:
        return " (it aborted: exit 134)"
    if code < 0:
        return f" (killed by signal {-code})"
    return f" (exit {code})"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


# ---------------------------------------------------------------- wasmedge.plugin_path


def _plugin_path(
    ctx: Context, setup: WasmEdgeSetup, lib: Libwasmedge | None, plugins: PluginScan
) -> CheckResult:
    user = parse_plugin_path(ctx.environ.get(PLUGIN_PATH_ENV))
    value = setup.plugin_path_value()
    if setup.source == "installed":
        head = f"run sets {PLUGIN_PATH_ENV}={value}"
    elif user.raw is None:
        head = f"{PLUGIN_PATH_ENV} is not set: WasmEdge searches only its default directory"
    else:
        head = f"{PLUGIN_PATH_ENV}={user.raw}" + (f"; run passes {value}" if value != user.raw
                                                  else "")  # fmt: skip
    notes = [_describe_search(plugins.search, library_extension(ctx.host.os))]
    if lib is None:
        notes.append(
            "no default directory: the libwasmedge this wasmedge needs was not found "
            "(LD_LIBRARY_PATH, its RUNPATH, ld.so.cache), so it cannot start"
        )
    search = f"search: {', '.join(n for n in notes if n) or 'nothing'}"
    if user.aborts and user.raw is not None:
        return warn(
            PLUGIN_PATH,
            f"{PLUGIN_PATH_ENV}={user.raw} ends with ':': WasmEdge aborts on it "
            "(std::out_of_range, exit 134), even `wasmedge --version`; run passes "
            f"{value or 'it'} without the ':'; {search}",
            f"export {PLUGIN_PATH_ENV}={user.raw.rstrip(':')}",
        )
    return ok(PLUGIN_PATH, f"{head}; {search}")


def _describe_search(search: tuple[SearchEntry, ...], extension: str) -> str:
    """The entries in WasmEdge's order, each with what WasmEdge does with it."""
    parts: list[str] = []
    for entry in search:
        what = {
            "dir": "",
            "file": f" (a {extension} file: loaded itself)",
            "missing": " (does not exist: skipped)",
            "ignored": f" (not a directory or a {extension} file: skipped)",
        }[entry.state(extension)]
        if entry.origin == "default":
            parts.append(f"{'then ' if parts else ''}WasmEdge's default {entry.path}{what}")
        else:
            parts.append(f"{entry.path}{what}")
    return ", ".join(parts)


# ---------------------------------------------------------------- wasmedge.plugin


def _plugin(ctx: Context, plugins: PluginScan) -> CheckResult:
    library = plugin_library(ctx)
    loaded = plugins.loaded
    if loaded is None and not plugins.copies:
        where = (_describe_search(plugins.search, library_extension(ctx.host.os))
                 or "no directory at all")  # fmt: skip
        return fail(
            PLUGIN,
            f"{library} not found; WasmEdge searches {where} "
            '(wasmedge will say "unknown option: nn-preload")',
            f"put {library} in one of those directories or name its directory (or the file) "
            f"in {PLUGIN_PATH_ENV}; to install it: {install_fix(ctx)}",
        )
    if loaded is None:
        broken = "; ".join(f"{c.path} is {c.problem}" for c in plugins.broken)
        logs = f'WasmEdge logs "{LOAD_ERROR}" for each and ' if all(
            c.logged for c in plugins.broken) else "WasmEdge "  # fmt: skip
        return fail(
            PLUGIN,
            f"no copy of {library} that WasmEdge can load: {broken} ({logs}says "
            '"unknown option: nn-preload")',
            f"install the {ctx.host.arch} plugin: {install_fix(ctx)}",
        )
    before = plugins.copies.index(loaded)
    after = (
        f"; WasmEdge first passes over {before} other cop{'y' if before == 1 else 'ies'} "
        f"(see {DUPLICATES})" if before else ""
    )  # fmt: skip
    try:
        header = read_elf_header(loaded.path)
    except OSError:
        header = None
    if header is None:
        return ok(PLUGIN, f"{loaded.path} (not ELF; architecture not checked on {ctx.host.os})"
                  f"{after}")  # fmt: skip
    if header.matches_host(ctx.host.arch) is None:
        return ok(PLUGIN, f"{loaded.path} ({header.describe()}; host arch {ctx.host.arch} not "
                  f"checked){after}")  # fmt: skip
    return ok(PLUGIN, f"{loaded.path} ({header.describe()}){after}")


# ---------------------------------------------------------------- wasmedge.plugin_duplicates


def _duplicates(plugins: PluginScan) -> CheckResult:
    library = plugins.library
    loaded = plugins.loaded
    if not plugins.copies:
        return skip(DUPLICATES, "no plugin found")
    if len(plugins.copies) == 1:
        return ok(DUPLICATES, f"one copy of {library}")
    dropped = ", ".join(str(c.path) for c in plugins.dropped)
    logged = [c for c in plugins.broken if c.logged]
    passed = ", ".join(f"{c.path} ({c.problem})" for c in plugins.broken if not c.logged)
    broken = ", ".join(f"{c.path} ({c.problem})" for c in logged)
    parts = [f"{len(plugins.copies)} copies of {library}: "]
    parts.append(f"WasmEdge loads {loaded.path}" if loaded else "WasmEdge loads none")
    if dropped:
        parts.append(f" and silently drops {dropped}")
    if passed:
        parts.append(f"; it silently passes over {passed}")
    if broken:
        parts.append(f"; it fails to load {broken} and logs \"{LOAD_ERROR}\" for "
                     f"{'it' if len(logged) == 1 else 'each'} at every start")  # fmt: skip
    summary = "".join(parts)
    remove = ", ".join(str(c.path) for c in (*plugins.broken, *plugins.dropped))
    if dropped:
        return fail(
            DUPLICATES,
            summary,
            f"remove {remove} or reorder {PLUGIN_PATH_ENV} so the copy you want comes first",
        )
    return warn(DUPLICATES, summary, f"remove {remove}")
