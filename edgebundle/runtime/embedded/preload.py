"""``--nn-preload NAME:ENCODING:TARGET:PATH``, parsed the way the WasmEdge plugin does.

Encoding and target are case-insensitive; the path may itself contain ``:`` (the
plugin joins the remaining fields). The model file is not opened here: like the
GGML plugin, a missing file only shows up as errno 103 when the app loads it.
[WasmEdge: plugins/wasi_nn/wasinnenv.cpp]
"""

from __future__ import annotations

from dataclasses import dataclass

from edgebundle.runtime.embedded.nn_errno import log_error

TARGETS = ("cpu", "gpu", "tpu", "auto")
# Backends the plugin knows, with the name its "not built" log line gives them; only
# GGML is implemented by the embedded runtime.
KNOWN_ENCODINGS = {"openvino": "OpenVINO", "onnx": "ONNX", "tensorflow": "Tensorflow",
                   "pytorch": "PyTorch", "pytorchaoti": "PyTorch",
                   "tensorflowlite": "TensorflowLite", "autodetect": "AutoDetect",
                   "ggml": "GGML", "neuralspeed": "NeuralSpeed", "whisper": "Whisper",
                   "mlx": "MLX", "piper": "Piper", "chattts": "ChatTTS",
                   "openvinogenai": "OpenVINOGenAI", "bitnet": "BitNet"}


@dataclass(frozen=True)
class Preload:
    """One preloaded model: the app loads it with ``load_by_name(name)``."""

    name: str
    encoding: str  # lower case, always "ggml" here
    target: str  # lower case: cpu | gpu | tpu | auto
    path: str


def parse_preload(text: str) -> Preload | None:
    """Parse one ``--nn-preload`` value as genuine WasmEdge's plugin does
    (wasinnenv.cpp): it never stops the app.

    - An unknown encoding or target: logged on stdout, and the app runs without that
      preload (its load by that name fails with 8, not found).
    - A known backend this runtime lacks (OpenVINO …): kept; loading it fails with 1
      and a log line (:meth:`WasiNn.load_by_name`).
    - Missing fields read as empty: no path is a model file that does not exist (103).
    """
    fields = text.split(":")
    fields += [""] * (4 - len(fields))
    name, encoding, target = fields[0], fields[1].lower(), fields[2].lower()
    if target not in TARGETS or encoding not in KNOWN_ENCODINGS:
        log_error("Preload Model's Backend or Device is Not Support.", backend=False)
        return None
    return Preload(name, encoding, target, ":".join(fields[3:]))
