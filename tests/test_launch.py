"""The launcher: what `run` would start, resolved from settings (no process is started).

WasmEdge cannot be installed on these machines, so the `wasmedge` binaries here are the
stand-in script of tests/support/standin_wasmedge.py (a test double at the process
boundary) plus fake ELF plugin files; the launcher only needs them to exist.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgebundle.config import load_settings
from edgebundle.errors import ConfigError, RuntimeNotFoundError, UsageError
from edgebundle.host import usable_cpus
from edgebundle.runtime.launch import DEMO_MODEL_NOTE, default_app, wasmedge_launch
from edgebundle.serving import launch_spec
from tests.support.standin_wasmedge import fake_plugin, write_standin


def install_runtime(home: Path) -> Path:
    """The installer's layout: <home>/runtime/wasmedge-<v>-<variant>, `current` link to it."""
    prefix = home / "runtime" / "wasmedge-0.14.1-cpu"
    write_standin(prefix / "bin" / "wasmedge")
    fake_plugin(prefix / "plugin" / "libwasmedgePluginWasiNN.so")
    (prefix / "lib").mkdir()
    (home / "runtime" / "current").symlink_to(prefix.name)
    return home / "runtime" / "current" / "bin" / "wasmedge"


def files(tmp_path: Path, app_name: str = "llama-api-server.wasm") -> tuple[Path, Path]:
    model = tmp_path / "models" / "tiny.gguf"
    model.parent.mkdir(parents=True, exist_ok=True)
    model.write_bytes(b"GGUF" + b"\0" * 60)
    app = tmp_path / "apps" / app_name
    app.parent.mkdir(parents=True, exist_ok=True)
    app.write_bytes(b"\0asm\x01\0\0\0")
    return model, app


def env_with_path(*dirs: Path) -> dict[str, str]:
    return {"PATH": os.pathsep.join([*map(str, dirs), "/usr/bin", "/bin"])}


def value_after(argv: list[str] | tuple[str, ...], flag: str) -> str:
    return argv[list(argv).index(flag) + 1]


def test_dry_run_spec_has_the_api_shape(home: Path, tmp_path: Path) -> None:
    """Stand-in wasmedge (test double at the process boundary) in the installed layout."""
    binary = install_runtime(home)
    model, app = files(tmp_path)
    settings = load_settings(
        {"model": str(model), "app": str(app), "template": "llama-3-chat", "port": 8181},
        environ={"EDGEBUNDLE_HOME": str(home)},
    )
    spec = launch_spec(settings, environ=env_with_path())
    data = spec.to_json()

    assert set(data) == {"runtime", "argv", "env", "cwd"}
    assert data["runtime"] == "wasmedge"
    assert data["argv"] == [
        str(binary), "--dir", ".:.", "--nn-preload", f"default:GGML:AUTO:{model}", str(app),
        "--prompt-template", "llama-3-chat", "--ctx-size", "4096", "--model-name", "tiny",
        "--model-alias", "default", "--socket-addr", "127.0.0.1:8181",
    ]  # fmt: skip
    current = home / "runtime" / "current"
    assert data["env"]["WASMEDGE_PLUGIN_PATH"] == str(current / "plugin")
    assert data["env"]["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(current / "lib")
    assert data["env"]["PATH"].split(os.pathsep)[0] == str(current / "bin")
    # A LlamaEdge app's "." is its own data directory, never the home.
    assert data["cwd"] == str(home / "apps" / "llama-api-server" / "data")
    assert Path(data["cwd"]).is_dir()
    # The preload name is the alias the app is told to look its model up by.
    assert value_after(spec.argv, "--nn-preload").split(":")[0] == value_after(
        spec.argv, "--model-alias"
    )


def test_installed_runtime_is_preferred_over_path(home: Path, tmp_path: Path) -> None:
    """Two stand-in wasmedge scripts (test doubles): one installed, one on PATH."""
    installed = install_runtime(home)
    on_path = write_standin(tmp_path / "elsewhere" / "bin" / "wasmedge")
    model, app = files(tmp_path)
    settings = load_settings({"model": str(model), "app": str(app), "template": "chatml"})
    spec = launch_spec(settings, environ=env_with_path(on_path.parent))
    assert spec.argv[0] == str(installed)


def test_wasmedge_on_path_gets_an_explicit_plugin_path(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stand-in wasmedge (test double) found on PATH, no installed runtime."""
    on_path = write_standin(tmp_path / "opt" / "bin" / "wasmedge")
    fake_plugin(tmp_path / "opt" / "plugin" / "libwasmedgePluginWasiNN.so")
    model, app = files(tmp_path)
    settings = load_settings({"model": str(model), "app": str(app), "template": "chatml"})

    # Unset: explicitly empty, which genuine WasmEdge ignores, so its own default applies
    # exactly as for a bare `wasmedge` (an inherited value cannot slip in).
    spec = launch_spec(settings, environ=env_with_path(on_path.parent))
    assert spec.argv[0] == str(on_path)
    assert spec.env == {"WASMEDGE_PLUGIN_PATH": ""}

    chosen = tmp_path / "plugins-a"
    environ = {**env_with_path(on_path.parent), "WASMEDGE_PLUGIN_PATH": str(chosen)}
    assert launch_spec(settings, environ=environ).env["WASMEDGE_PLUGIN_PATH"] == str(chosen)

    # A trailing ':' aborts genuine WasmEdge (even --version): run passes the value without
    # it. A relative entry is made absolute here: wasmedge runs in another directory.
    monkeypatch.chdir(tmp_path)
    environ["WASMEDGE_PLUGIN_PATH"] = f"plugins-a:{tmp_path / 'gone'}:"
    assert launch_spec(settings, environ=environ).env["WASMEDGE_PLUGIN_PATH"] == \
        f"{chosen}:{tmp_path / 'gone'}"  # fmt: skip


def test_explicit_wasmedge_wins_and_a_missing_one_is_named(home: Path, tmp_path: Path) -> None:
    """Stand-in wasmedge scripts (test doubles at the process boundary)."""
    install_runtime(home)
    explicit = write_standin(tmp_path / "mine" / "wasmedge")
    model, app = files(tmp_path)
    flags = {"model": str(model), "app": str(app), "template": "chatml"}
    settings = load_settings({**flags, "wasmedge": str(explicit)})
    spec = launch_spec(settings, environ=env_with_path())
    assert spec.argv[0] == str(explicit)

    missing = tmp_path / "nope" / "wasmedge"
    with pytest.raises(RuntimeNotFoundError, match=r"nope/wasmedge.*--wasmedge"):
        launch_spec(load_settings({**flags, "wasmedge": str(missing)}), environ=env_with_path())


def test_llama_chat_gets_system_prompt_and_no_socket(home: Path, tmp_path: Path) -> None:
    """Stand-in wasmedge (test double) in the installed layout.

    `run` refuses llama-chat (it is interactive and run gives it no terminal), but its
    command line is still built right for whoever starts it.
    """
    install_runtime(home)
    model, app = files(tmp_path, "llama-chat.wasm")
    settings = load_settings(
        {"model": str(model), "app": str(app), "template": "llama-3-chat", "ctx_size": 2048,
         "system_prompt": "You are terse."}
    )  # fmt: skip
    with pytest.raises(UsageError, match=r"interactive terminal app.*edgebundle exec"):
        launch_spec(settings, environ=env_with_path())
    spec = wasmedge_launch(settings, app=app, model=model, environ=env_with_path())
    assert spec.kind == "llama-chat"
    tail = list(spec.argv[spec.argv.index(str(app)) + 1 :])
    assert tail == [
        "--prompt-template", "llama-3-chat", "--ctx-size", "2048", "--model-name", "tiny",
        "--model-alias", "default", "--system-prompt", "You are terse.",
    ]  # fmt: skip


def test_app_kind_from_name_or_setting(home: Path, tmp_path: Path) -> None:
    """Stand-in wasmedge (test double) in the installed layout."""
    install_runtime(home)
    model, app = files(tmp_path, "server.wasm")
    flags = {"model": str(model), "app": str(app), "template": "chatml"}
    with pytest.raises(UsageError, match=r"cannot tell which app server.wasm is.*--app-kind"):
        launch_spec(load_settings(flags), environ=env_with_path())
    spec = launch_spec(load_settings({**flags, "app_kind": "llama-api-server"}), environ={})
    assert spec.kind == "llama-api-server" and "--socket-addr" in spec.argv

    # The chat guest's tail: the alias and the load options; the template stays outside.
    spec = launch_spec(load_settings({**flags, "app_kind": "edgechat"}), environ={})
    assert spec.kind == "edgechat"
    assert list(spec.argv[spec.argv.index(str(app)) + 1 :]) == [
        "--model-alias", "default", "--config",
        f'{{"ctx-size":4096,"threads":{usable_cpus()},"threads-batch":{usable_cpus()},'
        '"flash-attn":"off"}'
    ]  # fmt: skip
    # flash attention: off unless asked (slower prompts on CPUs), one of the plugin's values
    spec = launch_spec(load_settings({**flags, "app_kind": "edgechat", "flash_attn": "on"}),
                       environ={})
    assert json.loads(value_after(spec.argv, "--config"))["flash-attn"] == "on"
    with pytest.raises(ConfigError, match=r"--flash-attn: flash_attn must be one of off, on, "
                                          r"auto, got 'fast'"):
        load_settings({**flags, "flash_attn": "fast"})
    _, edgechat = files(tmp_path, "edgechat.wasm")
    spec = launch_spec(load_settings({**flags, "app": str(edgechat)}), environ={})
    assert spec.kind == "edgechat"


def test_missing_inputs_name_the_flag_and_variable(home: Path, tmp_path: Path) -> None:
    """Stand-in wasmedge (test double) in the installed layout."""
    install_runtime(home)
    model, app = files(tmp_path)
    gone = tmp_path / "gone.gguf"
    with pytest.raises(UsageError, match=rf"model file not found: {gone}.*--model"):
        launch_spec(load_settings({"model": str(gone), "app": str(app)}), environ={})
    with pytest.raises(UsageError, match=r"app file not found.*--app"):
        missing_app = load_settings({"model": str(model), "app": str(tmp_path / "x.wasm")})
        launch_spec(missing_app, environ={})
    with pytest.raises(UsageError, match=r"--template NAME.*EDGEBUNDLE_TEMPLATE"):
        launch_spec(load_settings({"model": str(model), "app": str(app)}), environ={})


def test_no_model_and_no_app_mean_the_demo_model_and_the_chat_guest(
    home: Path, tmp_path: Path
) -> None:
    """Stand-in wasmedge (test double) in the installed layout."""
    install_runtime(home)
    spec = launch_spec(load_settings({"runtime": "wasmedge"}), environ={})
    assert spec.notes == (DEMO_MODEL_NOTE,)
    assert spec.model is not None and spec.model.parent == home / "models"
    assert spec.model.is_file()  # generated on first use
    assert spec.app == default_app() and spec.kind == "edgechat"
    assert spec.argv[1:6] == (  # no --dir: the chat guest gets no directory; its frame
        "--env", f"EDGECHAT_FRAME={spec.frame}",
        "--nn-preload", f"default:GGML:AUTO:{spec.model}", str(default_app()))
    assert len(spec.frame) == 16  # random per launch (guest_protocol.new_frame)
    assert spec.cwd == home
    threads = usable_cpus()  # always sent: genuine WasmEdge's plugin would run 4
    assert value_after(spec.argv, "--config") == (  # the demo model's context
        f'{{"ctx-size":512,"threads":{threads},"threads-batch":{threads},"flash-attn":"off"}}'
    )


def test_settings_come_from_the_environment(home: Path, tmp_path: Path) -> None:
    """Stand-in wasmedge (test double) in the installed layout."""
    install_runtime(home)
    model, app = files(tmp_path)
    environ = {
        "EDGEBUNDLE_HOME": str(home), "EDGEBUNDLE_MODEL": str(model), "EDGEBUNDLE_APP": str(app),
        "EDGEBUNDLE_TEMPLATE": "phi-3-chat", "EDGEBUNDLE_PORT": "9001",
    }  # fmt: skip
    spec = launch_spec(load_settings({}, environ=environ), environ=environ)
    assert value_after(spec.argv, "--prompt-template") == "phi-3-chat"
    assert value_after(spec.argv, "--socket-addr") == "127.0.0.1:9001"


def test_no_runtime_errors_say_how_to_fix(home: Path, tmp_path: Path) -> None:
    """No wasmedge anywhere (PATH holds only /usr/bin:/bin, which have none here)."""
    model, app = files(tmp_path)
    flags = {"model": str(model), "app": str(app), "template": "chatml"}
    empty = env_with_path(tmp_path / "empty-bin")
    with pytest.raises(RuntimeNotFoundError, match=r"no wasmedge found.*install\.sh.*--wasmedge"):
        launch_spec(load_settings({**flags, "runtime": "wasmedge"}), environ=empty)
    # llama-api-server has no embedded fallback (it needs WasmEdge's sockets) ...
    with pytest.raises(RuntimeNotFoundError, match=r"no wasmedge found.*runs only on WasmEdge"):
        launch_spec(load_settings({**flags, "runtime": "auto"}), environ=empty)
    with pytest.raises(UsageError, match=r"cannot run on the embedded runtime.*--runtime wasmedge"):
        launch_spec(load_settings({**flags, "runtime": "embedded"}), environ=empty)
    # ... the chat guest has: auto falls back to the embedded runtime and says why.
    spec = launch_spec(load_settings({"model": str(model)}), environ=empty)
    assert (spec.runtime, spec.reason) == ("embedded", "auto: no wasmedge found")


def test_pinned_model_fills_in_the_template(home: Path, tmp_path: Path) -> None:
    """Stand-in wasmedge (test double); the app and model names are the pinned ones."""
    install_runtime(home)
    pinned_app = home / "apps" / "llama-api-server-0.22.1.wasm"
    pinned_app.parent.mkdir()
    pinned_app.write_bytes(b"\0asm\x01\0\0\0")
    model = tmp_path / "Llama-3.2-1B-Instruct-Q4_K_M.gguf"
    model.write_bytes(b"GGUF")
    spec = launch_spec(load_settings({"model": str(model), "app": str(pinned_app)}), environ={})
    assert spec.argv[5] == str(pinned_app)
    assert value_after(spec.argv, "--prompt-template") == "llama-3-chat"
    # An installed LlamaEdge app is used only when asked for: the default is the chat guest.
    assert launch_spec(load_settings({"model": str(model)}), environ={}).kind == "edgechat"


def test_ipv6_host_is_bracketed(home: Path, tmp_path: Path) -> None:
    """Stand-in wasmedge (test double) in the installed layout."""
    install_runtime(home)
    model, app = files(tmp_path)
    settings = load_settings({"model": str(model), "app": str(app), "template": "t", "host": "::1"})
    assert value_after(launch_spec(settings, environ={}).argv, "--socket-addr") == "[::1]:8080"
