"""The context window of a thread: which messages a run's prompt keeps, and how it counts.

Real parts: the llama-3-chat template, llama.cpp's own tokenizer over a scripted GGUF
vocabulary (a SentencePiece one without "▁", so a space costs three byte tokens), and
for the estimate's retries a real guest on the embedded runtime.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from edgebundle.completion import ChatParams, ChatService, Finished, TextDelta
from edgebundle.config import load_settings
from edgebundle.context_window import (
    ContextWindow,
    TokenEstimate,
    VocabTokenCounter,
    Window,
    fit_window,
    guest_limit,
    prompt_budget,
    reply_reserve,
    token_bound,
)
from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.engine import Engine
from edgebundle.errors import ConfigError, UsageError
from edgebundle.model_info import ModelInfo, load_model_info
from edgebundle.serving import launch_spec
from edgebundle.templates import Message, get_template
from tests.support.serving import LoopThread

REPLY = "Sure thing."
TEMPLATE = get_template("llama-3-chat")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scripted_model(tmp_path_factory.mktemp("model") / "m.gguf",
                                ScriptedModelSpec(reply=REPLY, context_length=2048))


@pytest.fixture(scope="module")
def info(model: Path) -> ModelInfo:
    return load_model_info(model)


@pytest.fixture(scope="module")
def counter(model: Path) -> VocabTokenCounter:
    return VocabTokenCounter(model)


def render(messages: Sequence[Message]) -> str:
    return TEMPLATE.render(messages)


def conversation(turns: int) -> list[Message]:
    """``turns`` question/answer pairs, then the run's input."""
    messages: list[Message] = []
    for i in range(turns):
        messages += [Message("user", f"question {i} about the weather"),
                     Message("assistant", f"answer {i}: sunny and warm")]
    return [*messages, Message("user", "and tomorrow?")]


def fit(messages: Sequence[Message], counter: VocabTokenCounter, budget: int,
        limit: int = 10**6) -> Window:
    return fit_window(messages, render, budget=budget, limit=limit, count=counter)


def test_budget_is_ctx_minus_max_tokens_else_a_reserve_and_never_past_the_guest() -> None:
    assert reply_reserve(4096, None) == 512 and reply_reserve(1024, None) == 256
    assert reply_reserve(4096, 100) == 100
    assert prompt_budget(4096, None) == 3584 and prompt_budget(1024, 300) == 724
    assert prompt_budget(1024, 1) == guest_limit(1024) == 1020  # the guest keeps 4
    assert prompt_budget(512, 1000) < 0  # only the input is kept: it goes alone


def test_the_newest_whole_messages_that_fit_are_kept(counter: VocabTokenCounter) -> None:
    messages = conversation(6)
    for keep in (3, 5, 7):  # question, answer, …, input: whole turns from a question
        budget = counter(render(messages[-keep:]))
        window = fit(messages, counter, budget)
        assert window.messages == tuple(messages[-keep:])
        assert (window.dropped, window.fits, window.counted) == (len(messages) - keep, True, True)
        assert window.prompt == render(messages[-keep:])
        assert counter(window.prompt) <= budget < counter(render(messages[-keep - 1:]))


def test_the_window_starts_at_a_question_not_at_an_orphaned_answer(
    counter: VocabTokenCounter,
) -> None:
    messages = conversation(6)
    budget = counter(render(messages[-4:]))  # room for answer, question, answer, input
    window = fit(messages, counter, budget)
    assert [m.role for m in window.messages] == ["user", "assistant", "user"]
    assert window.messages == tuple(messages[-3:]) and window.dropped == len(messages) - 3


def test_a_message_is_never_cut_a_big_old_one_goes_whole(counter: VocabTokenCounter) -> None:
    big = Message("user", " ".join(f"word{i}" for i in range(300)))
    messages = [big, Message("assistant", "noted"), *conversation(2)]
    window = fit(messages, counter, counter(render(messages[2:])) + 10)
    assert window.messages == tuple(messages[2:]) and window.dropped == 2
    assert all(kept in messages for kept in window.messages)  # every one as it was


def test_the_system_messages_stay_and_the_device_prompt_too(counter: VocabTokenCounter) -> None:
    system = Message("system", "You are terse.")
    messages = [system, *conversation(5)]
    budget = counter(render([system, *messages[-3:]]))
    window = fit(messages, counter, budget)
    assert window.messages == (system, *messages[-3:]) and window.dropped == len(messages) - 4

    # Without system messages the device's system prompt is rendered in every window.
    with_prompt = ChatService(None, TEMPLATE, system_prompt="Device rules.")  # type: ignore[arg-type]
    plain = conversation(5)
    budget = counter(with_prompt.render(plain[-3:]))
    window = fit_window(plain, with_prompt.render, budget=budget, limit=10**6, count=counter)
    assert window.messages == tuple(plain[-3:]) and "Device rules." in window.prompt


def test_the_input_is_never_dropped_and_alone_too_long_it_does_not_fit(
    counter: VocabTokenCounter,
) -> None:
    messages = conversation(3)
    alone = counter(render(messages[-1:]))
    window = fit(messages, counter, budget=alone - 5, limit=alone)  # over budget, fits guest
    assert (window.messages, window.dropped, window.fits) == ((messages[-1],), 6, True)
    window = fit(messages, counter, budget=alone - 5, limit=alone - 1)  # over the guest too
    assert (window.messages, window.dropped, window.fits) == ((messages[-1],), 6, False)


def test_a_conversation_the_template_cannot_render_is_refused_not_windowed(
    counter: VocabTokenCounter,
) -> None:
    with pytest.raises(UsageError):
        fit(conversation(3)[:-1], counter, budget=10)  # ends with an answer
    late_system = [*conversation(3)[:-1], Message("system", "late"), Message("user", "x")]
    with pytest.raises(UsageError):
        fit(late_system, counter, budget=10)


def test_a_thread_within_the_byte_bound_needs_no_tokenizer(model: Path, info: ModelInfo) -> None:
    window = ContextWindow.for_model(2048, info)
    assert window.counter is not None and not window.counter.loaded
    messages = [Message("system", "Be brief."), Message("user", "hello there")]
    fitted = window.fit(messages, render)
    assert (fitted.messages, fitted.dropped, fitted.counted) == (tuple(messages), 0, False)
    assert not window.counter.loaded  # no vocabulary loaded: the fast path
    fitted = window.fit(conversation(60), render)  # past the bound: counted exactly
    assert fitted.counted and fitted.dropped > 0 and window.counter.loaded
    assert window.counter(fitted.prompt) <= prompt_budget(2048, None)


def test_the_byte_bound_is_never_below_llama_cpps_count(
    counter: VocabTokenCounter, info: ModelInfo,
) -> None:
    bound = token_bound(info.tokenizer_model, info.token_id("\u2581") is not None)
    assert bound is not None
    prompts = ["", " ", "x", "a b c d e f", "\n\n", "é ü 漢字 🙂", " " * 50,
               render(conversation(20)), "<|eot_id|> <|eot_id|>x<|start_header_id|> y"]
    for prompt in prompts:
        assert counter(prompt) <= bound(prompt), prompt
    byte_level = token_bound("gpt2", False)
    assert byte_level is not None and byte_level("abc") == 5
    assert token_bound("bert", True) is None  # WordPiece: no bound, always counted


def test_the_binary_search_counts_a_few_prompts_not_every_one(counter: VocabTokenCounter) -> None:
    messages = conversation(100)
    counted: list[str] = []

    def counting(prompt: str) -> int:
        counted.append(prompt)
        return counter(prompt)

    budget = counter(render(messages[-11:]))
    window = fit_window(messages, render, budget=budget, limit=10**6, count=counting)
    assert window.messages == tuple(messages[-11:])
    assert len(counted) <= 12  # the whole, the input alone, ~log2(200) halvings, the kept


def test_the_estimate_starts_at_the_bound_and_learns_the_guests_ratio() -> None:
    estimate = TokenEstimate(token_bound("gpt2", False))
    assert estimate("x" * 100) == 102  # the bound: nothing the guest would refuse
    estimate.learn("x" * 100, 25)
    assert estimate("x" * 1000) == pytest.approx(275, abs=1)  # 0.25 tokens a byte, plus 10%
    estimate.learn("y" * 100, 10)  # a lower ratio does not lower it
    assert estimate("x" * 1000) == pytest.approx(275, abs=1)
    estimate.learn("z" * 100, 50)
    assert estimate("x" * 1000) == pytest.approx(550, abs=1)
    assert TokenEstimate()("abc") == 5  # no bound: one token a byte until it learns
    estimate.learn("w" * 10, 20)  # 2 tokens a byte: past the bound, which no count exceeds
    assert estimate("x" * 100) == 102


def test_a_vocabulary_llama_cpp_cannot_read_falls_back_to_the_estimate(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    window = ContextWindow(512, broken, token_bound("gpt2", False), exact=True)
    assert not window.estimated
    fitted = window.fit(conversation(30), render)
    assert window.estimated and fitted.dropped > 0  # the run goes on with estimates


def test_a_bad_policy_is_one_clear_config_error(tmp_path: Path) -> None:
    home = str(tmp_path)
    assert load_settings({"home": home}, {}).context_policy == "window"
    assert load_settings({"home": home}, {"EDGEBUNDLE_CONTEXT_POLICY": "fail"}
                         ).context_policy == "fail"
    with pytest.raises(ConfigError) as caught:
        load_settings({"home": home, "context_policy": "drop"}, {})
    assert str(caught.value) == ("--context-policy: context_policy must be one of window, fail, "
                                 "got 'drop'")
    (tmp_path / "config.toml").write_text('context_policy = "truncate"\n')
    with pytest.raises(ConfigError, match=r"config\.toml: context_policy must be one of"):
        load_settings({"home": home}, {})


# -- the estimate's retries against a real guest ------------------------------------


@pytest.fixture(scope="module")
def guest(loop: LoopThread, model: Path, info: ModelInfo,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    home = tmp_path_factory.mktemp("home")
    settings = load_settings({"home": str(home), "model": str(model), "runtime": "embedded",
                              "ctx_size": 512}, {})
    engine = Engine(launch_spec(settings, environ={}), log_path=home / "guest.log")
    loop.run(engine.start())
    yield engine
    loop.run(engine.stop())


def complete(loop: LoopThread, service: ChatService, messages: Sequence[Message],
             params: ChatParams) -> tuple[str, Finished]:
    async def run() -> tuple[str, Finished]:
        pieces: list[str] = []
        async for event in service.complete(messages, params, fit_context=True):
            if isinstance(event, TextDelta):
                pieces.append(event.text)
            else:
                return "".join(pieces), event
        raise AssertionError("no Finished")

    return loop.run(run())


def test_without_llama_cpp_a_low_estimate_is_refused_learned_from_and_fitted_again(
    loop: LoopThread, guest: Engine, info: ModelInfo, counter: VocabTokenCounter,
) -> None:
    service = ChatService(guest, TEMPLATE, info, ctx_size=512)
    service.window = ContextWindow(512, None, exact=False)  # a WasmEdge-only device
    assert service.window.estimated
    service.window.estimate.ratio = 0.05  # as if it had only seen very compact prompts
    messages = conversation(40)
    text, finished = complete(loop, service, messages, ChatParams(max_tokens=3))
    assert (text, finished.reason) == ("Sure thing.", "eos")
    learned = service.window.estimate.ratio
    assert learned is not None and learned > 0.05  # taught by the guest's refusal
    dropped = finished.usage.dropped_messages
    assert dropped is not None and 0 < dropped < len(messages)
    assert finished.usage.input_tokens <= guest_limit(512)
    assert finished.usage.input_tokens == counter(render(messages[dropped:]))


def test_an_input_too_long_on_its_own_still_ends_prompt_too_long(
    loop: LoopThread, guest: Engine, info: ModelInfo,
) -> None:
    service = ChatService(guest, TEMPLATE, info, ctx_size=512)
    long_input = Message("user", " ".join(f"w{i}" for i in range(400)))
    text, finished = complete(loop, service, [*conversation(2)[:-1], long_input],
                              ChatParams(max_tokens=3))
    assert (text, finished.reason) == ("", "prompt_too_long")
    assert finished.usage.input_tokens > guest_limit(512)
    assert finished.usage.dropped_messages == 4
