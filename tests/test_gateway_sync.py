"""The sync API over HTTP/SSE: two devices (two real `edgebundle run` processes) on one Redis.

Real parts only: a real redis-server child, two `python -m edgebundle run` children on
the embedded runtime with a scripted tiny model (it says "Looping forever forever …"
until max_tokens or a cancel stops it), real HTTP and SSE.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.devices import (
    Device,
    endless_model,
    new_thread,
    read_sse,
    serving,
    text_of,
    types,
)
from tests.support.processes import gone
from tests.support.redis_server import RedisServer
from tests.support.serving import RunProcess, wait_for


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4096 tokens of context at ~2 ms a token: seconds of generation to join and stop.
    return endless_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def devices(redis: RedisServer, model: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Device, Device]]:
    common = ["--runtime", "embedded", "--no-preflight", "--model", str(model),
              "--template", "llama-3-chat"]
    runs = [  # A is configured by flags, B by the environment
        RunProcess([*common, "--redis-url", redis.url, "--device-id", "devA"],
                   home=tmp_path_factory.mktemp("devA")),
        RunProcess(common, home=tmp_path_factory.mktemp("devB"),
                   env={"EDGEBUNDLE_REDIS_URL": redis.url, "EDGEBUNDLE_DEVICE_ID": "devB"}),
    ]
    with serving(runs):
        yield Device(runs[0], "devA"), Device(runs[1], "devB")


def test_a_turn_on_a_opens_b_next_run_and_b_answers_from_the_whole_history(
    devices: tuple[Device, Device],
) -> None:
    a, b = devices
    thread = new_thread(a)
    assert (thread["full"], thread["messages"], thread["active_run"]) == (True, [], None)
    tid = thread["id"]

    first = a.run_turn(tid, "first question", epoch=thread["epoch"], since=thread["version"],
                       params={"max_tokens": 4})
    assert types(first)[0] == "sync" and "id" not in first[0]
    assert first[0]["data"]["messages"][0]["content"] == "first question"
    assert [t for t in types(first) if t != "message.delta"] == [
        "sync", "run.queued", "message.created", "run.started", "message.created",
        "message.completed", "run.completed", "done"]
    assert all(e["id"] for e in first[1:])
    answer_a = text_of(first)
    assert answer_a == "Looping forever forever forever"
    assert first[-2]["data"]["reason"] == "length"

    # B knows nothing yet: its run opens with everything A did (full, epoch unknown).
    second = b.run_turn(tid, "second question", params={"max_tokens": 2})
    opening = second[0]["data"]
    assert second[0]["event"] == "sync" and opening["full"] is True
    assert [(m["role"], m["content"], m["status"]) for m in opening["messages"]] == [
        ("user", "first question", "completed"),
        ("assistant", answer_a, "completed"),
        ("user", "second question", "completed"),
    ]
    done = second[-2]["data"]
    assert second[-2]["event"] == "run.completed"
    assert done["run"]["device_id"] == "devB"
    # B rendered the whole synced thread: the same prompt as the three turns sent directly.
    direct = b.post("/v1/chat/completions", {"max_tokens": 1, "messages": [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": answer_a},
        {"role": "user", "content": "second question"}]}).json()  # fmt: skip
    assert done["usage"]["input_tokens"] == direct["usage"]["prompt_tokens"]
    alone = b.post("/v1/chat/completions", {"max_tokens": 1, "messages": [
        {"role": "user", "content": "second question"}]}).json()  # fmt: skip
    assert done["usage"]["input_tokens"] > alone["usage"]["prompt_tokens"]

    # A's diff since its last version carries B's turn only.
    run_a = first[-2]["data"]["run"]
    got = a.http.get(f"/v1/threads/{tid}", params={"epoch": thread["epoch"], "since": 0}).json()
    assert len(got["messages"]) == 4 and got["full"] is False
    seen = max(m["version"] for m in first[0]["data"]["messages"])
    diff = a.http.get(f"/v1/threads/{tid}",
                      params={"epoch": thread["epoch"], "since": got["version"]}).json()
    assert diff["messages"] == [] and diff["version"] == got["version"] > seen
    assert a.http.get(f"/v1/threads/{tid}/runs/{run_a['id']}").json()["status"] == "completed"

    quiet = a.post(f"/v1/threads/{tid}/runs", {"device_id": "devA", "stream": False,
                                              "input": {"content": "third"},
                                              "params": {"max_tokens": 1}})
    assert quiet.status_code == 200, quiet.text
    assert (quiet.json()["status"], quiet.json()["reason"]) == ("completed", "length")


def test_b_joins_a_live_run_resumes_without_repeats_and_reject_is_409(
    devices: tuple[Device, Device],
) -> None:
    a, b = devices
    tid = new_thread(a)["id"]
    seen_a: list[dict[str, Any]] = []
    payload = {"device_id": "devA", "input": {"content": "go on"}}
    with a.http.stream("POST", f"/v1/threads/{tid}/runs", json=payload) as response:
        stream = read_sse(response)
        for event in stream:
            seen_a.append(event)
            if event["event"] == "message.delta":
                break
        run_id = seen_a[1]["data"]["run"]["id"]

        busy = b.post(f"/v1/threads/{tid}/runs", {"device_id": "devB", "multitask": "reject",
                                                 "input": {"content": "me too"}})
        assert busy.status_code == 409 and busy.headers["retry-after"] == "3"
        assert busy.json()["error"] == "thread_busy"
        assert busy.json()["active_run"]["id"] == run_id

        seen_b: list[dict[str, Any]] = []
        with b.http.stream("GET", f"/v1/threads/{tid}/runs/{run_id}/events") as joined:
            assert joined.status_code == 200
            for event in read_sse(joined):
                seen_b.append(event)
                if len(seen_b) == 8:  # watched a while: B stops it for everyone
                    stopped = b.post(f"/v1/threads/{tid}/runs/{run_id}/cancel",
                                     {"device_id": "devB"})
                    assert stopped.status_code == 200, stopped.text
        seen_a.extend(stream)

    assert seen_a[1:] == seen_b  # identical events, ids included (A's first is its sync)
    assert types(seen_b)[-2:] == ["run.cancelled", "done"]
    kept = b.http.get(f"/v1/threads/{tid}").json()["messages"][-1]
    assert (kept["status"], kept["content"]) == ("incomplete", text_of(seen_b))
    assert b.http.get(f"/v1/threads/{tid}/runs/{run_id}").json()["status"] == "cancelled"

    for cut in (3, len(seen_b) - 2):
        path = f"/v1/threads/{tid}/runs/{run_id}/events"
        with a.http.stream("GET", path, headers={"Last-Event-ID": seen_b[cut]["id"]}) as again:
            assert list(read_sse(again)) == seen_b[cut + 1:]
        with b.http.stream("GET", path, params={"after": seen_b[cut]["id"]}) as again:
            assert list(read_sse(again)) == seen_b[cut + 1:]


def test_watching_a_thread_on_b_sees_each_change_made_on_a(
    devices: tuple[Device, Device],
) -> None:
    a, b = devices
    thread = new_thread(a)
    tid, epoch = thread["id"], thread["epoch"]
    with b.http.stream("GET", f"/v1/threads/{tid}/watch",
                       params={"epoch": epoch, "since": thread["version"]}) as watch:
        assert watch.status_code == 200
        changes = read_sse(watch)
        opening = next(changes)
        assert (opening["event"], opening["data"]["full"], opening["data"]["messages"]) == (
            "sync", False, [])

        turn = a.run_turn(tid, "seen from afar", epoch=epoch, since=thread["version"],
                          params={"max_tokens": 3})
        run_id = turn[1]["data"]["run"]["id"]
        final = a.http.get(f"/v1/threads/{tid}").json()
        merged: dict[str, dict[str, Any]] = {}
        version = opening["data"]["version"]
        while version < final["version"]:  # diffs arrive until B has what A stored
            change = next(changes)
            assert change["event"] == "sync" and change["data"]["version"] > version
            version = change["data"]["version"]
            merged.update({m["id"]: m for m in change["data"]["messages"]})
    assert sorted(merged.values(), key=lambda m: m["position"]) == final["messages"]
    assert [m["content"] for m in final["messages"]] == ["seen from afar", text_of(turn)]
    assert final["messages"][1]["run_id"] == run_id

    gone = b.http.get("/v1/threads/thr-never-made/watch")
    assert gone.status_code == 404 and gone.json()["error"] == "thread_not_found"


def test_a_push_with_a_stale_epoch_is_409_epoch_mismatch(devices: tuple[Device, Device]) -> None:
    a, b = devices
    thread = new_thread(a)
    put = {"mid": 1, "op": "put", "message": {"id": "m1", "role": "user", "content": "hi"}}
    stale = b.post(f"/v1/threads/{thread['id']}/push", {
        "device_id": "devB", "epoch": "0ld", "since": 0, "mutations": [put]})
    assert stale.status_code == 409
    assert stale.json()["error"] == "epoch_mismatch"
    assert stale.json()["epoch"] == thread["epoch"]
    assert a.http.get(f"/v1/threads/{thread['id']}").json()["messages"] == []

    ok = b.post(f"/v1/threads/{thread['id']}/push", {
        "device_id": "devB", "epoch": thread["epoch"], "since": 0, "mutations": [put]})
    assert ok.status_code == 200, ok.text
    assert [m["content"] for m in ok.json()["messages"]] == ["hi"]

    shared = a.post("/v1/threads", {"id": thread["id"]})  # joining by a shared id
    assert shared.status_code == 201 and shared.json()["epoch"] == thread["epoch"]


def test_a_push_naming_another_device_cannot_silence_it(devices: tuple[Device, Device]) -> None:
    """Over HTTP, as a web page or a stolen client would: a forged jump of devB's ids
    (10^15) and a mid of 10^400 are 400s that write nothing; devB's next edit lands."""
    a, b = devices
    thread = new_thread(a)
    path = f"/v1/threads/{thread['id']}/push"

    def put(mid: int, content: str) -> dict[str, Any]:
        return {"device_id": "devB", "epoch": thread["epoch"], "since": 0, "mutations": [
            {"mid": mid, "op": "put", "message": {"id": "m1", "role": "user",
                                                  "content": content}}]}

    assert b.post(path, put(1, "mine")).status_code == 200
    forged = a.post(path, put(10**15, "forged"))
    assert forged.status_code == 400 and forged.json()["error"] == "invalid_request"
    assert "expects mutation 2" in forged.json()["message"]
    huge = a.post(path, put(10**400, "forged"))
    assert huge.status_code == 400 and "2^53 - 1" in huge.json()["message"]
    edited = b.post(path, put(2, "mine, edited"))
    assert edited.status_code == 200, edited.text
    assert [m["content"] for m in a.http.get(f"/v1/threads/{thread['id']}").json()[
        "messages"]] == ["mine, edited"]


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/runs", {"device_id": "devA"}, 400),
    ("POST", "/runs", {"input": {"content": 5}}, 400),
    ("POST", "/runs", {"input": {"content": "x"}, "multitask": "shove"}, 400),
    ("POST", "/runs", {"input": {"content": "x"}, "params": {"max_tokens": 0}}, 400),
    ("POST", "/runs", {"input": {"content": "x"}, "since": -1}, 400),
    ("POST", "/runs", {"input": {"content": "x"}, "device_id": "no spaces"}, 400),
    ("POST", "/runs", "not an object", 400),
    ("POST", "/push", {"device_id": "devA", "epoch": "E", "mutations": [{"op": "put"}]}, 400),
    ("POST", "/push", {"device_id": "devA", "mutations": []}, 400),
    ("GET", "?since=soon", None, 400),
    ("GET", "/runs/run-nope", None, 404),
    ("GET", "/runs/run-nope/events?after=yesterday", None, 400),
    ("POST", "/runs/run-nope/cancel", {"content_seen": 3}, 400),
])  # fmt: skip
def test_bad_payloads_are_4xx_with_one_message_and_change_nothing(
    devices: tuple[Device, Device], method: str, path: str, body: Any, status: int,
) -> None:
    a, _ = devices
    thread = new_thread(a)
    url = f"/v1/threads/{thread['id']}{path}"
    response = a.http.request(method, url, json=body) if body is not None else \
        a.http.request(method, url)
    assert response.status_code == status, response.text
    error = response.json()
    assert isinstance(error["error"], str) and error["message"].count("\n") == 0
    after = a.http.get(f"/v1/threads/{thread['id']}").json()
    assert (after["version"], after["messages"]) == (thread["version"], [])

    broken = a.http.post("/v1/threads", content=b"{",
                         headers={"Content-Type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"] == "invalid_json"
    assert a.http.get("/v1/threads/never-made").status_code == 404


def test_run_without_redis_url_starts_and_stops_a_private_redis(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run = RunProcess(["--runtime", "embedded", "--no-preflight"], home=home)
    try:
        run.read_line()
        [note] = [line for line in run.stderr().splitlines() if "redis-server" in line]
        assert note.startswith("edgebundle: no --redis-url: started a private redis-server (pid ")
        pid = int(note.split("(pid ")[1].split(",")[0])
        state = home / "state" / "redis"
        assert f"data in {state}" in note
        wait_for(lambda: any(state.rglob("*.aof")), timeout=10)
        thread = httpx.post(f"{run.base_url}/v1/threads", json={"id": "kept"}, timeout=10)
        assert thread.status_code == 201
        device = (home / "state" / "device-id").read_text().strip()
        assert device.startswith("dev-")
        assert run.stop() == 0, run.stderr()
        assert gone(pid)
        assert not (state / "redis.pid").exists()
    finally:
        run.close()

    again = RunProcess(["--runtime", "embedded", "--no-preflight"], home=home)
    try:
        again.read_line()
        kept = httpx.get(f"{again.base_url}/v1/threads/kept", timeout=10)
        assert kept.status_code == 200  # the AOF brought the thread back
        assert (home / "state" / "device-id").read_text().strip() == device
        assert again.stop() == 0, again.stderr()
    finally:
        again.close()


def test_an_enqueued_run_waits_for_the_active_one_and_a_stop_keeps_what_was_seen(
    devices: tuple[Device, Device],
) -> None:
    a, b = devices
    tid = new_thread(a)["id"]
    payload = {"device_id": "devA", "input": {"content": "long"}}
    with a.http.stream("POST", f"/v1/threads/{tid}/runs", json=payload) as response:
        stream = read_sse(response)
        started = [next(stream) for _ in range(2)]
        first_run = started[1]["data"]["run"]["id"]
        # B's run (no device_id: the gateway's own) queues behind A's; B's opening shows it.
        queued_payload = {"input": {"content": "after you"}, "params": {"max_tokens": 2}}
        with b.http.stream("POST", f"/v1/threads/{tid}/runs", json=queued_payload) as queued:
            events = read_sse(queued)
            opening = next(events)
            assert opening["data"]["active_run"]["id"] == first_run
            assert next(events)["event"] == "run.queued"
            stopped = a.post(f"/v1/threads/{tid}/runs/{first_run}/cancel",
                             {"device_id": "devA", "content_seen": "Loop"})
            assert stopped.status_code == 200 and stopped.json()["status"] == "cancelled"
            rest = list(events)
        assert [e["event"] for e in stream][-2:] == ["run.cancelled", "done"]
    assert "run.started" in types(rest) and types(rest)[-2:] == ["run.completed", "done"]
    assert rest[-2]["data"]["run"]["device_id"] == "devB"
    messages = sorted(a.http.get(f"/v1/threads/{tid}").json()["messages"],
                      key=lambda m: m["position"])  # a diff is in version order
    assert [(m["role"], m["content"], m["status"]) for m in messages] == [
        ("user", "long", "completed"),
        ("assistant", "Loop", "incomplete"),  # exactly what the user saw
        ("user", "after you", "completed"),
        ("assistant", text_of(rest), "completed"),
    ]


def test_with_an_api_key_the_sync_routes_need_it(redis: RedisServer, model: Path,
                                                 tmp_path: Path) -> None:
    run = RunProcess(["--runtime", "embedded", "--no-preflight", "--model", str(model),
                      "--redis-url", redis.url], home=tmp_path / "home",
                     env={"EDGEBUNDLE_API_KEY": "k3y"})
    try:
        run.read_line()
        url = f"{run.base_url}/v1/threads"
        assert httpx.post(url, json={}, timeout=10).status_code == 401
        made = httpx.post(url, json={}, headers={"Authorization": "Bearer k3y"}, timeout=10)
        assert made.status_code == 201
        assert run.stop() == 0, run.stderr()
    finally:
        run.close()


def test_stopping_run_mid_turn_ends_the_run_in_redis_and_the_next_start_continues(
    tmp_path: Path,
) -> None:
    """SIGTERM while a run generates: the gateway ends it (failed, text kept) before its
    private redis-server stops; the AOF brings the thread back on the next start."""
    home = tmp_path / "home"
    # The scripted tokenizer spells a word of a prompt in ~10 tokens: a big context
    # leaves room for the next turn after seconds of generated text.
    model = endless_model(tmp_path, 16384)
    args = ["--runtime", "embedded", "--no-preflight", "--model", str(model),
            "--ctx-size", "16384"]
    run = RunProcess(args, home=home)
    try:
        run.read_line()
        run.wait_healthy()
        http = httpx.Client(base_url=run.base_url, timeout=30)
        assert http.post("/v1/threads", json={"id": "t1"}).status_code == 201
        # ~12 s at most: far longer than the stop's grace, so the run cannot finish first
        body = {"input": {"content": "hi"}, "params": {"max_tokens": 6000}}
        with http.stream("POST", "/v1/threads/t1/runs", json=body) as r:
            for event in read_sse(r):
                if event["event"] == "message.delta":
                    break
        assert run.stop() == 0, run.stderr()
        assert "Traceback" not in run.stderr()
    finally:
        run.close()

    again = RunProcess(args, home=home)
    try:
        again.read_line()
        again.wait_healthy()
        http = httpx.Client(base_url=again.base_url, timeout=30)
        state = http.get("/v1/threads/t1").json()
        assert state["active_run"] is None
        [question, partial] = sorted(state["messages"], key=lambda m: m["position"])
        assert question["content"] == "hi" and partial["status"] == "incomplete"
        assert partial["content"].startswith("Looping forever")
        turn = http.post("/v1/threads/t1/runs", json={
            "input": {"content": "again"}, "stream": False, "params": {"max_tokens": 3}})
        events = http.get(f"/v1/threads/t1/runs/{turn.json()['id']}/events").text
        assert (turn.status_code, turn.json()["status"]) == (200, "completed"), events
        assert again.stop() == 0, again.stderr()
    finally:
        again.close()


def test_an_edit_on_a_during_a_run_on_b_interrupts_it_keeping_its_text(
    devices: tuple[Device, Device],
) -> None:
    a, b = devices
    thread = new_thread(a)
    tid = thread["id"]
    payload = {"device_id": "devB", "input": {"id": "q1", "content": "tell me"}}
    with b.http.stream("POST", f"/v1/threads/{tid}/runs", json=payload) as response:
        events = read_sse(response)
        seen = []
        for event in events:
            seen.append(event)
            if event["event"] == "message.delta":
                break
        edit = {"mid": 1, "op": "put",
                "message": {"id": "q1", "role": "user", "content": "tell me more"}}
        pushed = a.post(f"/v1/threads/{tid}/push", {
            "device_id": "devA", "epoch": thread["epoch"], "since": thread["version"],
            "mutations": [edit]})
        assert pushed.status_code == 200, pushed.text
        seen.extend(events)
    assert types(seen)[-2:] == ["run.cancelled", "done"]
    assert (seen[-2]["data"]["run"]["status"], seen[-2]["data"]["reason"]) == (
        "incomplete", "interrupted")
    messages = sorted(a.http.get(f"/v1/threads/{tid}").json()["messages"],
                      key=lambda m: m["position"])
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "tell me more"), ("assistant", text_of(seen))]
    assert messages[1]["status"] == "incomplete"
