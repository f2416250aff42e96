"""The chat orchestrator: messages -> prompt -> guest -> text, usable without HTTP.

:class:`ChatService` renders a conversation with the prompt template (system prompt
injected once, special-token text typed by a user neutralised), sends the prompt and
the sampling options (the GGML plugin's metadata JSON) to the :class:`~edgebundle.engine.Engine`
and streams the reply. The template's end-of-turn strings and the request's ``stop``
strings are applied here, on the stream: text that could be the start of a stop
string is held back until it is known not to be one, so a stop string never reaches
the client; on a match the guest is told to stop. This is what keeps a model whose
end-of-turn token is not an end-of-generation token (Llama 3 with eos =
<|end_of_text|>) from talking to itself.

The one-shot ``edgebundle ask`` (start an engine, answer one prompt, stop it) is
:func:`edgebundle.serving.ask`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from edgebundle.config import Settings
from edgebundle.context_window import ESTIMATE_ATTEMPTS, ContextWindow
from edgebundle.engine import READY_TIMEOUT, ChatEngine, Delta, Engine
from edgebundle.errors import UsageError
from edgebundle.model_info import ModelInfo, load_model_info, resolve_template
from edgebundle.runtime.launch import LaunchSpec
from edgebundle.templates import ChatTemplate, Message

# The GGML plugin's own defaults (llama.cpp common_params_sampling). Sampling options
# stay set in the plugin from one request to the next, so every request sends all.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_REPEAT_PENALTY = 1.0
RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a fresh random seed

# Finished.reason: the engine's reasons plus "stop" (a stop string ended the reply).
FINISH_REASONS = ("eos", "length", "context_full", "prompt_too_long", "stop", "cancelled", "error")


@dataclass(frozen=True)
class ChatParams:
    """Per-request options; None = the default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    # Older messages the prompt left out to fit the context; None: not a windowed turn.
    dropped_messages: int | None = None


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    """The reply is over: why (:data:`FINISH_REASONS`), the token counts, and for errors why."""

    reason: str
    usage: Usage
    detail: str = ""


class StopScanner:
    """Finds the first stop string in a stream of text, never letting one through.

    ``feed(text)`` returns the text that is safe to pass on and whether a stop string
    was found (then nothing after its start is returned). The longest tail that could
    still grow into a stop string is held back; :meth:`flush` releases it at the end.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stops if s))
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        buffer = self._held + text
        found = [i for i in (buffer.find(stop) for stop in self._stops) if i >= 0]
        if found:
            self._held = ""
            return buffer[: min(found)], True
        keep = self._partial_tail(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that a stop string starts with."""
        longest = max((len(s) for s in self._stops), default=0)
        for size in range(min(len(buffer), longest - 1), 0, -1):
            tail = buffer[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0


class ChatService:
    """Chat turns through one engine: render, generate, apply stop strings."""

    def __init__(
        self,
        engine: ChatEngine,
        template: ChatTemplate,
        model_info: ModelInfo | None = None,
        system_prompt: str | None = None,
        ctx_size: int = 0,
    ) -> None:
        self.engine = engine
        self.template = template
        self.model_info = model_info
        self.system_prompt = system_prompt
        self.ctx_size = ctx_size
        self._specials = model_info.special_texts() if model_info is not None else ()
        # The window policy of threads (nothing is loaded until a thread outgrows the
        # byte bound); without a known context size there is nothing to fit.
        self.window = ContextWindow.for_model(ctx_size, model_info) if ctx_size else None

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt for the next assistant turn; UsageError for a malformed conversation."""
        return self.template.render(messages, self.system_prompt, extra_specials=self._specials)

    def stop_strings(self, params: ChatParams) -> tuple[str, ...]:
        return (*self.template.stop_strings, *params.stop)

    def metadata(self, params: ChatParams) -> dict[str, Any]:
        """The plugin's metadata JSON (input 1) for a request with ``params``."""
        stops = self.stop_strings(params)
        meta: dict[str, Any] = {
            "n-predict": params.max_tokens or -1,
            "temp": _pick(params.temperature, DEFAULT_TEMPERATURE),
            "top-p": _pick(params.top_p, DEFAULT_TOP_P),
            "top-k": _pick(params.top_k, DEFAULT_TOP_K),
            "seed": _pick(params.seed, RANDOM_SEED),
            "repeat-penalty": _pick(params.repeat_penalty, DEFAULT_REPEAT_PENALTY),
            "presence-penalty": _pick(params.presence_penalty, 0.0),
            "frequency-penalty": _pick(params.frequency_penalty, 0.0),
            # compute() only; the guest streams with compute_single and we stop it ourselves.
            "reverse-prompt": stops[0] if stops else "",
        }
        if self.ctx_size:
            meta["ctx-size"] = self.ctx_size
        return meta

    async def complete(
        self, messages: Sequence[Message], params: ChatParams = ChatParams(), *,
        fit_context: bool = False,
    ) -> AsyncGenerator[TextDelta | Finished, None]:
        """The reply to ``messages``: text as it comes, then one :class:`Finished`.

        ``fit_context`` (a turn of a synced thread): the prompt is the context window of
        ``messages`` (:mod:`edgebundle.context_window`), and the usage says how many
        older messages it left out. Otherwise the whole conversation is the prompt and
        one too long for the context ends ``prompt_too_long``.

        Raises UsageError (before anything runs) for a conversation the template
        cannot render.
        """
        if not fit_context or self.window is None:
            prompt = self.render(messages)
            if self.window is not None and not self.window.surely_fits(prompt):
                # counting may load the vocabulary and tokenize: not on the loop
                tokens = await asyncio.to_thread(self.window.over_limit, prompt)
                if tokens is not None:
                    yield Finished("prompt_too_long", Usage(input_tokens=tokens))
                    return
            async with aclosing(self._generate(prompt, params)) as events:
                async for event in events:
                    yield event
            return
        async with aclosing(self._complete_window(self.window, messages, params)) as events:
            async for event in events:
                yield event

    async def _complete_window(
        self, window: ContextWindow, messages: Sequence[Message], params: ChatParams
    ) -> AsyncGenerator[TextDelta | Finished, None]:
        whole = self.render(messages)
        for attempt in range(1, ESTIMATE_ATTEMPTS + 1):
            # Counting may load the vocabulary and tokenize a few times: not on the loop
            # (a thread that surely fits is not counted: no hop to a worker thread).
            fitted = window.fits_whole(messages, whole, params.max_tokens) \
                if attempt == 1 else None
            if fitted is None:
                fitted = await asyncio.to_thread(window.fit, messages, self.render,
                                                 params.max_tokens, whole)
            async with aclosing(self._generate(fitted.prompt, params)) as events:
                async for event in events:
                    if isinstance(event, Finished):
                        window.learn(fitted, event.usage.input_tokens)
                        if (event.reason == "prompt_too_long" and fitted.fits
                                and window.estimated and attempt < ESTIMATE_ATTEMPTS):
                            break  # the estimate was low: fit again with the guest's count
                        event = replace(event, usage=replace(
                            event.usage, dropped_messages=fitted.dropped))
                    yield event
                else:
                    return

    async def _generate(
        self, prompt: str, params: ChatParams
    ) -> AsyncGenerator[TextDelta | Finished, None]:
        """The reply to a rendered prompt, stop strings applied."""
        scanner = StopScanner(self.stop_strings(params))
        stopped = False
        stream = self.engine.generate(prompt, self.metadata(params), params.max_tokens or 0)
        async with aclosing(stream):
            async for event in stream:
                if isinstance(event, Delta):
                    if stopped:
                        continue  # generated after the stop string, before the guest stopped
                    text, stopped = scanner.feed(event.text)
                    if text:
                        yield TextDelta(text)
                    if stopped:
                        await self.engine.cancel()
                    continue
                if not stopped:
                    rest = scanner.flush()
                    if rest:
                        yield TextDelta(rest)
                usage = Usage(event.input_tokens, event.output_tokens)
                yield Finished("stop" if stopped else event.reason, usage, event.detail)
                return


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


# -- setup shared by `ask` and `run` ----------------------------------------------


@dataclass(frozen=True)
class ChatSetup:
    """Everything a chat needs besides the running guest."""

    spec: LaunchSpec
    template: ChatTemplate
    template_source: str  # "--template", "the model's own chat template", "default …"
    model_info: ModelInfo | None

    @property
    def model_id(self) -> str:
        """The model's name in the API (/v1/models): its file name without .gguf."""
        return self.spec.model.stem if self.spec.model is not None else "default"


def chat_setup(settings: Settings, spec: LaunchSpec) -> ChatSetup:
    """Template and model metadata for the edgechat ``spec``."""
    if spec.kind != "edgechat" or spec.model is None:
        raise UsageError(
            f"{spec.app.name if spec.app else 'this app'} is not the edgechat guest: chat needs "
            "the built-in edgechat app (drop --app / EDGEBUNDLE_APP)"
        )
    info = load_model_info(spec.model)
    template, source = resolve_template(settings.template, info)
    return ChatSetup(spec=spec, template=template, template_source=source, model_info=info)


def chat_engine(settings: Settings, setup: ChatSetup,
                ready_timeout: float = READY_TIMEOUT) -> Engine:
    """The engine of the chat guest ``setup`` describes, not started yet; the guest's
    stderr and the supervisor's notes go to ``<home>/logs/edgechat.log``."""
    return Engine(setup.spec, log_path=settings.layout.logs / "edgechat.log",
                  ready_timeout=ready_timeout)


def runtime_line(spec: LaunchSpec) -> str:
    """``runtime embedded (auto: no wasmedge found)``: which runtime and why, in one line."""
    return f"runtime {spec.runtime} ({spec.reason})" if spec.reason else f"runtime {spec.runtime}"
