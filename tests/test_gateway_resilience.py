"""Two devices keep one conversation through failures: a guest killed mid-run, Redis
killed (SIGKILL) and started again between turns and in the middle of a run.

Real parts only: one real redis-server (append-only file, ``appendfsync always``) on a
fixed port and directory so it can be killed and started again; two real
`python -m edgebundle run` children on the embedded runtime with a scripted endless
model ("Looping forever forever …" until max_tokens, a full context or a stop); real
HTTP and SSE. Nothing here waits a fixed time: every wait is on a condition.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py

from tests.support.devices import (
    ENDLESS,
    Device,
    endless_model,
    messages_of,
    new_thread,
    prompt_tokens,
    read_sse,
    sync_devices,
    text_of,
    types,
)
from tests.support.processes import children, cmdline
from tests.support.redis_server import RedisServer
from tests.support.serving import RunProcess, wait_for

NEVER_OFFLINE = 3600  # s: longer than this module runs
CONTEXT = 16384  # the scripted tokenizer spells a prompt word in ~10 tokens: room for a
# second turn whose prompt carries seconds of generated text


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), aof=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return endless_model(tmp_path_factory.mktemp("models"), CONTEXT)


@pytest.fixture(scope="module")
def devices(redis: RedisServer, model: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Device, Device]]:
    homes = [tmp_path_factory.mktemp(name) for name in ("devA", "devB")]
    # Never offline here: the outages below are the window before a device serves from
    # its local store (tests/test_offline.py is about that), however slow the machine.
    with sync_devices(redis.url, model, homes, ids=("devA", "devB"),
                      extra_args=("--ctx-size", str(CONTEXT),
                                  "--offline-after", str(NEVER_OFFLINE))) as (a, b):
        yield a, b
    for device in (a, b):  # every failure above was handled, none crashed a device
        assert "Traceback" not in device.run.stderr(), device.run.stderr()


@pytest.fixture
def redis_up(redis: RedisServer) -> Iterator[RedisServer]:
    """The module's Redis, started again after the test if the test left it down."""
    yield redis
    if redis.process is None:
        redis.start()


def guests(device: Device, model: Path) -> list[int]:
    """The device's chat guests: children of its `run` process that run the model."""
    return [pid for pid in children(device.run.proc.pid)
            if "exec" in (argv := cmdline(pid)) and any(str(model) in arg for arg in argv)]


def started_pids(device: Device) -> list[int]:
    """Every guest pid the device's supervisor logged as started, in order."""
    log = device.run.stderr_path.parent / "logs" / "edgechat.log"
    return [int(line.split("started pid ")[1].split(":")[0])
            for line in log.read_text().splitlines() if "edgebundle: started pid " in line]


def deltas(events: list[dict[str, Any]]) -> int:
    return types(events).count("message.delta")


def assert_unavailable(device: Device, thread_id: str) -> None:
    down = device.http.get(f"/v1/threads/{thread_id}")
    assert down.status_code == 503, down.text
    assert down.json()["error"] == "redis_unavailable"
    assert down.json()["message"].count("\n") == 0


def test_a_guest_killed_mid_run_ends_it_incomplete_and_the_next_turn_builds_on_it(
    devices: tuple[Device, Device], model: Path,
) -> None:
    a, b = devices
    tid = new_thread(a)["id"]
    [guest] = guests(a, model)
    assert started_pids(a)[-1] == guest  # the supervisor's own word: this is its guest
    seen: list[dict[str, Any]] = []
    payload = {"device_id": "devA", "input": {"content": "tell a long story"}}
    with a.http.stream("POST", f"/v1/threads/{tid}/runs", json=payload) as response:
        events = read_sse(response)
        for event in events:
            seen.append(event)
            if deltas(seen) == 3:
                break
        os.kill(guest, signal.SIGKILL)
        seen.extend(events)

    assert types(seen)[-2:] == ["run.cancelled", "done"]
    ended = seen[-2]["data"]
    assert (ended["run"]["status"], ended["reason"], ended["cause"]) == (
        "incomplete", "interrupted", "engine_error")
    question, partial = messages_of(b, tid)
    assert (partial["role"], partial["status"]) == ("assistant", "incomplete")
    assert partial["content"] == text_of(seen) and partial["content"].startswith(ENDLESS)

    # The supervisor starts a new guest; the gateway is healthy again by itself.
    wait_for(lambda: started_pids(a)[-1] != guest, timeout=60)
    a.run.wait_healthy(timeout=120)
    assert guests(a, model) == [started_pids(a)[-1]]

    turn = a.run_turn(tid, "and then?", params={"max_tokens": 3})
    assert types(turn)[-2:] == ["run.completed", "done"]
    assert text_of(turn) == "Looping forever forever"
    history = messages_of(b, tid)
    assert [(m["role"], m["content"]) for m in history[:2]] == [
        ("user", question["content"]), ("assistant", partial["content"])]
    # Its prompt held the partial reply: the same count as the three messages sent directly.
    assert turn[-2]["data"]["usage"]["input_tokens"] == prompt_tokens(a, history[:3])
    assert prompt_tokens(a, history[:3]) > prompt_tokens(a, [history[0], history[2]])


def test_redis_killed_between_turns_loses_no_acknowledged_message_and_both_devices_go_on(
    devices: tuple[Device, Device], redis_up: RedisServer,
) -> None:
    a, b = devices
    thread = new_thread(a)
    tid = thread["id"]
    first = a.run_turn(tid, "one", params={"max_tokens": 3})
    second = b.run_turn(tid, "two", params={"max_tokens": 2})
    assert types(first)[-2] == types(second)[-2] == "run.completed"
    note = {"mid": 1, "op": "put", "message": {"id": "note-1", "role": "user",
                                               "content": "acknowledged just before the crash"}}
    pushed = b.post(f"/v1/threads/{tid}/push", {"device_id": "devB", "epoch": thread["epoch"],
                                               "since": 0, "mutations": [note]})
    assert pushed.status_code == 200, pushed.text
    before = a.http.get(f"/v1/threads/{tid}").json()
    assert len(before["messages"]) == 5

    watch = b.http.stream("GET", f"/v1/threads/{tid}/watch",
                          params={"epoch": before["epoch"], "since": before["version"]})
    with watch as response:
        changes = read_sse(response)
        assert next(changes)["event"] == "sync"
        redis_up.kill()  # no shutdown: only what was fsynced before each reply survives
        told = list(changes)  # a watcher is told, and its stream ends
    assert [(e["event"], e["data"]["error"]) for e in told] == [("error", "redis_unavailable")]
    assert_unavailable(a, tid)
    assert_unavailable(b, tid)
    refused = a.post(f"/v1/threads/{tid}/runs", {"device_id": "devA", "input": {"content": "x"}})
    assert (refused.status_code, refused.json()["error"]) == (503, "redis_unavailable")

    redis_up.start()  # same port, same directory: the AOF is loaded again
    wait_for(lambda: a.http.get(f"/v1/threads/{tid}").status_code == 200, timeout=30)
    wait_for(lambda: b.http.get(f"/v1/threads/{tid}").status_code == 200, timeout=30)
    after = b.http.get(f"/v1/threads/{tid}").json()
    assert (after["epoch"], after["version"]) == (before["epoch"], before["version"])
    by_id = {m["id"]: m for m in after["messages"]}
    assert [by_id[m["id"]] for m in before["messages"]] == before["messages"]
    assert {m["content"] for m in after["messages"]} >= {
        "one", text_of(first), "two", text_of(second), "acknowledged just before the crash"}

    for device in (a, b):  # both reconnected by themselves: no restart of either
        assert device.run.proc.poll() is None
        turn = device.run_turn(tid, f"after the crash, on {device.id}",
                               params={"max_tokens": 2})
        assert types(turn)[-2:] == ["run.completed", "done"], turn[-2:]
    assert len(messages_of(a, tid)) == 9


def test_redis_restarted_mid_run_the_run_goes_on_and_every_piece_lands_once(
    devices: tuple[Device, Device], redis_up: RedisServer,
) -> None:
    """Down for longer than the client's own reconnect attempts, back within the lease:
    the generating device holds the run, and it completes as if nothing happened."""
    a, b = devices
    tid = new_thread(a)["id"]
    seen: list[dict[str, Any]] = []
    tokens = 3000  # ~2 ms a token: seconds of generation, so the crash is mid-run
    payload = {"device_id": "devA", "input": {"content": "count for me"},
               "params": {"max_tokens": tokens}}
    with a.http.stream("POST", f"/v1/threads/{tid}/runs", json=payload) as response:
        events = read_sse(response)
        for event in events:
            seen.append(event)
            if deltas(seen) == 5:
                break
        run_id = seen[1]["data"]["run"]["id"]
        redis_up.kill()
        assert_unavailable(b, tid)  # longer than the reconnect attempts (~2.5 s)
        seen.extend(events)  # the reader is told, and its stream ends
    assert seen[-1]["event"] == "error", types(seen)[-3:]
    wait_for(lambda: f"run {run_id}: Redis is unavailable" in a.run.stderr(), timeout=30)
    redis_up.start()

    last_id = [e["id"] for e in seen if "id" in e][-1]
    path = f"/v1/threads/{tid}/runs/{run_id}/events"
    with b.http.stream("GET", path, headers={"Last-Event-ID": last_id}) as rejoined:
        rest = list(read_sse(rejoined))
    assert types(rest)[-2:] == ["run.completed", "done"], types(rest)[-3:]
    assert rest[-2]["data"]["reason"] == "length"
    whole = [e for e in seen if "id" in e] + rest
    pieces = [e["data"] for e in whole if e["event"] == "message.delta"]
    assert [p["seq"] for p in pieces] == list(range(1, len(pieces) + 1))  # none twice, no hole
    expected = "Looping" + " forever" * (tokens - 1)
    assert "".join(p["text"] for p in pieces) == expected
    question, reply = messages_of(b, tid)
    assert (reply["status"], reply["content"]) == ("completed", expected)
    assert "of thread" not in a.run.stderr().split(f"run {run_id}: Redis is unavailable")[-1]


def test_redis_down_longer_than_the_lease_ends_the_run_incomplete_with_what_was_acknowledged(
    devices: tuple[Device, Device], redis_up: RedisServer,
) -> None:
    a, b = devices
    tid = new_thread(a)["id"]
    seen: list[dict[str, Any]] = []
    payload = {"device_id": "devA", "input": {"content": "talk until stopped"}}
    with a.http.stream("POST", f"/v1/threads/{tid}/runs", json=payload) as response:
        events = read_sse(response)
        for event in events:
            seen.append(event)
            if deltas(seen) == 5:
                break
        run_id = seen[1]["data"]["run"]["id"]
        # B's turn waits in line behind A's (its client leaves; B keeps waiting for it).
        later = {"device_id": "devB", "input": {"content": "me next"}, "params": {"max_tokens": 2}}
        with b.http.stream("POST", f"/v1/threads/{tid}/runs", json=later) as queued:
            opening = read_sse(queued)
            assert [next(opening)["event"], (waiting := next(opening))["event"]] == [
                "sync", "run.queued"]
        queued_id = waiting["data"]["run"]["id"]
        redis_up.kill()
        assert_unavailable(b, tid)
        seen.extend(events)  # the reader cannot follow any more: it is told so, and ends
    assert seen[-1]["event"] == "error", types(seen)[-3:]
    assert seen[-1]["data"]["error"] == "redis_unavailable"
    read_before_crash = text_of(seen)
    # Down until the generating device gives up: its lease is over (a shorter outage is
    # ridden out and the run goes on, see the test above).
    wait_for(lambda: f"run {run_id} of thread {tid}: Redis is unavailable" in a.run.stderr(),
             timeout=60, interval=0.1)
    wait_for(lambda: f"run {queued_id} of thread {tid}: waiting for its turn" in b.run.stderr(),
             timeout=60, interval=0.1)

    redis_up.start()
    for device in (a, b):  # no device served offline meanwhile (NEVER_OFFLINE)
        assert device.run.healthz().json()["sync"]["link"] == "online"
    # The run ends as soon as Redis is back: its lease ran out while Redis was away.
    wait_for(lambda: b.http.get(f"/v1/threads/{tid}/runs/{run_id}").status_code == 200 and
             b.http.get(f"/v1/threads/{tid}/runs/{run_id}").json()["status"] != "in_progress",
             timeout=90, interval=0.2)
    run = b.http.get(f"/v1/threads/{tid}/runs/{run_id}").json()
    assert (run["status"], run["reason"]) == ("incomplete", "interrupted")

    path = f"/v1/threads/{tid}/runs/{run_id}/events"
    with b.http.stream("GET", path) as replay:
        everything = list(read_sse(replay))
    assert types(everything)[-2:] == ["run.cancelled", "done"]
    # Ended by whoever got there first once Redis was back: the device (its end was
    # sent in the last moments of its lease) or the first reader (lease expired).
    assert everything[-2]["data"]["cause"] in ("redis_unavailable", "lease_expired")
    question, partial, *_ = messages_of(b, tid)
    assert (partial["status"], partial["content"]) == ("incomplete", text_of(everything))
    # What the reader had been sent (acknowledged by Redis) survived the SIGKILL.
    assert partial["content"].startswith(read_before_crash) and read_before_crash

    # The reader rejoins from its last event id and gets the rest, once.
    last_id = [e["id"] for e in seen if "id" in e][-1]
    with a.http.stream("GET", path, headers={"Last-Event-ID": last_id}) as rejoined:
        rest = list(read_sse(rejoined))
    assert [e for e in seen[1:] if "id" in e] + rest == everything

    # B's queued turn got the thread once A's run ended, and B generated it.
    wait_for(lambda: b.http.get(f"/v1/threads/{tid}/runs/{queued_id}").json()["status"]
             not in ("queued", "in_progress"), timeout=60, interval=0.2)
    assert b.http.get(f"/v1/threads/{tid}/runs/{queued_id}").json()["status"] == "completed"

    for device in (b, a):
        turn = device.run_turn(tid, f"still there, {device.id}?", params={"max_tokens": 2})
        assert types(turn)[-2:] == ["run.completed", "done"], turn[-2:]
    assert [(m["role"], m["content"]) for m in messages_of(a, tid)][:4] == [
        ("user", question["content"]), ("assistant", partial["content"]),
        ("user", "me next"), ("assistant", "Looping forever")]


def test_the_private_redis_of_run_fsyncs_each_write_before_it_answers(tmp_path: Path) -> None:
    """What makes "acknowledged" mean "on disk" for a device without --redis-url."""
    run = RunProcess(["--runtime", "embedded", "--no-preflight"], home=tmp_path / "home")
    try:
        run.read_line()
        [note] = [line for line in run.stderr().splitlines() if "redis-server (pid " in line]
        pid = int(note.split("(pid ")[1].split(",")[0])
        assert pid in children(run.proc.pid)
        url = (tmp_path / "home" / "state" / "redis" / "redis.url").read_text().strip()
        client = redis_py.Redis.from_url(url, decode_responses=True)  # it has a password
        try:
            assert client.config_get("append*") == {"appendonly": "yes",
                                                    "appendfsync": "always",
                                                    "appendfilename": "appendonly.aof",
                                                    "appenddirname": "appendonlydir"}
        finally:
            client.close()
        assert run.stop() == 0, run.stderr()
    finally:
        run.close()
