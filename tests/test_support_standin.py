"""The stand-in wasmedge behaves like the genuine one (it is a test double).

Each behaviour here was seen on a genuine WasmEdge 0.17.1 build with the wasi_nn
plugin 0.1.34 (docs/wasmedge-facts.md); the doctor tests rely on the double keeping it.
"""

import signal
import subprocess
from pathlib import Path

from edgebundle.runtime.wasmedge import parse_version_output
from tests.support.standin_wasmedge import (
    fake_libwasmedge,
    fake_plugin,
    standin_env,
    write_standin,
)

PLUGIN = "libwasmedgePluginWasiNN.so"


def _version(binary: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``--version`` with only PATH and ``env`` set (no inherited plugin or library path)."""
    return subprocess.run([str(binary), "--version"], env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def _loaded(out: subprocess.CompletedProcess[str]) -> Path | None:
    info = parse_version_output(out.stdout)
    assert info is not None, out
    nn = info.plugin("wasi_nn")
    return None if nn is None else nn.path


def test_standin_lists_only_first_plugin(tmp_path: Path) -> None:
    binary = write_standin(tmp_path / "bin" / "wasmedge", version="0.14.1")
    first = fake_plugin(tmp_path / "a" / PLUGIN)
    fake_plugin(tmp_path / "b" / PLUGIN)
    out = _version(binary, WASMEDGE_PLUGIN_PATH=f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    info = parse_version_output(out.stdout)
    assert info is not None and info.version == "0.14.1"
    assert _loaded(out) == first


def test_standin_rejects_nn_preload_without_plugin_on_stdout(tmp_path: Path) -> None:
    binary = write_standin(tmp_path / "wasmedge")
    env = standin_env(WASMEDGE_PLUGIN_PATH=str(tmp_path / "none"))
    out = subprocess.run([str(binary), "--nn-preload", "default:GGML:AUTO:m.gguf", "a.wasm"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stdout == "unknown option: nn-preload\n"


def test_standin_aborts_on_a_trailing_colon_even_for_version(tmp_path: Path) -> None:
    binary = write_standin(tmp_path / "bin" / "wasmedge")
    fake_plugin(tmp_path / "p" / PLUGIN)
    for value in (f"{tmp_path / 'p'}:", ":", f"{tmp_path / 'p'}::"):
        out = _version(binary, WASMEDGE_PLUGIN_PATH=value)
        assert out.returncode == -signal.SIGABRT, value  # exit 134 in a shell
        assert out.stdout == ""
        assert "std::out_of_range" in out.stderr
    # A leading colon or a run of colons inside is one separator: no harm.
    for value in (f":{tmp_path / 'p'}", f"{tmp_path / 'gone'}::{tmp_path / 'p'}"):
        assert _loaded(_version(binary, WASMEDGE_PLUGIN_PATH=value)) == tmp_path / "p" / PLUGIN


def test_standin_skips_an_entry_that_does_not_exist(tmp_path: Path) -> None:
    binary = write_standin(tmp_path / "bin" / "wasmedge")
    plugin = fake_plugin(tmp_path / "p" / PLUGIN)
    out = _version(binary, WASMEDGE_PLUGIN_PATH=f"{tmp_path / 'gone'}:{tmp_path / 'p'}")
    assert out.returncode == 0 and _loaded(out) == plugin
    assert "[error]" not in out.stdout


def test_standin_loads_a_plugin_file_named_as_an_entry(tmp_path: Path) -> None:
    binary = write_standin(tmp_path / "bin" / "wasmedge")
    plugin = fake_plugin(tmp_path / "p" / PLUGIN)
    assert _loaded(_version(binary, WASMEDGE_PLUGIN_PATH=str(plugin))) == plugin


def test_standin_logs_a_broken_first_copy_and_loads_the_next(tmp_path: Path) -> None:
    binary = write_standin(tmp_path / "bin" / "wasmedge")
    (tmp_path / "broken").mkdir()
    empty = tmp_path / "broken" / PLUGIN
    empty.write_bytes(b"")
    good = fake_plugin(tmp_path / "good" / PLUGIN)
    out = _version(binary, WASMEDGE_PLUGIN_PATH=f"{tmp_path / 'broken'}:{tmp_path / 'good'}")
    assert out.returncode == 0 and _loaded(out) == good
    errors = [line for line in out.stdout.splitlines() if "[error]" in line]
    assert len(errors) == 4  # two lines per attempt, and the genuine CLI tries twice
    assert errors[1].endswith(f"[error]     load library failed:{empty}: file too short")


def test_standin_skips_a_plugin_for_another_machine(tmp_path: Path) -> None:
    binary = write_standin(tmp_path / "bin" / "wasmedge")
    arm = fake_plugin(tmp_path / "arm" / PLUGIN, machine=0xB7)
    good = fake_plugin(tmp_path / "good" / PLUGIN)
    out = _version(binary, WASMEDGE_PLUGIN_PATH=f"{tmp_path / 'arm'}:{tmp_path / 'good'}")
    assert _loaded(out) == good
    assert f"load library failed:{arm}: cannot open shared object file" in out.stdout


def test_standin_searches_next_to_its_library_after_the_plugin_path(tmp_path: Path) -> None:
    """``<lib>/../plugin``, lib found by LD_LIBRARY_PATH first, else $ORIGIN/../lib."""
    prefix = tmp_path / "we"
    binary = write_standin(prefix / "bin" / "wasmedge")
    fake_libwasmedge(prefix / "lib")
    fake_plugin(prefix / "plugin" / PLUGIN)
    assert _loaded(_version(binary)) == prefix / "lib" / ".." / "plugin" / PLUGIN
    other = tmp_path / "other"
    fake_libwasmedge(other / "lib")
    fake_plugin(other / "plugin" / PLUGIN)
    out = _version(binary, LD_LIBRARY_PATH=str(other / "lib"))
    assert _loaded(out) == other / "lib" / ".." / "plugin" / PLUGIN
