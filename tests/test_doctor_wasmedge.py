"""wasmedge.* checks on fabricated devices.

The ``wasmedge`` binary is the stand-in of tests/support/standin_wasmedge.py (a test
double at the process boundary: WasmEdge cannot be installed here). It prints
``--version`` in the format of genuine builds and, like WasmEdge, lists only the first
WASI-NN plugin along WASMEDGE_PLUGIN_PATH. Plugins are files with real ELF headers.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from edgebundle.doctor.wasmedge_checks import plugin_version_matches
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
from tests.support.standin_wasmedge import fake_plugin

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
    version = diagnose(home, runtime="wasmedge", wasmedge=binary, env=env).check("wasmedge.version")
    assert version.status == "fail"
    assert (
        "did not load" in version.summary and str(prefix / "plugin" / PLUGIN_LIB) in version.summary
    )


# -- wasmedge.plugin_path ---------------------------------------------------------


def test_plugin_path_unset_without_plugin_in_default_dir_fails(home: Path, tmp_path: Path) -> None:
    binary = path_wasmedge(tmp_path / "usr")
    report = diagnose(home, runtime="wasmedge", env=environ((binary.parent,)))
    check = report.check("wasmedge.plugin_path")
    assert check.status == "fail"
    assert "WASMEDGE_PLUGIN_PATH is not set" in check.summary
    assert check.fix and "export WASMEDGE_PLUGIN_PATH=" in check.fix
    assert str(home / "env") in check.fix


def test_plugin_path_unset_with_plugin_in_default_dir_warns(home: Path, tmp_path: Path) -> None:
    binary = path_wasmedge(tmp_path / "usr")
    fake_plugin(tmp_path / "usr" / "plugin" / PLUGIN_LIB)
    report = diagnose(home, runtime="wasmedge", env=environ((binary.parent,)))
    check = report.check("wasmedge.plugin_path")
    assert check.status == "warn"
    assert "run will set it" in check.summary
    assert report.check("wasmedge.plugin").status == "ok"


def test_plugin_path_pointing_at_a_missing_dir_fails_naming_it(home: Path, tmp_path: Path) -> None:
    binary = path_wasmedge(tmp_path / "usr")
    good = tmp_path / "plugins"
    fake_plugin(good / PLUGIN_LIB)
    missing = tmp_path / "gone"
    env = environ((binary.parent,), WASMEDGE_PLUGIN_PATH=f"{good}:{missing}")
    check = diagnose(home, runtime="wasmedge", env=env).check("wasmedge.plugin_path")
    assert check.status == "fail"
    assert f"{missing} does not exist" in check.summary


def test_plugin_path_pointing_at_existing_dirs_passes(home: Path, tmp_path: Path) -> None:
    binary = path_wasmedge(tmp_path / "usr")
    good = tmp_path / "plugins"
    fake_plugin(good / PLUGIN_LIB)
    env = environ((binary.parent,), WASMEDGE_PLUGIN_PATH=str(good))
    check = diagnose(home, runtime="wasmedge", env=env).check("wasmedge.plugin_path")
    assert check.status == "ok"
    assert str(good) in check.summary


def test_installed_runtime_plugin_dir_missing_fails(home: Path) -> None:
    prefix = install_runtime(home)
    (prefix / "plugin" / PLUGIN_LIB).unlink()
    (prefix / "plugin").rmdir()
    check = diagnose(home, runtime="wasmedge").check("wasmedge.plugin_path")
    assert check.status == "fail"
    assert "does not exist" in check.summary


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


def test_plugin_for_another_architecture_fails_naming_both(home: Path) -> None:
    install_runtime(home, machine=AARCH64)
    check = diagnose(home, runtime="wasmedge", host_info=host("x86_64")).check("wasmedge.plugin")
    assert check.status == "fail"
    assert "aarch64" in check.summary and "x86_64" in check.summary


def test_plugin_for_this_architecture_passes(home: Path) -> None:
    install_runtime(home, machine=AARCH64)
    check = diagnose(home, runtime="wasmedge", host_info=host("aarch64", "fp asimd")).check(
        "wasmedge.plugin"
    )
    assert check.status == "ok"
    assert "aarch64" in check.summary


def test_non_elf_plugin_skips_the_arch_part_on_macos(home: Path) -> None:
    prefix = install_runtime(home)
    # A 64-bit Mach-O header (magic 0xfeedfacf, little endian, arm64 cputype).
    (prefix / "plugin" / PLUGIN_LIB).write_bytes(bytes.fromhex("cffaedfe0c000001") + bytes(56))
    on_mac = diagnose(home, runtime="wasmedge", host_info=host("arm64", "", "darwin"))
    assert on_mac.check("wasmedge.plugin").status == "ok"
    assert "not checked" in on_mac.check("wasmedge.plugin").summary
    on_linux = diagnose(home, runtime="wasmedge", host_info=host("x86_64"))
    assert on_linux.check("wasmedge.plugin").status == "fail"


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
    """WasmEdge scans its own plugin dir after WASMEDGE_PLUGIN_PATH: a copy there is dropped."""
    binary = path_wasmedge(tmp_path / "usr")
    default_copy = fake_plugin(tmp_path / "usr" / "plugin" / PLUGIN_LIB)
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
