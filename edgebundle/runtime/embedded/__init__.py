"""The embedded runtime: a WASI app under wasmtime with WasmEdge's WASI-NN GGML module.

``host.run_app`` runs any wasm32-wasi command the way ``wasmedge`` does (argv,
``--env``, ``--dir``, inherited stdio, exit code); ``wasi_nn`` provides the
``wasi_ephemeral_nn`` functions of the WasmEdge GGML plugin, implemented in
``ggml`` over llama-cpp-python with the plugin's semantics; ``preload`` parses
``--nn-preload``; ``metadata`` applies the plugin's metadata JSON.
"""
