"""WasmEdge's WASI-NN GGML backend, over llama-cpp-python's low-level llama.cpp API.

Semantics read from WasmEdge plugins/wasi_nn/GGML/ (core/ggml_core.cpp,
core/input_processor.cpp, core/output_generator.cpp, compute/compute_engine.cpp,
compute/inference_manager.cpp):

- load: the model file is checked (103 if missing) and opened only now; the graph
  owns the llama model and ONE llama context, shared by its execution contexts.
- set_input index 1: metadata JSON (see :mod:`.metadata`); any other index: the
  prompt, tokenized with add_special and parse_special (so BOS is added only if
  the model asks for it, and special-token text becomes special tokens).
- compute: clear, evaluate the prompt, then sample until n-predict, an
  end-of-generation token or the reverse prompt; the EOG token's piece IS part of
  the output; end-of-sequence becomes success.
- compute_single: the first call clears and evaluates the prompt; every call
  samples one token; 100 at an EOG token (unless ignore-eos) and no n-predict or
  reverse prompt (the caller counts and stops). A failure ends the sequence.
- prompt longer than n_ctx - 4 tokens -> 102; a token that does not fit the
  context any more -> 101 (the sampled token still counts as output, as there).
- output 0: all generated text (compute) or the last token's piece (single);
  output 1: ``{"input_tokens": N, "output_tokens": M, "llama_build_number": B,
  "llama_commit": "C"}``.

Differences, on purpose:

- The KV cache is kept between prompts. The plugin clears it at every set_input and
  compute (GGML/core/input_processor.cpp, compute/inference_manager.cpp
  clearContext), so every turn evaluates its whole prompt again; here the graph
  remembers which tokens its context holds (:attr:`Graph.cached`) and a new prompt
  evaluates only what follows the longest common prefix (at least its last token, for
  the logits). A chat thread's next turn starts with the whole previous turn, so its
  first token costs the new message, not the history: what llama.cpp's own server
  and llama_cpp.server do. The guest sees the same outputs (input_tokens counts the
  whole prompt).
- compute_single evaluates the token it returns at the start of the next call, not
  before returning it (the plugin's sampleOutput evaluates first): the guest has each
  piece one evaluation sooner, and a guest that stops after a token never pays for
  evaluating it.
- The sampler is rebuilt whenever any sampling option changes (the plugin checks
  only temp, top-p, penalties, grammar and seed).

Like the plugin (GGML/core/ggml_core.cpp), ``ctx-size``, ``batch-size`` and
``threads`` take effect at load only (give them in load_by_name_with_config's
config), prompt batches run with ``threads`` too (the plugin ignores
``threads-batch`` at load), and a later set_input's values are parsed but do not
rebuild the llama context: a guest that sends threads only per request runs
llama.cpp's default of 4 on both runtimes.

The per-token path makes a handful of C calls and no Python allocations beyond
the token's cached piece.

Why it is over 400 lines: it mirrors one backend of WasmEdge's plugin (a graph and its
execution context, with the plugin's error codes and option handling), kept in one
module so that it can be read side by side with GGML/core/ggml_core.cpp.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from dataclasses import replace
from typing import Any

from edgebundle.runtime.embedded.metadata import (
    ContextConfig,
    GraphSettings,
    Sampling,
    apply_metadata,
)
from edgebundle.runtime.embedded.nn_errno import (
    CONTEXT_FULL,
    END_OF_SEQUENCE,
    INVALID_ARGUMENT,
    MODEL_NOT_FOUND,
    PROMPT_TOO_LONG,
    RUNTIME_ERROR,
    SUCCESS,
    NnError,
)

# llama-cpp-python exposes neither llama.cpp's build number nor its commit, so the
# info JSON says 0 / "unknown" where the plugin has LLAMA_BUILD_NUMBER/LLAMA_COMMIT.
LLAMA_BUILD_NUMBER = 0
LLAMA_COMMIT = "unknown"
_INT32_MAX = 2**31 - 1

_llama: Any = None  # the llama_cpp module, imported on the first load (it is heavy)
_log_callback: Any = None  # kept referenced: llama.cpp calls it from C
_log_enabled = False


def llama() -> Any:
    """llama_cpp, initialised once, with llama.cpp's logging gated by enable-log."""
    global _llama, _log_callback
    if _llama is None:
        from edgebundle.runtime.embedded.llama_bindings import llama_cpp

        @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
        def forward(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if _log_enabled:
                sys.stderr.write(text.decode("utf-8", "replace"))

        llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _log_callback = forward
        _llama = llama_cpp
    return _llama


def _set_log(enabled: bool) -> None:
    global _log_enabled
    _log_enabled = enabled


class Graph:
    """A loaded model: llama model + context, settings, and a piece cache."""

    def __init__(self, model_path: str, settings: GraphSettings | None = None,
                 conf: ContextConfig | None = None) -> None:
        self.path = model_path
        self.settings = settings or GraphSettings()
        self.conf = conf or ContextConfig()  # copied into each new execution context
        self.model: Any = None
        self.ctx: Any = None
        self.vocab: Any = None
        self.memory: Any = None
        self.n_ctx = 0
        self.n_batch = 0
        self.n_vocab = 0
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        # The tokens whose keys and values the context holds, at positions 0..len-1 of
        # sequence 0: what a next prompt may reuse.
        self.cached: list[int] = []

    def forget(self, keep: int = 0) -> None:
        """Drop the context's keys and values from position ``keep`` on."""
        if keep <= 0 or not _llama.llama_memory_seq_rm(self.memory, 0, keep, -1):
            _llama.llama_memory_clear(self.memory, True)
            keep = 0
        del self.cached[keep:]

    def load(self) -> None:
        if not self.path or not os.path.exists(self.path):
            raise NnError(MODEL_NOT_FOUND, "load: model file not found.")
        lib = llama()
        _set_log(self.settings.enable_log)
        params = lib.llama_model_default_params()
        model = lib.llama_model_load_from_file(os.fsencode(self.path), params)
        if not model:
            raise NnError(INVALID_ARGUMENT, "load: unable to init model.")
        self.model = model
        self.vocab = lib.llama_model_get_vocab(model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        settings = self.settings
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = max(0, settings.ctx_size)
        cparams.n_batch = max(1, settings.batch_size)
        cparams.n_ubatch = max(1, settings.ubatch_size)
        cparams.n_threads = max(1, settings.threads)
        cparams.n_threads_batch = max(1, settings.threads)
        cparams.flash_attn_type = {"on": lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                   "off": lib.LLAMA_FLASH_ATTN_TYPE_DISABLED}.get(
            settings.flash_attn, lib.LLAMA_FLASH_ATTN_TYPE_AUTO)
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            self.unload()
            raise NnError(INVALID_ARGUMENT, "load: unable to init context.")
        self.ctx = ctx
        self.memory = lib.llama_get_memory(ctx)
        self.n_ctx = lib.llama_n_ctx(ctx)
        self.n_batch = lib.llama_n_batch(ctx)

    @property
    def loaded(self) -> bool:
        return self.ctx is not None

    def unload(self) -> None:
        lib = _llama
        self.cached = []
        if self.ctx is not None:
            lib.llama_free(self.ctx)
            self.ctx = self.memory = None
        if self.model is not None:
            lib.llama_model_free(self.model)
            self.model = self.vocab = None

    def tokenize(self, text: bytes) -> Any:
        """Token ids as a ctypes array (add_special, parse_special: common_tokenize)."""
        lib = _llama
        capacity = len(text) + 2
        while True:
            tokens = (lib.llama_token * capacity)()
            n = lib.llama_tokenize(self.vocab, text, len(text), tokens, capacity, True, True)
            if n >= 0:
                return (lib.llama_token * n).from_buffer_copy(tokens, 0) if n else tokens[:0]
            capacity = -n

    def piece(self, token: int) -> bytes:
        """The token's text, special tokens rendered (common_token_to_piece)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = self._piece_buf
            n = _llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = _llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
            cached = self._pieces[token] = buf.raw[:n]
        return cached


def load_graph(model_path: str, config: bytes | None = None) -> Graph:
    """The plugin's load(): default settings, the config JSON, then the model."""
    graph = Graph(model_path)
    if config:
        try:
            apply_metadata(config, graph.settings, graph.conf)
        except NnError as exc:
            raise NnError(exc.errno, f"load: Failed to parse metadata. {exc.message}") from None
    graph.load()
    return graph


def load_graph_from_bytes(data: bytes, config: bytes | None = None) -> Graph:
    """load() with the model itself as the builder: written to a temporary file first."""
    if data.startswith(b"preload:"):
        return load_graph(os.fsdecode(data[len(b"preload:"):]), config)
    handle, path = tempfile.mkstemp(prefix="edgebundle-ggml-", suffix=".gguf")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        return load_graph(path, config)
    finally:
        os.unlink(path)  # llama.cpp has read or mapped it by now


class ExecutionContext:
    """One execution context of a graph: inputs, sampler, outputs, position."""

    def __init__(self, graph: Graph) -> None:
        lib = llama()
        self.graph = graph
        self.conf = replace(graph.conf)
        self.sampler: Any = None
        self._sampler_for: Sampling | None = None
        self.inputs: Any = None
        self.n_inputs = 0
        self.outputs = bytearray()
        self.output_tokens: list[int] = []
        self.npos = 0
        self.single_started = False
        self._held: int | None = None  # sampled, returned, not yet evaluated
        self._batch: Any = None
        self._batch_size = 0
        one = lib.llama_batch_init(1, 0, 1)
        one.n_tokens = 1
        one.n_seq_id[0] = 1
        one.seq_id[0][0] = 0
        one.logits[0] = 1
        self._one = one
        self._one_token = one.token  # cached pointers: the per-token path only stores
        self._one_pos = one.pos
        self._reverse = b""
        self._build_sampler()

    # -- inputs ------------------------------------------------------------------

    def set_metadata(self, raw: bytes) -> None:
        graph = self.graph
        try:
            apply_metadata(raw, graph.settings, self.conf)
        except NnError as exc:
            raise NnError(exc.errno, f"setInput: failed to parse metadata. {exc.message}") from None
        _set_log(graph.settings.enable_log)
        self._require_graph()
        if graph.settings.sampling != self._sampler_for:
            self._build_sampler()

    def set_prompt(self, raw: bytes) -> None:
        graph = self._require_graph()
        self.inputs = graph.tokenize(raw)
        self.n_inputs = len(self.inputs)
        self.single_started = False

    # -- compute -----------------------------------------------------------------

    def compute(self) -> int:
        self._require_graph()
        self._clear()
        self._evaluate_input("compute")
        self._reverse = self.conf.reverse_prompt.encode()
        budget = _INT32_MAX if self.conf.n_predict < 0 else self.conf.n_predict
        status = SUCCESS
        while budget > 0:
            budget -= 1
            status = self._sample(single=False)
            if status != SUCCESS:
                break
        return SUCCESS if status == END_OF_SEQUENCE else status

    def compute_single(self) -> int:
        self._require_graph()
        if not self.single_started:
            self.single_started = True
            self._clear()
            self._evaluate_input("compute")
        try:
            self._decode_held()
            status = self._sample(single=True)
        except NnError:
            self.single_started = False
            raise
        if status != SUCCESS:
            self.single_started = False
        return status

    def fini_single(self) -> None:
        self._held = None
        self.outputs.clear()
        self.output_tokens.clear()
        if self.sampler is not None:
            _llama.llama_sampler_reset(self.sampler)
        self.single_started = False
        self.npos = 0

    # -- outputs -----------------------------------------------------------------

    def output(self, index: int, *, single: bool) -> bytes:
        if index == 1:
            return self.info()
        if single:
            if not self.output_tokens:
                return b""
            self._require_graph()
            return self.graph.piece(self.output_tokens[-1])
        return bytes(self.outputs)

    def info(self) -> bytes:
        return (f'{{"input_tokens": {self.n_inputs}, "output_tokens": {len(self.output_tokens)}, '
                f'"llama_build_number": {LLAMA_BUILD_NUMBER}, "llama_commit": "{LLAMA_COMMIT}"}}'
                ).encode()

    def finalize(self) -> None:
        lib = _llama
        if self.sampler is not None:
            lib.llama_sampler_free(self.sampler)
            self.sampler = None
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._one is not None:
            lib.llama_batch_free(self._one)
            self._one = None

    # -- internals ---------------------------------------------------------------

    def _require_graph(self) -> Graph:
        if not self.graph.loaded:
            raise NnError(INVALID_ARGUMENT, "setInput: Graph is invalid. Please reload again by "
                          "passing metadata in set_input or unload graph.")
        return self.graph

    def _build_sampler(self) -> None:
        """common_sampler_init's chain, with the same order and defaults."""
        lib = llama()
        graph = self._require_graph()
        s = graph.settings.sampling
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        add = lib.llama_sampler_chain_add
        min_keep = max(0, s.min_keep)
        if s.grammar:
            grammar = lib.llama_sampler_init_grammar(graph.vocab, s.grammar.encode(), b"root")
            if not grammar:
                lib.llama_sampler_free(chain)
                raise NnError(INVALID_ARGUMENT, "setInput: unable to init sampler.")
            add(chain, grammar)
        if s.mirostat == 0:
            add(chain, lib.llama_sampler_init_penalties(
                graph.n_vocab, s.penalty_last_n, s.penalty_repeat, s.penalty_freq,
                s.penalty_present))
            if s.dry_multiplier > 0:
                breakers = (ctypes.c_char_p * 4)(b"\n", b":", b'"', b"*")
                add(chain, lib.llama_sampler_init_dry(
                    graph.vocab, s.dry_multiplier, s.dry_base, s.dry_allowed_length,
                    s.penalty_last_n, breakers, len(breakers)))
            add(chain, lib.llama_sampler_init_top_k(s.top_k))
            add(chain, lib.llama_sampler_init_typical(s.typ_p, min_keep))
            add(chain, lib.llama_sampler_init_top_p(s.top_p, min_keep))
            add(chain, lib.llama_sampler_init_min_p(s.min_p, min_keep))
            add(chain, lib.llama_sampler_init_xtc(s.xtc_probability, s.xtc_threshold,
                                                  min_keep, s.seed))
            add(chain, lib.llama_sampler_init_temp_ext(s.temp, s.dynatemp_range,
                                                       s.dynatemp_exponent))
            add(chain, lib.llama_sampler_init_dist(s.seed))
        elif s.mirostat == 1:
            add(chain, lib.llama_sampler_init_temp(s.temp))
            add(chain, lib.llama_sampler_init_mirostat(graph.n_vocab, s.seed, s.mirostat_tau,
                                                       s.mirostat_eta, 100))
        else:
            add(chain, lib.llama_sampler_init_temp(s.temp))
            add(chain, lib.llama_sampler_init_mirostat_v2(s.seed, s.mirostat_tau, s.mirostat_eta))
        if self.sampler is not None:
            lib.llama_sampler_free(self.sampler)
        self.sampler = chain
        self._sampler_for = replace(s)

    def _clear(self) -> None:
        """clearContext: reset sampler, forget outputs (the KV cache is kept for the
        next prompt's common prefix: see the module doc)."""
        self._held = None
        _llama.llama_sampler_reset(self.sampler)
        self.npos = 0
        self.outputs.clear()
        self.output_tokens.clear()

    def _evaluate_input(self, prefix: str) -> None:
        if self.n_inputs == 0:
            raise NnError(INVALID_ARGUMENT, f"{prefix}: llama input is not set!")
        limit = self.graph.n_ctx - 4  # room for special tokens, as the plugin keeps
        if self.n_inputs > limit:
            raise NnError(PROMPT_TOO_LONG,
                          f"{prefix}: the prompt is too long. Your input has {self.n_inputs} "
                          f"tokens. Please reduce it to {limit} tokens.")
        status = self._evaluate_prompt()
        if status != SUCCESS:
            raise NnError(status, f"{prefix}: failed to evaluate input tokens.")

    def _evaluate_prompt(self) -> int:
        graph = self.graph
        n = self.n_inputs
        if n > graph.n_ctx:
            return CONTEXT_FULL
        inputs = self.inputs
        cached = graph.cached
        reuse = 0
        limit = min(len(cached), n - 1)  # the last prompt token is evaluated for its logits
        while reuse < limit and cached[reuse] == inputs[reuse]:
            reuse += 1
        graph.forget(reuse)
        reuse = len(graph.cached)
        self.npos = reuse
        step = max(1, min(graph.settings.batch_size, graph.n_batch))
        if self._batch is None or self._batch_size != step:
            if self._batch is not None:
                _llama.llama_batch_free(self._batch)
            self._batch = _llama.llama_batch_init(step, 0, 1)
            self._batch_size = step
        batch = self._batch
        tokens, pos, n_seq, seq, logits = (batch.token, batch.pos, batch.n_seq_id, batch.seq_id,
                                           batch.logits)
        for start in range(reuse, n, step):
            count = min(step, n - start)
            for j in range(count):
                tokens[j] = inputs[start + j]
                pos[j] = self.npos + j
                n_seq[j] = 1
                seq[j][0] = 0
                logits[j] = 0
            if start + count >= n:
                logits[count - 1] = 1
            batch.n_tokens = count
            self._decode(batch)
            self.npos += count
            cached.extend(inputs[start:start + count])
        return SUCCESS

    def _sample(self, *, single: bool) -> int:
        """sampleOutput: one token sampled, recorded, checked, then evaluated (by
        compute_single: held for its next call, see :meth:`_decode_held`)."""
        graph = self.graph
        lib = _llama
        token = lib.llama_sampler_sample(self.sampler, graph.ctx, -1)
        self.output_tokens.append(token)
        piece = graph.piece(token)
        outputs = self.outputs
        outputs += piece
        if not single:
            if self.conf.stream_stdout:
                os.write(1, piece)
            reverse = self._reverse
            if reverse:
                start = max(0, len(outputs) - len(piece) - len(reverse) + 1)
                if outputs.find(reverse, start) >= 0:
                    return END_OF_SEQUENCE
        if not graph.settings.sampling.ignore_eos and lib.llama_vocab_is_eog(graph.vocab, token):
            return END_OF_SEQUENCE
        if self.npos + 1 > graph.n_ctx:
            return CONTEXT_FULL
        self._held = token
        if not single:
            self._decode_held()
        return SUCCESS

    def _decode_held(self) -> None:
        """Evaluate the token sampled last. compute_single returns its token first and
        evaluates it at the start of the next call (the guest has the piece one
        evaluation sooner: the first token's latency); a guest that stops there never
        pays for it."""
        token, self._held = self._held, None
        if token is None:
            return
        self._one_token[0] = token
        self._one_pos[0] = self.npos
        self._decode(self._one)
        self.npos += 1
        self.graph.cached.append(token)

    def _decode(self, batch: Any) -> None:
        status = _llama.llama_decode(self.graph.ctx, batch)
        if status:
            self.graph.forget()  # what the context holds is unknown now: nothing to reuse
            self._check_decode(status)

    @staticmethod
    def _check_decode(status: int) -> None:
        if status == 1:
            raise NnError(RUNTIME_ERROR, "evaluateTokens: failed to llama_decode: try reducing "
                          "the size of the batch or increasing the size of context.")
        if status < 0:
            raise NnError(RUNTIME_ERROR, "evaluateTokens: failed to llama_decode:  fatal error. "
                          "Please open an issue on GitHub.")
