"""Compiled wasm modules kept between runs of the embedded runtime.

Compiling edgechat.wasm with wasmtime's Cranelift takes about 40 ms, and leaves the
compiler's memory and code (about 12 MiB: its heap, and the pages of wasmtime's
library it ran) resident in the guest for the guest's whole life; loading the same
module precompiled (``Module.deserialize_file``, which maps the file) takes under a
millisecond and almost no memory. So :func:`compile_cached` keeps each compiled
module in ``<home>/cache/wasm/``, named by the sha256 of the wasm's bytes and by the
identity of wasmtime's native library (its path, size and modification time: a new
wasmtime is a new name, without importing importlib.metadata to ask its version).
wasmtime checks the file's own version and settings again when loading it.

A module not in the cache yet is compiled by a short-lived helper process (``python
-m edgebundle.runtime.embedded.module_cache FILE``, the wasm on its stdin, a default
``wasmtime.Engine`` as :mod:`.host` makes), so even the first run's guest never holds
the compiler; that costs one Python start, once per wasm and wasmtime. When the
helper fails, or wasmtime refuses what it wrote, the module is compiled here, as
without a cache (and a wasm that is not valid fails with wasmtime's own message).

A compiled module is machine code that runs in this process, so only a file this
user owns and nobody else may write is loaded (the folder is made 0700, the files
0600), and one is written whole (a temporary file renamed into place), so a guest
starting next to another never reads half of one. The folder is safe to delete.
"""

from __future__ import annotations

import importlib
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import wasmtime
from wasmtime import _ffi as ffi

SUFFIX = ".cwasm"
HELPER_TIMEOUT = 300.0  # s: a large module on a slow device


def compile_cached(engine: wasmtime.Engine, wasm: bytes, cache_dir: Path | None) -> wasmtime.Module:
    """``wasmtime.Module(engine, wasm)``, read from ``cache_dir`` (compiled into it by
    the helper process first if it is not there); ``cache_dir`` None compiles here
    without a cache. Raises what compiling raises (wasmtime.WasmtimeError for a module
    that is not valid)."""
    if cache_dir is None:
        return wasmtime.Module(engine, wasm)
    path = cache_dir / f"{sha256_hex(wasm)}-{_wasmtime_key()}{SUFFIX}"
    if _trusted(path) or _compile_aside(wasm, path):
        try:
            return wasmtime.Module.deserialize_file(engine, str(path))
        except wasmtime.WasmtimeError:
            pass  # another wasmtime or other settings wrote it: compile and replace it
    module = wasmtime.Module(engine, wasm)
    store(path, module.serialize())
    return module


def _compile_aside(wasm: bytes, path: Path) -> bool:
    """Compile ``wasm`` into ``path`` in the helper process; True once it is there."""
    try:
        done = subprocess.run([sys.executable, "-m", __name__, str(path)], input=wasm,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=HELPER_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and _trusted(path)


def _wasmtime_key() -> str:
    library = Path(ffi.filename)
    try:
        info = library.stat()
    except OSError:
        return "unknown"
    identity = f"{library.resolve()}:{info.st_size}:{info.st_mtime_ns}"
    return sha256_hex(identity.encode())[:16]


def sha256_hex(data: bytes) -> str:
    """SHA-256 by CPython's own implementation (the one hashlib falls back to): hashlib
    itself loads OpenSSL's libcrypto, 3 MiB more resident in the guest for one hash."""
    for name in ("_sha2", "_sha256"):  # Python 3.12+, 3.11
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return str(module.sha256(data).hexdigest())
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _trusted(path: Path) -> bool:
    try:
        info = path.stat()
    except OSError:
        return False
    return (stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def store(path: Path, compiled: bytes | bytearray) -> bool:
    """Write ``compiled`` to ``path`` whole (folder 0700, file 0600); False if it cannot be."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=SUFFIX)
        try:
            with os.fdopen(fd, "wb") as out:  # mkstemp made it 0600
                out.write(compiled)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError:
        return False  # a cache only: the next start compiles again
    return True


def main() -> int:
    """The helper: the wasm on stdin, compiled into the file named by the argument."""
    compiled = wasmtime.Module(wasmtime.Engine(), sys.stdin.buffer.read()).serialize()
    return 0 if store(Path(sys.argv[1]), compiled) else 1


if __name__ == "__main__":
    sys.exit(main())
