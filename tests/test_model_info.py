"""GGUF metadata on generated models; end-of-generation ids agree with the real llama.cpp."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.errors import ModelError, UsageError
from edgebundle.model_info import (
    SOURCE_DEFAULT,
    SOURCE_EXPLICIT,
    SOURCE_MODEL,
    guess_template,
    load_model_info,
    resolve_template,
)
from tests.support.vocab_model import (
    JINJA,
    llama_eog_ids,
    llama_tokenize,
    llama_vocab,
    write_vocab_model,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    specs = {
        "demo": ScriptedModelSpec(),
        "templated": ScriptedModelSpec(chat_template=JINJA["llama-3-chat"], context_length=1024),
        "classic": ScriptedModelSpec(eot_metadata=False),
        "eot_as_text": ScriptedModelSpec(eot_is_special=False, after_end="and on"),
    }
    return {name: write_scripted_model(root / f"{name}.gguf", spec) for name, spec in specs.items()}


def test_demo_model_metadata(models: dict[str, Path]) -> None:
    info = load_model_info(models["demo"])
    assert info.architecture == "llama"
    assert info.name == "edgebundle-demo"
    assert info.context_length == 512
    assert info.chat_template is None
    assert info.tokenizer_model == "llama"
    assert info.token_text(info.bos_id) == "<|begin_of_text|>"
    assert info.token_text(info.eos_id) == "<|end_of_text|>"
    assert info.token_text(info.eot_id) == "<|eot_id|>"
    assert info.eom_id is None
    assert info.token_id("<|eot_id|>") == info.eot_id
    assert info.token_id("no such token") is None
    assert info.token_text(None) is None and info.token_text(10**6) is None
    assert len(info.tokens) == len(info.token_types)


def test_chat_template_and_context_length_are_read(models: dict[str, Path]) -> None:
    info = load_model_info(models["templated"])
    assert info.chat_template == JINJA["llama-3-chat"]
    assert info.context_length == 1024


def test_special_texts_are_the_control_tokens(models: dict[str, Path]) -> None:
    texts = load_model_info(models["demo"]).special_texts()
    for special in ("<s>", "</s>", "<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>"):
        assert special in texts
    assert "<unk>" not in texts  # unknown type: cannot open or end a turn
    assert "<0x0A>" not in texts and "system" not in texts


def test_tokens_llama_cpp_promotes_to_control_are_special_texts(tmp_path: Path) -> None:
    # <|im_end|> typed as a NORMAL token: llama.cpp treats it as control by its text.
    model = write_vocab_model(tmp_path / "m.gguf", ["<|im_start|>"], words=("<|im_end|>", "hi"))
    info = load_model_info(model)
    assert "<|im_end|>" in info.special_texts()
    assert "hi" not in info.special_texts()
    llm = llama_vocab(model)
    assert llama_tokenize(llm, "<|im_end|>") == [info.token_id("<|im_end|>")]


@pytest.mark.parametrize("name", ["demo", "templated", "classic", "eot_as_text"])
def test_eog_ids_match_llama_cpp_on_scripted_models(name: str, models: dict[str, Path]) -> None:
    info = load_model_info(models[name])
    assert info.eog_ids() == llama_eog_ids(llama_vocab(models[name]))


def test_classic_llama3_conversion_ends_turns_only_by_token_text(models: dict[str, Path]) -> None:
    info = load_model_info(models["classic"])
    eot = info.token_id("<|eot_id|>")
    assert info.eot_id is None
    assert eot in info.eog_ids()
    assert eot not in info.declared_eog_ids()
    assert info.declared_eog_ids() == {info.eos_id}


def test_eot_spelled_as_text_is_no_token_and_no_eog(models: dict[str, Path]) -> None:
    info = load_model_info(models["eot_as_text"])
    assert info.token_id("<|eot_id|>") is None
    llm = llama_vocab(models["eot_as_text"])
    pieces = llama_tokenize(llm, "<|eot_id|>")
    assert len(pieces) > 1
    assert not set(pieces) & info.eog_ids()


# Every text llama.cpp's EOG rules look at, plus FIM tokens; the two workarounds
# (<|end|> with <|return|> and <|call|>; </s> with <|tool_response>) apply.
ALL_TEXTS = [
    "<s>", "</s>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>",
    "<|flush|>", "<|calls|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
    "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>",
    "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[", "<|fim_pad|>", "<|file_sep|>",
    "<|repo_name|>", "<|im_start|>", "<|fim_prefix|>",
]  # fmt: skip


@pytest.mark.parametrize(
    ("specials", "declared"),
    [
        (ALL_TEXTS, {}),
        (["<s>", "</s>", "<|end|>", "<|return|>", "<|call|>"], {}),
        (["<s>", "</s>", "<|end|>", "<|calls|>", "<|flush|>"], {"eot": "<|end|>"}),
        (["<s>", "</s>", "<|tool_response>"], {}),
        (["<s>", "</s>", "<|end|>"], {"eos": "<|end|>"}),
        (["<s>", "<|custom_end|>"], {"eos": "<|custom_end|>"}),
        (["<s>", "<|custom_end|>"], {"eot": "<|custom_end|>"}),
        (["<s>", "<|custom_end|>"], {}),  # default eos 2 = <|custom_end|>
        (["<|only|>"], {}),  # default eos 2 is the first byte token <0x00>
    ],
)
def test_eog_ids_match_llama_cpp(
    specials: list[str], declared: dict[str, str], tmp_path: Path
) -> None:
    model = write_vocab_model(tmp_path / "m.gguf", specials, **declared)  # type: ignore[arg-type]
    info = load_model_info(model)
    assert info.eog_ids() == llama_eog_ids(llama_vocab(model))


def test_harmony_vocabulary_drops_end_from_eog(tmp_path: Path) -> None:
    model = write_vocab_model(tmp_path / "m.gguf", ["<s>", "</s>", "<|end|>", "<|return|>",
                                                     "<|call|>"])  # fmt: skip
    info = load_model_info(model)
    assert info.token_id("<|end|>") not in info.eog_ids()
    assert info.token_id("<|return|>") in info.eog_ids()


def test_out_of_range_special_ids_are_ignored(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "hi"])
    writer.add_eos_token_id(99)
    writer.add_eot_token_id(3)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = load_model_info(path)
    assert info.eos_id == 2  # llama.cpp keeps the SentencePiece default
    assert info.eot_id == 3
    assert info.token_types == (1, 1, 1, 1)  # no token types in the file: all normal
    assert info.context_length is None


@pytest.mark.parametrize("name", sorted(JINJA))
def test_guess_template_names_each_family(name: str) -> None:
    assert guess_template(JINJA[name]) == name


def test_guess_template_without_a_known_family() -> None:
    assert guess_template(None) is None
    assert guess_template("") is None
    assert guess_template("{% for m in messages %}User: {{ m.content }}{% endfor %}") is None


def test_resolve_template_prefers_explicit_then_model_then_default(
    models: dict[str, Path],
) -> None:
    templated = load_model_info(models["templated"])
    plain = load_model_info(models["demo"])
    template, source = resolve_template("chatml", templated)
    assert (template.name, source) == ("chatml", SOURCE_EXPLICIT) == ("chatml", "--template")
    template, source = resolve_template(None, templated)
    assert (template.name, source) == ("llama-3-chat", SOURCE_MODEL)
    assert source == "the model's own chat template"
    template, source = resolve_template(None, plain)
    assert (template.name, source) == ("llama-3-chat", SOURCE_DEFAULT)
    assert source == "default llama-3-chat"
    assert resolve_template(None, None)[1] == SOURCE_DEFAULT
    with pytest.raises(UsageError, match="unknown prompt template 'llama-9'"):
        resolve_template("llama-9", templated)


def test_load_model_info_errors_are_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"absent\.gguf does not exist; point --model"):
        load_model_info(tmp_path / "absent.gguf")
    with pytest.raises(ModelError, match="is a directory"):
        load_model_info(tmp_path)
    html = tmp_path / "page.gguf"
    html.write_text("<html>404</html>")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        load_model_info(html)

    import gguf

    bare = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(bare), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match=r"no tokenizer vocabulary \(tokenizer.ggml.tokens\)"):
        load_model_info(bare)
    for path in (tmp_path / "absent.gguf", tmp_path, html, bare):
        with pytest.raises(ModelError) as caught:
            load_model_info(path)
        assert "\n" not in str(caught.value)
