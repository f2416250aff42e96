"""Compiled wasm modules kept between runs of the embedded runtime.

Compiling edgechat.wasm with wasmtime's Cranelift takes about 40 ms and leaves about
12 MiB of the compiler's memory resident in the guest process for its whole life;
loading the same module precompiled (``Module.serialize`` earlier, then
``Module.deserialize_file``, which maps the file) takes under a millisecond and
almost no memory. So :func:`compile_cached` keeps each compiled module in
``<home>/cache/wasm/``, named by the sha256 of the wasm's bytes and by the identity of
wasmtime's native library (its path, size and modification time: a new wasmtime is
a new name, without importing importlib.metadata to ask its version). wasmtime checks
the file's own version and settings again when loading it; a file it refuses, or
cannot read, is compiled anew and replaced.

A compiled module is machine code that runs in this process, so only a file this
user owns and nobody else may write is loaded (the folder is made 0700, the files
0600), and one is written whole (a temporary file renamed into place), so a guest
starting next to another never reads half of one. Nothing here is needed: when the
folder cannot be made or written, the module is compiled as without a cache. The
folder is safe to delete.
"""

from __future__ import annotations

import importlib
import os
import stat
import tempfile
from pathlib import Path

import wasmtime
from wasmtime import _ffi as ffi

SUFFIX = ".cwasm"


def compile_cached(engine: wasmtime.Engine, wasm: bytes, cache_dir: Path | None) -> wasmtime.Module:
    """``wasmtime.Module(engine, wasm)``, read from ``cache_dir`` when it holds it (and
    written there when not); ``cache_dir`` None compiles without a cache. Raises what
    compiling raises (wasmtime.WasmtimeError for a module that is not valid)."""
    if cache_dir is None:
        return wasmtime.Module(engine, wasm)
    path = cache_dir / f"{sha256_hex(wasm)}-{_wasmtime_key()}{SUFFIX}"
    if _trusted(path):
        try:
            return wasmtime.Module.deserialize_file(engine, str(path))
        except wasmtime.WasmtimeError:
            pass  # another wasmtime or other settings wrote it: compile and replace it
    module = wasmtime.Module(engine, wasm)
    _store(path, module)
    return module


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


def _store(path: Path, module: wasmtime.Module) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=SUFFIX)
        try:
            with os.fdopen(fd, "wb") as out:  # mkstemp made it 0600
                out.write(module.serialize())
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except (OSError, wasmtime.WasmtimeError):
        pass  # a cache only: the next start compiles again
