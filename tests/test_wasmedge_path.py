"""The wasmedge code path: the same guest and argv tail, started as ``wasmedge …``.

WasmEdge cannot be installed on these machines, so the ``wasmedge`` here is a
stand-in at the process boundary, and only there: ``--version`` is answered by the
stand-in of tests/support/standin_wasmedge.py (a recorded genuine output format,
listing the first WASI-NN plugin on WASMEDGE_PLUGIN_PATH), and every other command
line is handed unchanged to ``python -m edgebundle exec``, which takes wasmedge's
flags. The plugin is a fake ELF header (doctor reads only the header). Everything
behind the stand-in is real: the committed guest, the embedded runtime, llama.cpp.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from edgebundle.config import load_settings
from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.serving import launch_spec
from tests.support.serving import RunProcess
from tests.support.standin_wasmedge import install_delegating_runtime

REPLY = "Greetings through the wasmedge command line."

@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_scripted_model(tmp_path / "greeter.gguf", ScriptedModelSpec(reply=REPLY))


def test_both_runtimes_start_the_same_argv_tail(home: Path, model: Path) -> None:
    binary = install_delegating_runtime(home)
    flags = {"model": str(model)}
    on_wasmedge = launch_spec(load_settings({**flags, "runtime": "wasmedge"}), environ={})
    embedded = launch_spec(load_settings({**flags, "runtime": "embedded"}), environ={})
    assert on_wasmedge.argv[0] == str(binary)
    assert embedded.argv[:4] == (sys.executable, "-m", "edgebundle", "exec")
    # the same but for the protocol frame, which is random per launch
    assert on_wasmedge.argv[1:] == tuple(
        f"EDGECHAT_FRAME={on_wasmedge.frame}" if arg == f"EDGECHAT_FRAME={embedded.frame}"
        else arg for arg in embedded.argv[4:])
    assert on_wasmedge.frame != embedded.frame
    assert on_wasmedge.env["WASMEDGE_PLUGIN_PATH"] == str(home / "runtime" / "current" / "plugin")


def test_auto_uses_wasmedge_when_doctor_passes_else_embedded(home: Path, model: Path) -> None:
    install_delegating_runtime(home)
    settings = load_settings({"model": str(model)})
    spec = launch_spec(settings, environ={"PATH": "/usr/bin:/bin"})
    assert (spec.runtime, spec.reason) == ("wasmedge", "auto: doctor's wasmedge checks pass")

    (home / "runtime" / "current" / "plugin" / "libwasmedgePluginWasiNN.so").unlink()
    spec = launch_spec(settings, environ={"PATH": "/usr/bin:/bin"})
    assert spec.runtime == "embedded"
    assert spec.reason.startswith("auto: wasmedge fails doctor's ") and "wasmedge.plugin" in \
        spec.reason


def test_run_serves_through_wasmedge(tmp_path: Path, model: Path) -> None:
    home = tmp_path / "home"
    binary = install_delegating_runtime(home)
    record = tmp_path / "record.jsonl"
    run = RunProcess(["--runtime", "wasmedge", "--model", str(model)], home=home,
                     env={"STANDIN_RECORD": str(record)})
    try:
        line = run.read_line()
        assert line.endswith(" (runtime wasmedge: chosen with --runtime)\n")
        run.wait_healthy()
        assert run.healthz().json()["runtime"] == "wasmedge"
        reply = httpx.post(f"{run.base_url}/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert reply.json()["choices"][0]["message"]["content"] == REPLY
        [started] = [json.loads(x) for x in record.read_text().splitlines()]
        assert started["argv"][0] == str(binary)
        assert started["argv"][1] == "--env"
        assert re.fullmatch(r"EDGECHAT_FRAME=[0-9a-f]{16}", started["argv"][2])
        assert started["argv"][3:5] == ["--nn-preload", f"default:GGML:AUTO:{model}"]
        assert run.stop() == 0, run.stderr()
    finally:
        run.close()


def test_ask_with_auto_picks_wasmedge_and_says_why(tmp_path: Path, model: Path) -> None:
    home = tmp_path / "home"
    install_delegating_runtime(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEBUNDLE_", "WASMEDGE_"))}
    env.update(EDGEBUNDLE_HOME=str(home), PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin")
    out = subprocess.run(
        [sys.executable, "-m", "edgebundle", "ask", "--model", str(model), "hello"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == REPLY + "\n"
    assert out.stderr == "edgebundle: runtime wasmedge (auto: doctor's wasmedge checks pass)\n"
    assert re.search(r"runtime/current/bin/wasmedge --env EDGECHAT_FRAME=[0-9a-f]{16} "
                     r"--nn-preload", (home / "logs" / "ask.log").read_text())
