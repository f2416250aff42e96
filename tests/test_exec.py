"""`edgebundle exec`: any wasm32-wasi app with wasmedge's flags, on the embedded runtime.

The app is a real WASI command built here from tests/guests/exec_probe.c with clang
(or written in WAT for the broken-import cases) and run in a child process.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import wasmtime

from tests.support.guest import REPO, build_probe


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_probe(tmp_path_factory.mktemp("probe"))


def edgebundle_exec(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "edgebundle", "exec", *args], input=stdin,
                          capture_output=True, timeout=60, cwd=REPO)


def test_exit_code_argv_and_env_are_the_apps(probe: Path) -> None:
    done = edgebundle_exec("--env", "GREETING=hello world", "--env", "EMPTY=", str(probe),
                           "exit", "7", "--model-alias", "not-for-exec", "--help")
    assert done.returncode == 7, done.stderr
    assert done.stdout.decode().splitlines() == [
        "argv[0]=probe.wasm", "argv[1]=exit", "argv[2]=7", "argv[3]=--model-alias",
        "argv[4]=not-for-exec", "argv[5]=--help", "env GREETING=hello world", "env EMPTY=",
    ]  # nothing of this process's environment leaks in, as with wasmedge


def test_dir_maps_a_host_directory_into_the_app(probe: Path, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("shared file")
    done = edgebundle_exec("--dir", f"/data:{tmp_path}", str(probe), "files", "/data")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.txt").read_text() == "SHARED FILE"
    (tmp_path / "out.txt").unlink()
    bare = edgebundle_exec("--dir", str(tmp_path), str(probe), "files", str(tmp_path))
    assert bare.returncode == 0, bare.stderr
    assert (tmp_path / "out.txt").read_text() == "SHARED FILE"
    unmapped = edgebundle_exec(str(probe), "files", str(tmp_path))
    assert unmapped.returncode == 4


def test_stdin_and_stdout_are_the_apps(probe: Path) -> None:
    payload = bytes(range(256)) * 40
    done = edgebundle_exec(str(probe), "echo", stdin=payload)
    assert done.returncode == 0
    assert done.stdout.endswith(payload)


LOG_LINE = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\] \[error\] "


def error_lines(done: subprocess.CompletedProcess[bytes]) -> list[str]:
    """The runtime's error lines: on stdout (after whatever the app wrote), in spdlog's
    format, as genuine wasmedge."""
    lines = [line for line in done.stdout.decode().strip().splitlines()
             if not line.startswith("argv[")]  # the probe's own output
    assert lines and all(re.match(LOG_LINE, line) for line in lines), lines
    return [re.sub(LOG_LINE, "", line) for line in lines]


def test_a_trap_logs_on_stdout_and_exits_134_as_wasmedge(probe: Path) -> None:
    done = edgebundle_exec(str(probe), "trap")
    assert done.returncode == 134
    assert error_lines(done)[0].startswith("execution failed: wasm trap: wasm `unreachable`")
    assert b"Traceback" not in done.stderr


def wat_app(tmp_path: Path, imports: str) -> Path:
    path = tmp_path / "app.wasm"
    path.write_bytes(wasmtime.wat2wasm(
        f'(module {imports} (memory (export "memory") 1) (func (export "_start")))'))
    return path


def test_a_missing_wasi_nn_function_is_named(tmp_path: Path) -> None:
    app = wat_app(tmp_path, '(import "wasi_ephemeral_nn" "load_by_name_with_magic" '
                            '(func (param i32) (result i32)))')
    done = edgebundle_exec(str(app))
    assert done.returncode == 1
    lines = error_lines(done)
    assert len(lines) == 1 and "wasi_ephemeral_nn.load_by_name_with_magic" in lines[0]


def test_an_unknown_import_module_is_named(tmp_path: Path) -> None:
    app = wat_app(tmp_path, '(import "wasmedge_httpsreq" "send_data" (func (param i32)))')
    done = edgebundle_exec(str(app))
    assert done.returncode == 1
    assert "wasmedge_httpsreq.send_data" in error_lines(done)[0]


def test_a_wasi_nn_app_without_model_work_runs(tmp_path: Path) -> None:
    app = wat_app(tmp_path, '(import "wasi_ephemeral_nn" "fini_single" '
                            '(func (param i32) (result i32)))')
    assert edgebundle_exec(str(app)).returncode == 0


@pytest.mark.parametrize(("args", "message"), [
    (["--env", "NOVALUE", "app.wasm"], "NAME=VALUE"),
    (["--reactor", "app.wasm"], "exec has no option --reactor"),
])
def test_usage_errors_are_one_line_exit_2(args: list[str], message: str) -> None:
    done = edgebundle_exec(*args)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


@pytest.mark.parametrize(("args", "message"), [
    (["missing.wasm"], "cannot read missing.wasm"),
    (["tests/guests/exec_probe.c"], "not a valid WebAssembly"),
])
def test_an_app_that_cannot_start_exits_1_as_wasmedge(args: list[str], message: str) -> None:
    done = edgebundle_exec(*args)
    assert done.returncode == 1
    assert message in error_lines(done)[0]


def test_a_dir_that_does_not_exist_cannot_start(probe: Path, tmp_path: Path) -> None:
    done = edgebundle_exec("--dir", f"/x:{tmp_path / 'nope'}", str(probe))
    assert done.returncode == 1
    assert "is not a directory" in error_lines(done)[0]


@pytest.mark.parametrize("preload", ["default:NoSuchNet:CPU:m.xml", "default:GGML:NPU:m.gguf"])
def test_a_malformed_preload_is_logged_and_the_app_still_runs(probe: Path, preload: str) -> None:
    """Genuine WasmEdge logs "Preload Model's Backend or Device is Not Support." and
    runs the app without that preload (tests/test_runtime_conformance.py: the load)."""
    done = edgebundle_exec("--nn-preload", preload, str(probe), "exit", "0")
    assert done.returncode == 0, done
    first = done.stdout.decode().splitlines()[0]
    assert re.match(LOG_LINE + r"\[WASI-NN\] Preload Model's Backend or Device is Not "
                    r"Support\.$", first), first
