"""Which file the dynamic loader (glibc's ld.so) takes for a library an executable needs.

Doctor needs this for one library: WasmEdge finds its default plugin directory
relative to the ``libwasmedge`` it runs from (``dladdr``), so that directory depends
on which copy ld.so picks: ``LD_LIBRARY_PATH`` can point one ``wasmedge`` at another
install's library, and with it at that install's plugins.

The search, as glibc's ``_dl_map_object`` does it for a name without a slash:
``DT_RPATH`` (only when there is no ``DT_RUNPATH``), ``LD_LIBRARY_PATH``,
``DT_RUNPATH``, ``/etc/ld.so.cache``, then the system directories. ``$ORIGIN`` is the
directory of the executable with symlinks resolved (ld.so reads ``/proc/self/exe``).
The name found is the directory joined with the library's name, not resolved, which
is the name ``dladdr`` reports. Seen on WasmEdge 0.17.1: ``wasmedge`` (RUNPATH
``$ORIGIN/../lib``) started through a symlink loads ``<real bin>/../lib``; with
``LD_LIBRARY_PATH=<prefix>/current/lib`` it loads that one, ``current`` unresolved.

Not modelled (none is used by a WasmEdge install): ``$LIB`` and ``$PLATFORM`` tokens,
hwcaps subdirectories, secure-execution mode, empty ``LD_LIBRARY_PATH`` entries.
"""

from __future__ import annotations

import os
import struct
import sysconfig
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from edgebundle.elf import DynamicInfo, read_elf_header

LD_SO_CACHE = Path("/etc/ld.so.cache")
_CACHE_MAGIC = b"glibc-ld.so.cache1.1"
_CACHE_HEADER = 48  # magic+version (20), nlibs, len_strings, flags (+3 pad), ext, 3 unused
_CACHE_ENTRY = 24  # flags i32, key u32, value u32, osversion u32, hwcap u64


@dataclass(frozen=True)
class Found:
    """A library as ld.so names it once loaded, and which rule found it."""

    path: Path  # directory joined with the name, unresolved (what dladdr reports)
    via: str  # "DT_RPATH", "LD_LIBRARY_PATH", "DT_RUNPATH", "ld.so.cache", "system directory"


def search(
    name: str,
    executable: Path,
    dynamic: DynamicInfo,
    environ: Mapping[str, str],
    cache: Path = LD_SO_CACHE,
) -> Found | None:
    """Where ld.so finds ``name`` for ``executable`` started with ``environ``; None if nowhere."""
    origin = os.path.dirname(os.path.realpath(executable))
    for directory, via in _directories(dynamic, environ, origin):
        candidate = Path(os.path.join(directory, name))
        if _loadable(candidate, dynamic):
            return Found(candidate, via)
    cached = _from_cache(name, dynamic, cache)
    if cached is not None:
        return Found(cached, "ld.so.cache")
    for directory in _system_directories():
        candidate = Path(directory) / name
        if _loadable(candidate, dynamic):
            return Found(candidate, "system directory")
    return None


def _directories(
    dynamic: DynamicInfo, environ: Mapping[str, str], origin: str
) -> Iterator[tuple[str, str]]:
    def expand(entry: str) -> str | None:
        entry = entry.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
        return None if "$" in entry else entry  # $LIB, $PLATFORM: not modelled

    if not dynamic.runpath:
        for entry in dynamic.rpath:
            if (expanded := expand(entry)) is not None:
                yield expanded, "DT_RPATH"
    for entry in environ.get("LD_LIBRARY_PATH", "").replace(";", ":").split(":"):
        if entry:
            yield entry, "LD_LIBRARY_PATH"
    for entry in dynamic.runpath:
        if (expanded := expand(entry)) is not None:
            yield expanded, "DT_RUNPATH"


def _loadable(candidate: Path, dynamic: DynamicInfo) -> bool:
    """ld.so skips a file of another class or machine and goes on searching."""
    try:
        header = read_elf_header(candidate)
    except OSError:
        return False
    return (
        header is not None
        and header.bits == dynamic.header.bits
        and header.machine == dynamic.header.machine
    )


def _from_cache(name: str, dynamic: DynamicInfo, cache: Path) -> Path | None:
    """The first ``/etc/ld.so.cache`` entry for ``name`` that fits the executable."""
    try:
        data = cache.read_bytes()
    except OSError:
        return None
    start = data.find(_CACHE_MAGIC)  # after the old-format part, when there is one
    if start < 0 or len(data) < start + _CACHE_HEADER:
        return None
    flags = data[start + 28]
    order = {2: "<", 3: ">"}.get(flags & 3, "=")  # endianness, unset = native
    nlibs = struct.unpack_from(order + "I", data, start + 20)[0]
    key_bytes = name.encode()

    def string(offset: int) -> bytes:
        at = start + offset  # offsets count from the new-format header
        end = data.find(b"\0", at)
        return data[at:end] if end >= 0 else b""

    for i in range(nlibs):
        at = start + _CACHE_HEADER + i * _CACHE_ENTRY
        if at + _CACHE_ENTRY > len(data):
            break
        _, key, value = struct.unpack_from(order + "iII", data, at)
        if string(key) == key_bytes:
            path = Path(os.fsdecode(string(value)))
            if _loadable(path, dynamic):
                return path
    return None


def _system_directories() -> list[str]:
    multiarch = sysconfig.get_config_var("MULTIARCH")
    triplet = [f"/lib/{multiarch}", f"/usr/lib/{multiarch}"] if multiarch else []
    return [*triplet, "/lib64", "/usr/lib64", "/lib", "/usr/lib"]
