"""What a GGUF model says about itself: architecture, context, chat template, tokens.

Read with the small header reader in :mod:`edgebundle.gguf_file` (no model load, no
``gguf`` import), so doctor and ``ask`` can look at a multi-gigabyte model in a few
milliseconds.

The end-of-generation set follows llama.cpp's ``llama_vocab::impl::load`` in
src/llama-vocab.cpp (ggml-org/llama.cpp, 2025; the same rules as the llama.cpp
vendored by llama-cpp-python 0.3.36, checked in tests/test_model_info.py):

1. special ids from metadata (``tokenizer.ggml.<name>_token_id``), ignored when out
   of range; the ``llama`` (SentencePiece) tokenizer defaults to bos 1 / eos 2,
   ``gpt2`` (BPE) to bos = eos = 11;
2. when not in metadata, eot, eom and the FIM pad/rep/sep ids are detected by token
   text (:data:`EOT_TEXTS`, :data:`EOM_TEXTS`, :data:`FIM_*_TEXTS`);
3. EOG = FIM pad/rep/sep + every token whose text is in :data:`EOG_TEXTS` + eos, eot,
   eom;
4. workarounds: ``<|end|>`` leaves the set when ``<|return|>`` and ``<|call|>`` (or
   ``<|calls|>`` and ``<|flush|>``) are in it (gpt-oss, solar-open); ``</s>`` leaves it
   when ``<|tool_response>`` is in it (gemma4, paddleocr).

Tokens matched by text are promoted to control tokens by llama.cpp ("control-looking
token ... its type will be overridden"), so they are parsed as special in a prompt
too: :meth:`ModelInfo.special_texts` includes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from edgebundle.errors import ModelError
from edgebundle.gguf_file import GGUFInfo, read_gguf
from edgebundle.templates import DEFAULT_TEMPLATE, ChatTemplate, get_template

# tokenizer.ggml.token_type values (llama.h enum llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4
TOKEN_UNUSED, TOKEN_BYTE = 5, 6

# Default special ids per tokenizer model, before metadata (llama-vocab.cpp).
_DEFAULT_IDS: dict[str, dict[str, int]] = {
    "llama": {"bos": 1, "eos": 2},
    "gpt2": {"bos": 11, "eos": 11},
    "bert": {"bos": 101},
    "t5": {"eos": 1},
    "plamo2": {"bos": 1, "eos": 2},
}
_SPECIAL_NAMES = ("bos", "eos", "eot", "eom", "fim_pad", "fim_rep", "fim_sep")

# "find EOT token" in llama-vocab.cpp: used when tokenizer.ggml.eot_token_id is absent.
EOT_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
})  # fmt: skip
EOM_TEXTS = frozenset({"<|eom_id|>"})
FIM_PAD_TEXTS = frozenset({"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"})
FIM_REP_TEXTS = frozenset({"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"})
FIM_SEP_TEXTS = frozenset({"<|file_sep|>"})
# "maintain a list of tokens that cause end-of-generation" in llama-vocab.cpp.
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
    "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>",
    "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>",
    "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
})  # fmt: skip


@dataclass(frozen=True)
class ModelInfo:
    """A GGUF model's metadata, decoded; ids are token indices (None when absent)."""

    path: Path
    architecture: str | None
    name: str | None
    context_length: int | None
    chat_template: str | None
    tokenizer_model: str | None
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]  # TOKEN_* per token; NORMAL when the file has none
    declared_ids: Mapping[str, int]  # bos/eos/eot/eom/fim_* from metadata, in range

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos")

    @property
    def eos_id(self) -> int | None:
        """tokenizer.ggml.eos_token_id, else the tokenizer's default (llama: 2)."""
        return self._special_id("eos")

    @property
    def eot_id(self) -> int | None:
        """tokenizer.ggml.eot_token_id as declared (llama.cpp also guesses it by text)."""
        return self.declared_ids.get("eot")

    @property
    def eom_id(self) -> int | None:
        return self.declared_ids.get("eom")

    def _special_id(self, name: str) -> int | None:
        if name in self.declared_ids:
            return self.declared_ids[name]
        default = _DEFAULT_IDS.get(self.tokenizer_model or "", {}).get(name)
        return default if default is not None and default < len(self.tokens) else None

    @cached_property
    def _index(self) -> dict[str, int]:
        index: dict[str, int] = {}
        for token_id, text in enumerate(self.tokens):
            index.setdefault(text, token_id)
        return index

    def token_id(self, text: str) -> int | None:
        """The id of the token spelled exactly ``text``, or None."""
        return self._index.get(text)

    def token_text(self, token_id: int | None) -> str | None:
        if token_id is None or not 0 <= token_id < len(self.tokens):
            return None
        return self.tokens[token_id]

    def _detected(self, name: str, texts: Iterable[str]) -> int | None:
        """``name``'s id from metadata, else the first token spelled like one of ``texts``.

        llama.cpp takes whichever its hash map yields first; with one candidate (the
        usual case) that is the same token.
        """
        if name in self.declared_ids:
            return self.declared_ids[name]
        found = [i for i in (self._index.get(t) for t in texts) if i is not None]
        return min(found) if found else None

    def declared_eog_ids(self) -> frozenset[int]:
        """eos, eot and eom as the metadata (or tokenizer default) says: EOG in any llama.cpp."""
        ids = (self.eos_id, self.eot_id, self.eom_id)
        return frozenset(i for i in ids if i is not None)

    @cached_property
    def _eog(self) -> frozenset[int]:
        eog: set[int] = set()
        for name, texts in (
            ("fim_pad", FIM_PAD_TEXTS), ("fim_rep", FIM_REP_TEXTS), ("fim_sep", FIM_SEP_TEXTS),
        ):  # fmt: skip
            found = self._detected(name, texts)
            if found is not None:
                eog.add(found)
        eog.update(i for i in (self._index.get(t) for t in EOG_TEXTS) if i is not None)
        for found in (
            self.eos_id, self._detected("eot", EOT_TEXTS), self._detected("eom", EOM_TEXTS),
        ):  # fmt: skip
            if found is not None:
                eog.add(found)
        by_text = {self.tokens[i]: i for i in eog}
        present = by_text.keys()
        if "<|end|>" in present and (
            {"<|return|>", "<|call|>"} <= present or {"<|calls|>", "<|flush|>"} <= present
        ):
            eog.discard(by_text["<|end|>"])
        if "</s>" in present and "<|tool_response>" in present:
            eog.discard(by_text["</s>"])
        return frozenset(eog)

    def eog_ids(self) -> frozenset[int]:
        """The ids that end generation in llama.cpp (``llama_vocab_is_eog``)."""
        return self._eog

    def special_texts(self) -> tuple[str, ...]:
        """Texts llama.cpp parses as control tokens in a prompt: neutralise them in user text.

        Control-type tokens plus the tokens llama.cpp promotes to control because of
        their text (eot/eom/FIM/EOG detection). Unknown and user-defined tokens are
        left out: they cannot end or open a turn, and user-defined ones are often
        plain text such as runs of spaces.
        """
        ids = {i for i, kind in enumerate(self.token_types) if kind == TOKEN_CONTROL}
        ids |= self._eog
        for name, texts in (
            ("eot", EOT_TEXTS), ("eom", EOM_TEXTS), ("fim_pad", FIM_PAD_TEXTS),
            ("fim_rep", FIM_REP_TEXTS), ("fim_sep", FIM_SEP_TEXTS),
        ):  # fmt: skip
            found = self._detected(name, texts)
            if found is not None:
                ids.add(found)
        return tuple(sorted({self.tokens[i] for i in ids if self.tokens[i].strip()}))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def model_info_from_gguf(gguf: GGUFInfo) -> ModelInfo:
    """Decode the metadata of an already read GGUF header (doctor reads the file once)."""
    meta = gguf.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ModelError(
            f"{gguf.path} has no tokenizer vocabulary (tokenizer.ggml.tokens): it cannot chat; "
            "use a GGUF conversion of a chat model"
        )
    types = meta.get("tokenizer.ggml.token_type")
    if isinstance(types, list) and len(types) >= len(tokens):
        token_types = tuple(_int(t) or TOKEN_NORMAL for t in types[: len(tokens)])
    else:
        token_types = (TOKEN_NORMAL,) * len(tokens)
    declared: dict[str, int] = {}
    for special in _SPECIAL_NAMES:
        value = _int(meta.get(f"tokenizer.ggml.{special}_token_id"))
        if value is not None and 0 <= value < len(tokens):  # llama.cpp ignores bad ids
            declared[special] = value
    arch = gguf.architecture
    template = meta.get("tokenizer.chat_template")
    name = meta.get("general.name")
    tokenizer_model = meta.get("tokenizer.ggml.model")
    return ModelInfo(
        path=gguf.path,
        architecture=arch,
        name=name if isinstance(name, str) else None,
        context_length=_int(meta.get(f"{arch}.context_length")) if arch else None,
        chat_template=template if isinstance(template, str) and template.strip() else None,
        tokenizer_model=tokenizer_model if isinstance(tokenizer_model, str) else None,
        tokens=tuple(tokens),
        token_types=token_types,
        declared_ids=declared,
    )


def load_model_info(path: Path) -> ModelInfo:
    """Read ``path``'s GGUF metadata. Raises ModelError with one clear line."""
    if not path.exists():
        raise ModelError(
            f"model file {path} does not exist; point --model / EDGEBUNDLE_MODEL at a .gguf file"
        )
    try:
        gguf = read_gguf(path)
    except IsADirectoryError:
        raise ModelError(f"model path {path} is a directory, not a .gguf file") from None
    except OSError as exc:
        raise ModelError(
            f"cannot read model file {path}: {exc.strerror or exc}; check its permissions"
        ) from None
    return model_info_from_gguf(gguf)


# Markers of each family in a GGUF's Jinja chat template, most specific first.
_FAMILY_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("llama-3-chat", ("<|start_header_id|>",)),
    ("chatml", ("<|im_start|>",)),
    ("gemma-instruct", ("<start_of_turn>",)),
    ("phi-3-chat", ("<|user|>", "<|end|>")),
    ("llama-2-chat", ("[INST]", "<<SYS>>")),
    ("mistral-instruct", ("[INST]",)),
)


def guess_template(chat_template: str | None) -> str | None:
    """The LlamaEdge template name a GGUF Jinja chat template looks like, or None."""
    if not chat_template:
        return None
    for name, markers in _FAMILY_MARKERS:
        if all(marker in chat_template for marker in markers):
            return name
    return None


SOURCE_EXPLICIT = "--template"
SOURCE_MODEL = "the model's own chat template"
SOURCE_DEFAULT = f"default {DEFAULT_TEMPLATE}"


def resolve_template(explicit: str | None, info: ModelInfo | None) -> tuple[ChatTemplate, str]:
    """The template to render with, and where it came from.

    An explicit name wins (UsageError when unknown); else the family of the model's
    own chat template; else llama-3-chat.
    """
    if explicit:
        return get_template(explicit), SOURCE_EXPLICIT
    guessed = guess_template(info.chat_template) if info is not None else None
    if guessed is not None:
        return get_template(guessed), SOURCE_MODEL
    return get_template(DEFAULT_TEMPLATE), SOURCE_DEFAULT
