"""Offline-first devices: a device whose link to the central Redis is cut keeps chatting
from its local store, and converges with the others when the link heals.

Real parts only: a central redis-server (AOF), three real ``edgebundle run`` devices
on the embedded runtime with a scripted model, each with its own private local store;
device C reaches the central Redis through a TCP proxy the test cuts and heals (the
partition), A and B directly. Nothing is mocked.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from tests.support.devices import Device, messages_of, mirrored, sync_devices
from tests.support.redis_server import RedisServer
from tests.support.serving import wait_for
from tests.support.tcp_proxy import TcpProxy

REPLY = "Noted, thank you."
OFFLINE_AFTER = "1"


@pytest.fixture
def central(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "central", aof=True).start()
    yield server
    server.stop()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_scripted_model(tmp_path / "m.gguf", ScriptedModelSpec(
        reply=REPLY, context_length=4096))


def turn(device: Device, thread: str, content: str, input_id: str,
         deadline: float) -> dict[str, Any]:
    """A turn, retried with the same input id while the device answers 503."""
    body = {"device_id": device.id, "input": {"id": input_id, "content": content},
            "stream": False, "params": {"max_tokens": 8}}
    while True:
        answer = device.post(f"/v1/threads/{thread}/runs", body)
        if answer.status_code != 503:
            assert answer.status_code == 200, answer.text
            run: dict[str, Any] = answer.json()
            assert run["status"] == "completed", run
            return run
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.2)


def link(device: Device) -> dict[str, Any]:
    health = device.run.healthz()
    assert health.status_code == 200, health.text
    sync: dict[str, Any] = health.json()["sync"]
    return sync


def transcript(device: Device, thread: str) -> list[tuple[str, str, str]]:
    return [(m["id"], m["role"], m["content"]) for m in messages_of(device, thread)
            if not m["deleted"]]


def test_a_device_cut_off_keeps_chatting_and_converges_when_the_link_heals(
        tmp_path: Path, central: RedisServer, model: Path) -> None:
    proxy = TcpProxy(central.port).start()
    homes = [tmp_path / name for name in ("A", "B", "C")]
    urls = [central.url, central.url, central.url.replace(str(central.port), str(proxy.port))]
    try:
        with sync_devices(urls, model, homes, ids=("devA", "devB", "devC"),
                          extra_args=("--offline-after", OFFLINE_AFTER)) as (a, b, c):
            thread = a.post("/v1/threads", {"id": "kiosk"}).json()["id"]
            deadline = time.monotonic() + 120
            turn(a, thread, "A before", "a-0", deadline)
            turn(c, thread, "C before", "c-0", deadline)
            wait_for(lambda: mirrored(c, central, thread))  # C has its copy of the thread
            assert link(c) == {"link": "online", "pending": 0, "threads_pending": 0,
                               "offline_since": None}

            proxy.cut(hold=True)  # the partition
            offline = [turn(c, thread, f"C offline {n}", f"c-off-{n}", deadline)
                       for n in range(20)]
            assert link(c)["link"] == "offline" and link(c)["pending"] == 40
            for n in range(3):  # meanwhile the others chat on the central store
                turn((a, b)[n % 2], thread, f"central {n}", f"central-{n}", deadline)
            seen_offline = transcript(c, thread)
            assert [content for _, _, content in seen_offline][-2:] == ["C offline 19", REPLY]
            assert all(content != "central 0" for _, _, content in seen_offline)

            proxy.resume()  # the link heals
            wait_for(lambda: link(c) == {"link": "online", "pending": 0, "threads_pending": 0,
                                         "offline_since": None}, timeout=30, interval=0.2)
            everywhere = [transcript(device, thread) for device in (a, b, c)]
            assert everywhere[0] == everywhere[1] == everywhere[2]
            contents = [content for _, _, content in everywhere[0]]
            expected_questions = (["A before", "C before"]
                                  + [f"central {n}" for n in range(3)]
                                  + [f"C offline {n}" for n in range(20)])
            # The merge rule: C's offline turns after what the central store took
            # meanwhile, in their own order, each question right before its reply.
            assert contents == [part for q in expected_questions for part in (q, REPLY)]
            ids = [message_id for message_id, _, _ in everywhere[0]]
            assert [run["input_message_id"] for run in offline] == [
                f"c-off-{n}" for n in range(20)]
            assert all(ids.count(f"c-off-{n}") == 1 for n in range(20))

            # Online again: C's turns are central turns as before.
            turn(c, thread, "C after", "c-after", deadline)
            wait_for(lambda: transcript(a, thread)[-2:] == [
                ("c-after", "user", "C after"), transcript(a, thread)[-1]])
    finally:
        proxy.stop()
