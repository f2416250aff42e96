"""Checks of the model file: present, GGUF, and as long as its own tensor table says.

A truncated download keeps a perfect header, so the size computed from the tensor
table is what tells it apart before llama.cpp fails at load time.
"""

from __future__ import annotations

from edgebundle.doctor.context import Context
from edgebundle.doctor.report import CheckResult, fail, ok, skip, warn
from edgebundle.doctor.sizes import human_bytes
from edgebundle.errors import ModelError
from edgebundle.gguf_file import read_gguf

FILE, TEMPLATE, STOP_TOKENS = "model.file", "model.template", "model.stop_tokens"
MODEL_FIX = "download the model again, or point --model / EDGEBUNDLE_MODEL at a .gguf file"


def checks(ctx: Context) -> list[CheckResult]:
    return [_file(ctx), *_template(ctx)]


def _file(ctx: Context) -> CheckResult:
    path = ctx.settings.model
    if path is None:
        return skip(FILE, "no model configured (--model PATH or EDGEBUNDLE_MODEL)")
    if not path.exists():
        return fail(FILE, f"model file {path} does not exist", MODEL_FIX)
    if not path.is_file():
        return fail(FILE, f"model path {path} is not a file", MODEL_FIX)
    try:
        info = read_gguf(path)
    except ModelError as exc:
        return fail(FILE, str(exc), MODEL_FIX)
    except OSError as exc:
        return fail(
            FILE, f"cannot read {path}: {exc.strerror or exc}", "check the file's permissions"
        )
    arch = f", {info.architecture}" if info.architecture else ""
    summary = (
        f"{path.name}: GGUF v{info.version}{arch}, {len(info.tensors)} tensors, "
        f"{human_bytes(info.file_size)}"
    )
    if info.expected_size is None:
        types = ", ".join(str(t) for t in info.unknown_types)
        return warn(
            FILE,
            f"{summary}; ggml tensor type(s) {types} unknown to this edgebundle, "
            "so the file size cannot be checked",
            "update edgebundle, or compare the file's sha256 with its source",
        )
    return ok(FILE, summary)


def _template(ctx: Context) -> list[CheckResult]:
    # The chat template and stop-token checks need the template table (next issue).
    if ctx.settings.template is None:
        why = "no template configured"
    else:
        why = f"template {ctx.settings.template!r}: template checks are not implemented yet"
    return [skip(TEMPLATE, why), skip(STOP_TOKENS, why)]
