"""Doctor's verdict names the runtime ``run`` starts, decided by run's own function.

``run --runtime auto`` uses wasmedge only when doctor's wasmedge checks pass
(edgebundle/runtime/launch.py ``choose_runtime``); doctor's report takes its runtime
and reason from that same function, so the two cannot disagree. The ``wasmedge`` here
is the stand-in of tests/support/standin_wasmedge.py (a test double at the process
boundary); the model is a real (tiny) GGUF file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgebundle import resources
from edgebundle.cli.doctor import verdict
from edgebundle.config import Settings
from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.doctor import Report
from edgebundle.errors import RuntimeNotFoundError, UsageError
from edgebundle.host import detect
from edgebundle.pins import load_runtime_lock
from edgebundle.serving import launch_spec
from tests.support.doctor_env import (
    PLUGIN_LIB,
    environ,
    install_runtime,
    path_wasmedge,
    write_app_pins,
    write_meminfo,
)
from tests.support.standin_wasmedge import fake_plugin


def _doctor(settings: Settings, env: dict[str, str]) -> Report:
    """Doctor as the CLI runs it: this machine, the shipped pins (as run decides by them)."""
    from edgebundle.doctor import run_doctor

    pins = settings.home.parent / "pins"
    return run_doctor(settings, host=detect(), environ=env, online=False,
                      lock=load_runtime_lock(resources.runtime_lock_file()),
                      app_pins=write_app_pins(pins),
                      meminfo=write_meminfo(pins, 8 << 20, 6 << 20))  # fmt: skip


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A model that passes doctor's model checks (llama-3-chat, its end-of-turn token)."""
    return write_scripted_model(tmp_path / "models" / "m.gguf", ScriptedModelSpec(reply="Hi."))


def test_auto_with_a_failing_wasmedge_is_embedded_in_both(
    home: Path, tmp_path: Path, model: Path
) -> None:
    """A wasmedge on PATH without its plugin: run falls back to the embedded runtime, and
    doctor says so (it used to say run would use wasmedge)."""
    binary = path_wasmedge(tmp_path / "opt")
    env = environ((binary.parent,))
    settings = Settings(home=home, model=model)
    report = _doctor(settings, env)
    spec = launch_spec(settings, environ=env)
    why = "auto: wasmedge fails doctor's wasmedge.plugin check(s)"
    assert (report.runtime, report.reason) == (spec.runtime, spec.reason) == ("embedded", why)
    assert report.to_json()["runtime_reason"] == why
    assert verdict(report).startswith("doctor: NOT READY for WasmEdge (")
    assert verdict(report).endswith(f"); run will use the embedded runtime ({why})")


def test_auto_with_a_passing_wasmedge_is_wasmedge_in_both(
    home: Path, tmp_path: Path, model: Path
) -> None:
    lock = load_runtime_lock(resources.runtime_lock_file())
    install_runtime(home, version=lock.wasmedge_version, variant=None)
    env = environ()
    settings = Settings(home=home, model=model)
    report = _doctor(settings, env)
    spec = launch_spec(settings, environ=env)
    why = "auto: doctor's wasmedge checks pass"
    assert (report.runtime, report.reason) == (spec.runtime, spec.reason) == ("wasmedge", why)


def test_a_plugin_path_entry_that_does_not_exist_no_longer_sends_run_to_embedded(
    home: Path, tmp_path: Path, model: Path
) -> None:
    binary = path_wasmedge(tmp_path / "opt")
    fake_plugin(tmp_path / "opt" / "plugin" / PLUGIN_LIB)
    env = environ((binary.parent,), WASMEDGE_PLUGIN_PATH=str(tmp_path / "gone"))
    settings = Settings(home=home, model=model)
    assert _doctor(settings, env).runtime == launch_spec(settings, environ=env).runtime \
        == "wasmedge"  # fmt: skip


def test_an_app_only_wasmedge_runs_without_wasmedge_is_a_refusal(
    home: Path, tmp_path: Path, model: Path
) -> None:
    """llama-api-server under auto with no wasmedge: run refuses; doctor used to say it
    would use the embedded runtime."""
    app = tmp_path / "llama-api-server.wasm"
    app.write_bytes(b"\0asm\x01\0\0\0")
    env = environ()
    settings = Settings(home=home, model=model, app=app, template="chatml")
    report = _doctor(settings, env)
    with pytest.raises(RuntimeNotFoundError) as refused:
        launch_spec(settings, environ=env)
    assert report.refusal == str(refused.value) and not report.ok
    binary = report.check("wasmedge.binary")
    assert binary.status == "fail" and "llama-api-server runs only on WasmEdge" in binary.summary
    assert verdict(report).endswith(f"; run would not start: {refused.value}")


def test_an_app_only_wasmedge_runs_on_the_embedded_runtime_is_a_refusal(
    home: Path, tmp_path: Path, model: Path
) -> None:
    app = tmp_path / "llama-api-server.wasm"
    app.write_bytes(b"\0asm\x01\0\0\0")
    settings = Settings(home=home, model=model, app=app, template="chatml", runtime="embedded")
    report = _doctor(settings, environ())
    with pytest.raises(UsageError) as refused:
        launch_spec(settings, environ=environ())
    assert report.refusal == str(refused.value)
    assert report.check("runtime.embedded").status == "fail"
