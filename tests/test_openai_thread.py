"""Chat completions with ``thread_id``: the official `openai` client taking part in a synced thread.

Real parts only: a real redis-server child, two `python -m edgebundle run` devices on
it (embedded runtime, real llama.cpp on a scripted tiny model that says "Looping
forever forever …" until max_tokens or a cancel stops it), the official client on
device 0, and what it did read back on device 1 through the sync API.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.devices import ENDLESS, Device, endless_model, sync_devices
from tests.support.redis_server import RedisServer
from tests.support.serving import RunProcess, wait_for

KEY = "thread-key"
Messages = list[openai.types.chat.ChatCompletionMessageParam]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4096 tokens of context: seconds of generation, time for a client to walk away.
    return endless_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def devices(redis: RedisServer, model: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Device]]:
    homes = [tmp_path_factory.mktemp(f"dev{i}") for i in range(2)]
    with sync_devices(redis.url, model, homes, api_key=KEY) as started:
        yield started


def client_of(device: Device) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{device.run.base_url}/v1", api_key=KEY, max_retries=0)


def new_thread_id() -> str:
    return f"oa-{uuid.uuid4().hex[:12]}"


def stored(device: Device, thread_id: str) -> list[dict[str, Any]]:
    """The thread's messages as another device reads them, in order."""
    response = device.http.get(f"/v1/threads/{thread_id}")
    assert response.status_code == 200, response.text
    return sorted(response.json()["messages"], key=lambda m: m["position"])


def prompt_tokens(device: Device, messages: Messages) -> int:
    """The prompt size of ``messages`` sent directly (no thread): the reference."""
    direct = client_of(device).chat.completions.create(model="endless", messages=messages,
                                                       max_tokens=1)
    assert direct.usage is not None
    return direct.usage.prompt_tokens


def test_a_new_thread_is_seeded_from_the_request_and_the_reply_is_stored(
    devices: list[Device],
) -> None:
    here, there = devices
    tid = new_thread_id()
    messages: Messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "earlier question"},
        {"role": "assistant", "content": "earlier answer"},
        {"role": "user", "content": "first question"},
    ]
    completion = client_of(here).chat.completions.create(
        model="endless", messages=messages, max_tokens=4, extra_body={"thread_id": tid})

    [choice] = completion.choices
    assert choice.message.content == "Looping forever forever forever"
    assert choice.finish_reason == "length"
    assert completion.object == "chat.completion"
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    # The thread as device 1 sees it: the seed without the system message, the turn.
    assert [(m["role"], m["content"], m["status"]) for m in stored(there, tid)] == [
        ("user", "earlier question", "completed"),
        ("assistant", "earlier answer", "completed"),
        ("user", "first question", "completed"),
        ("assistant", choice.message.content, "completed"),
    ]
    # The prompt was rendered from the thread: the same as those three sent directly.
    assert completion.usage.prompt_tokens == prompt_tokens(there, messages[1:])


def test_a_streamed_second_call_continues_the_thread_whatever_history_it_sends(
    devices: list[Device],
) -> None:
    here, there = devices
    tid = new_thread_id()
    client = client_of(here)
    first = client.chat.completions.create(
        model="endless", messages=[{"role": "user", "content": "one"}], max_tokens=2,
        extra_body={"thread_id": tid})
    answer = first.choices[0].message.content
    assert answer == "Looping forever"

    # A stateless client sends only the new message, or a history of its own: the
    # thread's history wins either way.
    stream = client.chat.completions.create(
        model="endless", stream=True, stream_options={"include_usage": True}, max_tokens=3,
        messages=[{"role": "user", "content": "not in the thread"},
                  {"role": "assistant", "content": "nor this"},
                  {"role": "user", "content": "two"}],
        extra_body={"thread_id": tid})
    pieces: list[str] = []
    reasons: list[str | None] = []
    usage = None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            reasons.append(choice.finish_reason)
    text = "".join(pieces)
    assert text == "Looping forever forever"  # pieces may be batched by the run
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    assert [(m["role"], m["content"]) for m in stored(there, tid)] == [
        ("user", "one"), ("assistant", answer), ("user", "two"), ("assistant", text)]
    assert usage is not None and usage.completion_tokens == 3
    assert first.usage is not None and usage.prompt_tokens > first.usage.prompt_tokens
    assert usage.prompt_tokens == prompt_tokens(there, [
        {"role": "user", "content": "one"}, {"role": "assistant", "content": answer},
        {"role": "user", "content": "two"}])


def endless_turn(device: Device, thread_id: str) -> Any:
    """A streamed turn "go on" of ``thread_id`` that only the model's context (4096
    tokens) would end: no max_tokens."""
    return client_of(device).chat.completions.create(
        model="endless", stream=True, messages=[{"role": "user", "content": "go on"}],
        extra_body={"thread_id": thread_id})


def test_a_client_that_goes_away_mid_stream_cancels_the_run_keeping_what_was_sent(
    devices: list[Device],
) -> None:
    here, there = devices
    tid = new_thread_id()
    stream = endless_turn(here, tid)
    received: list[str] = []
    for chunk in stream:
        received.extend(c.delta.content for c in chunk.choices if c.delta.content)
        if len(received) >= 5:
            break
    stream.close()

    def ended() -> bool:
        messages = stored(there, tid)
        return len(messages) == 2 and messages[1]["status"] != "in_progress"

    wait_for(ended, timeout=60, interval=0.1)
    question, reply = stored(there, tid)
    assert question["content"] == "go on"
    assert reply["status"] == "incomplete"
    # Chunks sent but not read yet are kept too (they were sent): a prefix check.
    assert reply["content"].startswith("".join(received))
    assert reply["content"].startswith(ENDLESS)
    run = there.http.get(f"/v1/threads/{tid}/runs/{reply['run_id']}").json()
    assert (run["status"], run["reason"]) == ("cancelled", "cancelled")
    assert run["device_id"] == here.id


def test_a_run_cancelled_on_another_device_ends_the_stream_here_with_what_was_stored(
    devices: list[Device],
) -> None:
    """The reply reaches this client before Redis has acknowledged it (the run's tap):
    a cancel from another device must still end the stream, and every text the thread
    keeps must have reached the client."""
    here, there = devices
    tid = new_thread_id()
    stream = endless_turn(here, tid)
    received: list[str] = []
    finishes: list[str] = []
    cancelled = False
    for chunk in stream:
        received.extend(c.delta.content for c in chunk.choices if c.delta.content)
        finishes.extend(c.finish_reason for c in chunk.choices if c.finish_reason)
        if len(received) >= 5 and not cancelled:
            reply = stored(there, tid)[1]
            response = there.post(f"/v1/threads/{tid}/runs/{reply['run_id']}/cancel", {})
            assert response.status_code == 200, response.text
            cancelled = True
    assert cancelled and finishes == ["stop"]
    reply = stored(there, tid)[1]
    assert reply["status"] == "incomplete"
    # Redis may have stored less than the client got (its writes trail the tap), never
    # more.
    assert "".join(received).startswith(reply["content"])
    # Ended by the cancel, not by the context (4096 tokens of " forever": 32k characters).
    assert len("".join(received)) < 16_000
    run = there.http.get(f"/v1/threads/{tid}/runs/{reply['run_id']}").json()
    assert (run["status"], run["reason"]) == ("cancelled", "cancelled")


@pytest.mark.parametrize(("messages", "thread_id", "param", "says"), [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
     None, "messages[1].role", "last message must be the user's"),
    ([{"role": "user", "content": "  "}], None, "messages[0].content", "empty"),
    ([{"role": "user", "content": "hi"}], "has space", "thread_id", "invalid thread id"),
    ([{"role": "user", "content": "hi"}], 7, "thread_id", "must be a string"),
])  # fmt: skip
def test_a_request_that_cannot_be_a_turn_is_a_400_and_writes_nothing(
    devices: list[Device], messages: Messages, thread_id: Any, param: str, says: str,
) -> None:
    here, there = devices
    tid = new_thread_id() if thread_id is None else thread_id
    with pytest.raises(openai.BadRequestError) as caught:
        client_of(here).chat.completions.create(model="endless", messages=messages,
                                                extra_body={"thread_id": tid})
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == param, error
    assert says in error["message"] and "\n" not in error["message"]
    if isinstance(tid, str) and " " not in tid:
        assert there.http.get(f"/v1/threads/{tid}").status_code == 404


def test_an_input_too_long_for_the_context_is_a_400_and_older_long_messages_are_left_out(
    devices: list[Device],
) -> None:
    here, there = devices
    tid = new_thread_id()
    # The scripted tokenizer spells an unknown word in ~10 tokens: far over 4096.
    long_story = " ".join(f"word{i}" for i in range(2000))
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client_of(here).chat.completions.create(
                model="endless", stream=stream, max_tokens=2,
                messages=[{"role": "user", "content": long_story}],
                extra_body={"thread_id": tid})
        assert caught.value.code == "context_length_exceeded"
        assert "more than the model's context allows even without the thread's older " \
               "messages" in caught.value.message
    # The thread goes on: the next turn leaves both long inputs out (context_policy window).
    completion = client_of(here).chat.completions.create(
        model="endless", max_tokens=2, messages=[{"role": "user", "content": "summarise"}],
        extra_body={"thread_id": tid})
    assert completion.choices[0].message.content == "Looping forever"
    assert completion.usage is not None
    assert completion.usage.model_dump()["dropped_messages"] == 2
    assert completion.usage.prompt_tokens == prompt_tokens(
        there, [{"role": "user", "content": "summarise"}])
    users = [m["content"] for m in stored(there, tid) if m["role"] == "user"]
    assert users == [long_story, long_story, "summarise"]


def test_thread_id_on_a_device_without_sync_is_a_400_saying_so(model: Path,
                                                               tmp_path: Path) -> None:
    # No --redis-url and no redis-server on PATH: `run` serves the chat without sync.
    empty = tmp_path / "empty-path"
    empty.mkdir()
    run = RunProcess(["--runtime", "embedded", "--no-preflight", "--model", str(model)],
                     home=tmp_path / "home", env={"PATH": str(empty)})
    try:
        run.read_line()
        run.wait_healthy()
        assert "without sync" in run.stderr()
        body = {"messages": [{"role": "user", "content": "hi"}], "thread_id": "t1",
                "max_tokens": 1}
        answer = httpx.post(f"{run.base_url}/v1/chat/completions", json=body, timeout=30)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == "thread_id" and "--redis-url" in error["message"]
        plain = httpx.post(f"{run.base_url}/v1/chat/completions",
                           json={**body, "thread_id": None}, timeout=30)
        assert plain.status_code == 200, plain.text
        assert run.stop() == 0, run.stderr()
    finally:
        run.close()
