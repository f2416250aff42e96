"""A synced thread driven far past the model's context keeps answering (context_policy).

Real parts only: a real redis-server child, two `python -m edgebundle run` devices on
it with a 512-token context (embedded runtime, real llama.cpp on a scripted tiny model
that answers "Noted." to anything): ``win`` with the default policy (window), ``fail``
with ``--context-policy fail``. Every prompt is checked against the device's own
token count of the messages it should hold, asked directly (no thread).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from tests.support.devices import (
    Device,
    messages_of,
    new_thread,
    prompt_tokens,
    sync_devices,
    text_of,
    types,
)
from tests.support.redis_server import RedisServer

REPLY = "Noted."
CTX = 512
RESERVE = 128  # no max_tokens: min(512, ctx / 4) tokens stay free for the reply
TURNS = 20  # ~90 tokens a turn with this tokenizer: the thread grows past 3 x CTX


@pytest.fixture(scope="module")
def devices(redis: RedisServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Device, Device]]:
    root = tmp_path_factory.mktemp("window")
    model = write_scripted_model(root / "noted.gguf",
                                 ScriptedModelSpec(reply=REPLY, context_length=4096))
    with sync_devices(redis.url, model, [root / "win", root / "fail"], ids=("win", "fail"),
                      extra_args=("--ctx-size", str(CTX)),
                      device_args=((), ("--context-policy", "fail"))) as (win, fail):
        yield win, fail
    for device in (win, fail):
        assert "Traceback" not in device.run.stderr(), device.run.stderr()


def question(turn: int) -> str:
    # Words the scripted vocabulary does not know: ~7 tokens each.
    return f"turn {turn}: " + " ".join(f"w{turn}x{word}" for word in range(8))


def metric(device: Device, name: str) -> float:
    text = device.http.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} is not in /metrics")


def check_window(device: Device, thread: list[dict[str, Any]], usage: dict[str, int],
                 budget: int) -> None:
    """The run's prompt was the newest messages that fit ``budget``, from a question."""
    before_reply = thread[:-1]  # the run's own reply is not part of its prompt
    dropped = usage["dropped_messages"]
    kept = before_reply[dropped:]
    assert kept[0]["role"] == "user" and kept[-1]["role"] == "user"
    assert usage["input_tokens"] == prompt_tokens(device, kept) <= budget
    if dropped:  # one more question and answer would not have fitted
        assert prompt_tokens(device, before_reply[dropped - 2:]) > budget


def test_a_thread_three_times_the_context_keeps_answering_with_its_newest_messages(
    devices: tuple[Device, Device],
) -> None:
    win, fail = devices
    tid = new_thread(win)["id"]
    drops: list[int] = []
    for turn in range(TURNS):
        events = win.run_turn(tid, question(turn))
        assert types(events)[-2:] == ["run.completed", "done"], events[-2:]
        assert text_of(events) == REPLY
        usage = events[-2]["data"]["usage"]
        check_window(win, messages_of(win, tid), usage, CTX - RESERVE)
        drops.append(usage["dropped_messages"])
    assert drops[0] == 0 and drops == sorted(drops) and drops[-1] > TURNS
    # Every turn adds a question and an answer of the same size: once the window is
    # full it moves on by exactly one of each per turn.
    assert drops[-1] - drops[-2] == drops[-2] - drops[-3] == 2

    # max_tokens is the reply's budget when given: less room, more left out.
    events = win.run_turn(tid, question(TURNS), params={"max_tokens": 200})
    usage = events[-2]["data"]["usage"]
    check_window(win, messages_of(win, tid), usage, CTX - 200)
    assert usage["dropped_messages"] > drops[-1] + 2
    windowed = sum(1 for d in drops if d) + 1
    assert metric(win, "edgebundle_context_windowed_runs_total") == windowed
    assert metric(win, "edgebundle_context_dropped_messages_total") == (
        sum(drops) + usage["dropped_messages"])

    # The same thread on the device with --context-policy fail: today's failure, and
    # the guest's count of the whole thread says how far past the context it went.
    events = fail.run_turn(tid, question(TURNS + 1))
    assert types(events)[-2:] == ["run.failed", "done"], events[-2:]
    error = events[-2]["data"]["error"]
    assert error.startswith("the thread is ") and "more than the model's context allows" in error
    assert int(error.split()[3]) > 3 * CTX


def test_the_openai_thread_path_reports_what_it_left_out_and_fail_gives_the_old_400(
    devices: tuple[Device, Device],
) -> None:
    win, fail = devices
    tid = new_thread(win)["id"]
    for turn in range(8):
        assert types(win.run_turn(tid, question(turn)))[-2] == "run.completed"
    body = {"model": "noted", "max_tokens": 50, "thread_id": tid,
            "messages": [{"role": "user", "content": question(8)}]}
    answer = win.post("/v1/chat/completions", body)
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    assert answer.json()["choices"][0]["message"]["content"] == REPLY
    assert usage["dropped_messages"] > 0 and usage["prompt_tokens"] <= CTX - 50
    run = messages_of(win, tid)[-1]["run_id"]
    stored = win.http.get(f"/v1/threads/{tid}/runs/{run}").json()["usage"]
    assert stored["dropped_messages"] == usage["dropped_messages"]

    refused = fail.post("/v1/chat/completions", {**body, "messages": [
        {"role": "user", "content": question(9)}]})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "context_length_exceeded"

    # Without thread_id chat completions keep OpenAI's semantics on either device.
    whole = [{"role": m["role"], "content": m["content"]} for m in messages_of(win, tid)
             if m["content"]] + [{"role": "user", "content": "and?"}]
    plain = win.post("/v1/chat/completions", {"model": "noted", "messages": whole})
    assert plain.status_code == 400 and plain.json()["error"]["code"] == "context_length_exceeded"
    assert "dropped_messages" not in win.post("/v1/chat/completions", {
        "model": "noted", "messages": [{"role": "user", "content": "hi"}]}).json()["usage"]
