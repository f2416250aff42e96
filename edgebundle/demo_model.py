"""Tiny llama GGUF models generated locally: a built-in demo and scripted test models.

No model can be downloaded on many devices and CI runners, so edgebundle writes its
own. With one-hot token embeddings, zeroed attention and feed-forward weights (each
block adds nothing to the residual stream) and an output matrix that maps token *i*
to token *next(i)*, greedy decoding is a chosen function of the last token: a
*script*. The llama-3-chat prompt always ends with ``"\\n\\n"`` (byte token 0x0A), so
the reply is the chain ``next(0x0A), next(next(0x0A)), ...`` up to ``<|eot_id|>``.

The tokenizer is SentencePiece-style (``tokenizer.ggml.model = "llama"``) with byte
fallback, the llama-3 special tokens, and the reply's words as pieces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgebundle import files

SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
# Words any llama-3-chat prompt is made of, so prompts tokenize compactly.
BASE_PIECES = ("system", "user", "assistant")
_TOKEN_TYPE_NORMAL, _TOKEN_TYPE_UNKNOWN, _TOKEN_TYPE_CONTROL, _TOKEN_TYPE_BYTE = 1, 2, 3, 6
SPACE = "\u2581"  # SentencePiece's visible space

# Every word distinct: the script maps each token to the next one.
DEMO_REPLY = "Hello! This is the edgebundle demo model: pass --model with a real GGUF file to chat."


def pieces_for(text: str) -> list[str]:
    """Split a reply into SentencePiece pieces: words carry their leading space."""
    pieces: list[str] = []
    for i, word in enumerate(text.split(" ")):
        if word:
            pieces.append((SPACE if i else "") + word)
    return pieces


@dataclass(frozen=True)
class ScriptedModelSpec:
    """What a scripted model says, and its shape.

    ``reply`` is said after any llama-3-chat prompt, followed by ``end_token`` (set it
    to None for a model that never ends its turn by itself). ``eot_is_special``
    False spells ``<|eot_id|>`` as ordinary text pieces, so it is not an
    end-of-generation token: the model "talks to itself" unless the template's stop
    strings stop it. ``eot_metadata`` False leaves out ``tokenizer.ggml.eot_token_id``
    (eos stays ``<|end_of_text|>``): the classic Llama-3 conversion, whose turn end is
    an end-of-generation token only through llama.cpp's detection by token text.
    """

    reply: str = DEMO_REPLY
    end_token: str | None = "<|eot_id|>"
    after_end: str = ""
    eot_is_special: bool = True
    context_length: int = 512
    layers: int = 1
    width: int | None = None  # default: the smallest multiple of 32 >= vocabulary
    name: str = "edgebundle-demo"
    extra_pieces: Sequence[str] = field(default_factory=tuple)
    chat_template: str | None = None
    eot_metadata: bool = True


def write_scripted_model(path: Path, spec: ScriptedModelSpec | None = None) -> Path:
    """Write a scripted llama GGUF to ``path`` (overwriting) and return it."""
    import gguf  # imported here: a heavy import only model-writing paths need
    import numpy as np

    spec = spec or ScriptedModelSpec()
    specials = [t for t in SPECIAL_TOKENS if spec.eot_is_special or t != "<|eot_id|>"]
    reply = pieces_for(spec.reply)
    tail = pieces_for(spec.after_end)
    eot_text_pieces = ["<|", "eot", "_id", "|>"]
    words: list[str] = []
    for piece in (*BASE_PIECES, *reply, *tail, *spec.extra_pieces,
                  *([] if spec.eot_is_special else eot_text_pieces)):
        if piece not in words and piece not in specials:
            words.append(piece)
    tokens: list[str] = []
    types: list[int] = []
    for special in specials:
        tokens.append(special)
        types.append(_TOKEN_TYPE_UNKNOWN if special == "<unk>" else _TOKEN_TYPE_CONTROL)
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        types.append(_TOKEN_TYPE_BYTE)
    tokens.extend(words)
    types.extend([_TOKEN_TYPE_NORMAL] * len(words))
    index = {token: i for i, token in enumerate(tokens)}

    chain = [index["<0x0A>"]] + [index[p] for p in reply]
    if spec.end_token is not None:
        if spec.eot_is_special or spec.end_token != "<|eot_id|>":
            chain.append(index[spec.end_token])
        else:
            chain.extend(index[p] for p in eot_text_pieces)
    chain.extend(index[p] for p in tail)
    script: dict[int, int] = {}
    for current, following in zip(chain, chain[1:], strict=False):
        if current in script and script[current] != following:
            repeated = tokens[current]
            raise ValueError(f"scripted reply repeats token {repeated!r}: use distinct words")
        script[current] = following
    fallback = index["<|end_of_text|>"] if spec.end_token is not None else chain[-1]

    n_vocab = len(tokens)
    width = spec.width or ((n_vocab + 31) // 32) * 32
    if width < n_vocab:
        raise ValueError(f"width {width} is smaller than the vocabulary ({n_vocab})")
    ffn = 64
    heads = 4

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(spec.name)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(width)
    writer.add_block_count(spec.layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(width // heads)
    writer.add_file_type(0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(index["<|begin_of_text|>"])
    writer.add_eos_token_id(index["<|end_of_text|>"])
    if spec.eot_is_special and spec.eot_metadata:
        writer.add_eot_token_id(index["<|eot_id|>"])
    writer.add_add_bos_token(False)
    if spec.chat_template is not None:
        writer.add_chat_template(spec.chat_template)

    embeddings = np.zeros((n_vocab, width), np.float32)
    embeddings[np.arange(n_vocab), np.arange(n_vocab)] = 1.0
    output = np.zeros((n_vocab, width), np.float32)
    for token_id in range(n_vocab):
        output[script.get(token_id, fallback), token_id] = 1.0
    writer.add_tensor("token_embd.weight", embeddings)
    writer.add_tensor("output_norm.weight", np.ones(width, np.float32))
    writer.add_tensor("output.weight", output)
    for layer in range(spec.layers):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(width, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{prefix}.{name}.weight", np.zeros((width, width), np.float32))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(width, np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", np.zeros((ffn, width), np.float32))
        writer.add_tensor(f"{prefix}.ffn_up.weight", np.zeros((ffn, width), np.float32))
        writer.add_tensor(f"{prefix}.ffn_down.weight", np.zeros((width, ffn), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def demo_model_path(models_dir: Path) -> Path:
    """The built-in demo model under ``models_dir``, generated on first use."""
    spec = ScriptedModelSpec()
    digest = hashlib.sha256(repr(spec).encode()).hexdigest()[:12]
    path = models_dir / f"edgebundle-demo-{digest}.gguf"
    if not path.exists():
        with files.replacing(path) as tmp:  # two first uses at once: one whole file wins
            write_scripted_model(tmp, spec)
    return path
