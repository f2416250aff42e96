"""``--nn-preload NAME:ENCODING:TARGET:PATH``, parsed the way the WasmEdge plugin does.

Encoding and target are case-insensitive; the path may itself contain ``:`` (the
plugin joins the remaining fields). The model file is not opened here: like the
GGML plugin, a missing file only shows up as errno 103 when the app loads it.
[WasmEdge: plugins/wasi_nn/wasinnenv.cpp]
"""

from __future__ import annotations

from dataclasses import dataclass

from edgebundle.errors import UsageError

TARGETS = ("cpu", "gpu", "tpu", "auto")
# Backends the plugin knows; only GGML is implemented by the embedded runtime.
KNOWN_ENCODINGS = ("openvino", "onnx", "tensorflow", "pytorch", "pytorchaoti", "tensorflowlite",
                   "autodetect", "ggml", "neuralspeed", "whisper", "mlx", "piper", "chattts",
                   "openvinogenai", "bitnet")


@dataclass(frozen=True)
class Preload:
    """One preloaded model: the app loads it with ``load_by_name(name)``."""

    name: str
    encoding: str  # lower case, always "ggml" here
    target: str  # lower case: cpu | gpu | tpu | auto
    path: str


def parse_preload(text: str) -> Preload:
    """Parse one ``--nn-preload`` value; a usage error names what is wrong."""
    fields = text.split(":")
    if len(fields) < 4 or not fields[0] or not fields[3]:
        raise UsageError(f"--nn-preload {text!r} is not NAME:ENCODING:TARGET:PATH "
                         "(e.g. default:GGML:AUTO:/models/model.gguf)")
    name, encoding, target = fields[0], fields[1].lower(), fields[2].lower()
    path = ":".join(fields[3:])
    if target not in TARGETS:
        raise UsageError(f"--nn-preload {text!r}: unknown target {fields[2]!r} "
                         f"(use one of {', '.join(t.upper() for t in TARGETS)})")
    if encoding != "ggml":
        what = "is not supported by" if encoding in KNOWN_ENCODINGS else "is unknown to"
        raise UsageError(f"--nn-preload {text!r}: encoding {fields[1]!r} {what} the embedded "
                         "runtime, which runs GGML models only (NAME:GGML:AUTO:model.gguf)")
    return Preload(name, encoding, target, path)
