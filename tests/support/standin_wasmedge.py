"""A stand-in for the ``wasmedge`` binary, which cannot be installed on these machines.

This is a test double at a process boundary, and only there: it prints a recorded
``wasmedge --version`` (the format seen on genuine WasmEdge builds, see
docs/wasmedge-facts.md) and records how it was started. Like WasmEdge it lists only the first
WASI-NN plugin found along WASMEDGE_PLUGIN_PATH, and without one it rejects
``--nn-preload`` with ``unknown option: nn-preload`` and exit code 1.

``write_standin(path, version=...)`` creates an executable script; behaviour at run
time is steered by environment variables:

- STANDIN_RECORD=<file>: append one JSON line {argv, env, cwd, pid} per start
- STANDIN_EXIT=<n>: exit with n right after recording (default: run until SIGTERM)
- STANDIN_READY_FILE=<file>: touch this file once "ready"
- STANDIN_IGNORE_TERM=1: ignore SIGTERM (so a supervisor must SIGKILL)
- STANDIN_LISTEN=1: listen on the address after ``--socket-addr`` (as llama-api-server
  does), so a TCP readiness probe can succeed
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

_SCRIPT = r'''#!{python}
import json, os, signal, sys, time
VERSION = {version!r}
ARGV0_STYLE = {argv0_style!r}
PLUGIN_VERSION = {plugin_version!r}
LIBS = ("libwasmedgePluginWasiNN.so", "libwasmedgePluginWasiNN.dylib")

def first_plugin():
    for directory in [p for p in os.environ.get("WASMEDGE_PLUGIN_PATH", "").split(":") if p]:
        for root, dirs, files in os.walk(directory):
            dirs.sort()
            for name in sorted(files):
                if name in LIBS:
                    return os.path.join(root, name)
    return None

args = sys.argv[1:]
if args == ["--version"]:
    head = sys.argv[0] if ARGV0_STYLE else "wasmedge"
    print(f"{{head}} version {{VERSION}}")
    print(' (plugin "wasi_logging") version 0.1.0.0')
    plugin = first_plugin()
    if plugin:
        print(f'{{plugin}} (plugin "wasi_nn") version {{PLUGIN_VERSION}}')
    sys.exit(0)
if any(a.startswith("--nn-preload") for a in args) and first_plugin() is None:
    print("unknown option: nn-preload", file=sys.stderr)
    sys.exit(1)
record = os.environ.get("STANDIN_RECORD")
if record:
    with open(record, "a") as fh:
        fh.write(json.dumps({{"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd(),
                             "pid": os.getpid()}}) + "\n")
if "STANDIN_EXIT" in os.environ:
    sys.exit(int(os.environ["STANDIN_EXIT"]))
if os.environ.get("STANDIN_IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
ready = os.environ.get("STANDIN_READY_FILE")
if ready:
    open(ready, "w").close()
listener = None
if os.environ.get("STANDIN_LISTEN") and "--socket-addr" in args:
    import socket
    host, _, port = args[args.index("--socket-addr") + 1].rpartition(":")
    listener = socket.create_server((host.strip("[]"), int(port)))
    listener.settimeout(0.1)
print("standin wasmedge running", flush=True)
while True:
    if listener is None:
        time.sleep(0.1)
        continue
    try:
        listener.accept()[0].close()
    except socket.timeout:
        pass
'''


def write_standin(
    path: Path,
    version: str = "0.14.1",
    plugin_version: str = "0.14.1.0",
    argv0_style: bool = True,
) -> Path:
    """Write an executable stand-in ``wasmedge`` at ``path`` and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        _SCRIPT.format(
            python=sys.executable,
            version=version,
            plugin_version=plugin_version,
            argv0_style=argv0_style,
        ),
        encoding="utf-8",
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_plugin(path: Path, machine: int = 0x3E) -> Path:
    """A file with a 64-bit little-endian ELF shared-object header for ``machine``.

    0x3E is x86-64, 0xB7 is AArch64. It is not a loadable plugin: doctor reads only the
    header, and the stand-in never loads it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytearray(64)
    header[0:4] = b"\x7fELF"
    header[4] = 2  # ELFCLASS64
    header[5] = 1  # little endian
    header[6] = 1  # EV_CURRENT
    header[16:18] = (3).to_bytes(2, "little")  # ET_DYN
    header[18:20] = machine.to_bytes(2, "little")
    header[20:24] = (1).to_bytes(4, "little")
    path.write_bytes(bytes(header) + b"\0" * 64)
    return path


def standin_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


_DELEGATE = '''#!{python}
"""Stand-in `wasmedge` (test double at the process boundary): --version like
tests/support/standin_wasmedge.py, anything else runs on `python -m edgebundle exec`."""
import json, os, sys
args = sys.argv[1:]
if args == ["--version"]:
    os.execv({standin!r}, [{standin!r}, "--version"])
record = os.environ.get("STANDIN_RECORD")
if record:
    with open(record, "a") as fh:
        fh.write(json.dumps({{"argv": sys.argv, "pid": os.getpid()}}) + "\\n")
os.execv({python!r}, [{python!r}, "-m", "edgebundle", "exec", *args])
'''


def install_delegating_runtime(home: Path) -> Path:
    """The installer's layout with a delegating ``bin/wasmedge``: ``--version`` is the
    stand-in's, every other command line runs unchanged on ``python -m edgebundle exec``
    (which takes wasmedge's flags), so what is behind it is the real embedded runtime."""
    prefix = home / "runtime" / "wasmedge-0.14.1-cpu"
    standin = write_standin(prefix / "libexec" / "standin-wasmedge")
    binary = prefix / "bin" / "wasmedge"
    binary.parent.mkdir(parents=True)
    binary.write_text(_DELEGATE.format(python=sys.executable, standin=str(standin)))
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    fake_plugin(prefix / "plugin" / "libwasmedgePluginWasiNN.so")
    (prefix / "lib").mkdir()
    (home / "runtime" / "current").symlink_to(prefix.name)
    return home / "runtime" / "current" / "bin" / "wasmedge"
