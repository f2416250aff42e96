"""Vocabulary-only GGUF files with chosen special tokens, written by the ``gguf`` package.

llama-cpp-python loads them with ``vocab_only=True`` (no tensors needed), so tests can
ask the real llama.cpp how it tokenizes a prompt and which ids end generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6

# Short but faithful excerpts of the Jinja chat templates shipped in real GGUF files.
JINJA = {
    "llama-3-chat": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] "
        "| trim + '<|eot_id|>' %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
        "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "gemma-instruct": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'assistant') %}"
        "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
    ),
    "phi-3-chat": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
        "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + "
        "message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    ),
    "llama-2-chat": (
        "{% if messages[0]['role'] == 'system' %}{% set system_message = '<<SYS>>\\n' + "
        "messages[0]['content'] | trim + '\\n<</SYS>>\\n\\n' %}{% endif %}{% for message in "
        "messages %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}{% endfor %}"
    ),
    "mistral-instruct": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
        "'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}"
    ),
}


def write_vocab_model(
    path: Path,
    specials: Sequence[str],
    *,
    words: Sequence[str] = ("hello", "world"),
    special_type: int = CONTROL,
    eos: str | None = None,
    eot: str | None = None,
    bos: str | None = None,
    chat_template: str | None = None,
    context_length: int = 256,
) -> Path:
    """A llama-architecture GGUF: ``<unk>``, ``specials``, 256 byte tokens, ``words``.

    ``eos`` / ``eot`` / ``bos`` name tokens to declare in metadata (None: not declared,
    so llama.cpp's defaults and text detection apply).
    """
    import gguf

    tokens = ["<unk>", *specials]
    types = [UNKNOWN, *([special_type] * len(specials))]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    tokens += list(words)
    types += [NORMAL] * len(words)
    index = {t: i for i, t in enumerate(tokens)}
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    # Not the file name: llama.cpp patches token attributes of models named like
    # "phi-3" and fails when their "</s>" is missing.
    writer.add_name("vocabulary test model")
    writer.add_context_length(context_length)
    writer.add_embedding_length(32)
    writer.add_block_count(1)
    writer.add_feed_forward_length(32)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_add_bos_token(False)
    if bos is not None:
        writer.add_bos_token_id(index[bos])
    if eos is not None:
        writer.add_eos_token_id(index[eos])
    if eot is not None:
        writer.add_eot_token_id(index[eot])
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_vocab(path: Path) -> Any:
    """The real llama.cpp vocabulary of ``path`` (llama-cpp-python, vocab only)."""
    from llama_cpp import Llama

    return Llama(str(path), vocab_only=True, verbose=False)


def llama_eog_ids(llm: Any) -> set[int]:
    """Every id llama.cpp's ``llama_vocab_is_eog`` says ends generation."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    return {i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)}


def llama_tokenize(llm: Any, text: str) -> list[int]:
    """``text`` tokenized as a prompt: special-token text parsed, no BOS added."""
    tokens: list[int] = llm.tokenize(text.encode(), add_bos=False, special=True)
    return tokens
