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


def parse_preload(text: str) -> Preload | None:
    """Parse one ``--nn-preload`` value; None for one the runtime cannot use.

    As on genuine WasmEdge, a malformed value (too few fields, an unknown encoding or
    target, or a backend the runtime lacks) does not stop the app: the plugin logs it
    (on stdout, like every plugin error) and the app runs without that preload, so its
    load by that name fails with 8 (not found).
    """
    fields = text.split(":")
    if len(fields) < 4 or not fields[0] or not fields[3]:
        log_error(f"Model preload format error: {text} is not NAME:ENCODING:TARGET:PATH",
                  backend=False)
        return None
    name, encoding, target = fields[0], fields[1].lower(), fields[2].lower()
    path = ":".join(fields[3:])
    if target not in TARGETS or encoding != "ggml":
        known = encoding in KNOWN_ENCODINGS and target in TARGETS
        log_error(f"Backend or Device is Not Support: {fields[1]}:{fields[2]} "
                  f"({'not built into this runtime' if known else 'unknown'})", backend=False)
        return None
    return Preload(name, encoding, target, path)
