"""Runtimes that execute the chat wasm: the real wasmedge binary, or the embedded one."""
