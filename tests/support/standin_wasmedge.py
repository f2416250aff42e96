"""A stand-in for the ``wasmedge`` binary, which cannot be installed on these machines.

This is a test double at a process boundary, and only there: it prints a recorded
``wasmedge --version`` (the format seen on genuine WasmEdge builds, see
docs/wasmedge-facts.md) and records how it was started. It finds its plugins by the
rules of genuine WasmEdge 0.17.1 (lib/plugin/plugin.cpp; each seen on a genuine build):

- WASMEDGE_PLUGIN_PATH split on ':' (runs of colons are one separator); a value that
  ends with ':' aborts before anything else, even ``--version``: ``terminate called
  after throwing an instance of 'std::out_of_range'`` on stderr, SIGABRT (exit 134);
- then one directory next to its libwasmedge: the first LD_LIBRARY_PATH entry holding
  ``libwasmedge.so.0``, else ``<real dir>/../lib`` (a release build's RUNPATH
  ``$ORIGIN/../lib``); ``<lib>/wasmedge`` when that directory's text starts with
  ``/usr`` or ``/lib``, else ``<lib>/../plugin``;
- directories walked in readdir order, depth first, symlinked subdirectories not
  entered; every ``.so`` regular file loaded, an entry that is a ``.so`` file loaded
  itself, anything else skipped without a word;
- "loading" a file: it loads when it has an ELF shared-object header for this machine
  (the fake plugins of :func:`fake_plugin` do); else the two ``[error]`` lines genuine
  WasmEdge logs on stdout (``load library failed:<path>: <dlerror>``), and the search
  goes on, so a later copy loads. The first loadable ``libwasmedgePluginWasiNN.so``
  registers ``wasi_nn``; later ones are dropped silently. The search runs twice (the
  genuine CLI registers its options twice), so each error pair appears twice.

``--version`` lists the registered plugin with the path as it was built
(``<lib>/../plugin/…``); without it ``--nn-preload`` fails with ``unknown option:
nn-preload`` on stdout and exit code 1.

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
import datetime, json, os, signal, sys, time
VERSION = {version!r}
ARGV0_STYLE = {argv0_style!r}
PLUGIN_VERSION = {plugin_version!r}
PLUGIN = "libwasmedgePluginWasiNN.so"
MACHINE = {machine!r}  # the e_machine this double pretends to run on (dlopen's check)

def plugin_path_entries(value):
    entries = []
    while ":" in value:
        sep = value.index(":")
        entries.append(value[:sep])
        rest = value[sep:].lstrip(":")
        if not rest:
            sys.stderr.write("terminate called after throwing an instance of "
                             "'std::out_of_range'\n  what():  basic_string_view::substr: "
                             "__pos (which is 18446744073709551615) > __size (which is "
                             f"{{len(value)}})\n")
            sys.stderr.flush()
            os.abort()
        value = rest
    entries.append(value)
    return entries

def default_dir():
    lib = None
    for entry in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        if entry and os.path.isfile(os.path.join(entry, "libwasmedge.so.0")):
            lib = entry
            break
    if lib is None:
        lib = os.path.join(os.path.dirname(os.path.realpath(sys.argv[0])), "..", "lib")
    lib = os.path.normpath(lib)
    if lib.startswith("/usr") or lib.startswith("/lib"):
        return os.path.join(lib, "wasmedge")
    return os.path.join(lib, "..", "plugin")

def walk(directory):
    try:
        with os.scandir(directory) as listing:
            entries = list(listing)
    except OSError:
        return
    for entry in entries:
        if entry.is_file() and entry.name.endswith(".so") and entry.name != ".so":
            yield entry.path
        elif entry.is_dir(follow_symlinks=False):
            yield from walk(entry.path)

def dlerror(path):
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        return f"cannot open shared object file: {{exc.strerror}}"
    if len(head) < 64:
        return "file too short"
    if head[:4] != b"\x7fELF" or int.from_bytes(head[16:18], "little") != 3:
        return "invalid ELF header"
    if int.from_bytes(head[18:20], "little") != MACHINE:
        return "cannot open shared object file: No such file or directory"
    return None

def log_error(text):
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    print(f"[{{stamp}}] [error] {{text}}", flush=True)

def load_plugins():
    registered = None
    entries = plugin_path_entries(os.environ["WASMEDGE_PLUGIN_PATH"]) \
        if "WASMEDGE_PLUGIN_PATH" in os.environ else []
    for _ in range(2):  # the CLI loads the default paths twice
        for entry in [*entries, default_dir()]:
            if os.path.isdir(entry):
                files = list(walk(entry))
            elif os.path.isfile(entry) and entry.endswith(".so"):
                files = [entry]
            else:
                continue
            for path in files:
                problem = dlerror(path)
                if problem is not None:
                    log_error("loading failed: invalid path, Code: 0x100")
                    log_error(f"    load library failed:{{path}}: {{problem}}")
                elif registered is None and os.path.basename(path) == PLUGIN:
                    registered = path
    return registered

args = sys.argv[1:]
plugin = load_plugins()
if args == ["--version"]:
    head = sys.argv[0] if ARGV0_STYLE else "wasmedge"
    print(f"{{head}} version {{VERSION}}")
    print(' (plugin "wasi_logging") version 0.1.0.0')
    if plugin:
        print(f'{{plugin}} (plugin "wasi_nn") version {{PLUGIN_VERSION}}')
    sys.exit(0)
if any(a.startswith("--nn-preload") for a in args) and plugin is None:
    print("unknown option: nn-preload", flush=True)
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
    machine: int = 0x3E,
) -> Path:
    """Write an executable stand-in ``wasmedge`` at ``path`` and return it.

    ``machine`` is the ELF e_machine the double pretends to run on (x86-64, as the
    fabricated hosts of the doctor tests): a plugin built for another one does not load.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        _SCRIPT.format(
            python=sys.executable,
            version=version,
            plugin_version=plugin_version,
            argv0_style=argv0_style,
            machine=machine,
        ),
        encoding="utf-8",
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_libwasmedge(lib_dir: Path, machine: int = 0x3E) -> Path:
    """``lib_dir/libwasmedge.so.0`` as an install has it (an ELF header, not loadable):
    where the stand-in, like WasmEdge, finds its default plugin directory from."""
    return fake_plugin(lib_dir / "libwasmedge.so.0", machine=machine)


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
    fake_libwasmedge(prefix / "lib")
    (home / "runtime" / "current").symlink_to(prefix.name)
    return home / "runtime" / "current" / "bin" / "wasmedge"
