"""Crafted requests against a real gateway (issue 12): what an attacker tried on main.

Real parts only: a real redis-server child and `python -m edgebundle run` devices with
sync (embedded runtime, real llama.cpp on a scripted tiny model), real HTTP. Each test
names the attack and what the gateway answers now.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.devices import Device, endless_model, new_thread, sync_devices
from tests.support.redis_server import RedisServer


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return endless_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def device(redis: RedisServer, model: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    with sync_devices(redis.url, model, [tmp_path_factory.mktemp("home")]) as [started]:
        yield started


def assert_sync_error(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    body: dict[str, str] = response.json()
    assert body["error"] == code and body["message"], body
    return body


# -- issue 12, item 10: 500s that are 400s, look-alike ids, positions --------------------


def test_unicode_digits_in_since_are_a_400_not_a_500(device: Device) -> None:
    thread = new_thread(device)
    for since in ("²", "٣", "1²", "1\n"):
        for path in (f"/v1/threads/{thread['id']}", f"/v1/threads/{thread['id']}/watch"):
            answer = device.http.get(path, params={"since": since})
            assert "since" in assert_sync_error(answer, 400, "invalid_request")["message"]
    for since in (10**20, 2**53):
        answer = device.http.get(f"/v1/threads/{thread['id']}", params={"since": since})
        assert_sync_error(answer, 400, "invalid_request")
        pushed = device.post(f"/v1/threads/{thread['id']}/push", {
            "device_id": "d", "epoch": thread["epoch"], "since": since, "mutations": []})
        assert_sync_error(pushed, 400, "invalid_request")
    assert device.http.get(f"/v1/threads/{thread['id']}", params={"since": "0"}).status_code \
        == 200


def test_deeply_nested_json_is_a_400_not_a_500(device: Device) -> None:
    thread = new_thread(device)
    deep = b'{"mutations": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    headers = {"Content-Type": "application/json"}
    for path in ("/v1/threads", f"/v1/threads/{thread['id']}/push",
                 f"/v1/threads/{thread['id']}/runs"):
        answer = device.http.post(path, content=deep, headers=headers)
        assert "too deeply" in assert_sync_error(answer, 400, "invalid_json")["message"]
    answer = device.http.post("/v1/chat/completions", headers=headers,
                              content=b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert answer.status_code == 400, answer.text
    assert "too deeply" in answer.json()["error"]["message"]


def test_an_id_with_a_trailing_newline_is_no_look_alike_of_the_id(device: Device) -> None:
    assert device.post("/v1/threads", {"id": "kitchen"}).status_code == 201
    answer = device.post("/v1/threads", {"id": "kitchen\n"})
    assert "invalid thread id" in assert_sync_error(answer, 400, "invalid_request")["message"]
    assert_sync_error(device.http.get("/v1/threads/kitchen%0A"), 400, "invalid_request")
    thread = device.http.get("/v1/threads/kitchen").json()
    pushed = device.post("/v1/threads/kitchen/push", {
        "device_id": "tablet\n", "epoch": thread["epoch"], "since": thread["version"],
        "mutations": [{"mid": 1, "op": "put",
                       "message": {"id": "m1\n", "role": "user", "content": "hi"}}]})
    assert_sync_error(pushed, 400, "invalid_request")
    # An event id with a newline once reached XRANGE (a Redis error, a 500).
    answer = device.http.get("/v1/threads/kitchen/runs/run_x/events",
                             params={"after": "1-1\n"})
    assert "invalid event id" in assert_sync_error(answer, 400, "invalid_request")["message"]


def test_a_position_beyond_the_bound_is_refused_and_the_order_stays(device: Device) -> None:
    thread = new_thread(device)
    tid = thread["id"]

    def push(mid: int, message_id: str, **fields: object) -> httpx.Response:
        state = device.http.get(f"/v1/threads/{tid}").json()
        return device.post(f"/v1/threads/{tid}/push", {
            "device_id": "tablet", "epoch": state["epoch"], "since": state["version"],
            "mutations": [{"mid": mid, "op": "put", "message": {
                "id": message_id, "role": "user", "content": message_id, **fields}}]})

    for position in (1e300, 2**40 + 1, 1e16):
        answer = push(1, "far", position=position)
        assert "position" in assert_sync_error(answer, 400, "invalid_request")["message"]
    assert push(2, "last-allowed", position=2**40).status_code == 200
    for mid, name in enumerate(("after-1", "after-2"), 3):
        assert push(mid, name).status_code == 200
    messages = device.http.get(f"/v1/threads/{tid}").json()["messages"]
    order = sorted(messages, key=lambda m: m["position"])
    assert [m["id"] for m in order] == ["last-allowed", "after-1", "after-2"]
    assert len({m["position"] for m in messages}) == 3  # distinct: the order is kept


def test_a_503_names_no_internal_redis_address(model: Path, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    try:
        with sync_devices(redis.url, model, [tmp_path / "home"]) as [started]:
            thread = new_thread(started)
            redis.stop()
            for answer in (started.http.get(f"/v1/threads/{thread['id']}"),
                           started.post("/v1/threads", {}),
                           started.post("/v1/chat/completions", {
                               "thread_id": thread["id"],
                               "messages": [{"role": "user", "content": "hi"}]})):
                assert answer.status_code == 503, answer.text
                assert str(redis.port) not in answer.text and "127.0.0.1" not in answer.text
                assert "the sync Redis is unavailable" in answer.text
            redis.start()  # the device stops cleanly with its Redis back
    finally:
        redis.stop()
