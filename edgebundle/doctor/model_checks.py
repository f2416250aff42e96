"""Checks of the model: the file, the prompt template, and how a turn ends.

A truncated download keeps a perfect header, so the size computed from the tensor
table is what tells it apart before llama.cpp fails at load time.

A chat whose end-of-turn token is not an end-of-generation token talks to itself:
model.stop_tokens checks the template's end-of-turn text is one token of the model
and in llama.cpp's end-of-generation set (edgebundle.model_info), and names the
classic Llama-3 conversion (eos <|end_of_text|>, turns ending with <|eot_id|>) whose
turn end stops generation only through llama.cpp's detection by token text.
"""

from __future__ import annotations

from edgebundle.doctor.context import Context
from edgebundle.doctor.report import CheckResult, fail, ok, skip, warn
from edgebundle.doctor.sizes import human_bytes
from edgebundle.errors import ModelError, UsageError
from edgebundle.gguf_file import GGUFInfo, read_gguf
from edgebundle.model_info import (
    SOURCE_EXPLICIT,
    ModelInfo,
    guess_template,
    model_info_from_gguf,
    resolve_template,
)
from edgebundle.templates import TEMPLATES, ChatTemplate

FILE, TEMPLATE, STOP_TOKENS = "model.file", "model.template", "model.stop_tokens"
MODEL_FIX = "download the model again, or point --model / EDGEBUNDLE_MODEL at a .gguf file"
NO_MODEL = "no model configured: run and ask use the built-in demo model"
KNOWN = ", ".join(sorted(TEMPLATES))


def checks(ctx: Context) -> list[CheckResult]:
    file_result, gguf = _file(ctx)
    return [file_result, *_template(ctx, gguf)]


def _file(ctx: Context) -> tuple[CheckResult, GGUFInfo | None]:
    """model.file, and the header it read (None when there is none to read)."""
    path = ctx.settings.model
    if path is None:
        return skip(FILE, "no model configured (--model PATH or EDGEBUNDLE_MODEL)"), None
    if not path.exists():
        return fail(FILE, f"model file {path} does not exist", MODEL_FIX), None
    if not path.is_file():
        return fail(FILE, f"model path {path} is not a file", MODEL_FIX), None
    try:
        info = read_gguf(path)
    except ModelError as exc:
        return fail(FILE, str(exc), MODEL_FIX), None
    except OSError as exc:
        return fail(
            FILE, f"cannot read {path}: {exc.strerror or exc}", "check the file's permissions"
        ), None
    return _file_summary(path.name, info), info


def _file_summary(name: str, info: GGUFInfo) -> CheckResult:
    arch = f", {info.architecture}" if info.architecture else ""
    summary = (
        f"{name}: GGUF v{info.version}{arch}, {len(info.tensors)} tensors, "
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


def _template(ctx: Context, gguf: GGUFInfo | None) -> list[CheckResult]:
    explicit = ctx.settings.template
    try:
        # Resolve the name before anything else: a wrong name fails with or without a model.
        resolve_template(explicit, None)
    except UsageError as exc:
        return [
            fail(TEMPLATE, str(exc), "pass --template with a known name, or leave it out to "
                 "follow the model's own chat template"),
            skip(STOP_TOKENS, "no usable prompt template (see model.template)"),
        ]
    if ctx.settings.model is None:
        return [skip(TEMPLATE, NO_MODEL), skip(STOP_TOKENS, NO_MODEL)]
    if gguf is None:
        why = "the model file cannot be read (see model.file)"
        given = f"--template {explicit}; " if explicit else ""
        return [skip(TEMPLATE, given + why), skip(STOP_TOKENS, why)]
    try:
        info = model_info_from_gguf(gguf)
    except ModelError as exc:
        no_vocabulary = skip(STOP_TOKENS, "the model has no vocabulary (see model.template)")
        return [fail(TEMPLATE, str(exc), MODEL_FIX), no_vocabulary]
    template, source = resolve_template(explicit, info)
    return [_template_result(template, source, info), _stop_tokens(template, info)]


def _template_result(template: ChatTemplate, source: str, info: ModelInfo) -> CheckResult:
    guessed = guess_template(info.chat_template)
    if source == SOURCE_EXPLICIT:
        if guessed is not None and guessed != template.name:
            return warn(
                TEMPLATE,
                f"model's own template looks like {guessed}; --template {template.name}: "
                "replies may be garbled",
                f"use --template {guessed}, or leave --template out to follow the model",
            )
        agrees = "; the model's own chat template agrees" if guessed else ""
        return ok(TEMPLATE, f"{template.name} (from --template{agrees})")
    if guessed is not None:
        return ok(TEMPLATE, f"{template.name} (from {source})")
    if info.chat_template is not None:
        return warn(
            TEMPLATE,
            f"the model's own chat template matches none of {KNOWN}; using {source}",
            "pass --template NAME with the model's prompt format (see its model card)",
        )
    return ok(TEMPLATE, f"{template.name} ({source}: the model has no chat template)")


def _stop_tokens(template: ChatTemplate, info: ModelInfo) -> CheckResult:
    end = template.end_of_turn
    end_id = info.token_id(end)
    guessed = guess_template(info.chat_template)
    if guessed is not None and guessed != template.name:
        fix = f"use the template that matches the model: --template {guessed}"
    elif guessed == template.name:
        fix = (f"the model's vocabulary does not fit its own {guessed} template: use a "
               "correct GGUF conversion of the model")
    else:
        fix = f"use the template that matches the model (--template NAME; known: {KNOWN})"
    if end_id is None:
        return fail(
            STOP_TOKENS,
            f"{end} is not a token of this model ({template.name}'s end of turn): the model "
            "cannot end its turn by itself and will talk to itself; edgebundle passes the "
            f"template's stop strings ({', '.join(template.stop_strings)}) so replies are cut "
            "there",
            fix,
        )
    if end_id not in info.eog_ids():
        # With today's llama.cpp this happens only where it drops the token on purpose
        # (<|end|> of gpt-oss, </s> of gemma4): those models end turns with another token.
        return fail(
            STOP_TOKENS,
            f"{end} ({end_id}) is a token of this model but llama.cpp does not end generation "
            "at it: the model runs past the end of its turn and talks to itself",
            fix,
        )
    if end_id in info.declared_eog_ids():
        return ok(STOP_TOKENS, f"{end} ({end_id}) ends generation")
    # End-of-generation only because llama.cpp recognises the token's text.
    eos = info.eos_id
    if eos is None:
        summary = (f"{end} ({end_id}) ends generation only through llama.cpp's detection by "
                   "token text (no eos or eot token declared)")
    else:
        summary = f"eos is {info.token_text(eos)} ({eos}) but turns end with {end} ({end_id})"
    if "eos" in info.declared_ids:
        tool = (f"python -m gguf.scripts.gguf_set_metadata {info.path} "
                f"tokenizer.ggml.eos_token_id {end_id}")
    else:
        tool = (f"python -m gguf.scripts.gguf_new_metadata --special-token-by-id eos {end_id} "
                f"{info.path} {info.path.with_suffix('.fixed.gguf')}")
    return warn(
        STOP_TOKENS,
        f"{summary}: runtimes with llama.cpp older than the text auto-detection talk to "
        "themselves",
        f"set tokenizer.ggml.eos_token_id to {end_id} (e.g. {tool})",
    )
