"""What each process of a device imports: the footprint and start-up of ``edgebundle run``.

Not timings (they swing with the machine's load): the modules in ``sys.modules`` of
real child processes. The CLI imports a command's module only when it runs, the
guest (``edgebundle exec``) loads llama.cpp's ctypes bindings without llama_cpp's
package (numpy, jinja2), and ``run`` imports the gateway's stack only after it has
started the guest. Plus the two mechanisms behind it: the command table ``--help``
lists from, and the compiled-module cache of the embedded runtime.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import click
import pytest
import wasmtime
from click.testing import CliRunner

from edgebundle.demo_model import demo_model_path
from edgebundle.runtime.embedded import module_cache
from edgebundle.runtime.embedded.module_cache import compile_cached
from tests.support.guest import EDGECHAT, FRAME, REPO

# Modules none of the processes below needs: each costs milliseconds and MiB.
HEAVY = ("edgebundle.fleet", "edgebundle.doctor", "edgebundle.installer", "edgebundle.bundle",
         "edgebundle.gateway.openapi", "yaml", "httpx", "rich", "pygments", "numpy", "jinja2")
# What only the gateway needs, and only once the guest is starting.
GATEWAY = ("edgebundle.gateway.app", "edgebundle.gateway.server", "edgebundle.sync.local_server",
           "starlette", "uvicorn", "redis", "pydantic", "prometheus_client")
# The embedded runtime's own.
RUNTIME = ("wasmtime", "llama_cpp")

# Prints the modules loaded when the process ends (after whatever the -c code runs).
REPORT = ("import atexit, json, sys\n"
          "atexit.register(lambda: sys.stderr.write('MODULES ' + json.dumps(sorted(sys.modules))"
          " + '\\n'))\n")


def modules_of(code: str, *, stdin: bytes = b"", env: dict[str, str] | None = None
               ) -> tuple[set[str], subprocess.CompletedProcess[bytes]]:
    done = subprocess.run([sys.executable, "-c", REPORT + code], input=stdin,
                          capture_output=True, timeout=120, cwd=REPO,
                          env={**os.environ, **(env or {})})
    lines = [line for line in done.stderr.decode().splitlines() if line.startswith("MODULES ")]
    assert lines, done.stderr.decode()[-2000:]
    return set(json.loads(lines[-1].removeprefix("MODULES "))), done


def present(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_the_cli_and_its_help_import_no_command() -> None:
    modules, done = modules_of("import sys\nsys.argv = ['edgebundle', '--help']\n"
                               "from edgebundle.cli import main\nmain()")
    assert done.returncode == 0
    assert "exec     Run APP.wasm like `wasmedge` does" in done.stdout.decode()
    assert present(modules, HEAVY + GATEWAY + RUNTIME) == []
    assert present(modules, ("edgebundle.cli",)) == ["edgebundle.cli"]


def test_run_imports_the_gateway_only_after_starting_the_guest() -> None:
    """What `edgebundle run` has loaded when it spawns the guest: the CLI, the command,
    serving and the engine; the gateway's stack comes in while the model loads."""
    modules, _ = modules_of("import edgebundle.cli, edgebundle.cli.run, edgebundle.serving, "
                            "edgebundle.engine, edgebundle.gateway.listen")
    assert present(modules, HEAVY + GATEWAY + RUNTIME) == []


def test_the_guest_loads_only_the_runtime_and_llama_cpps_bindings(tmp_path: Path) -> None:
    """The real chat guest, as `run` starts it, up to READY (then stdin ends: it exits)."""
    model = demo_model_path(tmp_path / "models")
    home = tmp_path / "home"
    home.mkdir()
    argv = ["edgebundle", "exec", "--env", f"EDGECHAT_FRAME={FRAME}", "--nn-preload",
            f"default:GGML:AUTO:{model}", str(EDGECHAT), "--model-alias", "default",
            "--config", '{"ctx-size":256,"threads":1}']
    modules, done = modules_of(f"import sys\nsys.argv = {argv!r}\n"
                               "from edgebundle.cli import main\nmain()",
                               env={"EDGEBUNDLE_HOME": str(home)})
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert f"{FRAME} READY".encode() in done.stdout
    assert present(modules, HEAVY + GATEWAY) == []
    assert "llama_cpp.llama_cpp" in modules and "wasmtime" in modules
    # llama_cpp's package (its Llama class, numpy, jinja2) was never imported
    assert present(modules, ("llama_cpp",)) == ["llama_cpp._ctypes_extensions",
                                                "llama_cpp.llama_cpp"]
    assert "edgebundle.cli.exec_" in modules and "edgebundle.cli.run" not in modules
    [cached] = (home / "cache" / "wasm").iterdir()  # edgechat.wasm, compiled once
    assert cached.suffix == ".cwasm"


def test_llama_cpps_bindings_alone_then_its_whole_package_share_one_library() -> None:
    """The installed llama-cpp-python still works the way llama_bindings loads it."""
    code = (
        "from edgebundle.runtime.embedded.llama_bindings import llama_cpp as bindings\n"
        "import sys\n"
        "assert 'llama_cpp' not in sys.modules and 'numpy' not in sys.modules\n"
        "for name in ('llama_backend_init', 'llama_log_set', 'llama_log_callback',\n"
        "             'llama_model_load_from_file', 'llama_init_from_model', 'llama_decode',\n"
        "             'llama_token_to_piece', 'llama_memory_clear', 'llama_batch_init'):\n"
        "    assert callable(getattr(bindings, name)), name\n"
        "import llama_cpp\n"  # the whole package afterwards (metadata's JSON grammar does)
        "assert llama_cpp.llama_cpp is bindings and llama_cpp.Llama\n"
        "from llama_cpp.llama_grammar import json_schema_to_gbnf\n"
        "assert 'root' in json_schema_to_gbnf('{\"type\": \"string\"}')\n"
        "from edgebundle.runtime.embedded import llama_bindings\n"
        "assert llama_bindings.load_bindings() is bindings\n"
    )
    _, done = modules_of(code)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def test_the_help_table_says_what_each_command_says() -> None:
    from edgebundle.cli import COMMANDS, cli

    before = CliRunner().invoke(cli, ["--help"], terminal_width=80).output
    ctx = click.Context(cli)
    for name, (_, _, text) in COMMANDS.items():
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name
        assert command.get_short_help_str(1000) == click.Command(
            name, help=text).get_short_help_str(1000), name
    assert sorted(cli.commands) == sorted(COMMANDS)
    assert CliRunner().invoke(cli, ["--help"], terminal_width=80).output == before


WAT = '(module (func (export "answer") (result i32) i32.const 42))'


def answer(engine: wasmtime.Engine, module: wasmtime.Module) -> int:
    store = wasmtime.Store(engine)
    function = wasmtime.Instance(store, module, []).exports(store)["answer"]
    assert isinstance(function, wasmtime.Func)
    return int(function(store))


def test_a_compiled_module_is_kept_and_loaded_again(tmp_path: Path) -> None:
    engine, wasm = wasmtime.Engine(), wasmtime.wat2wasm(WAT)
    cache = tmp_path / "cache" / "wasm"
    assert answer(engine, compile_cached(engine, wasm, cache)) == 42
    [kept] = cache.iterdir()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert kept.read_bytes() == compile_cached(engine, wasm, cache).serialize()
    assert answer(engine, compile_cached(engine, wasm, cache)) == 42

    kept.write_bytes(b"not a compiled module")  # refused by wasmtime: compiled, replaced
    assert answer(engine, compile_cached(engine, wasm, cache)) == 42
    assert kept.read_bytes() != b"not a compiled module"

    other = wasmtime.Module(engine, wasmtime.wat2wasm(WAT.replace("42", "7"))).serialize()
    kept.write_bytes(other)  # a valid module, but a file others may write: never loaded
    kept.chmod(0o664)
    assert answer(engine, compile_cached(engine, wasm, cache)) == 42
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600


def test_the_helper_compiles_and_when_it_cannot_the_guest_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, wasm = wasmtime.Engine(), wasmtime.wat2wasm(WAT)
    with pytest.raises(wasmtime.WasmtimeError):  # the helper fails; wasmtime's own error
        compile_cached(engine, b"\0asm not really", tmp_path / "cache")
    assert list((tmp_path / "cache").glob("*.cwasm")) == []
    monkeypatch.setattr(module_cache, "_compile_aside", lambda wasm, path: False)
    assert answer(engine, compile_cached(engine, wasm, tmp_path / "cache")) == 42
    assert len(list((tmp_path / "cache").glob("*.cwasm"))) == 1  # written from here then


def test_without_a_cache_folder_nothing_is_written(tmp_path: Path) -> None:
    engine = wasmtime.Engine()
    assert answer(engine, compile_cached(engine, wasmtime.wat2wasm(WAT), None)) == 42
    unwritable = tmp_path / "file"
    unwritable.write_text("")  # a folder that cannot be made: compiled all the same
    module = compile_cached(engine, wasmtime.wat2wasm(WAT), unwritable / "wasm")
    assert answer(engine, module) == 42


@pytest.mark.parametrize("command", ["run", "exec", "fleet"])
def test_a_command_runs_from_the_lazy_table(command: str) -> None:
    done = subprocess.run([sys.executable, "-m", "edgebundle", command, "--help"],
                          capture_output=True, timeout=60, cwd=REPO)
    assert done.returncode == 0 and b"Usage: edgebundle " + command.encode() in done.stdout


def test_exec_without_a_home_compiles_and_leaves_nothing(tmp_path: Path) -> None:
    app = tmp_path / "empty.wasm"
    app.write_bytes(wasmtime.wat2wasm('(module (memory (export "memory") 1) '
                                      '(func (export "_start")))'))
    home = tmp_path / "no-home"
    done = subprocess.run([sys.executable, "-m", "edgebundle", "exec", str(app)],
                          capture_output=True, timeout=60, cwd=REPO,
                          env={**os.environ, "EDGEBUNDLE_HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert not home.exists()
