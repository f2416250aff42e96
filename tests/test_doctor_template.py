"""doctor's model.template and model.stop_tokens on generated GGUF models.

The classic Llama-3 fix doctor prints is run for real (gguf's own gguf_set_metadata
script) and doctor then passes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.doctor.report import CheckResult
from edgebundle.model_info import load_model_info
from edgebundle.templates import TEMPLATES
from tests.support.doctor_env import diagnose, write_gguf
from tests.support.vocab_model import JINJA, llama_eog_ids, llama_vocab, write_vocab_model

NO_MODEL = "no model configured: run and ask use the built-in demo model"


def _checks(
    home: Path, model: Path | None = None, template: str | None = None
) -> tuple[CheckResult, CheckResult]:
    report = diagnose(home, model=model, template=template)
    return report.check("model.template"), report.check("model.stop_tokens")


def _model(tmp_path: Path, name: str = "model", **spec: object) -> Path:
    path = tmp_path / f"{name}.gguf"
    return write_scripted_model(path, ScriptedModelSpec(**spec))  # type: ignore[arg-type]


def test_no_model_skips_both_and_says_the_demo_model_is_used(home: Path) -> None:
    template, stop = _checks(home)
    assert (template.status, template.summary) == ("skip", NO_MODEL)
    assert (stop.status, stop.summary) == ("skip", NO_MODEL)


def test_demo_model_with_llama3_template_passes(home: Path, tmp_path: Path) -> None:
    template, stop = _checks(home, model=_model(tmp_path), template="llama-3-chat")
    assert template.status == "ok"
    assert template.summary == "llama-3-chat (from --template)"
    assert stop.status == "ok"
    assert stop.summary == "<|eot_id|> (7) ends generation"


def test_template_defaults_to_llama3_without_one_in_the_model(home: Path, tmp_path: Path) -> None:
    template, stop = _checks(home, model=_model(tmp_path))
    assert template.status == "ok"
    assert template.summary == "llama-3-chat (default llama-3-chat: the model has no chat template)"
    assert stop.status == "ok"


def test_template_follows_the_models_own_chat_template(home: Path, tmp_path: Path) -> None:
    model = _model(tmp_path, chat_template=JINJA["llama-3-chat"])
    template, stop = _checks(home, model=model)
    assert (template.status, template.summary) == (
        "ok", "llama-3-chat (from the model's own chat template)"
    )
    assert stop.status == "ok"
    agreeing, _ = _checks(home, model=model, template="llama-3-chat")
    assert agreeing.summary == (
        "llama-3-chat (from --template; the model's own chat template agrees)"
    )


def test_explicit_template_disagreeing_with_the_model_warns(home: Path, tmp_path: Path) -> None:
    model = _model(tmp_path, chat_template=JINJA["llama-3-chat"])
    template, stop = _checks(home, model=model, template="chatml")
    assert template.status == "warn"
    assert template.summary == (
        "model's own template looks like llama-3-chat; --template chatml: replies may be garbled"
    )
    assert template.fix and "--template llama-3-chat" in template.fix
    # chatml's <|im_end|> is no token of a llama-3 vocabulary.
    assert stop.status == "fail"
    assert "<|im_end|> is not a token of this model" in stop.summary
    assert stop.fix == "use the template that matches the model: --template llama-3-chat"


def test_model_whose_eot_is_text_pieces_fails_naming_the_problem(
    home: Path, tmp_path: Path
) -> None:
    model = _model(tmp_path, eot_is_special=False, after_end="and on")
    template, stop = _checks(home, model=model, template="llama-3-chat")
    assert template.status == "ok"
    assert stop.status == "fail"
    assert "<|eot_id|> is not a token of this model" in stop.summary
    assert "cannot end its turn by itself and will talk to itself" in stop.summary
    assert "stop strings (<|eot_id|>, <|end_of_text|>, <|start_header_id|>)" in stop.summary
    assert stop.fix and "use the template that matches the model" in stop.fix
    # With its own llama-3 chat template the vocabulary itself is at fault.
    own = _model(tmp_path, "own", eot_is_special=False, after_end="and on",
                 chat_template=JINJA["llama-3-chat"])  # fmt: skip
    _, stop = _checks(home, model=own)
    assert stop.status == "fail"
    assert stop.fix and "does not fit its own llama-3-chat template" in stop.fix


def test_classic_llama3_eos_eot_case_warns_with_a_fix_that_works(
    home: Path, tmp_path: Path
) -> None:
    model = _model(tmp_path, eot_metadata=False)
    template, stop = _checks(home, model=model, template="llama-3-chat")
    assert template.status == "ok"
    assert stop.status == "warn"
    assert stop.summary == (
        "eos is <|end_of_text|> (4) but turns end with <|eot_id|> (7): runtimes with llama.cpp "
        "older than the text auto-detection talk to themselves"
    )
    command = f"python -m gguf.scripts.gguf_set_metadata {model} tokenizer.ggml.eos_token_id 7"
    assert stop.fix == f"set tokenizer.ggml.eos_token_id to 7 (e.g. {command})"

    argv = [sys.executable, *command.split()[1:], "--force"]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    info = load_model_info(model)
    assert info.token_text(info.eos_id) == "<|eot_id|>"
    _, fixed = _checks(home, model=model, template="llama-3-chat")
    assert (fixed.status, fixed.summary) == ("ok", "<|eot_id|> (7) ends generation")


def test_classic_case_without_declared_eos_suggests_adding_it(home: Path, tmp_path: Path) -> None:
    # No eos in metadata: the SentencePiece default eos (2) is <|im_start|> here.
    model = write_vocab_model(tmp_path / "m.gguf", ["<s>", "<|im_start|>", "<|im_end|>"])
    _, stop = _checks(home, model=model, template="chatml")
    assert stop.status == "warn"
    assert stop.summary.startswith("eos is <|im_start|> (2) but turns end with <|im_end|> (3)")
    fixed = model.with_suffix(".fixed.gguf")
    tool = "python -m gguf.scripts.gguf_new_metadata"
    command = f"{tool} --special-token-by-id eos 3 {model} {fixed}"
    assert stop.fix == f"set tokenizer.ggml.eos_token_id to 3 (e.g. {command})"

    argv = [sys.executable, *command.split()[1:], "--force"]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    _, after = _checks(home, model=fixed, template="chatml")
    assert (after.status, after.summary) == ("ok", "<|im_end|> (3) ends generation")


def test_end_of_turn_token_that_llama_cpp_does_not_stop_at_fails(
    home: Path, tmp_path: Path
) -> None:
    # gpt-oss-like vocabulary: llama.cpp drops <|end|> from its end-of-generation set.
    model = write_vocab_model(
        tmp_path / "m.gguf", ["<s>", "</s>", "<|user|>", "<|end|>", "<|return|>", "<|call|>"]
    )
    end = load_model_info(model).token_id("<|end|>")
    assert end not in llama_eog_ids(llama_vocab(model))  # the real llama.cpp agrees
    _, stop = _checks(home, model=model, template="phi-3-chat")
    assert stop.status == "fail"
    assert f"<|end|> ({end}) is a token of this model but llama.cpp does not end" in stop.summary
    assert "talks to itself" in stop.summary


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_each_template_passes_on_a_model_made_for_it(
    name: str, home: Path, tmp_path: Path
) -> None:
    template = TEMPLATES[name]
    model = write_vocab_model(
        tmp_path / "m.gguf", list(template.specials), eot=template.end_of_turn
    )
    result, stop = _checks(home, model=model, template=name)
    assert result.status == "ok"
    assert stop.status == "ok", stop.summary


def test_unrecognised_model_template_warns(home: Path, tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "model.gguf")  # chat template "{{ messages }}"
    template, stop = _checks(home, model=model)
    assert template.status == "warn"
    assert "matches none of chatml, gemma-instruct" in template.summary
    assert "using default llama-3-chat" in template.summary
    assert stop.status == "fail"  # its vocabulary has no <|eot_id|>


def test_unknown_template_name_fails_with_the_list(home: Path, tmp_path: Path) -> None:
    for model in (None, _model(tmp_path)):
        template, stop = _checks(home, model=model, template="llama3")
        assert template.status == "fail"
        assert "unknown prompt template 'llama3'" in template.summary
        for name in TEMPLATES:
            assert name in template.summary
        assert stop.status == "skip"


def test_unreadable_model_skips_template_checks(home: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_text("not gguf")
    report = diagnose(home, model=model, template="chatml")
    assert report.check("model.file").status == "fail"
    template, stop = report.check("model.template"), report.check("model.stop_tokens")
    assert template.status == stop.status == "skip"
    assert template.summary == "--template chatml; the model file cannot be read (see model.file)"
