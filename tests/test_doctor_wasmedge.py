"""wasmedge.* checks on fabricated devices.

The ``wasmedge`` binary is the stand-in of tests/support/standin_wasmedge.py (a test
double at the process boundary: WasmEdge cannot be installed here). It prints
``--version`` in the format of genuine builds and searches plugins by the rules seen on
a genuine WasmEdge 0.17.1 (tests/test_support_standin.py): it lists only the first
loadable WASI-NN plugin, skips entries that do not exist, loads a plugin file named as
an entry, passes over a broken copy, and aborts on a trailing ':'. Plugins are files
with real ELF headers. Where doctor and the stand-in must agree, the test asks both.
"""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgebundle.doctor.wasmedge_checks import plugin_version_matches
from edgebundle.pins import load_runtime_lock
from edgebundle.runtime.wasmedge import parse_version_output
from tests.support.doctor_env import (
    AARCH64,
    PLUGIN_LIB,
    X86_64,
    diagnose,
    environ,
    host,
    install_runtime,
    path_wasmedge,
    write_lock,
)
from tests.support.standin_wasmedge import fake_libwasmedge, fake_plugin

# -- wasmedge.binary ---------------------------------------------------------------


def test_missing_wasmedge_fails_when_wasmedge_is_asked_for(home: Path) -> None:
    report = diagnose(home, runtime="wasmedge")
    binary = report.check("wasmedge.binary")
    assert binary.status == "fail"
    assert "not found" in binary.summary and binary.fix and "./install.sh" in binary.fix
    assert report.runtime == "wasmedge"
    for rest in ("wasmedge.version", "wasmedge.plugin_path", "wasmedge.plugin"):
        assert report.check(rest).status == "skip"
    assert not report.ok


def test_missing_wasmedge_only_warns_under_auto_and_run_uses_embedded(home: Path) -> None:
    report = diagnose(home, runtime="auto")
    binary = report.check("wasmedge.binary")
    assert binary.status == "warn"
    assert "run will use the embedded runtime" in binary.summary
    assert report.runtime == "embedded"


def test_embedded_runtime_skips_every_wasmedge_check(home: Path) -> None:
    install_runtime(home)
    report = diagnose(home, runtime="embedded")
    assert report.runtime == "embedded"
    assert {c.status for c in report.checks if c.id.startswith("wasmedge.")} == {"skip"}


def test_explicit_wasmedge_that_does_not_exist_fails(home: Path, tmp_path: Path) -> None:
    report = diagnose(home, wasmedge=tmp_path / "nope" / "wasmedge")
    assert report.check("wasmedge.binary").status == "fail"
    assert "nope/wasmedge does not exist" in report.check("wasmedge.binary").summary


def test_installed_wasmedge_passes_every_check(home: Path) -> None:
    install_runtime(home)
    report = diagnose(home, runtime="wasmedge")
    assert report.runtime == "wasmedge"
    for check_id in (
        "wasmedge.binary",
        "wasmedge.version",
        "wasmedge.plugin_path",
        "wasmedge.plugin",
        "wasmedge.plugin_duplicates",
    ):
        assert report.check(check_id).status == "ok", report.check(check_id)
    assert "(installed)" in report.check("wasmedge.binary").summary


def test_wasmedge_on_path_is_found_and_auto_picks_it(home: Path, tmp_path: Path) -> None:
    binary = path_wasmedge(tmp_path / "usr")
    fake_plugin(tmp_path / "usr" / "plugin" / PLUGIN_LIB)
    env = environ((binary.parent,), WASMEDGE_PLUGIN_PATH=str(tmp_path / "usr" / "plugin"))
    report = diagnose(home, env=env)
    assert report.runtime == "wasmedge"
    assert report.check("wasmedge.binary").status == "ok"
    assert "(PATH)" in report.check("wasmedge.binary").summary


# -- wasmedge.version -------------------------------------------------------------


def test_runtime_version_different_from_pin_fails(home: Path) -> None:
    install_runtime(home, version="0.13.5")
    report = diagnose(home, runtime="wasmedge", lock=write_lock(home.parent / "lock", "0.14.1"))
    version = report.check("wasmedge.version")
    assert version.status == "fail"
    assert "0.13.5" in version.summary and "0.14.1" in version.summary
    assert version.fix and "./install.sh" in version.fix


def test_runtime_version_equal_to_pin_passes_including_a_build_suffix(home: Path) -> None:
    install_runtime(home, version="0.14.1-3-gabcdef")
    report = diagnose(home, runtime="wasmedge", lock=write_lock(home.parent / "lock", "0.14.1"))
    assert report.check("wasmedge.version").status == "ok"


def test_plugin_version_line_different_from_pin_fails(home: Path) -> None:
    install_runtime(home, plugin_version="0.1.24.0")
    lock = write_lock(home.parent / "lock", reported_version="0.1.25")
    version = diagnose(home, runtime="wasmedge", lock=lock).check("wasmedge.version")
    assert version.status == "fail"
    assert "0.1.24.0" in version.summary and "0.1.25" in version.summary
    assert "b5593" in version.summary


def test_plugin_version_line_matching_pin_passes(home: Path) -> None:
    install_runtime(home, plugin_version="0.1.25.0")
    lock = write_lock(home.parent / "lock", reported_version="0.1.25")
    version = diagnose(home, runtime="wasmedge", lock=lock).check("wasmedge.version")
    assert version.status == "ok"
    assert "wasi_nn plugin 0.1.25.0" in version.summary


def test_plugin_version_is_not_compared_when_the_lock_records_none(home: Path) -> None:
    install_runtime(home, plugin_version="0.1.25.0")
    version = diagnose(home, runtime="wasmedge", lock=write_lock(home.parent / "lock")).check(
        "wasmedge.version"
    )
    assert version.status == "ok"
    assert "not compared" in version.summary


def test_plugin_version_prefix_matches_on_dot_boundaries_only() -> None:
    assert plugin_version_matches("0.14.1.0", "0.14.1")
    assert plugin_version_matches("0.1.25.0", "0.1.25")
    assert plugin_version_matches("0.1.25", "0.1.25")
    assert not plugin_version_matches("0.1.250.0", "0.1.25")
    assert not plugin_version_matches("0.1.26.0", "0.1.25")


def test_installed_plugin_build_different_from_pin_fails(home: Path) -> None:
    install_runtime(home, plugin_build="b4000")
    version = diagnose(home, runtime="wasmedge").check("wasmedge.version")
    assert version.status == "fail"
    assert "b4000" in version.summary and "b5593" in version.summary


def test_the_build_compared_is_the_one_pinned_for_the_installed_variant(
    home: Path, tmp_path: Path
) -> None:
    """The lock's CPU plugin may be another release's build (WasmEdge's own 0.14.1 one,
    b3651) than its other variants (b5593): doctor expects the installed variant's."""
    lock = write_lock(tmp_path / "pins")
    plugin_rows = "".join(
        f'[[asset]]\ncomponent = "plugin"\nos = "linux"\narch = "x86_64"\n'
        f'variant = "{variant}"\n{build}url = "https://example.invalid/{variant}.tar.gz"\n'
        'sha256 = "unknown"\n'
        for variant, build in (("cpu", 'build = "b3651"\n'), ("noavx", ""))
    )
    lock.path.write_text(lock.path.read_text() + plugin_rows)
    lock = load_runtime_lock(lock.path)
    install_runtime(home, variant="cpu", plugin_build="b3651")
    assert diagnose(home, runtime="wasmedge", lock=lock).check("wasmedge.version").status == "ok"
    install_runtime(home, variant="noavx", plugin_build="b3651")
    version = diagnose(home, runtime="wasmedge", lock=lock).check("wasmedge.version")
    assert version.status == "fail"
    assert "installed plugin is GGML build b3651, the pin is b5593" in version.summary


def test_unparseable_version_output_fails_naming_what_it_printed(
    home: Path, tmp_path: Path
) -> None:
    """A broken wasmedge (a tiny script, the double for a damaged install) prints no version."""
    broken = tmp_path / "broken" / "bin" / "wasmedge"
    broken.parent.mkdir(parents=True)
    broken.write_text(f"#!{sys.executable}\nprint('segmentation fault, core dumped')\n")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    report = diagnose(home, runtime="wasmedge", wasmedge=broken)
    version = report.check("wasmedge.version")
    assert version.status == "fail"
    assert "segmentation fault, core dumped" in version.summary


def test_plugin_on_path_that_wasmedge_did_not_load_fails(home: Path, tmp_path: Path) -> None:
    """WasmEdge skips a plugin for another API version silently: --version omits it.

    The double: a script that prints a genuine runtime line but no wasi_nn line.
    """
    prefix = tmp_path / "we"
    binary = prefix / "bin" / "wasmedge"
    binary.parent.mkdir(parents=True)
    binary.write_text(
        f"#!{sys.executable}\nprint('wasmedge version 0.14.1')\n"
        "print(' (plugin \"wasi_logging\") version 0.1.0.0')\n"
    )
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    fake_plugin(prefix / "plugin" / PLUGIN_LIB)
    env = environ(WASMEDGE_PLUGIN_PATH=str(prefix / "plugin"))
    report = diagnose(home, runtime="wasmedge", wasmedge=binary, env=env)
    version = report.check("wasmedge.version")
    assert version.status == "fail"
    assert (
        "did not load" in version.summary and str(prefix / "plugin" / PLUGIN_LIB) in version.summary
    )
    # The runtime's list has the last word: no copy is the plugin it uses.
    plugin = report.check("wasmedge.plugin")
    assert plugin.status == "fail" and "not registered by wasmedge 0.14.1" in plugin.summary


def _script_wasmedge(path: Path, body: str) -> Path:
    """A tiny script double for a wasmedge the stand-in does not model (its own lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\nimport os, sys\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_the_copy_wasmedge_lists_wins_over_doctors_scan(home: Path, tmp_path: Path) -> None:
    """WasmEdge knows a plugin by its descriptor: a library named like the plugin that is
    none (or is for another plugin API) is passed over silently for the next copy, which
    only --version reveals. Seen on genuine 0.17.1: libwasmedge.so copied to
    a/libwasmedgePluginWasiNN.so, then b/…: --version lists b/…. The double prints that."""
    first = fake_plugin(tmp_path / "a" / PLUGIN_LIB)
    second = fake_plugin(tmp_path / "b" / PLUGIN_LIB)
    binary = _script_wasmedge(tmp_path / "we" / "bin" / "wasmedge", (
        "print('wasmedge version 0.14.1')\n"
        f"print('{second} (plugin \"wasi_nn\") version 0.14.1.0')\n"
    ))  # fmt: skip
    env = environ(WASMEDGE_PLUGIN_PATH=f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    report = diagnose(home, runtime="wasmedge", wasmedge=binary, env=env)
    assert report.check("wasmedge.version").status == "ok"
    assert report.check("wasmedge.plugin").summary.startswith(
        f"{second} (x86_64); WasmEdge first passes over 1 other copy")  # fmt: skip
    duplicates = report.check("wasmedge.plugin_duplicates")
    assert duplicates.status == "warn"
    assert duplicates.summary == (
        f"2 copies of {PLUGIN_LIB}: WasmEdge loads {second}; it silently passes over {first} "
        "(not registered by wasmedge 0.14.1 as wasi_nn (not a plugin, or one for another "
        "WasmEdge))"
    )
    assert duplicates.fix == f"remove {first}"


def test_version_warns_of_a_plugin_doctor_cannot_see(home: Path, tmp_path: Path) -> None:
    """A renamed plugin file loads by its descriptor (seen: WASMEDGE_PLUGIN_PATH=renamed.so
    lists renamed.so as wasi_nn); doctor's checks know the plugin by its file name."""
    renamed = fake_plugin(tmp_path / "p" / "renamed.so")
    binary = _script_wasmedge(tmp_path / "we" / "bin" / "wasmedge", (
        "print('wasmedge version 0.14.1')\n"
        f"print('{renamed} (plugin \"wasi_nn\") version 0.14.1.0')\n"
    ))  # fmt: skip
    env = environ(WASMEDGE_PLUGIN_PATH=str(renamed))
    version = diagnose(home, runtime="wasmedge", wasmedge=binary, env=env).check(
        "wasmedge.version")  # fmt: skip
    assert version.status == "warn"
    assert f"it loads the wasi_nn plugin from {renamed}, a file not named {PLUGIN_LIB}" in \
        version.summary  # fmt: skip


def test_version_says_wasmedge_aborted(home: Path, tmp_path: Path) -> None:
    """An abort (exit 134 in a shell) is named as such, with what it printed."""
    binary = _script_wasmedge(tmp_path / "we" / "bin" / "wasmedge", (
        "sys.stderr.write(\"terminate called after throwing an instance of "
        "'std::out_of_range'\\n\")\nsys.stderr.flush()\nos.abort()\n"
    ))  # fmt: skip
    version = diagnose(home, runtime="wasmedge", wasmedge=binary).check("wasmedge.version")
    assert version.status == "fail"
    assert version.summary.startswith("`wasmedge --version` printed no version (it aborted: exit "
                                      "134): \"terminate called")  # fmt: skip


# -- wasmedge.plugin_path ---------------------------------------------------------


def test_plugin_path_unset_searches_only_wasmedges_default_dir(home: Path, tmp_path: Path) -> None:
    """Unset, WasmEdge searches <lib>/../plugin only: that is no fault of the path itself;
    the missing plugin is wasmedge.plugin's failure, whose fix names the variable."""
    binary = path_wasmedge(tmp_path / "usr")
    report = diagnose(home, runtime="wasmedge", env=environ((binary.parent,)))
    check = report.check("wasmedge.plugin_path")
    assert check.status == "ok"
    assert check.summary.startswith(
        "WASMEDGE_PLUGIN_PATH is not set: WasmEdge searches only its default directory; "
        f"search: WasmEdge's default {tmp_path / 'usr' / 'lib' / '..' / 'plugin'}"
    )
    plugin = report.check("wasmedge.plugin")
    assert plugin.status == "fail" and plugin.fix and "WASMEDGE_PLUGIN_PATH" in plugin.fix


def test_plugin_path_unset_with_plugin_in_default_dir_passes(home: Path, tmp_path: Path) -> None:
    """A bare wasmedge finds <lib>/../plugin by itself, so nothing to warn about; run
    passes WASMEDGE_PLUGIN_PATH empty, which WasmEdge ignores (seen on 0.17.1)."""
    binary = path_wasmedge(tmp_path / "usr")
    fake_plugin(tmp_path / "usr" / "plugin" / PLUGIN_LIB)
    report = diagnose(home, runtime="wasmedge", env=environ((binary.parent,)))
    assert report.check("wasmedge.plugin_path").status == "ok"
    default_copy = tmp_path / "usr" / "lib" / ".." / "plugin" / PLUGIN_LIB
    assert report.check("wasmedge.plugin").summary.startswith(f"{default_copy} (x86_64)")
    assert report.check("wasmedge.version").status == "ok"  # the stand-in lists the same copy


def test_plugin_path_entry_that_does_not_exist_is_skipped(home: Path, tmp_path: Path) -> None:
    """Genuine WasmEdge ignores an entry that does not exist (doctor used to fail on it)."""
    binary = path_wasmedge(tmp_path / "usr")
    good = tmp_path / "plugins"
    fake_plugin(good / PLUGIN_LIB)
    missing = tmp_path / "gone"
    env = environ((binary.parent,), WASMEDGE_PLUGIN_PATH=f"{missing}:{good}")
    report = diagnose(home, runtime="wasmedge", env=env)
    check = report.check("wasmedge.plugin_path")
    assert check.status == "ok"
    assert f"{missing} (does not exist: skipped)" in check.summary
    assert report.check("wasmedge.plugin").summary.startswith(str(good / PLUGIN_LIB))
    assert report.check("wasmedge.version").status == "ok"
    assert report.runtime == "wasmedge"


def test_plugin_path_pointing_at_existing_dirs_passes(home: Path, tmp_path: Path) -> None:
    binary = path_wasmedge(tmp_path / "usr")
    good = tmp_path / "plugins"
    fake_plugin(good / PLUGIN_LIB)
    env = environ((binary.parent,), WASMEDGE_PLUGIN_PATH=str(good))
    check = diagnose(home, runtime="wasmedge", env=env).check("wasmedge.plugin_path")
    assert check.status == "ok"
    assert str(good) in check.summary


def test_plugin_path_with_a_trailing_colon_warns_that_wasmedge_aborts(
    home: Path, tmp_path: Path
) -> None:
    """Genuine WasmEdge aborts on `/x/plugin:` (std::out_of_range, exit 134), even for
    --version; run passes the value without the colon, so run works and doctor warns."""
    binary = path_wasmedge(tmp_path / "usr")
    good = tmp_path / "plugins"
    fake_plugin(good / PLUGIN_LIB)
    env = environ((binary.parent,), WASMEDGE_PLUGIN_PATH=f"{good}:")
    report = diagnose(home, runtime="wasmedge", env=env)
    check = report.check("wasmedge.plugin_path")
    assert check.status == "warn"
    assert check.summary.startswith(
        f"WASMEDGE_PLUGIN_PATH={good}: ends with ':': WasmEdge aborts on it "
        f"(std::out_of_range, exit 134), even `wasmedge --version`; run passes {good} without "
        "the ':'; search: "
    )
    assert check.fix == f"export WASMEDGE_PLUGIN_PATH={good}"
    assert report.check("wasmedge.version").status == "ok"  # what run starts does not abort
    bare = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert bare.returncode == -signal.SIGABRT and "std::out_of_range" in bare.stderr


def test_relative_plugin_path_entries_are_taken_from_where_doctor_runs(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WasmEdge resolves a relative entry against its own working directory, and run
    starts it elsewhere: run and doctor both use the entry made absolute here."""
    binary = path_wasmedge(tmp_path / "usr")
    fake_plugin(tmp_path / "mine" / PLUGIN_LIB)
    monkeypatch.chdir(tmp_path)
    env = environ((binary.parent,), WASMEDGE_PLUGIN_PATH="mine")
    report = diagnose(home, runtime="wasmedge", env=env)
    assert f"run passes {tmp_path / 'mine'}" in report.check("wasmedge.plugin_path").summary
    assert report.check("wasmedge.plugin").summary.startswith(str(tmp_path / "mine" / PLUGIN_LIB))


def test_installed_runtime_plugin_dir_missing_fails_the_plugin_check(home: Path) -> None:
    prefix = install_runtime(home)
    (prefix / "plugin" / PLUGIN_LIB).unlink()
    (prefix / "plugin").rmdir()
    report = diagnose(home, runtime="wasmedge")
    path = report.check("wasmedge.plugin_path")
    assert path.status == "ok" and "plugin (does not exist: skipped)" in path.summary
    assert report.check("wasmedge.plugin").status == "fail"


def test_default_dir_follows_the_libwasmedge_ld_library_path_picks(
    home: Path, tmp_path: Path
) -> None:
    """WasmEdge's default directory is next to the libwasmedge it runs from
    (getDefaultPluginPaths, dladdr): LD_LIBRARY_PATH can point it at another install."""
    binary = path_wasmedge(tmp_path / "usr")
    fake_plugin(tmp_path / "usr" / "plugin" / PLUGIN_LIB)
    other = tmp_path / "other"
    fake_libwasmedge(other / "lib")
    env = environ((binary.parent,), LD_LIBRARY_PATH=str(other / "lib"))
    report = diagnose(home, runtime="wasmedge", env=env)
    assert f"search: WasmEdge's default {other / 'lib' / '..' / 'plugin'}" in report.check(
        "wasmedge.plugin_path").summary  # fmt: skip
    assert report.check("wasmedge.plugin").status == "fail"  # the copy in usr/plugin is unused
    fake_plugin(other / "plugin" / PLUGIN_LIB)
    report = diagnose(home, runtime="wasmedge", env=env)
    assert report.check("wasmedge.plugin").summary.startswith(
        str(other / "lib" / ".." / "plugin" / PLUGIN_LIB))  # fmt: skip
    assert report.check("wasmedge.version").status == "ok"  # the stand-in agrees


# -- wasmedge.plugin --------------------------------------------------------------


def test_missing_plugin_fails_with_the_nn_preload_symptom(home: Path) -> None:
    install_runtime(home, with_plugin=False)
    check = diagnose(home, runtime="wasmedge").check("wasmedge.plugin")
    assert check.status == "fail"
    assert "unknown option: nn-preload" in check.summary
    assert PLUGIN_LIB in check.summary
    assert check.fix and "WASMEDGE_PLUGIN_PATH" in check.fix


def test_missing_plugin_summary_matches_what_the_runtime_says(home: Path) -> None:
    """The symptom doctor predicts is what the (stand-in) runtime prints, on stdout."""
    prefix = install_runtime(home, with_plugin=False)
    out = subprocess.run(
        [str(prefix / "bin" / "wasmedge"), "--nn-preload", "default:GGML:AUTO:m.gguf", "a.wasm"],
        env=environ(WASMEDGE_PLUGIN_PATH=str(prefix / "plugin")),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 1 and "unknown option: nn-preload" in out.stdout


def test_plugin_file_named_as_an_entry_is_the_plugin(home: Path, tmp_path: Path) -> None:
    """Genuine WasmEdge loads an entry that is a .so file itself (doctor said missing)."""
    binary = path_wasmedge(tmp_path / "usr")
    plugin = fake_plugin(tmp_path / "p" / PLUGIN_LIB)
    env = environ((binary.parent,), WASMEDGE_PLUGIN_PATH=str(plugin))
    report = diagnose(home, runtime="wasmedge", env=env)
    assert report.check("wasmedge.plugin").status == "ok"
    assert report.check("wasmedge.plugin").summary == f"{plugin} (x86_64)"
    assert f"{plugin} (a .so file: loaded itself)" in report.check(
        "wasmedge.plugin_path").summary  # fmt: skip
    assert report.check("wasmedge.version").status == "ok"  # the stand-in lists that file


def test_broken_first_copy_is_passed_over_for_the_next(home: Path, tmp_path: Path) -> None:
    """A 0-byte first copy: genuine WasmEdge logs `load library failed` and loads the next
    copy (doctor said the broken one wins)."""
    binary = path_wasmedge(tmp_path / "usr")
    (tmp_path / "a").mkdir()
    broken = tmp_path / "a" / PLUGIN_LIB
    broken.write_bytes(b"")
    good = fake_plugin(tmp_path / "b" / PLUGIN_LIB)
    env = environ((binary.parent,), WASMEDGE_PLUGIN_PATH=f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    report = diagnose(home, runtime="wasmedge", env=env)
    plugin = report.check("wasmedge.plugin")
    assert plugin.status == "ok"
    assert plugin.summary.startswith(f"{good} (x86_64); WasmEdge first passes over 1 other copy")
    duplicates = report.check("wasmedge.plugin_duplicates")
    assert duplicates.status == "warn"
    assert duplicates.summary == (
        f"2 copies of {PLUGIN_LIB}: WasmEdge loads {good}; it fails to load {broken} (0 bytes) "
        'and logs "load library failed" for it at every start'
    )
    assert duplicates.fix == f"remove {broken}"
    assert report.check("wasmedge.version").status == "ok"  # the stand-in lists the good copy
    assert report.runtime == "wasmedge"


def test_plugin_for_another_machine_first_is_passed_over(home: Path, tmp_path: Path) -> None:
    binary = path_wasmedge(tmp_path / "usr")
    arm = fake_plugin(tmp_path / "a" / PLUGIN_LIB, machine=AARCH64)
    good = fake_plugin(tmp_path / "b" / PLUGIN_LIB)
    env = environ((binary.parent,), WASMEDGE_PLUGIN_PATH=f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    report = diagnose(home, runtime="wasmedge", env=env, host_info=host("x86_64"))
    assert report.check("wasmedge.plugin").summary.startswith(f"{good} (x86_64)")
    assert f"{arm} (built for aarch64, this host is x86_64)" in report.check(
        "wasmedge.plugin_duplicates").summary  # fmt: skip
    assert report.check("wasmedge.version").status == "ok"


def test_plugin_for_another_architecture_fails_naming_both(home: Path) -> None:
    install_runtime(home, machine=AARCH64)
    check = diagnose(home, runtime="wasmedge", host_info=host("x86_64")).check("wasmedge.plugin")
    assert check.status == "fail"
    assert "aarch64" in check.summary and "x86_64" in check.summary


def test_plugin_for_this_architecture_passes(home: Path) -> None:
    install_runtime(home, machine=AARCH64, host_machine=AARCH64)
    check = diagnose(home, runtime="wasmedge", host_info=host("aarch64", "fp asimd")).check(
        "wasmedge.plugin"
    )
    assert check.status == "ok"
    assert "aarch64" in check.summary


def test_non_elf_plugin_skips_the_arch_part_on_macos(home: Path) -> None:
    prefix = install_runtime(home)
    # A 64-bit Mach-O header (magic 0xfeedfacf, little endian, arm64 cputype); on macOS
    # WasmEdge loads .dylib files.
    macho = bytes.fromhex("cffaedfe0c000001") + bytes(56)
    (prefix / "plugin" / "libwasmedgePluginWasiNN.dylib").write_bytes(macho)
    on_mac = diagnose(home, runtime="wasmedge", host_info=host("arm64", "", "darwin"))
    assert on_mac.check("wasmedge.plugin").status == "ok"
    assert "not checked" in on_mac.check("wasmedge.plugin").summary
    (prefix / "plugin" / PLUGIN_LIB).write_bytes(macho)
    on_linux = diagnose(home, runtime="wasmedge", host_info=host("x86_64"))
    assert on_linux.check("wasmedge.plugin").status == "fail"
    assert "is not an ELF shared library" in on_linux.check("wasmedge.plugin").summary


# -- wasmedge.plugin_duplicates ---------------------------------------------------


def test_two_copies_fail_and_name_the_one_wasmedge_loads(home: Path, tmp_path: Path) -> None:
    binary = path_wasmedge(tmp_path / "usr")
    first = fake_plugin(tmp_path / "a" / PLUGIN_LIB)
    second = fake_plugin(tmp_path / "b" / "nested" / PLUGIN_LIB)
    env = environ((binary.parent,), WASMEDGE_PLUGIN_PATH=f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    check = diagnose(home, runtime="wasmedge", env=env).check("wasmedge.plugin_duplicates")
    assert check.status == "fail"
    assert check.summary == (
        f"2 copies of {PLUGIN_LIB}: WasmEdge loads {first} and silently drops {second}"
    )
    assert check.fix and str(second) in check.fix and "reorder WASMEDGE_PLUGIN_PATH" in check.fix
    # The (stand-in) runtime lists the same winner.
    out = subprocess.run(
        [str(binary), "--version"], env=env, capture_output=True, text=True, check=True
    )
    info = parse_version_output(out.stdout)
    assert info is not None and (nn := info.plugin("wasi_nn")) is not None and nn.path == first


def test_copy_in_wasmedges_default_dir_counts_as_a_duplicate(home: Path, tmp_path: Path) -> None:
    """WasmEdge scans its own plugin dir after WASMEDGE_PLUGIN_PATH: a copy there is dropped.
    It is named as WasmEdge names it: <lib>/../plugin/…"""
    binary = path_wasmedge(tmp_path / "usr")
    fake_plugin(tmp_path / "usr" / "plugin" / PLUGIN_LIB)
    default_copy = tmp_path / "usr" / "lib" / ".." / "plugin" / PLUGIN_LIB
    chosen = fake_plugin(tmp_path / "mine" / PLUGIN_LIB)
    env = environ((binary.parent,), WASMEDGE_PLUGIN_PATH=str(tmp_path / "mine"))
    check = diagnose(home, runtime="wasmedge", env=env).check("wasmedge.plugin_duplicates")
    assert check.status == "fail"
    assert f"loads {chosen} and silently drops {default_copy}" in check.summary


def test_one_copy_passes(home: Path) -> None:
    install_runtime(home)
    check = diagnose(home, runtime="wasmedge").check("wasmedge.plugin_duplicates")
    assert check.status == "ok"


def test_symlinked_copy_is_the_same_plugin(home: Path, tmp_path: Path) -> None:
    binary = path_wasmedge(tmp_path / "usr")
    real = fake_plugin(tmp_path / "a" / PLUGIN_LIB, machine=X86_64)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / PLUGIN_LIB).symlink_to(real)
    env = environ((binary.parent,), WASMEDGE_PLUGIN_PATH=f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    check = diagnose(home, runtime="wasmedge", env=env).check("wasmedge.plugin_duplicates")
    assert check.status == "ok"
