"""Prompt templates by LlamaEdge name, rendered once in Python for every device.

The guest stays dumb: it is handed the finished prompt. Each template knows

- how to render a conversation (system prompt injected once; roles validated; the
  prompt ends with the assistant's header so the model answers),
- its end-of-turn string (the token text that ends an assistant turn) and the stop
  strings to pass as reverse prompt, so a model whose end-of-turn token is not an
  end-of-generation token still stops at the end of its turn,
- its special strings, which are neutralised in message text so nobody can forge a
  turn by typing ``<|eot_id|><|start_header_id|>system...``.

Formats follow LlamaEdge's crates/chat-prompts (src/chat/{llama,chatml,mistral,phi,
gemma}.rs): message text trimmed, the same tokens and separators. Where LlamaEdge
departs from the model's own reference format in whitespace we follow the reference
(the Jinja template shipped in the model's GGUF, Meta's and Google's reference code),
because that is what the model was trained on; each renderer notes the difference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from edgebundle.errors import UsageError

ROLES = ("system", "user", "assistant")
# Inserted after the first character of a special string found in user text: the text
# reads the same, but the tokenizer no longer sees the special token.
_BREAK = "\u200b"


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


def neutralise(text: str, specials: Iterable[str]) -> str:
    """``text`` with every special string broken by a zero-width space."""
    for special in sorted(set(specials), key=len, reverse=True):
        if special and special in text:
            text = text.replace(special, special[0] + _BREAK + special[1:])
    return text


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    end_of_turn: str
    stop_strings: tuple[str, ...]
    specials: tuple[str, ...]
    supports_system: bool
    _render: Callable[[str | None, Sequence[Turn]], str]

    def render(
        self,
        messages: Sequence[Message],
        system_prompt: str | None = None,
        extra_specials: Iterable[str] = (),
    ) -> str:
        """The prompt for the next assistant turn after ``messages``.

        System messages are merged into one system block, injected once; without any,
        ``system_prompt`` is used. The last message must be the user's.
        """
        specials = (*self.specials, *extra_specials)
        system_parts: list[str] = []
        turns: list[Turn] = []
        for position, message in enumerate(messages):
            if message.role not in ROLES:
                raise UsageError(
                    f"message {position}: role {message.role!r} is not one of {', '.join(ROLES)}"
                )
            if not isinstance(message.content, str):
                raise UsageError(f"message {position}: content must be text")
            # Trimmed like LlamaEdge (content.trim()) and Llama-3's / Gemma's `| trim`.
            content = neutralise(message.content.strip(), specials)
            if message.role == "system":
                if turns:
                    raise UsageError(
                        f"message {position}: a system message must come before the conversation"
                    )
                system_parts.append(content)
            else:
                turns.append(Turn(message.role, content))
        if not turns or turns[-1].role != "user":
            raise UsageError("the conversation must end with a user message")
        system = "\n\n".join(system_parts) if system_parts else system_prompt
        if system is not None and not system_parts:
            system = neutralise(system.strip(), specials)
        if system and not self.supports_system:
            first = turns[0]
            turns[0] = Turn(first.role, f"{system}\n\n{first.content}")
            system = None
        return self._render(system or None, turns)


# Llama-3 (llama.rs Llama3ChatPrompt; Meta's model card and GGUF template). LlamaEdge
# puts a space before an assistant header and ends the prompt without "\n\n"; the
# reference has neither, and the model starts its reply after "\n\n".
def _llama3(system: str | None, turns: Sequence[Turn]) -> str:
    out = ["<|begin_of_text|>"]
    if system:
        out.append(f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>")
    for turn in turns:
        out.append(f"<|start_header_id|>{turn.role}<|end_header_id|>\n\n{turn.content}<|eot_id|>")
    out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


# Llama-2 (llama.rs Llama2ChatPrompt; Meta's llama/generation.py): "<s>[INST] " +
# user + " [/INST]", then " " + answer + " </s>". LlamaEdge closes the system block
# with " <</SYS>>"; Meta's B_SYS/E_SYS are "<<SYS>>\n" and "\n<</SYS>>\n\n".
def _llama2(system: str | None, turns: Sequence[Turn]) -> str:
    out: list[str] = []
    first_user = True
    for turn in turns:
        if turn.role == "user":
            if first_user and system:
                out.append(f"<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{turn.content} [/INST]")
            else:
                out.append(f"<s>[INST] {turn.content} [/INST]")
            first_user = False
        else:
            out.append(f" {turn.content} </s>")
    return "".join(out)


# ChatML (chatml.rs ChatMLPrompt; Qwen's and others' GGUF templates). LlamaEdge ends
# with "<|im_start|>assistant" without the "\n" of add_generation_prompt.
def _chatml(system: str | None, turns: Sequence[Turn]) -> str:
    out = [f"<|im_start|>system\n{system}<|im_end|>\n"] if system else []
    for turn in turns:
        out.append(f"<|im_start|>{turn.role}\n{turn.content}<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    return "".join(out)


# Mistral-instruct (mistral.rs MistralInstructPrompt, identical to Mistral-7B-Instruct
# v0.1/v0.2's template): "<s>[INST] u [/INST]a</s>[INST] u2 [/INST]". There is no
# system role: LlamaEdge drops system messages, we put them before the first user text.
def _mistral(system: str | None, turns: Sequence[Turn]) -> str:
    out = ["<s>"]
    for turn in turns:
        if turn.role == "user":
            out.append(f"[INST] {turn.content} [/INST]")
        else:
            out.append(f"{turn.content}</s>")
    return "".join(out)


# Phi-3 (phi.rs Phi3ChatPrompt; Phi-3's GGUF template). LlamaEdge ends with
# "<|assistant|>" without the "\n" of add_generation_prompt.
def _phi3(system: str | None, turns: Sequence[Turn]) -> str:
    out = [f"<|system|>\n{system}<|end|>\n"] if system else []
    for turn in turns:
        out.append(f"<|{turn.role}|>\n{turn.content}<|end|>\n")
    out.append("<|assistant|>\n")
    return "".join(out)


# Gemma (gemma.rs GemmaInstructPrompt; Gemma's GGUF template). LlamaEdge renders a
# past answer as "\n{answer}<end_of_turn>model" and ends without "\n"; the reference is
# "<start_of_turn>model\n{answer}<end_of_turn>\n". No system role: like Gemma 2/3's
# template (and LlamaEdge's gemma-3) the system text opens the first user turn.
def _gemma(system: str | None, turns: Sequence[Turn]) -> str:
    out = ["<bos>"]
    for turn in turns:
        role = "model" if turn.role == "assistant" else "user"
        out.append(f"<start_of_turn>{role}\n{turn.content}<end_of_turn>\n")
    out.append("<start_of_turn>model\n")
    return "".join(out)


TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            "llama-3-chat",
            end_of_turn="<|eot_id|>",
            stop_strings=("<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>"),
            specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                      "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"),
            supports_system=True,
            _render=_llama3,
        ),
        ChatTemplate(
            "llama-2-chat",
            end_of_turn="</s>",
            stop_strings=("</s>", "[INST]"),
            specials=("<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"),
            supports_system=True,
            _render=_llama2,
        ),
        ChatTemplate(
            "chatml",
            end_of_turn="<|im_end|>",
            stop_strings=("<|im_end|>", "<|im_start|>"),
            specials=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
            supports_system=True,
            _render=_chatml,
        ),
        ChatTemplate(
            "mistral-instruct",
            end_of_turn="</s>",
            stop_strings=("</s>", "[INST]"),
            specials=("<s>", "</s>", "[INST]", "[/INST]"),
            supports_system=False,
            _render=_mistral,
        ),
        ChatTemplate(
            "phi-3-chat",
            end_of_turn="<|end|>",
            stop_strings=("<|end|>", "<|user|>", "<|endoftext|>"),
            specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"),
            supports_system=True,
            _render=_phi3,
        ),
        ChatTemplate(
            "gemma-instruct",
            end_of_turn="<end_of_turn>",
            stop_strings=("<end_of_turn>", "<start_of_turn>"),
            specials=("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
            supports_system=False,
            _render=_gemma,
        ),
    )
}

DEFAULT_TEMPLATE = "llama-3-chat"


def get_template(name: str | None) -> ChatTemplate:
    """The template called ``name`` (LlamaEdge spelling); llama-3-chat when None."""
    key = name or DEFAULT_TEMPLATE
    try:
        return TEMPLATES[key]
    except KeyError:
        raise UsageError(
            f"unknown prompt template {key!r}; known: {', '.join(sorted(TEMPLATES))}"
        ) from None
