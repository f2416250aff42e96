"""The official `openai` Python client against `edgebundle run`.

One real `python -m edgebundle run` child for the module (embedded runtime, real
guest, real llama.cpp) serving a scripted model whose greedy reply is exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from tests.support.serving import RunProcess, healthy_run

# Non-ASCII on purpose: text goes through the guest as bytes and is decoded on our side.
REPLY = "Hello from the scripted model, grüße aus Köln — answering through OpenAI's own client."
KEY = "x"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunProcess]:
    root = tmp_path_factory.mktemp("openai")
    model = write_scripted_model(root / "scripted.gguf", ScriptedModelSpec(reply=REPLY))
    with healthy_run(["--runtime", "embedded", "--no-preflight", "--model", str(model)],
                     home=root / "home", env={"EDGEBUNDLE_API_KEY": KEY}) as run:
        yield run


@pytest.fixture
def client(server: RunProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0)


HELLO: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a test."},
    {"role": "user", "content": "Say hello."},
]


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["scripted"]


def test_completion_returns_the_scripted_reply(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="scripted", messages=HELLO)
    [choice] = completion.choices
    assert choice.message.content == REPLY
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens > 5
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_streamed_completion_returns_the_scripted_reply(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="scripted", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    pieces: list[str] = []
    reasons: list[str | None] = []
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == REPLY
    assert len(pieces) > 5  # streamed piece by piece
    assert reasons[-1] == "stop" and set(reasons[:-1]) == {None}
    assert usage is not None and usage.completion_tokens > 5


def test_stop_and_max_tokens(client: openai.OpenAI) -> None:
    stopped = client.chat.completions.create(model="scripted", messages=HELLO,
                                             stop=["scripted"])
    assert stopped.choices[0].message.content == "Hello from the "
    assert stopped.choices[0].finish_reason == "stop"
    cut = client.chat.completions.create(model="scripted", messages=HELLO, max_tokens=2)
    assert cut.choices[0].message.content == "Hello from"
    assert cut.choices[0].finish_reason == "length"


def test_errors_arrive_as_the_clients_exceptions(server: RunProcess) -> None:
    good = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="temperature must be between 0 and 2"):
        good.chat.completions.create(model="scripted", messages=HELLO, temperature=3)
    wrong = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="not-x", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="scripted", messages=HELLO)


def test_served_by_one_guest(server: RunProcess, tmp_path: Path) -> None:
    log = server.stderr_path.parent / "logs" / "edgechat.log"
    assert log.read_text().count("edgebundle: started pid ") == 1
