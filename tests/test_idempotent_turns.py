"""Idempotent turns over HTTP: a retried POST names its turn and gets the run it started.

Real parts only: a real redis-server child and two `python -m edgebundle run` devices
on it (embedded runtime, real llama.cpp on the scripted model that says "Looping
forever forever …" until max_tokens or a cancel stops it). A turn is named by its
input id (``input.id`` of ``POST …/runs``, ``input_id`` of chat completions) or by an
``Idempotency-Key`` header; whatever the retry asks for (the run object, its events
from the start or after an event id, on this device or the other), the thread holds
the turn once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from edgebundle.sse import iter_events
from edgebundle.sync.client import connect
from edgebundle.sync.service import SyncService
from tests.support.devices import (
    ENDLESS,
    Device,
    completion_chunks,
    endless_model,
    messages_of,
    new_thread,
    read_sse,
    sync_devices,
    text_of,
)
from tests.support.redis_server import RedisServer
from tests.support.serving import wait_for

REPLY_4 = "Looping forever forever forever"  # what max_tokens 4 makes the model say
LONG = 3000  # max_tokens of a reply still being written when its client walks away (~1.5 s)


@pytest.fixture(scope="module")
def devices(redis: RedisServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Device, Device]]:
    model = endless_model(tmp_path_factory.mktemp("models"))
    homes = [tmp_path_factory.mktemp(name) for name in ("devA", "devB")]
    with sync_devices(redis.url, model, homes, ids=("devA", "devB")) as (a, b):
        yield a, b


def turn(content: str, input_id: str | None = None, *, stream: bool,
         max_tokens: int = 4) -> dict[str, Any]:
    """The body of ``POST …/runs`` for one turn (named by ``input_id`` if given)."""
    given = {"content": content} if input_id is None else {"id": input_id, "content": content}
    return {"input": given, "stream": stream, "params": {"max_tokens": max_tokens}}


def post_events(device: Device, thread_id: str, body: dict[str, Any],
                headers: dict[str, str] | None = None,
                ) -> tuple[httpx.Headers, list[dict[str, Any]]]:
    """A streamed ``POST …/runs``: its headers and every event until ``done``."""
    with device.http.stream("POST", f"/v1/threads/{thread_id}/runs", json=body,
                            headers=headers or {}) as response:
        assert response.status_code == 200, response.read()
        return response.headers, list(read_sse(response))


def run_ids(events: list[dict[str, Any]]) -> set[str]:
    return {e["data"]["run"]["id"] for e in events if e["event"].startswith("run.")}


def conversation(device: Device, thread_id: str) -> list[tuple[str, str, str]]:
    return [(m["role"], m["content"], m["status"]) for m in messages_of(device, thread_id)]


def test_a_retried_turn_answers_with_its_run_whole_from_the_start_or_after_an_event_id(
    devices: tuple[Device, Device],
) -> None:
    a, _ = devices
    tid = new_thread(a)["id"]
    body = turn("hello once", "msg-retried-once", stream=False)
    first = a.post(f"/v1/threads/{tid}/runs", body)
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers  # the first one started it
    run = first.json()
    assert run["status"] == "completed" and run["input_message_id"] == "msg-retried-once"

    again = a.post(f"/v1/threads/{tid}/runs", body)  # the answer was lost: ask again
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == run

    headers, replay = post_events(a, tid, {**body, "stream": True})
    assert headers["idempotent-replayed"] == "true"
    assert replay[0]["event"] == "sync" and replay[-1]["event"] == "done"
    assert run_ids(replay) == {run["id"]}
    assert replay[1]["event"] == "run.queued"  # the run's events from its start
    assert text_of(replay) == REPLY_4

    middle = len(replay) // 2
    headers, rest = post_events(a, tid, {**body, "stream": True},
                                {"Last-Event-ID": replay[middle]["id"]})
    assert headers["idempotent-replayed"] == "true"
    assert rest == replay[middle + 1:]  # no opening sync, nothing before that id

    assert conversation(a, tid) == [("user", "hello once", "completed"),
                                    ("assistant", REPLY_4, "completed")]


def test_an_idempotency_key_names_a_turn_without_an_input_id(
    devices: tuple[Device, Device],
) -> None:
    a, _ = devices
    tid = new_thread(a)["id"]
    path = f"/v1/threads/{tid}/runs"
    body = turn("keyed", stream=False)
    first = a.post(path, body, headers={"Idempotency-Key": "key-1"})
    again = a.post(path, body, headers={"Idempotency-Key": "key-1"})
    other = a.post(path, body, headers={"Idempotency-Key": "key-2"})
    assert [r.status_code for r in (first, again, other)] == [200, 200, 200]
    assert again.json()["id"] == first.json()["id"] != other.json()["id"]
    assert "idempotent-replayed" not in first.headers
    assert "idempotent-replayed" not in other.headers
    assert again.headers["idempotent-replayed"] == "true"
    headers, replay = post_events(a, tid, {**body, "stream": True},
                                  {"Idempotency-Key": "key-2"})
    assert headers["idempotent-replayed"] == "true"
    assert run_ids(replay) == {other.json()["id"]}
    assert conversation(a, tid) == [("user", "keyed", "completed"),
                                    ("assistant", REPLY_4, "completed")] * 2

    bad = a.post(path, body, headers={"Idempotency-Key": "k" * 256})
    assert (bad.status_code, bad.json()["error"]) == (400, "invalid_request")


def test_a_retry_sent_to_the_other_gateway_gets_the_same_run(
    devices: tuple[Device, Device],
) -> None:
    a, b = devices
    tid = new_thread(a)["id"]
    body = turn("asked on A", "msg-moved-to-b", stream=True)
    _, on_a = post_events(a, tid, body)
    headers, on_b = post_events(b, tid, body)
    assert headers["idempotent-replayed"] == "true"
    assert run_ids(on_a) == run_ids(on_b) and len(run_ids(on_b)) == 1
    assert on_b[1:] == on_a[1:]  # the same events, ids and all
    assert on_b[-2]["data"]["run"]["device_id"] == "devA"  # generated by A, once
    assert conversation(b, tid) == [("user", "asked on A", "completed"),
                                    ("assistant", REPLY_4, "completed")]


def completion_text(response: httpx.Response) -> str:
    """The text of a streamed chat completion (its chunks up to ``[DONE]``)."""
    assert response.status_code == 200, response.read()
    return "".join(c["delta"].get("content") or ""
                   for chunk in completion_chunks(response) for c in chunk["choices"])


@pytest.mark.parametrize("named_by", ["input_id", "Idempotency-Key"])
def test_a_retried_chat_completion_with_thread_id_is_one_turn(
    devices: tuple[Device, Device], named_by: str,
) -> None:
    a, b = devices
    tid = f"oa-{uuid.uuid4().hex[:12]}"
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "once only"}],
                            "max_tokens": 4, "thread_id": tid}
    headers = {}
    if named_by == "input_id":
        body["input_id"] = "msg-completion-once"
    else:
        headers["Idempotency-Key"] = "completion-once"
    answers = [a.post("/v1/chat/completions", body, headers=headers),
               b.post("/v1/chat/completions", body, headers=headers)]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == REPLY_4
    with a.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                       headers=headers) as streamed:
        assert completion_text(streamed) == REPLY_4
    assert conversation(b, tid) == [("user", "once only", "completed"),
                                    ("assistant", REPLY_4, "completed")]
    [reply] = [m for m in messages_of(b, tid) if m["role"] == "assistant"]
    assert b.http.get(f"/v1/threads/{tid}/runs/{reply['run_id']}").json()["device_id"] == "devA"


def walk_away_mid_reply(device: Device, body: dict[str, Any]) -> None:
    """Stream a chat completion and close the connection after its first words."""
    with device.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        words = 0
        for event in iter_events(response):
            words += isinstance(event.data, dict)
            if words >= 3:
                return


@pytest.mark.parametrize(("input_id", "status", "reason"), [
    ("msg-coming-back", "completed", "length"),  # it said it would come back
    (None, "cancelled", "cancelled"),  # gone for good: stopped, as before
])
def test_a_client_that_walks_away_from_a_named_turn_leaves_it_running(
    devices: tuple[Device, Device], input_id: str | None, status: str, reason: str,
) -> None:
    a, b = devices
    tid = f"oa-{uuid.uuid4().hex[:12]}"
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "talk"}],
                            "max_tokens": LONG, "stream": True, "thread_id": tid}
    if input_id is not None:
        body["input_id"] = input_id
    walk_away_mid_reply(a, body)
    # It left mid-reply: a named turn goes on; an unnamed one may be stopped already.
    left = messages_of(b, tid)[1]["status"]
    assert left == "in_progress" if input_id else left in ("in_progress", "incomplete")

    def ended() -> bool:
        messages = messages_of(b, tid)
        return len(messages) == 2 and messages[1]["status"] != "in_progress"

    wait_for(ended, timeout=60, interval=0.05)
    reply = messages_of(b, tid)[1]
    run = b.http.get(f"/v1/threads/{tid}/runs/{reply['run_id']}").json()
    assert (run["status"], run["reason"]) == (status, reason)
    words = reply["content"].split()
    assert reply["content"].startswith(ENDLESS) and (len(words) == LONG) == (status == "completed")


def test_an_input_id_that_names_a_pushed_message_is_refused(
    devices: tuple[Device, Device],
) -> None:
    a, _ = devices
    thread = new_thread(a)
    tid = thread["id"]
    pushed = a.post(f"/v1/threads/{tid}/push", {
        "device_id": "devA", "epoch": thread["epoch"], "since": thread["version"],
        "mutations": [{"mid": 1, "op": "put", "message": {
            "id": "msg-pushed", "role": "user", "content": "just a note"}}]})
    assert pushed.status_code == 200, pushed.text
    refused = a.post(f"/v1/threads/{tid}/runs", turn("a turn", "msg-pushed", stream=False))
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_request")
    assert "started no run" in refused.json()["message"]
    assert conversation(a, tid) == [("user", "just a note", "completed")]


async def queue_turn_nobody_generates(redis_url: str, thread_id: str, input_id: str) -> str:
    """Start a turn through the sync core alone (no gateway generates it): its run id."""
    redis = await connect(redis_url)
    try:
        sync = SyncService(redis)
        state = await sync.sync(thread_id, None, 0)
        ticket = await sync.start_run(thread_id, "devGone", epoch=state.epoch,
                                      since=state.version, content="lost answer",
                                      input_id=input_id)
        assert ticket.run.status == "queued"
        return ticket.run.id
    finally:
        await redis.aclose()


def test_a_queued_turn_whose_starter_is_gone_is_generated_by_the_gateway_a_retry_reaches(
    devices: tuple[Device, Device], redis: RedisServer,
) -> None:
    # As when a gateway's Redis call took the turn but its answer was lost (a 503):
    # the run waits in line and no device is going to generate it.
    _, b = devices
    tid = new_thread(b)["id"]
    run_id = asyncio.run(queue_turn_nobody_generates(redis.url, tid, "msg-taken"))
    retried = b.post(f"/v1/threads/{tid}/runs", turn("lost answer", "msg-taken", stream=False))
    assert retried.status_code == 200, retried.text
    assert retried.headers["idempotent-replayed"] == "true"
    run = retried.json()
    assert (run["id"], run["status"], run["reason"]) == (run_id, "completed", "length")
    assert conversation(b, tid) == [("user", "lost answer", "completed"),
                                    ("assistant", REPLY_4, "completed")]
