"""`edgebundle run` on the embedded runtime: gateway + supervised guest, as a user runs it.

Real `python -m edgebundle run` children on free ports, real guests on the embedded
runtime, real HTTP; the built-in demo model or scripted models generated here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from edgebundle.demo_model import DEMO_REPLY
from edgebundle.host import usable_cpus
from tests.support.processes import free_port, gone
from tests.support.serving import RunProcess, started_pids, wait_for


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_run_serves_health_503_then_200_and_stops_cleanly(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    home = tmp_path / "home"
    run = RunProcess(["--runtime", "embedded"], home=home)
    try:
        line = run.read_line()
        assert line == (
            f"serving {next((home / 'models').glob('*.gguf')).stem} with llama-3-chat on "
            f"http://127.0.0.1:{run.port} (runtime embedded: chosen with --runtime)\n"
        )
        # The guest starts loading before the gateway listens, and the demo model is small:
        # it may be loaded already (test_gateway_inprocess.py checks the 503 while it is not).
        first = run.healthz()
        assert first.status_code == 200 or (first.status_code, first.json()) == (
            503, {"status": "loading"})
        run.wait_healthy()
        assert run.healthz().json()["runtime"] == "embedded"
        reply = httpx.post(f"{run.base_url}/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "hello"}]})  # fmt: skip
        assert reply.json()["choices"][0]["message"]["content"] == DEMO_REPLY

        log = home / "logs" / "edgechat.log"
        [guest] = started_pids(log)
        assert run.stop(stop_signal) == 0, run.stderr()
        assert gone(guest)
        assert f"stopping pid {guest} (SIGTERM)" in log.read_text()
        demo_note, redis_note = run.stderr().splitlines()
        assert demo_note == (
            "edgebundle: no model configured: using the built-in demo model (it only says one "
            "sentence); pass --model FILE.gguf"
        )
        assert redis_note.startswith("edgebundle: no --redis-url: started a private redis-server")
    finally:
        run.close()


def test_a_model_the_guest_cannot_load_fails_run_with_one_line(tmp_path: Path) -> None:
    """A GGUF whose metadata reads fine but whose architecture llama.cpp does not know."""
    import gguf

    broken = tmp_path / "broken.gguf"
    writer = gguf.GGUFWriter(str(broken), "nosucharch")
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    run = RunProcess(["--runtime", "embedded", "--no-preflight", "--model", str(broken),
                      "--template", "chatml"], home=tmp_path / "home")
    try:
        assert run.read_line().startswith("serving broken with chatml on ")
        assert run.proc.wait(30) == 1
        # The first line says run started its private redis-server (no --redis-url).
        lines = run.stderr().splitlines()[1:]
        assert len(lines) == 1 and lines[0].startswith("edgebundle: error: the chat guest could "
                                                       "not load its model: ")
    finally:
        run.close()


def run_once(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
    env["EDGEBUNDLE_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "edgebundle", "run", *args],
                          capture_output=True, text=True, timeout=30, env=env)


def test_a_taken_port_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        out = run_once(tmp_path, "--runtime", "embedded", "--port", str(port))
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == (
        f"edgebundle: error: 127.0.0.1:{port} is already in use by another process: stop it, "
        "or pass --port N"
    )
    assert not (tmp_path / "logs" / "edgechat.log").exists()


def test_llama_chat_is_refused_under_run(tmp_path: Path) -> None:
    app = tmp_path / "llama-chat.wasm"
    app.write_bytes(b"\0asm\x01\0\0\0")
    out = run_once(tmp_path, "--app", str(app), "--port", str(free_port()))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    error = out.stderr.splitlines()[-1]
    assert error.startswith("edgebundle: error: llama-chat.wasm is an interactive terminal app")
    assert "edgebundle exec" in error


def test_dry_run_shows_the_embedded_command(tmp_path: Path) -> None:
    out = run_once(tmp_path, "--runtime", "embedded", "--dry-run", "--ctx-size", "256")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    [model] = (tmp_path / "models").glob("*.gguf")
    app = Path(__file__).resolve().parents[1] / "wasm" / "edgechat.wasm"
    frame = data["argv"][5].removeprefix("EDGECHAT_FRAME=")  # random per launch
    threads = usable_cpus()
    assert data == {
        "runtime": "embedded",
        "argv": [sys.executable, "-m", "edgebundle", "exec",
                 "--env", f"EDGECHAT_FRAME={frame}", "--nn-preload",
                 f"default:GGML:AUTO:{model}", str(app), "--model-alias", "default",
                 "--config", f'{{"ctx-size":256,"threads":{threads},'
                             f'"threads-batch":{threads},"flash-attn":"off"}}'],
        "env": {"EDGEBUNDLE_HOME": str(tmp_path)},  # its compiled-module cache is there
        "cwd": str(tmp_path),
    }  # fmt: skip
    # the demo model's context is 512: a larger ctx-size is clipped to it
    out = run_once(tmp_path, "--runtime", "embedded", "--dry-run")
    assert json.loads(out.stdout)["argv"][-1] == (
        f'{{"ctx-size":512,"threads":{threads},"threads-batch":{threads},"flash-attn":"off"}}'
    )


def test_the_guest_is_restarted_after_a_crash(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run = RunProcess(["--runtime", "embedded", "--no-preflight"], home=home)
    try:
        run.read_line()
        run.wait_healthy()
        log = home / "logs" / "edgechat.log"
        [first] = started_pids(log)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: len(started_pids(log)) == 2)
        run.wait_healthy()
        reply = httpx.post(f"{run.base_url}/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "again"}]})  # fmt: skip
        assert reply.json()["choices"][0]["message"]["content"] == DEMO_REPLY
        assert run.stop() == 0
    finally:
        run.close()


def test_without_redis_server_run_serves_the_chat_without_sync(tmp_path: Path) -> None:
    """A device with no redis-server and no --redis-url still chats, and says why sync is off."""
    home = tmp_path / "home"
    bare_path = tmp_path / "bin"  # a PATH with no redis-server on it
    bare_path.mkdir()
    run = RunProcess(["--runtime", "embedded", "--no-preflight"], home=home,
                     env={"PATH": str(bare_path)})
    try:
        run.read_line()
        run.wait_healthy()
        reply = httpx.post(f"{run.base_url}/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert reply.json()["choices"][0]["message"]["content"] == DEMO_REPLY
        assert httpx.post(f"{run.base_url}/v1/threads", json={}, timeout=10).status_code == 404
        assert run.stop() == 0
        assert "serving the chat without sync" in run.stderr()
    finally:
        run.close()
