"""Run a wasm32-wasi app the way ``wasmedge`` does, on wasmtime, with WASI-NN GGML.

Same shape as ``wasmedge [--dir GUEST:HOST]… [--env K=V]… [--nn-preload …] APP ARGS…``:
argv[0] is the app's file name, the environment is only what ``--env`` gives (as
in wasmedge, nothing is inherited), stdin/stdout/stderr are this process's own,
and the result is the app's exit code. As on genuine WasmEdge (0.17), errors are
``[<time>] [error] …`` lines on stdout: a trap exits 134, an app that cannot start
(invalid wasm, an unknown import, no ``_start``, a missing file) exits 1, and the
WASI-NN plugin's own errors are logged there too.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import wasmtime
from wasmtime import _ffi as ffi  # the unchecked host-function API (see HostCalls)

from edgebundle.errors import RuntimeNotFoundError, UsageError
from edgebundle.runtime.embedded.module_cache import compile_cached
from edgebundle.runtime.embedded.nn_errno import RUNTIME_ERROR, log_error
from edgebundle.runtime.embedded.preload import Preload
from edgebundle.runtime.embedded.wasi_nn import MemoryFault, RawMemory, WasiNn

NN_MODULE = "wasi_ephemeral_nn"
WASI_MODULE = "wasi_snapshot_preview1"
_U32_MASK = 0xFFFFFFFF


def parse_dir(text: str) -> tuple[str, str]:
    """wasmedge's ``--dir GUEST:HOST``; a bare ``PATH`` maps the path onto itself."""
    guest, sep, host = text.partition(":")
    if not sep:
        return text, text
    if not guest or not host:
        raise UsageError(f"--dir {text!r} is not GUEST:HOST (e.g. --dir .:. or --dir /data:/srv)")
    return guest, host


def parse_env(text: str) -> tuple[str, str]:
    """wasmedge's ``--env NAME=VALUE``."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise UsageError(f"--env {text!r} is not NAME=VALUE")
    return name, value


TRAP_EXIT = 134  # genuine wasmedge aborts on a trap (SIGABRT's 128 + 6)
START_FAILED_EXIT = 1  # invalid wasm, an unknown import, no _start


def run_app(app: Path, args: Sequence[str], *, dirs: Sequence[tuple[str, str]] = (),
            env: Mapping[str, str] | None = None, preloads: Sequence[Preload] = (),
            log: TextIO | None = None, cache_dir: Path | None = None) -> int:
    """Run ``app`` to its end and return its exit code (errors logged on ``log``,
    stdout by default, as genuine wasmedge does). ``cache_dir``: where compiled modules
    are kept between runs (:mod:`.module_cache`); None compiles every time."""
    out = log or sys.stdout
    try:
        return _run(app, args, dirs, env, preloads, out, cache_dir)
    except (UsageError, RuntimeNotFoundError) as exc:
        log_error(str(exc), prefix="", stream=out)
        return START_FAILED_EXIT


def _run(app: Path, args: Sequence[str], dirs: Sequence[tuple[str, str]],
         env: Mapping[str, str] | None, preloads: Sequence[Preload], out: TextIO,
         cache_dir: Path | None) -> int:
    engine = wasmtime.Engine()
    module = _compile(engine, app, cache_dir)
    wants_nn = _check_imports(app, module)

    config = wasmtime.WasiConfig()
    config.argv = [app.name, *args]
    config.env = list((env or {}).items())
    config.inherit_stdin()
    config.inherit_stdout()  # never stdout_custom: its callbacks can panic at exit
    config.inherit_stderr()
    for guest, host in dirs:
        if not Path(host).is_dir():
            raise UsageError(f"--dir {guest}:{host}: {host} is not a directory")
        config.preopen_dir(host, guest)

    store = wasmtime.Store(engine)
    store.set_wasi(config)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    nn = WasiNn(preloads, log=out)
    calls = HostCalls(nn)
    if wants_nn:
        calls.define(linker)
    try:
        try:
            instance = linker.instantiate(store, module)
        except wasmtime.WasmtimeError as exc:
            raise RuntimeNotFoundError(f"cannot start {app.name} on the embedded runtime: "
                                       f"{_first_line(exc)}") from None
        start = instance.exports(store).get("_start")
        if not isinstance(start, wasmtime.Func):
            raise UsageError(f"{app} has no _start export: it is not a WASI command (program)")
        try:
            start(store)
        except wasmtime.ExitTrap as exc:
            return int(exc.code)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            calls.reraise()
            cause = [line.strip() for line in str(exc).splitlines() if line.strip()]
            log_error(f"execution failed: {cause[-1] if cause else 'trap'}", prefix="",
                      stream=out)
            log_error(f'    When executing function name: "_start" of {app.name}', prefix="",
                      stream=out)
            return TRAP_EXIT
        return 0
    finally:
        nn.close()


_VOID_P = ctypes.c_void_p
# The C API's unchecked host function: (env, caller, values, count) -> trap or NULL.
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_size_t, _VOID_P, _VOID_P, _VOID_P, ctypes.c_size_t)


def _c_function(name: str, restype: Any, *argtypes: Any) -> Any:
    """Our own prototype for a wasmtime C function: plain addresses in and out, no
    pointer objects (wasmtime-py's shared prototypes must stay as they are)."""
    address = ctypes.cast(getattr(ffi.dll, name), _VOID_P).value
    if not address:
        raise RuntimeNotFoundError(f"wasmtime's library has no {name}: reinstall wasmtime")
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


_define_unchecked = _c_function(
    "wasmtime_linker_define_func_unchecked", _VOID_P, _VOID_P, ctypes.c_char_p, ctypes.c_size_t,
    ctypes.c_char_p, ctypes.c_size_t, _VOID_P, _CALLBACK, _VOID_P, _VOID_P)
_caller_context = _c_function("wasmtime_caller_context", _VOID_P, _VOID_P)
_memory_data = _c_function("wasmtime_memory_data", _VOID_P, _VOID_P, _VOID_P)
_memory_size = _c_function("wasmtime_memory_data_size", ctypes.c_size_t, _VOID_P, _VOID_P)
_caller_export = _c_function("wasmtime_caller_export_get", ctypes.c_bool, _VOID_P,
                             ctypes.c_char_p, ctypes.c_size_t, _VOID_P)
_SLOT = 16  # sizeof(wasmtime_val_raw_t); an i32 sits in the first 4 bytes of its slot


class HostCalls:
    """``wasi_ephemeral_nn`` as raw wasmtime host functions.

    wasmtime-py's ``define_func`` converts every argument and result through ``Val``
    objects (about 100 us a call here) and the generation loop makes two calls per
    token, so this uses the C API's unchecked callbacks: i32s read and written in
    place, the guest memory located through the caller with plain C calls. A
    BaseException (Ctrl-C) becomes a trap and :meth:`reraise` raises it again.
    """

    def __init__(self, nn: WasiNn) -> None:
        self.nn = nn
        self.pending: BaseException | None = None
        self._memory: Any = None  # wasmtime_memory_t of the calling instance
        self._memory_address = 0
        self._keep: list[Any] = []  # ctypes keeps callbacks alive only while referenced

    def define(self, linker: wasmtime.Linker) -> None:
        i32 = wasmtime.ValType.i32()
        module = NN_MODULE.encode()
        for name, arity in WasiNn.FUNCTIONS.items():
            ty = wasmtime.FuncType([i32] * arity, [i32])
            callback = _CALLBACK(self._callback(getattr(self.nn, name), arity,
                                                name in WasiNn.WITH_MEMORY))
            self._keep.append((callback, ty))
            raw_name = name.encode()
            error = _define_unchecked(
                ctypes.cast(linker.ptr(), _VOID_P), module, len(module), raw_name, len(raw_name),
                ctypes.cast(ty.ptr(), _VOID_P), callback, None, None)
            if error:
                raise wasmtime.WasmtimeError._from_ptr(
                    ctypes.cast(error, ctypes.POINTER(ffi.wasmtime_error_t)))

    def reraise(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            raise pending

    def _callback(self, method: Callable[..., int], arity: int,
                  with_memory: bool) -> Callable[[Any, Any, Any, int], int]:
        slots = ctypes.c_uint32 * (arity * _SLOT // 4)
        stride = _SLOT // 4
        view = self._view

        def call(env: Any, caller: int, values: int, count: int) -> int:
            try:
                raw = slots.from_address(values)
                args = raw[::stride]
                raw[0] = (method(view(caller), *args) if with_memory else method(*args)) \
                    & _U32_MASK
                return 0
            except Exception as exc:  # the methods answer errnos; this is the glue failing
                log_error(f"{method.__name__}: {exc}", backend=False, stream=self.nn.log)
                slots.from_address(values)[0] = RUNTIME_ERROR
                return 0
            except BaseException as exc:  # Ctrl-C and the like: stop the app, raise it later
                self.pending = exc
                trap = wasmtime.Trap(f"host function interrupted: {type(exc).__name__}")
                return ctypes.cast(trap._consume(), _VOID_P).value or 0

        return call

    def _view(self, caller: int) -> RawMemory:
        if not self._memory_address:
            item = ffi.wasmtime_extern_t()
            if not _caller_export(caller, b"memory", 6, ctypes.addressof(item)) \
                    or int(item.kind) != ffi.WASMTIME_EXTERN_MEMORY.value:
                raise MemoryFault("the app exports no memory")
            self._memory = item.of.memory
            self._memory_address = ctypes.addressof(self._memory)
        context = _caller_context(caller)
        return RawMemory(_memory_data(context, self._memory_address) or 0,
                         _memory_size(context, self._memory_address))


def _compile(engine: wasmtime.Engine, app: Path, cache_dir: Path | None) -> wasmtime.Module:
    try:
        wasm = app.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {app}: {exc.strerror or exc}; give the path of a .wasm "
                         "app") from None
    try:
        return compile_cached(engine, wasm, cache_dir)
    except wasmtime.WasmtimeError as exc:
        raise UsageError(f"{app} is not a valid WebAssembly module: {_first_line(exc)}") from None


def _check_imports(app: Path, module: wasmtime.Module) -> bool:
    """Name the first import the embedded runtime lacks; True if the app uses WASI-NN."""
    wants_nn = False
    for item in module.imports:
        if item.module == NN_MODULE:
            wants_nn = True
            if item.name not in WasiNn.FUNCTIONS:
                raise RuntimeNotFoundError(
                    f"{app.name} imports {NN_MODULE}.{item.name}, which the WasmEdge GGML plugin "
                    "(and so the embedded runtime) does not provide; run an app built for it")
        elif item.module != WASI_MODULE:
            raise RuntimeNotFoundError(
                f"{app.name} imports {item.module}.{item.name}, which the embedded runtime does "
                "not provide (it has WASI preview 1 and wasi_ephemeral_nn); run it under wasmedge")
    return wants_nn


def _first_line(exc: Any) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
