"""Crafted requests against a real gateway (issue 12): what an attacker tried on main.

Real parts only: a real redis-server child and `python -m edgebundle run` devices with
sync (embedded runtime, real llama.cpp on a scripted tiny model), real HTTP. Each test
names the attack and what the gateway answers now.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgebundle.sse import aiter_events
from edgebundle.sync.runs import CURRENT_EPOCH
from tests.support.devices import Device, endless_model, new_thread, read_sse, sync_devices
from tests.support.redis_server import RedisServer
from tests.support.serving import wait_for
from tests.support.sync import sync_service


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
    # A refused push applied nothing: the device's ids go on from 1 (no gap)
    assert push(1, "last-allowed", position=2**40).status_code == 200
    for mid, name in enumerate(("after-1", "after-2"), 2):
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


# -- issue 12, item 5: a web page must not drive the gateway ------------------------------


def test_a_text_plain_post_is_a_415_and_writes_nothing(device: Device) -> None:
    """A page may POST text/plain across origins without asking (no preflight): once
    parsed as JSON whatever its type, it created threads and ran turns."""
    plain = {"Content-Type": "text/plain"}
    answer = device.http.post("/v1/threads", content=b'{"id": "csrf-made"}', headers=plain)
    assert "application/json" in assert_sync_error(answer, 415,
                                                   "unsupported_media_type")["message"]
    assert device.http.get("/v1/threads/csrf-made").status_code == 404
    thread = new_thread(device)
    for path in (f"/v1/threads/{thread['id']}/runs", f"/v1/threads/{thread['id']}/push"):
        answer = device.http.post(path, headers=plain,
                                  content=b'{"input": {"content": "hi"}, "stream": false}')
        assert_sync_error(answer, 415, "unsupported_media_type")
    form = device.http.post("/v1/threads", data={"id": "form-made"})  # a <form> POST
    assert_sync_error(form, 415, "unsupported_media_type")
    chat = device.http.post("/v1/chat/completions", headers=plain, content=json_bytes(
        {"thread_id": thread["id"], "messages": [{"role": "user", "content": "hi"}]}))
    assert chat.status_code == 415 and chat.json()["error"]["code"] == "unsupported_media_type"
    after = device.http.get(f"/v1/threads/{thread['id']}").json()
    assert (after["version"], after["messages"], after["active_run"]) == (
        thread["version"], [], None)
    # JSON with a charset, and a POST with no body at all, are fine.
    typed = device.http.post("/v1/threads", content=b'{"id": "typed"}',
                             headers={"Content-Type": "application/json; charset=utf-8"})
    assert typed.status_code == 201, typed.text
    assert device.http.post("/v1/threads").status_code == 201


def test_a_foreign_origin_is_a_403_and_the_gateway_s_own_page_passes(device: Device) -> None:
    base = device.run.base_url
    for origin in ("https://evil.example", "null", "http://127.0.0.1:1",
                   "http://localhost.evil.example"):
        answer = device.http.post("/v1/threads", json={"id": "cross-made"},
                                  headers={"Origin": origin})
        assert origin in assert_sync_error(answer, 403, "forbidden_origin")["message"]
        chat = device.http.post("/v1/chat/completions", headers={"Origin": origin},
                                json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 403 and chat.json()["error"]["code"] == "forbidden_origin"
    assert device.http.get("/v1/threads/cross-made").status_code == 404
    same = device.http.post("/v1/threads", json={"id": "same-made"}, headers={"Origin": base})
    assert same.status_code == 201, same.text
    assert device.post("/v1/threads", {"id": "no-origin"}).status_code == 201  # curl, SDKs


def test_a_foreign_host_is_a_400_so_dns_rebinding_reads_nothing(device: Device) -> None:
    """A name the attacker made resolve to 127.0.0.1 arrives as its Host header."""
    thread = new_thread(device)
    for host in ("evil.example", f"evil.example:{device.run.port}", "127.0.0.1.evil.example"):
        answer = device.http.get(f"/v1/threads/{thread['id']}", headers={"Host": host})
        assert "Host" in assert_sync_error(answer, 400, "invalid_host")["message"]
        models = device.http.get("/v1/models", headers={"Host": host})
        assert models.status_code == 400 and models.json()["error"]["code"] == "invalid_host"
        assert device.http.get("/", headers={"Host": host}).status_code == 400
        assert device.http.get("/healthz", headers={"Host": host}).status_code == 200
    for host in (f"localhost:{device.run.port}", f"127.0.0.1:{device.run.port}", "localhost"):
        answer = device.http.get(f"/v1/threads/{thread['id']}", headers={"Host": host})
        assert answer.status_code == 200, (host, answer.text)


def test_allowed_hosts_and_origins_are_settings(model: Path, redis: RedisServer,
                                                 tmp_path: Path) -> None:
    env = {"EDGEBUNDLE_ALLOWED_HOSTS": "kiosk.lan, *.shop.example",
           "EDGEBUNDLE_ALLOWED_ORIGINS": "https://kiosk.example/"}
    with sync_devices(redis.url, model, [tmp_path / "home"], env=env) as [started]:
        for host in ("kiosk.lan", "till-3.shop.example:8080"):
            assert started.http.get("/v1/models", headers={"Host": host}).status_code == 200
        assert started.http.get("/v1/models", headers={"Host": "shop.example.evil"}) \
            .status_code == 400
        allowed = started.post("/v1/threads", {}, headers={"Origin": "https://kiosk.example"})
        assert allowed.status_code == 201, allowed.text
        other = started.post("/v1/threads", {}, headers={"Origin": "https://other.example"})
        assert_sync_error(other, 403, "forbidden_origin")


# -- issue 12, item 9: sizes ---------------------------------------------------------------


def json_bytes(value: object) -> bytes:
    return json.dumps(value).encode()


def raw_post(device: Device, path: str, head: dict[str, str], body: bytes = b"",
             chunks: Iterator[bytes] | None = None) -> tuple[int, bytes]:
    """POST over a raw socket (headers first, then what the server still reads); the
    status and body the server answered, read while the body may still be unsent."""
    with socket.create_connection(("127.0.0.1", device.run.port), timeout=20) as sock:
        lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{device.run.port}",
                 *(f"{name}: {value}" for name, value in head.items()), "", ""]
        sock.sendall("\r\n".join(lines).encode() + body)
        with contextlib.suppress(OSError):  # the server may close before taking it all
            for chunk in chunks or ():
                sock.sendall(chunk)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
                re.search(rb"content-length: (\d+)", answer.lower() + b"content-length: 0")
                .group(1)):  # type: ignore[union-attr]
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    head_part, _, rest = answer.partition(b"\r\n\r\n")
    return int(head_part.split()[1]), rest


def test_a_body_over_the_cap_is_a_413_before_it_is_read(device: Device) -> None:
    """A 60 MB body was read whole: now Content-Length alone answers, and a chunked body
    is cut off once it passes the cap."""
    started = time.monotonic()
    status, body = raw_post(device, "/v1/threads", {
        "Content-Type": "application/json", "Content-Length": str(60_000_000)})
    assert status == 413 and json.loads(body)["error"] == "body_too_large"
    assert time.monotonic() - started < 5  # answered without waiting for 60 MB

    def chunked(total: int) -> Iterator[bytes]:
        piece = b"x" * 65536
        for _ in range(total // len(piece)):
            yield b"%x\r\n" % len(piece) + piece + b"\r\n"
        yield b"0\r\n\r\n"

    status, body = raw_post(device, "/v1/chat/completions", {
        "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        chunks=chunked(8 * 1024 * 1024))
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    assert device.post("/v1/threads", {"id": "x" * 100}).status_code == 201  # still serving


def test_a_message_over_the_cap_is_a_413_and_nothing_is_stored(device: Device) -> None:
    thread = new_thread(device)
    tid = thread["id"]
    big = "é" * 40_000  # 80,000 bytes of UTF-8: over 64 KiB, though 40,000 characters
    pushed = device.post(f"/v1/threads/{tid}/push", {
        "device_id": "tablet", "epoch": thread["epoch"], "since": thread["version"],
        "mutations": [{"mid": 1, "op": "put",
                       "message": {"id": "m1", "role": "user", "content": big}}]})
    assert "65536" in assert_sync_error(pushed, 413, "message_too_large")["message"]
    turn = device.post(f"/v1/threads/{tid}/runs", {"input": {"content": big},
                                                   "stream": False})
    assert_sync_error(turn, 413, "message_too_large")
    for messages in ([{"role": "user", "content": big}],
                     [{"role": "user", "content": big}, {"role": "user", "content": "hi"}]):
        chat = device.post("/v1/chat/completions", {"thread_id": "seeded-big",
                                                    "messages": messages})
        assert chat.status_code == 413, chat.text
        assert chat.json()["error"]["code"] == "message_too_large"
    assert device.http.get("/v1/threads/seeded-big").status_code == 404
    after = device.http.get(f"/v1/threads/{tid}").json()
    assert (after["version"], after["messages"]) == (thread["version"], [])
    fits = "é" * 30_000  # 60,000 bytes: under the cap
    assert device.post(f"/v1/threads/{tid}/push", {
        "device_id": "tablet", "epoch": thread["epoch"], "since": thread["version"],
        "mutations": [{"mid": 1, "op": "put", "message": {
            "id": "m1", "role": "user", "content": fits}}]}).status_code == 200


@pytest.fixture(scope="module")
def capped(redis: RedisServer, model: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    env = {"EDGEBUNDLE_MAX_THREAD_MESSAGES": "6", "EDGEBUNDLE_MAX_QUEUED_RUNS": "2",
           "EDGEBUNDLE_MAX_MESSAGE_BYTES": "1000"}
    with sync_devices(redis.url, model, [tmp_path_factory.mktemp("capped")],
                      ids=("capped",), env=env) as [started]:
        yield started


def test_a_retried_turn_gets_its_run_even_when_it_filled_the_thread(capped: Device) -> None:
    """The caps count what a request adds; a retry of a turn that started adds nothing."""
    tid = new_thread(capped)["id"]
    short = {"stream": False, "params": {"max_tokens": 2}}  # the endless model: seconds else
    body = {"input": {"id": "fills-it", "content": "last one"}, **short}
    for _ in range(2):  # four messages, then a turn of two: the thread is full
        filler = capped.post(f"/v1/threads/{tid}/runs", {"input": {"content": "q"}, **short})
        assert filler.status_code == 200, filler.text
    first = capped.post(f"/v1/threads/{tid}/runs", body)
    assert first.status_code == 200, first.text
    again = capped.post(f"/v1/threads/{tid}/runs", body)  # its answer was lost: retried
    assert again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    other = capped.post(f"/v1/threads/{tid}/runs", {"input": {"content": "more"}})
    assert_sync_error(other, 409, "thread_full")


def test_a_full_thread_takes_no_more_messages(capped: Device) -> None:
    thread = new_thread(capped)
    tid = thread["id"]

    def push(mid: int, *names: str) -> httpx.Response:
        state = capped.http.get(f"/v1/threads/{tid}").json()
        return capped.post(f"/v1/threads/{tid}/push", {
            "device_id": "tablet", "epoch": state["epoch"], "since": state["version"],
            "mutations": [{"mid": mid + i, "op": "put", "message": {
                "id": name, "role": "user", "content": name}} for i, name in enumerate(names)]})

    assert push(1, "m1", "m2", "m3", "m4").status_code == 200
    full = push(5, "m5", "m6", "m7")
    assert "6 at most" in assert_sync_error(full, 409, "thread_full")["message"]
    assert push(5, "m5").status_code == 200  # five now (the refused push applied nothing)
    turn = capped.post(f"/v1/threads/{tid}/runs", {"input": {"content": "one more?"},
                                                   "stream": False})
    assert_sync_error(turn, 409, "thread_full")  # a turn adds two (input and reply)
    chat = capped.post("/v1/chat/completions", {"thread_id": tid, "messages": [
        {"role": "user", "content": "one more?"}]})
    assert chat.status_code == 409 and chat.json()["error"]["code"] == "thread_full"
    assert len(capped.http.get(f"/v1/threads/{tid}").json()["messages"]) == 5
    big = capped.post(f"/v1/threads/{tid}/runs", {"input": {"content": "x" * 1001}})
    assert_sync_error(big, 413, "message_too_large")  # max_message_bytes is a setting


def test_a_thread_s_queue_is_capped_with_a_429_and_retry_after(capped: Device) -> None:
    thread = new_thread(capped)
    tid = thread["id"]
    for index in range(3):  # one generating, two waiting in line: the cap
        with capped.http.stream("POST", f"/v1/threads/{tid}/runs", json={
                "input": {"content": f"question {index}"},
                "params": {"max_tokens": 4000}}) as response:
            assert response.status_code == 200, response.read()
            assert next(read_sse(response))["event"] == "sync"
        if index == 0:  # it holds the thread: the next ones wait in line
            wait_for(lambda: capped.http.get(f"/v1/threads/{tid}").json()["active_run"],
                     timeout=20)
    wait_for(lambda: len(capped.http.get(f"/v1/threads/{tid}").json()["queued_runs"]) == 2,
             timeout=20)
    refused = capped.post(f"/v1/threads/{tid}/runs", {"input": {"content": "and me?"}})
    assert "max_queued_runs" in assert_sync_error(refused, 429, "queue_full")["message"]
    assert int(refused.headers["Retry-After"]) > 0
    chat = capped.post("/v1/chat/completions", {"thread_id": tid, "messages": [
        {"role": "user", "content": "and me?"}]})
    assert chat.status_code == 429 and chat.json()["error"]["code"] == "queue_full"
    assert "Retry-After" in chat.headers
    state = capped.http.get(f"/v1/threads/{tid}").json()
    for run in [state["active_run"], *state["queued_runs"]]:
        if run is not None:
            capped.post(f"/v1/threads/{tid}/runs/{run['id']}/cancel", {})
    assert len(capped.http.get(f"/v1/threads/{tid}").json()["messages"]) <= 6


# -- issue 12, item 4: readers and queued runs cannot starve everything else ----------------


async def open_stream(client: httpx.AsyncClient, path: str) -> httpx.Response:
    """A streaming GET, its headers read (a reader now waits in XREAD BLOCK)."""
    return await client.send(client.build_request("GET", path), stream=True)


async def start_turn(client: httpx.AsyncClient, tid: str, content: str) -> str:
    """A turn that goes on after its request (endless, until cancelled): its run id.
    ``content`` must be new to the thread (it finds the run by its input)."""
    async with client.stream("POST", f"/v1/threads/{tid}/runs", json={
            "input": {"content": content}, "params": {"max_tokens": 4000}}) as response:
        assert response.status_code == 200, await response.aread()
        async for event in aiter_events(response):
            if event.type.startswith("run."):
                break
    state = (await client.get(f"/v1/threads/{tid}")).json()
    [message_id] = [m["id"] for m in state["messages"] if m["content"] == content]
    [run_id] = [run["id"] for run in [state["active_run"], *state["queued_runs"]]
                if run and run["input_message_id"] == message_id]
    return str(run_id)


def test_150_readers_and_queued_runs_leave_every_other_route_answering(
    redis: RedisServer, model: Path, tmp_path: Path,
) -> None:
    """Each reader waits in XREAD BLOCK, each queued run in BLPOP: once on the one pool
    of 100 connections, ~100 of them made every route answer 503 Too many connections.
    Now they have a pool of their own, and caps answer 429 past them.

    Another device (a lease taken here) holds each thread, so the device's runs all
    wait in line and none of them ends during the test: a reader of an ended run would
    leave fewer than 150 streams open (the endless model writes 4000 tokens in ~2 s)."""
    env = {"EDGEBUNDLE_MAX_STREAMS": "150"}

    async def main(base_url: str) -> None:
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client, \
                sync_service(redis.url) as elsewhere:
            threads = [(await client.post("/v1/threads", json={})).json()["id"]
                       for _ in range(10)]
            holders = []
            for tid in threads:
                held = await elsewhere.start_run(tid, "holder", epoch=CURRENT_EPOCH, since=0,
                                                 content=f"held, {tid}")
                holders.append(await elsewhere.acquire(held))
            runs = {tid: [await start_turn(client, tid, f"go on, {tid}")] for tid in threads}
            for index in range(7):  # thread 0: one generating or waiting, 7 in line
                runs[threads[0]].append(await start_turn(client, threads[0], f"q{index}"))
            readers = [await open_stream(client, f"/v1/threads/{tid}/runs/{runs[tid][0]}/events")
                       for tid in threads for _ in range(15)]
            try:
                assert [r.status_code for r in readers] == [200] * 150
                await asyncio.sleep(1)  # every reader in its XREAD BLOCK by now
                for _ in range(3):  # ordinary requests answer promptly, again and again
                    started = time.monotonic()
                    got = await client.get(f"/v1/threads/{threads[0]}")
                    assert got.status_code == 200, got.text
                    fresh = (await client.post("/v1/threads", json={})).json()
                    pushed = await client.post(f"/v1/threads/{fresh['id']}/push", json={
                        "device_id": "tablet", "epoch": fresh["epoch"], "since": 0,
                        "mutations": [{"mid": 1, "op": "put", "message": {
                            "id": "m1", "role": "user", "content": "still there?"}}]})
                    assert pushed.status_code == 200, pushed.text
                    async with client.stream("POST", f"/v1/threads/{fresh['id']}/runs", json={
                            "input": {"content": "a new turn"},
                            "params": {"max_tokens": 1}}) as turn:
                        assert turn.status_code == 200, await turn.aread()
                        # raw on purpose: the first line on the wire is the sync event (no id first)
                        assert (await anext(turn.aiter_lines())) == "event: sync"
                    assert time.monotonic() - started < 5
                # Past the cap: a 429 that says when to try again, for this reader only.
                # (bounded: a watch that is let in streams for ever)
                refused = await asyncio.wait_for(
                    client.get(f"/v1/threads/{threads[1]}/watch"), 10)
                assert refused.status_code == 429, refused.text
                assert refused.json()["error"] == "too_many_streams"
                assert int(refused.headers["Retry-After"]) > 0
                for reader in readers[15:25]:  # thread 1's readers leave
                    await reader.aclose()
                more = [await open_stream(client, f"/v1/threads/{threads[0]}/watch")]
                assert more[0].status_code == 200  # thread 0: its 16th reader
                per_thread = await asyncio.wait_for(
                    client.get(f"/v1/threads/{threads[0]}/watch"), 10)
                assert per_thread.status_code == 429, per_thread.text
                assert "thread" in per_thread.json()["message"]
                readers += more
            finally:
                for reader in readers:
                    await reader.aclose()
                for tid, ids in runs.items():
                    for run_id in reversed(ids):
                        await client.post(f"/v1/threads/{tid}/runs/{run_id}/cancel", json={})
                for lease in holders:
                    await lease.finish("eos", {})

    with sync_devices(redis.url, model, [tmp_path / "home"], env=env) as [started]:
        asyncio.run(main(started.run.base_url))
        assert started.http.get("/metrics").status_code == 200


def test_requests_the_plugin_would_refuse_are_400s_before_the_guest_sees_them(
        device: Device) -> None:
    """Genuine WasmEdge's plugin logs such refusals on the guest's stdout. The gateway
    refuses a prompt longer than the context (exact count) and a seed out of the
    plugin's range first, again and again, and the device keeps serving with the same
    guest (no restart, so no restart limit to reach)."""
    too_long = {"messages": [{"role": "user", "content": "x" * 6000}]}
    for _ in range(8):
        answer = device.post("/v1/chat/completions", too_long)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "context_length_exceeded"
        bad_seed = device.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Hi"}], "seed": 2**64 - 1, "max_tokens": 1})
        assert bad_seed.status_code == 400 and bad_seed.json()["error"]["param"] == "seed"
    fine = device.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "seed": 2**63 - 1, "max_tokens": 2})
    assert fine.status_code == 200, fine.text
    assert fine.json()["choices"][0]["message"]["content"] == "Looping forever"
    metrics = device.http.get("/metrics").text
    assert re.search(r"^edgebundle_guest_restarts_total 0(\.0)?$", metrics, re.M), metrics
    logs = "".join(path.read_text(errors="replace")
                   for path in (device.run.stderr_path.parent / "logs").glob("*.log"))
    assert "prompt is too long" not in logs  # the guest never saw one
