"""WasmEdge's plugin search as doctor models it (WasmEdge 0.17.1 lib/plugin/plugin.cpp).

Each rule here was seen on a genuine 0.17.1 build with the wasi_nn plugin 0.1.34
(docs/wasmedge-facts.md); the files are real: plugins with ELF headers, binaries with
a real dynamic section (tests/support/elf_files.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgebundle.runtime.plugin_search import (
    Libwasmedge,
    PluginScan,
    default_plugin_dir,
    find_libwasmedge,
    parse_plugin_path,
    scan,
    search_entries,
)
from tests.support.doctor_env import AARCH64, PLUGIN_LIB, host
from tests.support.elf_files import write_elf
from tests.support.standin_wasmedge import fake_libwasmedge, fake_plugin, write_standin


def _scan(tmp_path: Path, value: str, lib: Libwasmedge | None = None) -> PluginScan:
    entries = search_entries(parse_plugin_path(value).paths, lib)
    return scan(entries, PLUGIN_LIB, host("x86_64"))


# -- WASMEDGE_PLUGIN_PATH -----------------------------------------------------------


@pytest.mark.parametrize("value", ["/x/plugin:", ":", "/a::", "/a:/b:"])
def test_a_trailing_colon_aborts_wasmedge(value: str) -> None:
    assert parse_plugin_path(value).aborts


@pytest.mark.parametrize(
    ("value", "entries"),
    [
        ("/a", ("/a",)),
        ("", ("",)),
        (":/a", ("", "/a")),  # a leading colon: an empty entry, which matches nothing
        ("/a::/b", ("/a", "/b")),  # a run of colons is one separator
    ],
)
def test_the_split_is_wasmedges(value: str, entries: tuple[str, ...]) -> None:
    parsed = parse_plugin_path(value)
    assert parsed.entries == entries and not parsed.aborts
    assert parse_plugin_path(None).entries == ()


# -- the default directory ----------------------------------------------------------


@pytest.mark.parametrize(
    ("lib", "default"),
    [
        ("/home/pi/.wasmedge/lib/libwasmedge.so.0", "/home/pi/.wasmedge/lib/../plugin"),
        ("/opt/we/bin/../lib/libwasmedge.so.0", "/opt/we/lib/../plugin"),  # normalised
        ("/usr/local/lib/libwasmedge.so.0", "/usr/local/lib/wasmedge"),
        ("/usr/lib/x86_64-linux-gnu/libwasmedge.so.0", "/usr/lib/x86_64-linux-gnu/wasmedge"),
        ("/lib64/libwasmedge.so.0", "/lib64/wasmedge"),
        # A string prefix, not a path component (seen with /usrtmp-… on 0.17.1):
        ("/usrtmp/lib/libwasmedge.so.0", "/usrtmp/lib/wasmedge"),
        ("/library/we/lib/libwasmedge.so.0", "/library/we/lib/wasmedge"),
    ],
)
def test_default_dir_is_lib_wasmedge_under_usr_else_lib_dotdot_plugin(
    lib: str, default: str
) -> None:
    assert str(default_plugin_dir(Libwasmedge(Path(lib), "test"))) == default


def test_libwasmedge_of_an_elf_binary_follows_its_runpath(tmp_path: Path) -> None:
    needed = ("libwasmedge.so.0", "libc.so.6")
    binary = write_elf(tmp_path / "we" / "bin" / "wasmedge", needed=needed,
                       runpath="$ORIGIN/../lib")  # fmt: skip
    write_elf(tmp_path / "we" / "lib" / "libwasmedge.so.0")
    lib = find_libwasmedge(binary, {})
    assert lib is not None and lib.via == "DT_RUNPATH"
    assert default_plugin_dir(lib) == tmp_path / "we" / "lib" / ".." / "plugin"
    # LD_LIBRARY_PATH points the same binary at another install's library, and plugins.
    write_elf(tmp_path / "other" / "lib" / "libwasmedge.so.0")
    lib = find_libwasmedge(binary, {"LD_LIBRARY_PATH": str(tmp_path / "other" / "lib")})
    assert lib is not None and lib.via == "LD_LIBRARY_PATH"
    assert default_plugin_dir(lib) == tmp_path / "other" / "lib" / ".." / "plugin"


def test_libwasmedge_linked_into_the_binary_is_the_binary(tmp_path: Path) -> None:
    binary = write_elf(tmp_path / "we" / "bin" / "wasmedge", needed=("libc.so.6",))
    lib = find_libwasmedge(binary, {})
    assert lib is not None and lib.via == "linked into the binary"
    assert default_plugin_dir(lib) == tmp_path / "we" / "bin" / ".." / "plugin"


def test_an_elf_binary_whose_libwasmedge_is_nowhere_has_no_default(tmp_path: Path) -> None:
    binary = write_elf(tmp_path / "bin" / "wasmedge", needed=("libwasmedge-not-here.so.9",),
                       runpath="$ORIGIN/../lib")  # fmt: skip
    assert find_libwasmedge(binary, {}) is None


def test_a_script_wasmedge_is_searched_as_a_release_build(tmp_path: Path) -> None:
    """Not ELF (a wrapper script, the tests' stand-in): LD_LIBRARY_PATH, then $ORIGIN/../lib."""
    binary = write_standin(tmp_path / "we" / "bin" / "wasmedge")
    fake_libwasmedge(tmp_path / "we" / "lib")
    lib = find_libwasmedge(binary, {})
    assert lib is not None and lib.directory == tmp_path / "we" / "lib"
    fake_libwasmedge(tmp_path / "other")
    lib = find_libwasmedge(binary, {"LD_LIBRARY_PATH": f"/nowhere:{tmp_path / 'other'}"})
    assert lib is not None and (lib.directory, lib.via) == (tmp_path / "other", "LD_LIBRARY_PATH")


# -- the scan -----------------------------------------------------------------------


def test_an_entry_that_does_not_exist_is_skipped(tmp_path: Path) -> None:
    plugin = fake_plugin(tmp_path / "p" / PLUGIN_LIB)
    result = _scan(tmp_path, f"{tmp_path / 'gone'}:{tmp_path / 'p'}")
    assert result.loaded is not None and result.loaded.path == plugin
    assert [e.state(".so") for e in result.search] == ["missing", "dir"]


def test_an_entry_that_is_the_plugin_file_is_loaded(tmp_path: Path) -> None:
    plugin = fake_plugin(tmp_path / "p" / PLUGIN_LIB)
    result = _scan(tmp_path, str(plugin))
    assert result.loaded is not None and result.loaded.path == plugin
    renamed = fake_plugin(tmp_path / "p" / f"{PLUGIN_LIB}.1")  # extension .1: skipped
    assert _scan(tmp_path, str(renamed)).copies == ()


def test_a_broken_first_copy_is_passed_over_for_the_next(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / PLUGIN_LIB).write_bytes(b"")
    arm = fake_plugin(tmp_path / "b" / PLUGIN_LIB, machine=AARCH64)
    good = fake_plugin(tmp_path / "c" / PLUGIN_LIB)
    later = fake_plugin(tmp_path / "d" / PLUGIN_LIB)
    result = _scan(tmp_path, ":".join(str(tmp_path / d) for d in "abcd"))
    assert result.loaded is not None and result.loaded.path == good
    assert [(c.path, c.problem) for c in result.broken] == [
        (tmp_path / "a" / PLUGIN_LIB, "0 bytes"),
        (arm, "built for aarch64, this host is x86_64"),
    ]
    assert [c.path for c in result.dropped] == [later]


def test_an_executable_is_not_a_loadable_plugin(tmp_path: Path) -> None:
    write_elf(tmp_path / "p" / PLUGIN_LIB, e_type=2)  # ET_EXEC
    [copy] = _scan(tmp_path, str(tmp_path / "p")).copies
    assert copy.problem == "not a shared library (ELF type 2)"


def test_the_walk_is_depth_first_in_directory_order_without_symlinked_dirs(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    fake_plugin(root / "sub" / PLUGIN_LIB)
    fake_plugin(root / "deeper" / "x" / PLUGIN_LIB)
    fake_plugin(tmp_path / "linked-target" / PLUGIN_LIB)
    (root / "link").symlink_to(tmp_path / "linked-target")
    found = [c.path for c in _scan(tmp_path, str(root)).copies]
    expected: list[Path] = []
    for entry in os.scandir(root):  # readdir order, as recursive_directory_iterator
        if entry.name == "sub":
            expected.append(root / "sub" / PLUGIN_LIB)
        elif entry.name == "deeper":
            expected.append(root / "deeper" / "x" / PLUGIN_LIB)
    assert found == expected  # the symlinked directory is not entered
    # ... but an entry that is itself a symlink to a directory is walked.
    assert [c.path for c in _scan(tmp_path, str(root / "link")).copies] == [
        root / "link" / PLUGIN_LIB
    ]


def test_one_file_reached_twice_is_one_copy(tmp_path: Path) -> None:
    real = fake_plugin(tmp_path / "a" / PLUGIN_LIB)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / PLUGIN_LIB).symlink_to(real)
    result = _scan(tmp_path, f"{tmp_path / 'a'}:{tmp_path / 'b'}:{tmp_path / 'a'}")
    assert [c.path for c in result.copies] == [real]


def test_the_default_dir_comes_after_the_plugin_path(tmp_path: Path) -> None:
    lib = Libwasmedge(fake_libwasmedge(tmp_path / "we" / "lib"), "test")
    in_default = fake_plugin(tmp_path / "we" / "plugin" / PLUGIN_LIB)
    mine = fake_plugin(tmp_path / "mine" / PLUGIN_LIB)
    result = _scan(tmp_path, str(tmp_path / "mine"), lib)
    assert result.loaded is not None and result.loaded.path == mine
    assert [c.path.resolve() for c in result.dropped] == [in_default]
    assert result.search[-1].origin == "default"
