"""The GGML plugin's metadata JSON (input 1, or the config of load_by_name_with_config).

Keys, types and clamping follow WasmEdge plugins/wasi_nn/GGML/metadata/metadata_parser.cpp:
JSON that does not parse -> errno 2 (invalid encoding); a known key with a value of
the wrong type -> errno 1; unknown keys are ignored. Like the plugin, the values
land in the graph's settings (shared by its contexts) except ``n-predict``,
``reverse-prompt`` and ``stream-stdout``, which belong to the execution context.
Keys for features this CPU build of llama.cpp lacks (GPU offload, multimodal,
TTS, speculative decoding, server options) are accepted and ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from edgebundle.runtime.embedded.nn_errno import INVALID_ARGUMENT, INVALID_ENCODING, NnError

LLAMA_DEFAULT_SEED = 0xFFFFFFFF


LLAMA_DEFAULT_THREADS = 4


def default_threads() -> int:
    """Threads when neither the load config nor the metadata names them: llama.cpp's
    default of 4, as genuine WasmEdge's plugin (it passes n_threads = -1) whatever the
    CPUs; edgebundle always sends ``threads`` (apps.load_config)."""
    return LLAMA_DEFAULT_THREADS


@dataclass
class Sampling:
    """llama.cpp's common_params_sampling defaults (common/common.h)."""

    seed: int = LLAMA_DEFAULT_SEED
    min_keep: int = 0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.10
    typ_p: float = 1.0
    temp: float = 0.80
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    penalty_last_n: int = 64
    penalty_repeat: float = 1.0
    penalty_freq: float = 0.0
    penalty_present: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.10
    grammar: str = ""
    ignore_eos: bool = False


@dataclass
class GraphSettings:
    """Per-graph settings: the model/context parameters and the sampling options."""

    enable_log: bool = False
    enable_debug_log: bool = False
    n_gpu_layers: int = -1  # accepted; this llama.cpp build is CPU only
    ctx_size: int = 0  # 0 = the model's training context
    batch_size: int = 2048
    ubatch_size: int = 512
    threads: int = field(default_factory=default_threads)
    threads_batch: int = 0  # 0 = same as threads
    embedding: bool = False
    flash_attn: str = "auto"  # on | off | auto
    sampling: Sampling = field(default_factory=Sampling)


@dataclass
class ContextConfig:
    """Per-execution-context settings (the plugin's LocalConfig)."""

    n_predict: int = -1  # compute() only; -1 = until EOG or context full
    reverse_prompt: str = ""  # compute() only
    stream_stdout: bool = False  # compute() only


# key -> (where, attribute, type). "g" graph, "s" sampling, "c" context config.
_KEYS: dict[str, tuple[str, str, type]] = {
    "enable-log": ("g", "enable_log", bool),
    "enable-debug-log": ("g", "enable_debug_log", bool),
    "n-gpu-layers": ("g", "n_gpu_layers", int),
    "ctx-size": ("g", "ctx_size", int),
    "batch-size": ("g", "batch_size", int),
    "ubatch-size": ("g", "ubatch_size", int),
    "threads": ("g", "threads", int),
    "threads-batch": ("g", "threads_batch", int),
    "embedding": ("g", "embedding", bool),
    "flash-attn": ("g", "flash_attn", str),
    "seed": ("s", "seed", int),
    "min-keep": ("s", "min_keep", int),
    "top-k": ("s", "top_k", int),
    "top-p": ("s", "top_p", float),
    "min-p": ("s", "min_p", float),
    "xtc-probability": ("s", "xtc_probability", float),
    "xtc-threshold": ("s", "xtc_threshold", float),
    "typ-p": ("s", "typ_p", float),
    "temp": ("s", "temp", float),
    "dynatemp-range": ("s", "dynatemp_range", float),
    "dynatemp-exponent": ("s", "dynatemp_exponent", float),
    "last-n-penalty": ("s", "penalty_last_n", int),
    "dry-last-n-penalty": ("s", "penalty_last_n", int),  # sic: the plugin maps it there
    "repeat-penalty": ("s", "penalty_repeat", float),
    "presence-penalty": ("s", "penalty_present", float),
    "frequency-penalty": ("s", "penalty_freq", float),
    "dry-multipier": ("s", "dry_multiplier", float),  # sic: the plugin's spelling
    "dry-base": ("s", "dry_base", float),
    "dry-allowed-length": ("s", "dry_allowed_length", int),
    "mirostat": ("s", "mirostat", int),
    "mirostat-eta": ("s", "mirostat_eta", float),
    "grammar": ("s", "grammar", str),
    "ignore-eos": ("s", "ignore_eos", bool),
    "n-predict": ("c", "n_predict", int),
    "reverse-prompt": ("c", "reverse_prompt", str),
    "stream-stdout": ("c", "stream_stdout", bool),
}
_FLASH_ATTN = {"on": "on", "enabled": "on", "off": "off", "disabled": "off", "auto": "auto"}
# The plugin clamps these at 0.
_NON_NEGATIVE = frozenset({"temp", "top-p", "repeat-penalty", "presence-penalty",
                           "frequency-penalty"})


def _typed(key: str, value: Any, kind: type) -> Any:
    """The value as the plugin's typed JSON getters accept it, or an errno-1 error."""
    is_bool = isinstance(value, bool)
    if kind is bool:
        ok = is_bool
    elif kind is int:
        ok = isinstance(value, int) and not is_bool
        # the plugin reads integers as int64 (simdjson): a uint64 beyond it is refused
        # as invalid (1), a bigger number breaks the parse (2), as genuine WasmEdge does
        if ok and not -2**63 <= value < 2**63:
            if -2**63 <= value < 2**64:
                raise NnError(INVALID_ARGUMENT, f"Unable to retrieve the {key} option.")
            raise NnError(INVALID_ENCODING, "parse metadata error.")
    elif kind is float:
        ok = isinstance(value, int | float) and not is_bool
    else:
        ok = isinstance(value, str)
    if not ok:
        raise NnError(INVALID_ARGUMENT, f"Unable to retrieve the {key} option.")
    return float(value) if kind is float else value


def apply_metadata(raw: bytes, graph: GraphSettings, conf: ContextConfig) -> None:
    """Apply a metadata JSON to the settings, as the plugin's parseMetadata does."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise NnError(INVALID_ENCODING, "parse metadata error.") from None
    if not isinstance(doc, dict):
        raise NnError(INVALID_ENCODING, "parse metadata error.")
    if "json-schema" in doc:
        doc = {**doc, "grammar": _schema_grammar(doc["json-schema"])}
    for key, value in doc.items():
        target = _KEYS.get(key)
        if target is None:
            continue
        where, attribute, kind = target
        value = _typed(key, value, kind)
        if key in _NON_NEGATIVE:
            value = max(0.0, value)
        if key == "flash-attn":
            value = _FLASH_ATTN.get(value)
            if value is None:
                raise NnError(INVALID_ARGUMENT, "The flash-attn option must be one of: on, off, "
                              "auto.")
        owner: object = graph if where == "g" else graph.sampling if where == "s" else conf
        setattr(owner, attribute, value)


def _schema_grammar(schema: Any) -> str:
    """json-schema -> GBNF, with llama-cpp-python's converter (the plugin uses llama.cpp's)."""
    if not isinstance(schema, str):
        raise NnError(INVALID_ARGUMENT, "Unable to retrieve the json-schema option.")
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return str(json_schema_to_gbnf(schema))
    except Exception as exc:  # the converter raises many kinds on bad schemas
        raise NnError(INVALID_ARGUMENT, f"Invalid json-schema option: {exc}") from None
