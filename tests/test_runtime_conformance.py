"""The same protocol cases on every runtime: the embedded one always, genuine WasmEdge
when ``EDGEBUNDLE_CONFORMANCE_WASMEDGE`` names its binary.

The embedded runtime must behave as genuine WasmEdge + the WASI-NN GGML plugin does
where the project depends on it, so that CI (which has no WasmEdge) catches what a
device would hit. To check a genuine build, e.g. one made from public sources::

    EDGEBUNDLE_CONFORMANCE_WASMEDGE=/opt/wasmedge/bin/wasmedge \\
    LD_LIBRARY_PATH=/opt/wasmedge/lib WASMEDGE_PLUGIN_PATH=/opt/wasmedge/plugin \\
    python -m pytest tests/test_runtime_conformance.py

Every case runs the committed edgechat guest (or a small probe wasm built here) with
the runtime's own command line and real llama.cpp inference on scripted models.
Without the variable the genuine cases are not generated (CI has no WasmEdge).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.guest_protocol import EndReason, Fatal, Ready
from tests.support.guest import (
    EDGECHAT,
    FRAME,
    REPO,
    GuestProcess,
    build_probe,
    llama3_prompt,
)

REPLY = "Certainly, the engine streams this scripted sentence word by word."
GENUINE = os.environ.get("EDGEBUNDLE_CONFORMANCE_WASMEDGE", "")
RUNTIMES = ["embedded", *(["genuine"] if GENUINE else [])]
# spdlog's line, as genuine WasmEdge prints it on stdout
LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\] \[error\] ")


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> list[str]:
    """The runtime's command, before its own options (as `run` would start it)."""
    if request.param == "genuine":
        return [GENUINE]
    return [sys.executable, "-m", "edgebundle", "exec"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scripted_model(tmp_path_factory.mktemp("models") / "chat.gguf",
                                ScriptedModelSpec(reply=REPLY))


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_probe(tmp_path_factory.mktemp("probe"))


def guest(runtime: list[str], model: Path | str, tmp_path: Path, *, preload: str | None = None,
          config: str = '{"ctx-size":256,"threads":2,"threads-batch":2}') -> GuestProcess:
    argv = [*runtime, "--env", f"EDGECHAT_FRAME={FRAME}",
            "--nn-preload", preload or f"default:GGML:AUTO:{model}", str(EDGECHAT),
            "--model-alias", "default", "--config", config]
    return GuestProcess(argv, tmp_path / "guest.stderr", timeout=120)


@pytest.fixture
def chat(runtime: list[str], model: Path, tmp_path: Path) -> Iterator[GuestProcess]:
    started = guest(runtime, model, tmp_path)
    try:
        assert isinstance(started.start(), Ready)
        yield started
    finally:
        started.kill()


def test_a_normal_request_streams_the_exact_reply(chat: GuestProcess) -> None:
    pieces, end = chat.request(llama3_prompt("Hi"))
    assert b"".join(pieces).decode() == REPLY
    assert (end.reason, end.errno) == (EndReason.EOS, 100)


@pytest.mark.parametrize(("prompt", "metadata", "reason", "errno"), [
    ("x" * 400, b"", EndReason.PROMPT_TOO_LONG, 102),
    ("Hi", b'{"seed":18446744073709551615}', EndReason.ERROR, 1),  # 2^64-1
    ("Hi", b'{"seed":1180591620717411303424}', EndReason.ERROR, 2),  # 2^70
    ("Hi", b"{not json", EndReason.ERROR, 2),
], ids=["prompt-too-long", "seed-2^64-1", "seed-2^70", "bad-metadata"])
def test_a_refused_request_logs_on_stdout_and_the_guest_serves_on(
        chat: GuestProcess, prompt: str, metadata: bytes, reason: EndReason,
        errno: int) -> None:
    for _ in range(3):
        pieces, end = chat.request(llama3_prompt(prompt), metadata)
        assert (pieces, end.reason, end.errno) == ([], reason, errno)
    assert chat.foreign and all(LOG_LINE.match(line) for line in chat.foreign), chat.foreign
    assert all("[WASI-NN] GGML backend: " in line for line in chat.foreign)
    pieces, end = chat.request(llama3_prompt("Hi"))
    assert b"".join(pieces).decode() == REPLY


@pytest.mark.parametrize(("preload", "errno"), [
    ("default:GGML:NPU:{model}", 8),  # unknown device: logged, skipped, so not found
    ("default:NoSuchNet:CPU:{model}", 8),  # unknown backend: the same
    ("default:OpenVINO:CPU:{model}", 1),  # a backend this plugin was not built with
    ("default:GGML:AUTO", 103),  # no path: a model file that does not exist
], ids=["unknown-device", "unknown-backend", "backend-not-built", "no-path"])
def test_a_malformed_preload_never_stops_the_runtime_the_load_fails(
        runtime: list[str], model: Path, tmp_path: Path, preload: str, errno: int) -> None:
    started = guest(runtime, model, tmp_path, preload=preload.format(model=model))
    try:
        event = started.start()
        assert isinstance(event, Fatal) and event.errno == errno, event
        assert started.close() == 1
        assert started.foreign and all(LOG_LINE.match(line) for line in started.foreign)
    finally:
        started.kill()


def test_a_missing_model_file_fails_the_load_with_103(runtime: list[str],
                                                       tmp_path: Path) -> None:
    started = guest(runtime, tmp_path / "nowhere.gguf", tmp_path)
    try:
        event = started.start()
        assert isinstance(event, Fatal) and event.errno == 103, event
        assert started.close() == 1
    finally:
        started.kill()


def test_end_of_input_ends_the_guest_with_0(chat: GuestProcess) -> None:
    assert chat.close() == 0


def wat_app(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "app.wasm"
    path.write_bytes(wasmtime.wat2wasm(f'(module {body} (memory (export "memory") 1))'))
    return path


def run(runtime: list[str], app: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*runtime, str(app), *args], capture_output=True, timeout=120,
                          stdin=subprocess.DEVNULL, cwd=REPO)


def test_exit_codes(runtime: list[str], probe: Path, tmp_path: Path) -> None:
    """A trap aborts (134); an app that cannot start exits 1; errors are log lines on
    stdout in both cases."""
    trap = run(runtime, probe, "trap")
    assert trap.returncode == 134, trap
    unknown = run(runtime, wat_app(tmp_path, '(import "nowhere" "f" (func)) '
                                             '(func (export "_start"))'))
    garbage = tmp_path / "garbage.wasm"
    garbage.write_bytes(b"\0asm\x07\0\0\0junk")
    invalid = run(runtime, garbage)
    for done in (unknown, invalid):
        assert done.returncode == 1, done
        assert any(LOG_LINE.match(line) for line in done.stdout.decode().splitlines()), done
    # no _start: genuine wasmedge says so on stderr ("A function name is required when
    # reactor mode is enabled."), the embedded runtime in a log line; both exit 1
    assert run(runtime, wat_app(tmp_path, '(func (export "main"))')).returncode == 1
    assert run(runtime, probe, "exit", "7").returncode == 7
