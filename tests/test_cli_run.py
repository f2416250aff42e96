"""`edgebundle run` as a user runs it: a real `edgebundle` subprocess.

WasmEdge cannot be installed on these machines: the `wasmedge` it finds in
<home>/runtime/current is the stand-in script of tests/support/standin_wasmedge.py, a
test double at the process boundary (it records each start in STANDIN_RECORD and, with
STANDIN_LISTEN=1, listens on --socket-addr like llama-api-server does).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import free_port, gone
from tests.support.standin_wasmedge import fake_plugin, write_standin


def install_runtime(home: Path) -> Path:
    prefix = home / "runtime" / "wasmedge-0.14.1-cpu"
    write_standin(prefix / "bin" / "wasmedge")
    fake_plugin(prefix / "plugin" / "libwasmedgePluginWasiNN.so")
    (home / "runtime" / "current").symlink_to(prefix.name)
    return home / "runtime" / "current" / "bin" / "wasmedge"


def inputs(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF")
    app = tmp_path / "llama-api-server.wasm"
    app.write_bytes(b"\0asm")
    return model, app


def edgebundle(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgebundle", *args], capture_output=True,
                          text=True, timeout=30, env=dict(os.environ), **kwargs)


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no output in time"
    return proc.stdout.readline()


def test_dry_run_prints_the_spec_and_starts_nothing(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stand-in wasmedge (test double at the process boundary) in the installed layout."""
    binary = install_runtime(home)
    model, app = inputs(tmp_path)
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("STANDIN_RECORD", str(record))
    out = edgebundle(
        "run", "--runtime", "wasmedge", "--dry-run", "--model", str(model), "--app", str(app),
        "--template", "llama-3-chat",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == {"runtime", "argv", "env", "cwd"}
    assert data["argv"][:6] == [
        str(binary), "--dir", ".:.", "--nn-preload", f"default:GGML:AUTO:{model}", str(app)
    ]  # fmt: skip
    assert data["env"]["WASMEDGE_PLUGIN_PATH"] == str(home / "runtime" / "current" / "plugin")
    assert data["cwd"] == str(home / "apps" / app.stem / "data")
    time.sleep(0.2)  # a start, had there been one, would have recorded itself by now
    assert not record.exists()
    assert not (home / "logs").exists()


def test_missing_model_is_one_line_and_exit_2(home: Path, tmp_path: Path) -> None:
    """Stand-in wasmedge (test double) installed, so only the missing model is wrong."""
    install_runtime(home)
    _, app = inputs(tmp_path)
    out = edgebundle("run", "--dry-run", "--app", str(app), "--model", str(tmp_path / "none.gguf"))
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith("edgebundle: error: model file not found:")
    assert "Traceback" not in out.stderr


def test_bad_redis_url_is_a_usage_error(home: Path, tmp_path: Path) -> None:
    """Stand-in wasmedge (test double) installed; the Redis URL is the only thing wrong."""
    install_runtime(home)
    model, app = inputs(tmp_path)
    out = edgebundle(
        "run", "--dry-run", "--model", str(model), "--app", str(app), "--template", "t",
        "--redis-url", "http://example",
    )  # fmt: skip
    assert out.returncode == 2 and out.stderr.startswith("edgebundle: error: bad Redis URL")


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_run_serves_until_signalled_then_stops_its_child(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_signal: signal.Signals
) -> None:
    """Stand-in wasmedge (test double) listening on --socket-addr like llama-api-server."""
    install_runtime(home)
    model, app = inputs(tmp_path)
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("STANDIN_RECORD", str(record))
    monkeypatch.setenv("STANDIN_LISTEN", "1")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgebundle", "run", "--runtime", "wasmedge", "--no-preflight",
         "--model", str(model), "--app", str(app), "--template", "llama-3-chat",
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = read_line(proc, timeout=20)
        [started] = [json.loads(x) for x in record.read_text().splitlines()]
        child = started["pid"]
        log = home / "logs" / "llama-api-server.log"
        assert line == (
            f"serving llama-api-server.wasm on http://127.0.0.1:{port} "
            f"(runtime wasmedge, pid {child}, logs: {log})\n"
        )
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # the app really serves on that port
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=15) == 0, proc.stderr.read() if proc.stderr else ""
        assert gone(child)
        assert f"stopping pid {child} (SIGTERM)" in log.read_text()
        assert len(record.read_text().splitlines()) == 1  # stopped, not restarted
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_failed_preflight_names_the_checks_and_starts_nothing(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stand-in wasmedge (test double) installed without its WASI-NN plugin: doctor fails."""
    install_runtime(home)
    (home / "runtime" / "current" / "plugin" / "libwasmedgePluginWasiNN.so").unlink()
    model, app = inputs(tmp_path)
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("STANDIN_RECORD", str(record))
    out = edgebundle(
        "run", "--runtime", "wasmedge", "--model", str(model), "--app", str(app),
        "--template", "llama-3-chat", "--port", str(free_port()),
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith("edgebundle: error: preflight failed: ")
    assert "wasmedge.plugin" in out.stderr and "run `edgebundle doctor`" in out.stderr
    assert not record.exists() and not (home / "logs").exists()


def test_port_already_in_use_is_refused_before_starting(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stand-in wasmedge (test double) installed; a real listener of the test holds the port."""
    install_runtime(home)
    model, app = inputs(tmp_path)
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("STANDIN_RECORD", str(record))
    with socket.create_server(("127.0.0.1", 0)) as occupied:
        port = occupied.getsockname()[1]
        out = edgebundle(
            "run", "--runtime", "wasmedge", "--no-preflight", "--model", str(model),
            "--app", str(app), "--template", "llama-3-chat", "--port", str(port),
        )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr == (
        f"edgebundle: error: 127.0.0.1:{port} is already in use by another process: "
        "stop it, or pass --port N\n"
    )
    assert not record.exists()
