"""The stand-in wasmedge behaves like the recorded real one (it is a test double)."""

import subprocess
from pathlib import Path

from edgebundle.runtime.wasmedge import parse_version_output
from tests.support.standin_wasmedge import fake_plugin, standin_env, write_standin


def test_standin_lists_only_first_plugin(tmp_path: Path) -> None:
    binary = write_standin(tmp_path / "bin" / "wasmedge", version="0.14.1")
    first = fake_plugin(tmp_path / "a" / "libwasmedgePluginWasiNN.so")
    fake_plugin(tmp_path / "b" / "libwasmedgePluginWasiNN.so")
    env = standin_env(WASMEDGE_PLUGIN_PATH=f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    out = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True,
                         check=True)
    info = parse_version_output(out.stdout)
    assert info is not None and info.version == "0.14.1"
    nn = info.plugin("wasi_nn")
    assert nn is not None and nn.path == first


def test_standin_rejects_nn_preload_without_plugin(tmp_path: Path) -> None:
    binary = write_standin(tmp_path / "wasmedge")
    env = standin_env(WASMEDGE_PLUGIN_PATH=str(tmp_path / "none"))
    out = subprocess.run([str(binary), "--nn-preload", "default:GGML:AUTO:m.gguf", "a.wasm"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 1
    assert "unknown option: nn-preload" in out.stderr
