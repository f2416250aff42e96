"""Which messages of a synced thread a run's prompt keeps: the context-window policy.

A thread grows without end, the model's context does not. Like Ollama and llama.cpp's
server, a run on a thread that outgrew the context leaves out the oldest turns instead
of failing (``context_policy = "window"``, the default; ``"fail"`` renders the whole
thread, and a thread that outgrew the context fails ``prompt_too_long`` as before).

The window of a run (:func:`fit_window`):

- always keeps the system prompt (the thread's leading system messages, or without
  any the device's system prompt, which the template adds) and the run's input (the
  last message, the user's);
- adds the newest older messages, each whole or not at all, while the rendered prompt
  fits the budget of ``ctx_size`` minus the reply's room (:func:`prompt_budget`): the
  run's ``max_tokens`` if it gives one, else min(512, ctx_size // 4);
- starts at a user message: an answer whose question was left out is left out too;
- changes nothing for a thread that fits: its prompt is the whole thread, as before.

The input is never dropped. If the system prompt and the input alone are more than the
guest takes (``ctx_size - 4`` tokens, :data:`GUEST_RESERVED`) the run fails
``prompt_too_long``; if they fit the guest but not the budget they are sent alone and
the reply gets the room that is left.

Tokens are counted as the guest counts them (llama.cpp, special tokens added and
parsed), as cheaply as possible:

1. No tokenizer at all while an upper bound from the prompt's UTF-8 length fits the
   budget (:func:`token_bound`), the common case of a thread far from the limit.
2. Exactly, with llama.cpp's tokenizer over the model's vocabulary only
   (:class:`VocabTokenCounter`, llama-cpp-python from the ``embedded`` extra, loaded
   once on first need); the oldest message to keep is found by binary search.
3. Without llama-cpp-python (a WasmEdge-only device), estimated from the UTF-8 length
   at the tokens-per-byte ratio the guest reported for earlier prompts
   (:class:`TokenEstimate`, the bound until it reported any); a prompt the guest
   still refuses as too long (it reports its token count) teaches the estimate that
   prompt's ratio and is fitted again, at most :data:`ESTIMATE_ATTEMPTS` times.

No I/O and no HTTP here: the chat (:meth:`edgebundle.completion.ChatService.complete`)
sends the window's prompt and reports :attr:`Window.dropped`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgebundle.errors import ConfigError, ModelError
from edgebundle.templates import Message

if TYPE_CHECKING:
    from edgebundle.model_info import ModelInfo

log = logging.getLogger(__name__)

CONTEXT_POLICIES = ("window", "fail")
# The guest refuses a prompt of more than ctx_size - 4 tokens (the GGML plugin keeps
# room for special tokens): the hard limit, whatever the reply's budget.
GUEST_RESERVED = 4
REPLY_RESERVE_MAX = 512  # tokens kept for a reply without max_tokens (a quarter on small contexts)
# Fits with a learned ratio the guest may still refuse; each refusal teaches the ratio.
ESTIMATE_ATTEMPTS = 3
ESTIMATE_MARGIN = 1.1  # a learned tokens-per-byte ratio is used 10% higher: text varies

Render = Callable[[Sequence[Message]], str]
TokenCount = Callable[[str], int]  # the tokens of a rendered prompt, exact or estimated


def check_policy(policy: str, source: str = "") -> str:
    """``policy`` if it is one of :data:`CONTEXT_POLICIES`, else a one-line ConfigError
    that starts with ``source`` (where the value came from) if given."""
    if policy not in CONTEXT_POLICIES:
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}context_policy must be one of "
                          f"{', '.join(CONTEXT_POLICIES)}, got {policy!r}")
    return policy


def reply_reserve(ctx_size: int, max_tokens: int | None) -> int:
    """The tokens kept free for the reply: ``max_tokens``, else min(512, ctx_size // 4)."""
    if max_tokens is not None:
        return max_tokens
    return min(REPLY_RESERVE_MAX, ctx_size // 4)


def prompt_budget(ctx_size: int, max_tokens: int | None) -> int:
    """The most tokens a windowed prompt may have before its oldest messages are left out."""
    return min(ctx_size - GUEST_RESERVED, ctx_size - reply_reserve(ctx_size, max_tokens))


def guest_limit(ctx_size: int) -> int:
    """The most prompt tokens the guest takes at all (more is ``prompt_too_long``)."""
    return ctx_size - GUEST_RESERVED


def token_bound(tokenizer_model: str | None, space_is_token: bool) -> TokenCount | None:
    """An upper bound on llama.cpp's token count of a prompt from its UTF-8 length, or
    None for a tokenizer it cannot be bounded for that way.

    - ``gpt2`` (byte-level BPE: Llama 3, Qwen, …): every token spans at least one
      byte of the text; add_special may add BOS and EOS. At most bytes + 2.
    - ``llama`` (SentencePiece: Llama 2, Mistral, Gemma): text is split at special and
      user-defined tokens and each piece after one gets a "▁" prefix (a token with no
      byte of the text), so a byte costs at most two tokens; plus a prefix at the
      start, BOS and EOS. Without "▁" in the vocabulary (the scripted test models) a
      space or prefix falls back to its three UTF-8 bytes: three times that.
    - others (WordPiece, Unigram with its normaliser, RWKV …): None.
    """
    if tokenizer_model == "gpt2":
        return lambda prompt: len(prompt.encode()) + 2
    if tokenizer_model == "llama":
        factor = 1 if space_is_token else 3
        return lambda prompt: factor * (2 * len(prompt.encode()) + 3)
    return None


@dataclass(frozen=True)
class Window:
    """What a run's prompt keeps (:func:`fit_window`)."""

    messages: tuple[Message, ...]  # the system messages, then the kept turns
    prompt: str  # ``messages`` rendered
    dropped: int  # older messages left out
    fits: bool  # False: even the system prompt and the input are more than the guest takes
    counted: bool  # tokens were counted (False: the byte bound alone showed that it fits)


def fit_window(messages: Sequence[Message], render: Render, *, budget: int, limit: int,
               count: TokenCount, bound: TokenCount | None = None,
               whole: str | None = None) -> Window:
    """The newest messages that fit ``budget`` tokens, with the system prompt and the
    input (the last message) always kept (see the module docstring).

    ``render`` raises UsageError for a conversation it cannot render (nothing is left
    out to make one renderable). ``count`` is called only when ``bound`` (an upper
    bound) does not already show that the whole thread fits; counts must not grow when
    older messages are left out, which holds for every template (a prompt is its
    messages' text in order). ``whole``: the whole thread already rendered, if the
    caller has it (it is not rendered again).
    """
    whole = render(messages) if whole is None else whole
    window = whole_by_bound(messages, whole, budget=budget, bound=bound)
    if window is not None:
        return window
    return _fit_counted(messages, render, whole, budget=budget, limit=limit, count=count,
                        bound=bound)


def whole_by_bound(messages: Sequence[Message], whole: str, *, budget: int,
                   bound: TokenCount | None) -> Window | None:
    """The whole thread (rendered: ``whole``) as the window if the byte bound alone
    shows it fits ``budget`` (what fit_window answers first, without counting)."""
    if bound is not None and bound(whole) <= budget:
        return Window(tuple(messages), whole, 0, True, counted=False)
    return None


def _fit_counted(messages: Sequence[Message], render: Render, whole: str, *, budget: int,
                 limit: int, count: TokenCount, bound: TokenCount | None) -> Window:
    """fit_window once the byte bound could not show that the whole thread fits."""
    system = tuple(_leading_system(messages))
    turns = tuple(messages[len(system):])
    counts: dict[int, tuple[str, int]] = {}

    def measured(start: int) -> tuple[str, int]:
        """The prompt without the first ``start`` turns, and its tokens."""
        if start not in counts:
            prompt = whole if start == 0 else render((*system, *turns[start:]))
            known = bound(prompt) if bound is not None else None
            counts[start] = (prompt, known if known is not None and known <= budget
                             else count(prompt))
        return counts[start]

    if measured(0)[1] <= budget:
        return Window(tuple(messages), whole, 0, True, counted=True)
    last = len(turns) - 1  # the input
    start = last
    if measured(last)[1] <= budget:  # the smallest start in 1..last that fits
        low = 1
        while low < start:
            middle = (low + start) // 2
            if measured(middle)[1] <= budget:
                start = middle
            else:
                low = middle + 1
    while turns[start].role != "user":  # the input is the user's: this stops there
        start += 1
    prompt, tokens = measured(start)
    return Window((*system, *turns[start:]), prompt, start, tokens <= limit, counted=True)


def _leading_system(messages: Sequence[Message]) -> list[Message]:
    system: list[Message] = []
    for message in messages:
        if message.role != "system":
            break
        system.append(message)
    return system


class VocabTokenCounter:
    """Exact prompt token counts: llama.cpp's tokenizer over the model's vocabulary.

    The vocabulary is loaded on the first count (``llama_model_load_from_file`` with
    ``vocab_only``: no tensors, no llama context, no KV cache), in the calling thread
    (the chat calls from a worker thread, so the event loop never waits for it), and
    kept. Its cost in this process, measured with llama-cpp-python 0.3.36 on x86-64:
    importing llama_cpp ~32 MB RSS; then Llama 3's 128k-token BPE vocabulary +53 MB
    in 0.6 s, Qwen 2's +47 MB, Gemma's 262k +96 MB in 1.3 s, Llama 2's 32k
    SentencePiece +6 MB in 40 ms. Counting a 4k-token prompt takes 1-10 ms.
    """

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        self._vocab: Any = None  # kept for the process's life, with its llama model
        self._lock = threading.Lock()  # one load; llama_tokenize on one vocab at a time

    @staticmethod
    def available() -> bool:
        """llama-cpp-python is installed (the ``embedded`` extra)."""
        return importlib.util.find_spec("llama_cpp") is not None

    @property
    def loaded(self) -> bool:
        return self._vocab is not None

    def __call__(self, prompt: str) -> int:
        text = prompt.encode()
        with self._lock:
            vocab = self._load()
            from edgebundle.runtime.embedded.ggml import llama

            # No buffer: llama_tokenize answers -(the count) when it has no room.
            found = int(llama().llama_tokenize(vocab, text, len(text), None, 0, True, True))
        return -found if found < 0 else found

    def _load(self) -> Any:
        if self._vocab is None:
            # ggml.llama() imports llama_cpp once, with llama.cpp's log kept quiet.
            from edgebundle.runtime.embedded.ggml import llama

            lib = llama()
            params = lib.llama_model_default_params()
            params.vocab_only = True
            model = lib.llama_model_load_from_file(os.fsencode(self.model_path), params)
            if not model:
                raise ModelError(f"{self.model_path}: llama.cpp cannot load its vocabulary "
                                 "to count prompt tokens")
            self._vocab = lib.llama_model_get_vocab(model)
        return self._vocab


class TokenEstimate:
    """Prompt tokens estimated from the UTF-8 length, for devices without llama-cpp-python.

    Until the guest reported a count, the estimate is ``bound`` (an upper bound, so
    nothing is refused; at one token per byte without one). Each count the guest
    reports (:meth:`learn`) raises the tokens-per-byte ratio to that prompt's, plus
    :data:`ESTIMATE_MARGIN`; the ratio only grows, so a prompt refused once is
    estimated at least at its own ratio the next time. An estimate is never above the
    bound, which no count exceeds.
    """

    def __init__(self, bound: TokenCount | None = None) -> None:
        self.bound = bound
        self.ratio: float | None = None  # tokens per byte, once learned

    def __call__(self, prompt: str) -> int:
        size = len(prompt.encode())
        bound = self.bound(prompt) if self.bound is not None else None
        if self.ratio is None:
            return bound if bound is not None else size + 2
        learned = math.ceil(size * self.ratio)
        return learned if bound is None else min(learned, bound)  # never above a sure bound

    def learn(self, prompt: str, tokens: int) -> None:
        """The guest counted ``tokens`` for ``prompt``."""
        if tokens <= 0:
            return
        ratio = tokens / max(1, len(prompt.encode())) * ESTIMATE_MARGIN
        self.ratio = ratio if self.ratio is None else max(self.ratio, ratio)


class ContextWindow:
    """The window policy of one model at one context size: :meth:`fit` a thread.

    Counts with :class:`VocabTokenCounter` when llama-cpp-python is installed, else
    with a :class:`TokenEstimate` that :meth:`learn` teaches (see the module docstring).
    """

    def __init__(self, ctx_size: int, model_path: Path | None,
                 bound: TokenCount | None = None, *, exact: bool | None = None) -> None:
        self.ctx_size = ctx_size
        self.bound = bound
        if exact is None:
            exact = model_path is not None and VocabTokenCounter.available()
        self.counter = VocabTokenCounter(model_path) if exact and model_path else None
        self.estimate = TokenEstimate(bound)

    @classmethod
    def for_model(cls, ctx_size: int, info: ModelInfo | None) -> ContextWindow:
        """The policy for the model ``info`` describes (None: no bound, no vocabulary)."""
        if info is None:
            return cls(ctx_size, None)
        space_is_token = info.token_id("\u2581") is not None  # SentencePiece's "▁"
        return cls(ctx_size, info.path, token_bound(info.tokenizer_model, space_is_token))

    @property
    def estimated(self) -> bool:
        """Counts are estimates (no llama-cpp-python): the guest may still refuse a window."""
        return self.counter is None

    def fit(self, messages: Sequence[Message], render: Render,
            max_tokens: int | None = None, whole: str | None = None) -> Window:
        """The window of ``messages`` for a reply of ``max_tokens`` (None: the reserve);
        ``whole``: the whole thread already rendered, if the caller has it."""
        budget, limit = prompt_budget(self.ctx_size, max_tokens), guest_limit(self.ctx_size)
        if self.counter is not None:
            try:
                return fit_window(messages, render, budget=budget, limit=limit,
                                  count=self.counter, bound=self.bound, whole=whole)
            except (ModelError, ImportError, OSError) as exc:
                # A llama.cpp here that cannot read this model's vocabulary (the guest's
                # WasmEdge plugin may be newer): estimate, as without llama-cpp-python.
                log.warning("counting prompt tokens exactly failed (%s); estimating them "
                            "from now on", exc)
                self.counter = None
        return fit_window(messages, render, budget=budget, limit=limit, count=self.estimate,
                          bound=self.bound, whole=whole)

    def fits_whole(self, messages: Sequence[Message], whole: str,
                   max_tokens: int | None = None) -> Window | None:
        """The whole thread (rendered: ``whole``) as its window when the byte bound alone
        shows it fits (the common case: no vocabulary, nothing tokenized, so no worker
        thread is needed); None: :meth:`fit` decides."""
        return whole_by_bound(messages, whole, budget=prompt_budget(self.ctx_size, max_tokens),
                              bound=self.bound)

    def surely_fits(self, prompt: str) -> bool:
        """The byte bound alone shows that the guest takes ``prompt`` (no vocabulary
        loaded, nothing tokenized: what most requests need)."""
        return self.bound is not None and self.bound(prompt) <= guest_limit(self.ctx_size)

    def over_limit(self, prompt: str) -> int | None:
        """The token count of ``prompt`` when it is certainly more than the guest takes
        (so it is refused before the guest sees it: genuine WasmEdge's plugin would log
        the refusal on the guest's stdout), else None. Only an exact count decides,
        and only where the byte bound cannot (:meth:`surely_fits`)."""
        if self.counter is None or self.surely_fits(prompt):
            return None
        try:
            tokens = self.counter(prompt)
        except (ModelError, ImportError, OSError):
            return None
        return tokens if tokens > guest_limit(self.ctx_size) else None

    def learn(self, window: Window, input_tokens: int) -> None:
        """The guest counted ``input_tokens`` for the window's prompt (estimates learn)."""
        if self.counter is None:
            self.estimate.learn(window.prompt, input_tokens)
