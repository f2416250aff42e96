"""Where genuine WasmEdge looks for plugins, and which copy of a plugin it loads.

Each rule follows WasmEdge 0.17.1 (lib/plugin/plugin.cpp) and was seen on a genuine
0.17.1 build with the wasi_nn plugin 0.1.34 (docs/wasmedge-facts.md):

- ``Plugin::getDefaultPluginPaths``: the ``WASMEDGE_PLUGIN_PATH`` entries, split on
  ``:`` (a run of colons is one separator; a leading colon gives an empty entry,
  which matches nothing), then exactly one directory relative to the ``libwasmedge``
  the process runs from (``dladdr``; :mod:`edgebundle.ldso` says which one that is):
  ``<lib>/wasmedge`` when the lexically normal ``<lib>`` *string* starts with
  ``/usr`` or ``/lib``, else ``<lib>/../plugin``. The split calls
  ``substr(find_first_not_of(':'))``, which throws ``std::out_of_range`` when the
  value ends with ``:``; the function is ``noexcept``, so WasmEdge aborts (exit 134,
  even ``wasmedge --version``). The same code is in 0.14.1.
- ``Plugin::load``: an entry that is a directory (a symlink to one counts) is walked
  with ``recursive_directory_iterator``: directory order as ``readdir`` gives it,
  depth first, symlinked subdirectories not entered, unreadable ones skipped; every
  regular file (symlinks followed) whose extension is exactly ``.so`` (``.dylib`` on
  macOS) is loaded. An entry that is such a file itself is loaded. Anything else (an
  entry that does not exist, a ``.so.1``) is skipped without a word.
- ``Plugin::loadFile`` / ``registerPlugin``: a file ``dlopen`` refuses (0 bytes,
  another machine) logs ``load library failed:<path>: <dlerror>`` on stdout and the
  search goes on, so the next copy of that plugin loads; the first copy that
  registers a name wins, later copies are dropped with a debug log only.
  ``wasmedge --version`` lists the copy that won, nothing about the others.

A plugin is known by the name its descriptor registers, not by its file name; doctor
does not load libraries, so it knows the wasi_nn plugin by its file name
(``libwasmedgePluginWasiNN.so``), and compares its verdict with what
``wasmedge --version`` lists.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from edgebundle import ldso
from edgebundle.elf import ET_DYN, read_dynamic, read_elf_header
from edgebundle.host import HostInfo

PLUGIN_PATH_ENV = "WASMEDGE_PLUGIN_PATH"
LIBWASMEDGE_NAMES = ("libwasmedge.so.0", "libwasmedge.0.dylib")
# Tried when the binary cannot be read as ELF (a wrapper script, a Mach-O file): release
# builds of wasmedge carry RUNPATH $ORIGIN/../lib (seen on 0.17.1).
_LIBRARY_PATH_VARIABLES = ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH")


# ---------------------------------------------------------------- WASMEDGE_PLUGIN_PATH


@dataclass(frozen=True)
class PluginPathValue:
    """``WASMEDGE_PLUGIN_PATH`` as WasmEdge splits it."""

    raw: str | None  # None: not set
    entries: tuple[str, ...]  # in order, empty entries kept (they match nothing)
    aborts: bool  # ends with ':': WasmEdge throws std::out_of_range and aborts

    @property
    def paths(self) -> tuple[str, ...]:
        """The entries that can name something (not empty)."""
        return tuple(e for e in self.entries if e)


def parse_plugin_path(raw: str | None) -> PluginPathValue:
    """Split ``raw`` exactly as ``Plugin::getDefaultPluginPaths`` does."""
    if raw is None:
        return PluginPathValue(None, (), False)
    entries: list[str] = []
    rest = raw
    while (sep := rest.find(":")) >= 0:
        entries.append(rest[:sep])
        after = len(rest) - len(rest[sep:].lstrip(":"))  # find_first_not_of(':', sep)
        if after == len(rest):
            # find_first_not_of gives npos; substr(npos) throws: WasmEdge aborts here.
            return PluginPathValue(raw, tuple(entries), True)
        rest = rest[after:]
    entries.append(rest)
    return PluginPathValue(raw, tuple(entries), False)


# ---------------------------------------------------------------- the default directory


@dataclass(frozen=True)
class Libwasmedge:
    """The libwasmedge a wasmedge binary runs from, as ``dladdr`` names it."""

    path: Path
    via: str  # how it was found: ld.so's rule, "linked into the binary", or "assumed: …"

    @property
    def directory(self) -> Path:
        """``parent_path().lexically_normal()``: ``..`` folded as text, links kept."""
        return Path(os.path.normpath(self.path.parent))


def find_libwasmedge(binary: Path, environ: Mapping[str, str]) -> Libwasmedge | None:
    """The libwasmedge ``binary`` loads when started with ``environ``; None if none is found.

    An ELF binary's own DT_NEEDED / RPATH / RUNPATH decide, searched as ld.so does. A
    binary with libwasmedge linked in reports itself (``dladdr`` finds the function in
    the executable, named by its argv[0], the absolute path ``run`` starts). Anything
    else is searched as a release build would be: the library path variables, then
    ``<real dir of the binary>/../lib`` (RUNPATH ``$ORIGIN/../lib``), else assumed there.
    """
    try:
        dynamic = read_dynamic(binary)
    except (OSError, ValueError):
        dynamic = None
    if dynamic is not None:
        needed = next((n for n in dynamic.needed if n.startswith("libwasmedge")), None)
        if needed is None:
            return Libwasmedge(Path(os.path.abspath(binary)), "linked into the binary")
        found = ldso.search(needed, binary, dynamic, environ)
        return None if found is None else Libwasmedge(found.path, found.via)
    for variable in _LIBRARY_PATH_VARIABLES:
        for entry in environ.get(variable, "").split(":"):
            for name in LIBWASMEDGE_NAMES:
                if entry and (Path(entry) / name).is_file():
                    return Libwasmedge(Path(entry) / name, variable)
    origin = os.path.dirname(os.path.realpath(binary))
    for name in LIBWASMEDGE_NAMES:
        candidate = Path(origin, "..", "lib", name)
        if candidate.is_file():
            return Libwasmedge(candidate, "$ORIGIN/../lib")
    return Libwasmedge(
        Path(origin, "..", "lib", LIBWASMEDGE_NAMES[0]),
        "assumed: not an ELF file doctor can read, so where release builds keep it",
    )


def default_plugin_dir(lib: Libwasmedge) -> Path:
    """``getDefaultPluginPaths``' one directory for a libwasmedge (Linux, macOS)."""
    directory = lib.directory
    text = str(directory)
    # A string prefix, not a path component: /usrlocal and /lib64 match too (seen).
    if text.startswith("/usr") or text.startswith("/lib"):
        return directory / "wasmedge"
    return directory / ".." / "plugin"


# ---------------------------------------------------------------- the search


@dataclass(frozen=True)
class SearchEntry:
    path: Path
    origin: str  # PLUGIN_PATH_ENV, or "default" (next to libwasmedge)

    def state(self, extension: str) -> str:
        """``dir``, ``file`` (a plugin file itself), ``missing`` or ``ignored``."""
        if not str(self.path):
            return "ignored"
        if self.path.is_dir():
            return "dir"
        if self.path.is_file():
            return "file" if self.path.suffix == extension else "ignored"
        return "missing"


@dataclass(frozen=True)
class Copy:
    """One copy of the plugin along the search, in WasmEdge's load order."""

    path: Path
    entry: SearchEntry
    problem: str | None  # why WasmEdge does not use it; None: loadable as far as can be told
    logged: bool = True  # a dlopen failure, which WasmEdge logs (not: it passed over silently)


@dataclass(frozen=True)
class PluginScan:
    library: str
    search: tuple[SearchEntry, ...]
    copies: tuple[Copy, ...]

    @property
    def loaded(self) -> Copy | None:
        """The copy WasmEdge registers: the first one dlopen accepts."""
        return next((c for c in self.copies if c.problem is None), None)

    @property
    def broken(self) -> tuple[Copy, ...]:
        """Copies WasmEdge tries and fails to load (each logs ``load library failed``)."""
        return tuple(c for c in self.copies if c.problem is not None)

    @property
    def dropped(self) -> tuple[Copy, ...]:
        """Loadable copies after the loaded one: silently unused."""
        loaded = self.loaded
        return tuple(c for c in self.copies if c.problem is None and c is not loaded)

    def registered(self, listed: Path | None, why: str) -> PluginScan:
        """This scan corrected by what ``wasmedge --version`` lists (``listed``, None: no
        copy registered): copies it passed over without a word get ``why`` as problem.

        Only loading tells whether a library is a plugin for this WasmEdge's plugin API;
        the header check cannot, so the runtime's own list has the last word.
        """
        copies = list(self.copies)
        for i, copy in enumerate(copies):
            if copy.problem is not None:
                continue
            if listed is not None and _same_file(copy.path, listed):
                break
            copies[i] = replace(copy, problem=why, logged=False)
        else:
            if listed is not None:
                return self  # a copy doctor does not know (a renamed file): nothing to correct
        return replace(self, copies=tuple(copies))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def search_entries(plugin_path: Sequence[str], lib: Libwasmedge | None) -> list[SearchEntry]:
    """The entries WasmEdge tries, in order: the plugin path, then its default directory."""
    entries = [SearchEntry(Path(p), PLUGIN_PATH_ENV) for p in plugin_path]
    if lib is not None:
        entries.append(SearchEntry(default_plugin_dir(lib), "default"))
    return entries


def library_extension(os_name: str) -> str:
    """WASMEDGE_LIB_EXTENSION."""
    return ".dylib" if os_name == "darwin" else ".so"


def scan(search: Sequence[SearchEntry], library: str, host: HostInfo) -> PluginScan:
    """Every copy of ``library`` along ``search`` in load order, each judged loadable or not.

    One file reached twice (a symlink, the same directory twice) is one copy: dlopen
    hands back the library it already has.
    """
    extension = library_extension(host.os)
    copies: list[Copy] = []
    seen: set[tuple[int, int]] = set()
    for entry in search:
        state = entry.state(extension)
        if state == "dir":
            files: Iterator[Path] = _walk(entry.path, extension)
        elif state == "file":
            files = iter((entry.path,))
        else:
            continue
        for path in files:
            if path.name != library:
                continue
            try:
                stat = path.stat()
            except OSError:
                continue
            if (stat.st_dev, stat.st_ino) in seen:
                continue
            seen.add((stat.st_dev, stat.st_ino))
            copies.append(Copy(path, entry, load_problem(path, host)))
    return PluginScan(library, tuple(search), tuple(copies))


def _walk(directory: Path, extension: str) -> Iterator[Path]:
    """``recursive_directory_iterator`` (skip_permission_denied): readdir order, depth first."""
    try:
        with os.scandir(directory) as listing:
            entries = list(listing)
    except OSError:
        return
    for entry in entries:
        path = Path(entry.path)
        try:
            if entry.is_file() and path.suffix == extension:  # follows symlinks
                yield path
            elif entry.is_dir(follow_symlinks=False):
                yield from _walk(path, extension)
        except OSError:
            continue


def load_problem(path: Path, host: HostInfo) -> str | None:
    """Why ``dlopen`` would refuse ``path`` on ``host``, from its header; None if it would not.

    What dlopen says, seen on 0.17.1: a 0-byte file "file too short", another machine
    "cannot open shared object file". Whether the file is a plugin at all (or for this
    WasmEdge's plugin API) only loading it tells; ``wasmedge --version`` shows that.
    """
    try:
        size = path.stat().st_size
        header = read_elf_header(path)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if size == 0:
        return "0 bytes"
    if header is None:
        if host.os == "linux":
            return "not an ELF shared library"
        return None  # a Mach-O file on macOS: not checked
    if header.file_type != ET_DYN:
        return f"not a shared library (ELF type {header.file_type})"
    if header.matches_host(host.arch) is False:
        return f"built for {header.describe()}, this host is {host.arch}"
    return None
