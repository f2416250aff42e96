"""WASI-NN error numbers, the error that carries one, and the plugin's log line.

[second-state/wasmedge-wasi-nn: rust/src/generated.rs; WasmEdge: plugins/wasi_nn/types.h]
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import TextIO

SUCCESS = 0
INVALID_ARGUMENT = 1
INVALID_ENCODING = 2
MISSING_MEMORY = 3
BUSY = 4
RUNTIME_ERROR = 5
UNSUPPORTED_OPERATION = 6
TOO_LARGE = 7
NOT_FOUND = 8
END_OF_SEQUENCE = 100
CONTEXT_FULL = 101
PROMPT_TOO_LONG = 102
MODEL_NOT_FOUND = 103


class NnError(Exception):
    """A host function fails with ``errno``; ``message`` is logged like the plugin does."""

    def __init__(self, errno: int, message: str, *, backend: bool = True) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message
        self.backend = backend  # False for the generic WASI-NN layer's messages


def log_error(message: str, *, backend: bool = True, stream: TextIO | None = None,
              prefix: str | None = None) -> None:
    """``[<time>] [error] [WASI-NN] GGML backend: <message>``, as spdlog prints it, on
    stdout by default: genuine WasmEdge's logger writes there (``--log-level off`` does
    not silence the plugin), so a guest's own stdout gets these lines too."""
    now = datetime.now().isoformat(sep=" ", timespec="milliseconds")
    if prefix is None:
        prefix = "[WASI-NN] GGML backend: " if backend else "[WASI-NN] "
    out = stream or sys.stdout
    out.write(f"[{now}] [error] {prefix}{message}\n")
    out.flush()
