"""The supervisor starts, probes, restarts and stops a real child process.

WasmEdge cannot be installed on these machines: the child is the stand-in `wasmedge`
script of tests/support/standin_wasmedge.py, a test double at the process boundary. It
records how it was started (STANDIN_RECORD), exits on demand (STANDIN_EXIT), signals
readiness by a file (STANDIN_READY_FILE) or by listening like llama-api-server
(STANDIN_LISTEN), and can ignore SIGTERM (STANDIN_IGNORE_TERM).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgebundle import apps
from edgebundle.config import load_settings
from edgebundle.errors import SupervisorError
from edgebundle.runtime.launch import LaunchSpec
from edgebundle.runtime.supervisor import Backoff, RestartLimit, Supervisor
from edgebundle.serving import launch_spec
from tests.support.processes import free_port, gone
from tests.support.standin_wasmedge import fake_plugin, write_standin

FAST = Backoff(initial=0.05, factor=2.0, maximum=1.0)


def install_runtime(home: Path) -> None:
    prefix = home / "runtime" / "wasmedge-0.14.1-cpu"
    write_standin(prefix / "bin" / "wasmedge")
    fake_plugin(prefix / "plugin" / "libwasmedgePluginWasiNN.so")
    (home / "runtime" / "current").symlink_to(prefix.name)


@pytest.fixture
def spec(home: Path, tmp_path: Path) -> LaunchSpec:
    """The launcher's spec for llama-api-server, run by the stand-in wasmedge."""
    install_runtime(home)
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF")
    app = tmp_path / "llama-api-server.wasm"
    app.write_bytes(b"\0asm")
    settings = load_settings(
        {"model": str(model), "app": str(app), "template": "chatml", "port": free_port()}
    )
    return launch_spec(settings)


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "record.jsonl"
    monkeypatch.setenv("STANDIN_RECORD", str(path))
    return path


@pytest.fixture
def supervisors() -> Iterator[list[Supervisor]]:
    """Every supervisor a test makes is stopped afterwards, even when the test fails."""
    made: list[Supervisor] = []
    yield made
    for sup in made:
        sup.stop()


def starts(record: Path) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


def wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_starts_exactly_the_spec_and_logs_to_the_file(
    spec: LaunchSpec, record: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    supervisors: list[Supervisor],
) -> None:  # fmt: skip
    """Stand-in wasmedge (test double): its record shows the argv/env/cwd it was given."""
    ready_file = tmp_path / "ready"
    monkeypatch.setenv("STANDIN_READY_FILE", str(ready_file))
    log = tmp_path / "logs" / "app.log"
    sup = Supervisor(spec, log_path=log, ready=ready_file.exists)
    supervisors.append(sup)
    sup.start()
    assert sup.wait_ready(5.0)

    [started] = starts(record)
    assert started["argv"] == list(spec.argv)
    assert started["cwd"] == str(spec.cwd)
    assert {k: started["env"][k] for k in spec.env} == dict(spec.env)
    assert started["pid"] == sup.pid
    # Own session: a Ctrl-C on our terminal does not reach the child directly.
    assert os.getsid(started["pid"]) == started["pid"]
    wait_for(lambda: "standin wasmedge running" in log.read_text())
    started_line = f"edgebundle: started pid {sup.pid}: {spec.argv[0]} --dir .:. --nn-preload"
    assert started_line in log.read_text()


def test_tcp_readiness_probe_waits_for_the_listener(
    spec: LaunchSpec, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    supervisors: list[Supervisor],
) -> None:  # fmt: skip
    """Stand-in wasmedge (test double) listens on --socket-addr like llama-api-server."""
    host, port = spec.argv[-1].rsplit(":", 1)
    probe = apps.readiness_probe(spec.kind, host, int(port))
    assert probe is not None and probe() is False  # nothing listens yet
    monkeypatch.setenv("STANDIN_LISTEN", "1")
    sup = Supervisor(spec, log_path=tmp_path / "app.log", ready=probe)
    supervisors.append(sup)
    sup.start()
    assert sup.wait_ready(5.0)
    assert apps.tcp_accepts(host, int(port))


def test_restarts_with_growing_backoff_then_gives_up(
    spec: LaunchSpec, record: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    supervisors: list[Supervisor],
) -> None:  # fmt: skip
    """Stand-in wasmedge (test double) that exits with code 3 every time it starts."""
    monkeypatch.setenv("STANDIN_EXIT", "3")
    log = tmp_path / "app.log"
    sup = Supervisor(
        spec, log_path=log, backoff=FAST, stable_after=60.0,
        restart_limit=RestartLimit(restarts=3, window=60.0),
    )  # fmt: skip
    supervisors.append(sup)
    sup.start()
    with pytest.raises(SupervisorError) as caught:
        sup.run_until(threading.Event())

    assert "exited with code 3 again after 3 restarts within 60 s; gave up" in str(caught.value)
    assert str(log) in str(caught.value)
    assert sup.delays == [0.05, 0.1, 0.2]
    assert sup.restarts == 3
    records = starts(record)
    assert len(records) == 4 and len({r["pid"] for r in records}) == 4
    text = log.read_text()
    for delay in ("0.05", "0.1", "0.2"):
        assert f"exited with code 3, restarting in {delay} s" in text


def test_backoff_resets_once_the_child_was_stable(
    spec: LaunchSpec, record: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    supervisors: list[Supervisor],
) -> None:  # fmt: skip
    """Stand-in wasmedge (test double) exiting at once; stable_after=0 counts every run healthy."""
    monkeypatch.setenv("STANDIN_EXIT", "3")
    sup = Supervisor(
        spec, log_path=tmp_path / "app.log", backoff=FAST, stable_after=0.0,
        restart_limit=RestartLimit(restarts=3, window=60.0),
    )  # fmt: skip
    supervisors.append(sup)
    sup.start()
    with pytest.raises(SupervisorError):
        sup.run_until(threading.Event())
    assert sup.delays == [0.05, 0.05, 0.05]


def test_exit_before_ready_fails_with_the_log_tail(
    spec: LaunchSpec, record: Path, tmp_path: Path, supervisors: list[Supervisor]
) -> None:
    """Stand-in wasmedge (test double) without a plugin: `unknown option: nn-preload`, exit 1."""
    bare = LaunchSpec(
        runtime=spec.runtime, argv=spec.argv, env={"WASMEDGE_PLUGIN_PATH": str(tmp_path / "none")},
        cwd=spec.cwd, kind=spec.kind,
    )  # fmt: skip
    sup = Supervisor(bare, log_path=tmp_path / "app.log", ready=lambda: False, backoff=FAST)
    supervisors.append(sup)
    sup.start()
    with pytest.raises(SupervisorError, match=r"exited with code 1 before it was ready") as caught:
        sup.wait_ready(5.0)
    assert "unknown option: nn-preload" in str(caught.value)
    assert starts(record) == []  # it failed before it got to run the app


def test_a_child_that_was_ready_then_crashed_is_not_a_startup_failure(
    spec: LaunchSpec, record: Path, tmp_path: Path, supervisors: list[Supervisor]
) -> None:
    """Stand-in wasmedge (test double) that said it was ready, then died before
    wait_ready looked: the supervisor restarts it, and wait_ready reports ready."""
    bare = LaunchSpec(
        runtime=spec.runtime, argv=spec.argv, env={"WASMEDGE_PLUGIN_PATH": str(tmp_path / "none")},
        cwd=spec.cwd, kind=spec.kind,
    )  # fmt: skip
    sup = Supervisor(bare, log_path=tmp_path / "app.log", ready=lambda: False, backoff=FAST)
    supervisors.append(sup)
    sup.start()
    sup.mark_ready()  # as the engine does when the guest's READY line arrives
    wait_for(lambda: sup.last_exit_code is not None)
    assert sup.wait_ready(5.0) is True


def test_not_ready_in_time_is_an_error(
    spec: LaunchSpec, record: Path, tmp_path: Path, supervisors: list[Supervisor]
) -> None:
    """Stand-in wasmedge (test double) that runs but never becomes ready."""
    sup = Supervisor(spec, log_path=tmp_path / "app.log", ready=lambda: False)
    supervisors.append(sup)
    sup.start()
    with pytest.raises(SupervisorError, match=r"was not ready after 0.3 s"):
        sup.wait_ready(0.3)


def test_wait_ready_returns_false_when_cancelled(
    spec: LaunchSpec, record: Path, tmp_path: Path, supervisors: list[Supervisor]
) -> None:
    """Stand-in wasmedge (test double); a stop request ends the wait without an error."""
    sup = Supervisor(spec, log_path=tmp_path / "app.log", ready=lambda: False)
    supervisors.append(sup)
    sup.start()
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    assert sup.wait_ready(10.0, cancel=cancel) is False


def test_no_probe_means_ready_after_settling(
    spec: LaunchSpec, record: Path, tmp_path: Path, supervisors: list[Supervisor]
) -> None:
    """Stand-in wasmedge (test double) standing in for llama-chat, which has nothing to probe."""
    sup = Supervisor(spec, log_path=tmp_path / "app.log", ready=None, settle=0.3)
    supervisors.append(sup)
    began = time.monotonic()
    sup.start()
    assert sup.wait_ready(5.0)
    assert time.monotonic() - began >= 0.3


def test_stop_sends_sigterm_to_its_child_only(
    spec: LaunchSpec, record: Path, tmp_path: Path, supervisors: list[Supervisor]
) -> None:
    """Stand-in wasmedge (test double); a second stand-in started by the test must survive."""
    bystander = subprocess.Popen([spec.argv[0], "--version-not"], env={**os.environ, **spec.env})
    try:
        log = tmp_path / "app.log"
        sup = Supervisor(spec, log_path=log, ready=None, settle=0.2)
        supervisors.append(sup)
        sup.start()
        assert sup.wait_ready(5.0)
        pid = sup.pid
        assert pid is not None
        sup.stop()
        sup.stop()  # idempotent
        assert gone(pid) and sup.pid is None
        assert f"stopping pid {pid} (SIGTERM)" in log.read_text()
        assert f"pid {pid} was killed by SIGTERM (stopped)" in log.read_text()
        assert "SIGKILL" not in log.read_text()
        assert bystander.poll() is None
    finally:
        bystander.terminate()
        bystander.wait()


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(
    spec: LaunchSpec, record: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    supervisors: list[Supervisor],
) -> None:  # fmt: skip
    """Stand-in wasmedge (test double) with STANDIN_IGNORE_TERM=1; a bystander must survive."""
    ready_file = tmp_path / "ready"
    monkeypatch.setenv("STANDIN_IGNORE_TERM", "1")
    monkeypatch.setenv("STANDIN_READY_FILE", str(ready_file))  # set after the handler is in place
    bystander = subprocess.Popen(
        [spec.argv[0], "--version-not"],
        env={**os.environ, **spec.env, "STANDIN_RECORD": str(tmp_path / "other.jsonl")},
    )
    try:
        log = tmp_path / "app.log"
        sup = Supervisor(spec, log_path=log, ready=ready_file.exists, stop_grace=0.3)
        supervisors.append(sup)
        sup.start()
        assert sup.wait_ready(5.0)
        pid = sup.pid
        assert pid is not None
        began = time.monotonic()
        sup.stop()
        assert time.monotonic() - began >= 0.3
        assert gone(pid)
        text = log.read_text()
        assert f"pid {pid} still running after 0.3 s (SIGKILL)" in text
        assert f"pid {pid} was killed by SIGKILL (stopped)" in text
        assert bystander.poll() is None  # same binary, same env: untouched
    finally:
        bystander.send_signal(signal.SIGKILL)
        bystander.wait()


def test_stop_during_backoff_starts_nothing_more(
    spec: LaunchSpec, record: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Stand-in wasmedge (test double) exiting at once; stop lands while waiting to restart."""
    monkeypatch.setenv("STANDIN_EXIT", "3")
    sup = Supervisor(spec, log_path=tmp_path / "app.log", backoff=Backoff(initial=30.0))
    sup.start()
    wait_for(lambda: sup.delays == [30.0])
    began = time.monotonic()
    sup.stop()
    assert time.monotonic() - began < 2.0
    assert len(starts(record)) == 1 and sup.restarts == 0


def test_a_binary_that_cannot_start_is_a_clear_error(spec: LaunchSpec, tmp_path: Path) -> None:
    """No process boundary involved: the binary is a plain non-executable file."""
    not_exec = tmp_path / "wasmedge"
    not_exec.write_text("not a program")
    broken = LaunchSpec(runtime="wasmedge", argv=(str(not_exec), "--version"), env={}, cwd=tmp_path)
    sup = Supervisor(broken, log_path=tmp_path / "app.log")
    with pytest.raises(SupervisorError, match=rf"cannot start {not_exec}: Permission denied"):
        sup.start()
    sup.stop()
