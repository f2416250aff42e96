"""Which libwasmedge the dynamic loader takes, on real (tiny) ELF files.

The order is glibc's: DT_RPATH (only without DT_RUNPATH), LD_LIBRARY_PATH, DT_RUNPATH,
ld.so.cache, system directories; ``$ORIGIN`` is the binary's real directory. Seen on
a genuine WasmEdge 0.17.1 (RUNPATH ``$ORIGIN/../lib``): through a symlinked binary the
library comes from the real ``bin/../lib``, and ``LD_LIBRARY_PATH`` beats the RUNPATH.
"""

from __future__ import annotations

import sys
from pathlib import Path

from edgebundle import ldso
from edgebundle.elf import read_dynamic
from tests.support.elf_files import write_elf, write_ld_so_cache

LIB = "libwasmedge.so.0"


def _library(directory: Path, machine: int = 0x3E) -> Path:
    return write_elf(directory / LIB, machine=machine)


def _search(binary: Path, environ: dict[str, str], cache: Path) -> ldso.Found | None:
    dynamic = read_dynamic(binary)
    assert dynamic is not None
    return ldso.search(LIB, binary, dynamic, environ, cache=cache)


def test_the_dynamic_section_is_read_as_the_loader_reads_it(tmp_path: Path) -> None:
    binary = write_elf(tmp_path / "wasmedge", needed=(LIB, "libc.so.6"),
                       runpath="$ORIGIN/../lib:/opt/x")  # fmt: skip
    dynamic = read_dynamic(binary)
    assert dynamic is not None
    assert dynamic.needed == (LIB, "libc.so.6")
    assert dynamic.runpath == ("$ORIGIN/../lib", "/opt/x") and dynamic.rpath == ()
    assert read_dynamic(Path(sys.executable).resolve()) is not None  # a real binary
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    assert read_dynamic(script) is None


def test_runpath_origin_is_the_real_directory_of_the_binary(tmp_path: Path) -> None:
    binary = write_elf(tmp_path / "rt" / "bin" / "wasmedge", needed=(LIB,),
                       runpath="$ORIGIN/../lib")  # fmt: skip
    _library(tmp_path / "rt" / "lib")
    link = tmp_path / "elsewhere" / "wasmedge"
    link.parent.mkdir()
    link.symlink_to(binary)
    found = _search(link, {}, tmp_path / "no-cache")
    assert found == ldso.Found(tmp_path / "rt" / "bin" / ".." / "lib" / LIB, "DT_RUNPATH")


def test_ld_library_path_beats_runpath_and_is_kept_as_written(tmp_path: Path) -> None:
    binary = write_elf(tmp_path / "rt" / "bin" / "wasmedge", needed=(LIB,),
                       runpath="$ORIGIN/../lib")  # fmt: skip
    _library(tmp_path / "rt" / "lib")
    _library(tmp_path / "other" / "real")
    (tmp_path / "other" / "current").symlink_to("real")
    env = {"LD_LIBRARY_PATH": f"{tmp_path / 'nothing'}:{tmp_path / 'other' / 'current'}"}
    found = _search(binary, env, tmp_path / "no-cache")
    assert found == ldso.Found(tmp_path / "other" / "current" / LIB, "LD_LIBRARY_PATH")


def test_rpath_counts_only_without_runpath_and_comes_before_ld_library_path(
    tmp_path: Path,
) -> None:
    _library(tmp_path / "r")
    _library(tmp_path / "ld")
    env = {"LD_LIBRARY_PATH": str(tmp_path / "ld")}
    old_style = write_elf(tmp_path / "a", needed=(LIB,), rpath=str(tmp_path / "r"))
    assert _search(old_style, env, tmp_path / "x") == ldso.Found(tmp_path / "r" / LIB, "DT_RPATH")
    both = write_elf(tmp_path / "b", needed=(LIB,), rpath=str(tmp_path / "r"),
                     runpath=str(tmp_path / "nothing"))  # fmt: skip
    assert _search(both, env, tmp_path / "x") == ldso.Found(tmp_path / "ld" / LIB,
                                                            "LD_LIBRARY_PATH")  # fmt: skip


def test_a_library_for_another_machine_is_passed_over(tmp_path: Path) -> None:
    binary = write_elf(tmp_path / "bin" / "wasmedge", needed=(LIB,),
                       runpath=f"{tmp_path / 'arm'}:{tmp_path / 'x86'}")  # fmt: skip
    _library(tmp_path / "arm", machine=0xB7)
    _library(tmp_path / "x86")
    assert _search(binary, {}, tmp_path / "x") == ldso.Found(tmp_path / "x86" / LIB, "DT_RUNPATH")


def test_then_the_ld_so_cache(tmp_path: Path) -> None:
    binary = write_elf(tmp_path / "bin" / "wasmedge", needed=(LIB,))
    target = _library(tmp_path / "opt" / "wasmedge" / "lib")
    entries = [("libz.so.1", "/nowhere/libz.so.1"), (LIB, str(target))]
    cache = write_ld_so_cache(tmp_path / "ld.so.cache", entries)
    assert _search(binary, {}, cache) == ldso.Found(target, "ld.so.cache")


def test_this_machines_cache_finds_the_c_library_of_this_python() -> None:
    """The real /etc/ld.so.cache (or the system directories) of the machine running tests."""
    python = Path(sys.executable).resolve()
    dynamic = read_dynamic(python)
    assert dynamic is not None
    libc = next((n for n in dynamic.needed if n.startswith("libc.so")), None)
    if libc is None:
        return  # a statically linked python: nothing to look up
    found = ldso.search(libc, python, dynamic, {})
    assert found is not None and found.path.is_file()
