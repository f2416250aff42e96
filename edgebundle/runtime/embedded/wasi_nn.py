"""The ``wasi_ephemeral_nn`` module of WasmEdge's WASI-NN plugin, GGML backend only.

Every function takes and returns i32 (pointers into the guest's linear memory) and
answers an errno, as in WasmEdge plugins/wasi_nn/wasinnfunc.cpp:

    load(builders_ptr, builders_len, encoding, target, graph_out)
    load_by_name(name_ptr, name_len, graph_out)
    load_by_name_with_config(name_ptr, name_len, config_ptr, config_len, graph_out)
    init_execution_context(graph, ctx_out)
    set_input(ctx, index, tensor_ptr)      tensor: 20 bytes {dims_ptr, dims_len,
                                           type u8 + 3 pad, data_ptr, data_len}
    compute(ctx) / compute_single(ctx) / fini_single(ctx)
    get_output(ctx, index, buf, buf_max, written_out)   (get_output_single alike)
    unload(graph) / finalize_execution_context(ctx)

A too-small output buffer answers 7 with the needed size in ``written_out``. A
preloaded name loads once; later load_by_name calls return the same graph. A
Python exception inside a host function becomes errno 5 plus a log line on
stderr: the guest sees an error, the process never crashes.
"""

from __future__ import annotations

import ctypes
import functools
import struct
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TextIO, TypeVar

from edgebundle.runtime.embedded.nn_errno import (
    INVALID_ARGUMENT,
    INVALID_ENCODING,
    NOT_FOUND,
    RUNTIME_ERROR,
    SUCCESS,
    TOO_LARGE,
    NnError,
    log_error,
)
from edgebundle.runtime.embedded.preload import KNOWN_ENCODINGS, Preload

if TYPE_CHECKING:  # ggml is imported on first use: llama_cpp is heavy
    from edgebundle.runtime.embedded.ggml import ExecutionContext, Graph

GGML_ENCODING = 6  # the plugin's Backend::GGML
TENSOR_TYPES = (0, 1, 3, 4)  # F16, F32, U8, I32: what set_input accepts
_U32 = struct.Struct("<I")
_TENSOR = struct.Struct("<IIB3xII")


class GuestMemory(Protocol):
    """The guest's linear memory; reads and writes raise MemoryFault out of bounds."""

    def read(self, ptr: int, size: int) -> bytes: ...

    def write(self, ptr: int, data: bytes) -> None: ...


class MemoryFault(Exception):
    """A pointer or length that does not fit the guest's memory."""


class BytesMemory:
    """Linear memory held in a bytearray (for callers that are not a wasm instance)."""

    def __init__(self, data: bytearray) -> None:
        self.data = data

    def read(self, ptr: int, size: int) -> bytes:
        if ptr < 0 or size < 0 or ptr + size > len(self.data):
            raise MemoryFault(f"{size} bytes at {ptr}")
        return bytes(self.data[ptr:ptr + size])

    def write(self, ptr: int, data: bytes) -> None:
        if ptr < 0 or ptr + len(data) > len(self.data):
            raise MemoryFault(f"{len(data)} bytes at {ptr}")
        self.data[ptr:ptr + len(data)] = data


class RawMemory:
    """Linear memory at a raw address (a wasmtime memory during one host call)."""

    __slots__ = ("base", "size")

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.size = size

    def read(self, ptr: int, size: int) -> bytes:
        if ptr + size > self.size:
            raise MemoryFault(f"{size} bytes at {ptr}")
        return ctypes.string_at(self.base + ptr, size)

    def write(self, ptr: int, data: bytes) -> None:
        if ptr + len(data) > self.size:
            raise MemoryFault(f"{len(data)} bytes at {ptr}")
        ctypes.memmove(self.base + ptr, data, len(data))


F = TypeVar("F", bound=Callable[..., int])


def host_function(func: F) -> F:
    """Errno in, errno out: NnError -> its errno, a bad pointer -> 1, anything else -> 5."""
    name = func.__name__

    @functools.wraps(func)
    def guarded(self: WasiNn, *args: Any) -> int:
        try:
            return func(self, *args)
        except NnError as exc:
            log_error(exc.message, backend=exc.backend, stream=self.log)
            return exc.errno
        except MemoryFault as exc:
            log_error(f"{name}: failed when accessing the guest memory ({exc}).",
                      backend=False, stream=self.log)
            return INVALID_ARGUMENT
        except Exception as exc:  # never let a bug crash the guest's process
            log_error(f"{name}: unexpected {type(exc).__name__}: {exc}", stream=self.log)
            return RUNTIME_ERROR

    return guarded  # type: ignore[return-value]


class WasiNn:
    """The host side of ``wasi_ephemeral_nn``: graphs, contexts and the preload table."""

    FUNCTIONS: dict[str, int] = {  # name -> number of i32 parameters
        "load": 5, "load_by_name": 3, "load_by_name_with_config": 5,
        "init_execution_context": 2, "set_input": 3, "compute": 1, "get_output": 5,
        "compute_single": 1, "get_output_single": 5, "fini_single": 1, "unload": 1,
        "finalize_execution_context": 1,
    }
    # The functions that touch guest memory take it as their first argument.
    WITH_MEMORY = frozenset({"load", "load_by_name", "load_by_name_with_config",
                             "init_execution_context", "set_input", "get_output",
                             "get_output_single"})

    def __init__(self, preloads: Sequence[Preload] = (), *, log: TextIO | None = None) -> None:
        self.preloads = {p.name: p for p in preloads}
        self.log = log or sys.stderr
        self.graphs: list[Graph | None] = []
        self.contexts: list[ExecutionContext | None] = []
        self._by_name: dict[str, int] = {}

    # -- loading -------------------------------------------------------------------

    @host_function
    def load(self, mem: GuestMemory, builders_ptr: int, builders_len: int, encoding: int,
             target: int, graph_out: int) -> int:
        if encoding != GGML_ENCODING:
            raise NnError(INVALID_ENCODING, f"Unknown backend {encoding}; the embedded "
                          "runtime has the GGML backend only.", backend=False)
        if target not in (0, 1, 2, 3):
            raise NnError(INVALID_ARGUMENT, f"Unknown device {target};", backend=False)
        pairs = mem.read(builders_ptr, 8 * builders_len)
        builders = [mem.read(*struct.unpack_from("<II", pairs, 8 * i)) for i in range(builders_len)]
        if not builders:
            raise NnError(INVALID_ARGUMENT, "load: no model given.")
        from edgebundle.runtime.embedded.ggml import load_graph_from_bytes

        graph = load_graph_from_bytes(builders[0], builders[1] if len(builders) > 1 else None)
        mem.write(graph_out, _U32.pack(self._add_graph(graph)))
        return SUCCESS

    @host_function
    def load_by_name(self, mem: GuestMemory, name_ptr: int, name_len: int, graph_out: int) -> int:
        return self._load_by_name(mem, mem.read(name_ptr, name_len), None, graph_out)

    @host_function
    def load_by_name_with_config(self, mem: GuestMemory, name_ptr: int, name_len: int,
                                 config_ptr: int, config_len: int, graph_out: int) -> int:
        config = mem.read(config_ptr, config_len)
        return self._load_by_name(mem, mem.read(name_ptr, name_len), config, graph_out)

    def _load_by_name(self, mem: GuestMemory, raw_name: bytes, config: bytes | None,
                      graph_out: int) -> int:
        name = raw_name.decode("utf-8", "surrogateescape")
        graph_id = self._by_name.get(name)
        if graph_id is None:
            preload = self.preloads.get(name)
            if preload is None:
                return NOT_FOUND  # the plugin answers this without a log line
            if preload.encoding != "ggml":
                backend = KNOWN_ENCODINGS[preload.encoding]
                raise NnError(INVALID_ARGUMENT, f"{backend} backend is not built. use "
                              f'-WASMEDGE_PLUGIN_WASI_NN_BACKEND="{backend}" to build it.',
                              backend=False)
            from edgebundle.runtime.embedded.ggml import load_graph

            graph_id = self._add_graph(load_graph(preload.path, config))
            self._by_name[name] = graph_id
        mem.write(graph_out, _U32.pack(graph_id))
        return SUCCESS

    def _add_graph(self, graph: Graph) -> int:
        self.graphs.append(graph)
        return len(self.graphs) - 1

    @host_function
    def init_execution_context(self, mem: GuestMemory, graph_id: int, ctx_out: int) -> int:
        from edgebundle.runtime.embedded.ggml import ExecutionContext

        graph = self._graph(graph_id, "init_execution_context")
        self.contexts.append(ExecutionContext(graph))
        mem.write(ctx_out, _U32.pack(len(self.contexts) - 1))
        return SUCCESS

    # -- running -------------------------------------------------------------------

    @host_function
    def set_input(self, mem: GuestMemory, ctx_id: int, index: int, tensor_ptr: int) -> int:
        dims_ptr, dims_len, kind, data_ptr, data_len = _TENSOR.unpack(mem.read(tensor_ptr, 20))
        mem.read(dims_ptr, 4 * dims_len)  # checked like the plugin, otherwise unused
        if kind not in TENSOR_TYPES:
            raise NnError(INVALID_ARGUMENT, f"Unknown tensor type {kind}.", backend=False)
        data = mem.read(data_ptr, data_len)
        ctx = self._context(ctx_id, "set_input")
        if index == 1:
            ctx.set_metadata(data)
        else:
            ctx.set_prompt(data)
        return SUCCESS

    @host_function
    def compute(self, ctx_id: int) -> int:
        return self._context(ctx_id, "compute").compute()

    @host_function
    def compute_single(self, ctx_id: int) -> int:
        return self._context(ctx_id, "compute_single").compute_single()

    @host_function
    def get_output(self, mem: GuestMemory, ctx_id: int, index: int, buf: int, buf_max: int,
                   written_out: int) -> int:
        data = self._context(ctx_id, "get_output").output(index, single=False)
        return self._copy_out(mem, data, buf, buf_max, written_out)

    @host_function
    def get_output_single(self, mem: GuestMemory, ctx_id: int, index: int, buf: int,
                          buf_max: int, written_out: int) -> int:
        data = self._context(ctx_id, "get_output_single").output(index, single=True)
        return self._copy_out(mem, data, buf, buf_max, written_out)

    @host_function
    def fini_single(self, ctx_id: int) -> int:
        self._context(ctx_id, "fini_single").fini_single()
        return SUCCESS

    # -- releasing -----------------------------------------------------------------

    @host_function
    def unload(self, graph_id: int) -> int:
        graph = self._graph(graph_id, "unload")
        graph.unload()
        self.graphs[graph_id] = None
        for name, known in list(self._by_name.items()):
            if known == graph_id:
                del self._by_name[name]
        return SUCCESS

    @host_function
    def finalize_execution_context(self, ctx_id: int) -> int:
        self._context(ctx_id, "finalize_execution_context").finalize()
        self.contexts[ctx_id] = None
        return SUCCESS

    def close(self) -> None:
        """Free every context and model (the process is about to end)."""
        for ctx in self.contexts:
            if ctx is not None:
                ctx.finalize()
        for graph in self.graphs:
            if graph is not None:
                graph.unload()
        self.contexts.clear()
        self.graphs.clear()
        self._by_name.clear()

    # -- helpers -------------------------------------------------------------------

    @staticmethod
    def _copy_out(mem: GuestMemory, data: bytes, buf: int, buf_max: int, written_out: int) -> int:
        mem.write(written_out, _U32.pack(len(data)))
        if len(data) > buf_max:
            raise NnError(TOO_LARGE, f"output buffer too small, need {len(data)} bytes but got "
                          f"{buf_max}.")
        mem.write(buf, data)
        return SUCCESS

    def _graph(self, graph_id: int, what: str) -> Graph:
        graph = self.graphs[graph_id] if 0 <= graph_id < len(self.graphs) else None
        if graph is None:
            raise NnError(INVALID_ARGUMENT, f"{what}: Graph Id does not exist.", backend=False)
        return graph

    def _context(self, ctx_id: int, what: str) -> ExecutionContext:
        ctx = self.contexts[ctx_id] if 0 <= ctx_id < len(self.contexts) else None
        if ctx is None:
            raise NnError(INVALID_ARGUMENT, f"{what}: Execution Context does not exist.",
                          backend=False)
        return ctx
