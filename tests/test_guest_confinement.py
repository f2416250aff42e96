"""A hostile guest, started exactly as `run` starts an app, cannot touch the home.

The guest is a real WASI command built here from tests/guests/escape.c with clang (the
home's path compiled in): it tries to create an executable in ``venv/bin``, to
overwrite ``config.toml`` and the runtime binary, and to read ``config.toml`` (the
API key), by relative, climbing and absolute paths. It is started with the argv, env
and cwd of the :class:`LaunchSpec` that ``run`` resolves, the way the supervisor
starts a child: as the edgechat app on the embedded runtime (no directory at all),
and as a LlamaEdge app on wasmedge (the delegating stand-in runs the same flags on
the embedded runtime: only its own data directory). Every file of the home is
compared before and after, but for what the embedded runtime itself adds before the
guest runs: the escape's compiled module in ``cache/wasm/`` (checked apart).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from edgebundle.config import load_settings
from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.runtime.launch import LaunchSpec
from edgebundle.serving import launch_spec
from tests.support.guest import REPO
from tests.support.standin_wasmedge import install_delegating_runtime

SECRET = "sk-confinement-test-secret"


def build_escape(out: Path, home: Path) -> Path:
    subprocess.run(["clang", "--target=wasm32-wasi", "-O2", f'-DHOME="{home}"', "-o", str(out),
                    str(REPO / "tests" / "guests" / "escape.c")], check=True, timeout=120)
    return out


def furnish(home: Path) -> None:
    """What an installed home holds that a guest must never reach."""
    (home / "venv" / "bin").mkdir(parents=True)
    (home / "venv" / "bin" / "python").write_text("#!/bin/sh\n")
    (home / "config.toml").write_text(f'api_key = "{SECRET}"\n')
    (home / "apps").mkdir()


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every entry below ``root`` (links not followed) with its kind and contents, but
    for ``skip`` and the runtime's compiled-module cache (:func:`assert_only_compiled`)."""
    entries: dict[str, str] = {}
    cache = root / "cache"
    for path in sorted(root.rglob("*")):
        if any(s is not None and (path == s or s in path.parents) for s in (skip, cache)):
            continue
        name = str(path.relative_to(root))
        if path.is_symlink():
            entries[name] = f"link {os.readlink(path)}"
        elif path.is_dir():
            entries[name] = "dir"
        else:
            entries[name] = f"file {oct(path.stat().st_mode)} {path.read_bytes()!r}"
    return entries


def start_like_run(spec: LaunchSpec) -> subprocess.CompletedProcess[str]:
    """The spec's argv, env and cwd, as Supervisor._spawn starts a child."""
    return subprocess.run(list(spec.argv), env={**os.environ, **spec.env}, cwd=spec.cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                          check=False)


def assert_only_compiled(home: Path, wasm: Path) -> None:
    """The cache holds nothing but ``wasm``'s compiled module, written by the runtime
    (not the guest: it has no directory there) and readable only by its owner."""
    cache = home / "cache"
    digest = hashlib.sha256(wasm.read_bytes()).hexdigest()
    entries = sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))
    assert entries[0] == "wasm" and len(entries) == 2, entries
    assert re.fullmatch(rf"wasm/{digest}-[0-9a-f]{{16}}\.cwasm", entries[1]), entries
    assert (cache / entries[1]).stat().st_mode & 0o077 == 0


def attempts(output: str, verdict: str) -> list[str]:
    return [line for line in output.splitlines() if line.split(": ", 1)[-1].startswith(verdict)]


def test_the_edgechat_app_gets_no_directory_at_all(home: Path, tmp_path: Path) -> None:
    furnish(home)
    model = write_scripted_model(tmp_path / "m.gguf", ScriptedModelSpec(reply="hi"))
    escape = build_escape(tmp_path / "escape.wasm", home)
    spec = launch_spec(load_settings({"model": str(model), "app": str(escape),
                                         "app_kind": "edgechat", "runtime": "embedded"}))
    before = snapshot(home)

    done = start_like_run(spec)

    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("done\n")
    assert attempts(done.stdout, "ok") == []  # not even "own.txt": there is no directory
    assert SECRET not in done.stdout
    assert snapshot(home) == before
    assert_only_compiled(home, escape)
    assert not (tmp_path / "escaped").exists() and not (home.parent / "escaped").exists()
    assert spec.runtime == "embedded" and "--dir" not in spec.argv


def test_a_llamaedge_app_gets_only_its_own_data_directory(home: Path, tmp_path: Path) -> None:
    furnish(home)
    install_delegating_runtime(home)
    model = write_scripted_model(tmp_path / "m.gguf", ScriptedModelSpec(reply="hi"))
    escape = build_escape(tmp_path / "llama-api-server.wasm", home)
    spec = launch_spec(load_settings({"model": str(model), "app": str(escape),
                                         "runtime": "wasmedge", "template": "llama-3-chat"}),
                          environ={})
    data = home / "apps" / "llama-api-server" / "data"
    before = snapshot(home, skip=data)

    done = start_like_run(spec)

    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("done\n")
    assert SECRET not in done.stdout
    assert snapshot(home, skip=data) == before
    assert_only_compiled(home, escape)
    # What it could create, it created inside its directory ("/x" and "config.toml" too:
    # for the guest, "/" and "." are that directory), and all it could read was its own.
    for line in attempts(done.stdout, "ok"):
        _, path = line.split(": ", 1)[0].split(" ", 1)
        assert (data / path.lstrip("/")).read_text() == "#!/bin/sh\necho escaped\n", line
    assert "create own.txt: ok" in done.stdout
    assert sorted(p.name for p in data.iterdir()) == ["config.toml", "own.txt", "x"]
    assert not (home / "apps" / "llama-api-server" / "escaped").exists()
    assert spec.kind == "llama-api-server"
    assert spec.cwd == data and spec.argv[1:3] == ("--dir", ".:.")


@pytest.mark.parametrize("runtime", ["embedded", "wasmedge"])
def test_dry_run_shows_the_confinement(home: Path, tmp_path: Path, runtime: str) -> None:
    install_delegating_runtime(home)
    model = write_scripted_model(tmp_path / "m.gguf", ScriptedModelSpec(reply="hi"))
    spec = launch_spec(load_settings({"model": str(model), "runtime": runtime}), environ={})
    assert "--dir" not in spec.argv and spec.cwd == home
