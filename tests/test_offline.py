"""Offline-first devices: a device whose link to the central Redis is cut keeps chatting
from its local store, and converges with the others when the link heals.

Real parts only: a central redis-server (AOF), three real ``edgebundle run`` devices
on the embedded runtime with a scripted model, each with its own private local store;
device C reaches the central Redis through a TCP proxy the test cuts and heals (the
partition), A and B directly. Nothing is mocked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_py
from prometheus_client.parser import text_string_to_metric_families

from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from tests.support.devices import (
    Device,
    endless_model,
    messages_of,
    mirrored,
    new_thread,
    read_sse,
    sync_devices,
)
from tests.support.redis_server import RedisServer
from tests.support.serving import RunProcess, wait_for
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


def gauges(device: Device) -> dict[str, float]:
    """The replication gauges of the device's /metrics, parsed as Prometheus does."""
    text = device.http.get("/metrics").text
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name in ("edgebundle_sync_offline", "edgebundle_sync_pending_changes")}


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
            assert gauges(c) == {"edgebundle_sync_offline": 1.0,
                                 "edgebundle_sync_pending_changes": 40.0}
            for n in range(3):  # meanwhile the others chat on the central store
                turn((a, b)[n % 2], thread, f"central {n}", f"central-{n}", deadline)
            seen_offline = transcript(c, thread)
            assert [content for _, _, content in seen_offline][-2:] == ["C offline 19", REPLY]
            assert all(content != "central 0" for _, _, content in seen_offline)

            proxy.resume()  # the link heals
            wait_for(lambda: link(c) == {"link": "online", "pending": 0, "threads_pending": 0,
                                         "offline_since": None}, timeout=30, interval=0.2)
            assert gauges(c) == {"edgebundle_sync_offline": 0.0,
                                 "edgebundle_sync_pending_changes": 0.0}
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


def device_c(home: Path, url: str, model: Path) -> RunProcess:
    """Device C as `edgebundle run` on ``home`` (the same home again after a kill)."""
    return RunProcess(["--runtime", "embedded", "--no-preflight", "--model", str(model),
                       "--template", "llama-3-chat", "--redis-url", url, "--device-id", "devC",
                       "--offline-after", OFFLINE_AFTER], home=home)


def test_offline_changes_survive_a_killed_device_and_a_restarted_central_redis(
        tmp_path: Path, central: RedisServer, model: Path) -> None:
    """C is SIGKILLed while offline (its pending turns are on its disk) and started
    again before the link heals; the central redis-server restarts meanwhile. On heal
    every offline turn reaches the central store once."""
    proxy = TcpProxy(central.port).start()
    url = central.url.replace(str(central.port), str(proxy.port))
    first = device_c(tmp_path / "C", url, model)
    second: RunProcess | None = None
    try:
        with sync_devices(central.url, model, [tmp_path / "A"], ids=("devA",),
                          extra_args=("--offline-after", OFFLINE_AFTER)) as (a,):
            first.read_line()
            first.wait_healthy()
            c = Device(first, "devC")
            thread = a.post("/v1/threads", {"id": "till"}).json()["id"]
            deadline = time.monotonic() + 120
            turn(c, thread, "C online", "c-on", deadline)
            wait_for(lambda: mirrored(c, central, thread))

            proxy.cut(hold=True)
            for n in range(3):
                turn(c, thread, f"C offline {n}", f"c-off-{n}", deadline)
            assert link(c)["pending"] == 6
            first.proc.kill()  # what the OOM killer does
            first.proc.wait()
            first.close()
            central.kill()  # and the central Redis restarts meanwhile (AOF)
            central.start()
            turn(a, thread, "A meanwhile", "a-mid", deadline)

            second = device_c(tmp_path / "C", url, model)
            second.read_line()
            second.wait_healthy()
            c = Device(second, "devC")
            assert link(c)["link"] == "offline" and link(c)["pending"] == 6
            assert [content for _, _, content in transcript(c, thread)][-2:] == [
                "C offline 2", REPLY]  # served from its disk while still cut off

            proxy.resume()
            wait_for(lambda: link(c)["link"] == "online" and link(c)["pending"] == 0,
                     timeout=30, interval=0.2)
            contents = [content for _, _, content in transcript(a, thread)]
            assert contents == [part for q in ["C online", "A meanwhile", "C offline 0",
                                               "C offline 1", "C offline 2"]
                                for part in (q, REPLY)]
            assert transcript(c, thread) == transcript(a, thread)
            assert second.stop() == 0, second.stderr()
    finally:
        proxy.stop()
        for run in (first, second):
            if run is not None:
                run.close()


@contextmanager
def a_and_c(tmp_path: Path, central: RedisServer, model: Path,
            thread: str) -> Iterator[tuple[Device, Device, TcpProxy, dict[str, Any]]]:
    """Device A on the central Redis and device C behind a proxy the test cuts, both on
    ``thread`` after A's first turn (C has its copy); and that turn's run."""
    proxy = TcpProxy(central.port).start()
    urls = [central.url, central.url.replace(str(central.port), str(proxy.port))]
    try:
        with sync_devices(urls, model, [tmp_path / "A", tmp_path / "C"], ids=("devA", "devC"),
                          extra_args=("--offline-after", OFFLINE_AFTER)) as (a, c):
            a.post("/v1/threads", {"id": thread})
            run = turn(a, thread, "A online", "a-on", time.monotonic() + 60)
            assert c.http.get(f"/v1/threads/{thread}").status_code == 200  # C joins it
            wait_for(lambda: mirrored(c, central, thread))
            yield a, c, proxy, run
    finally:
        proxy.stop()


def test_a_thread_the_central_store_lost_meanwhile_is_reseeded_from_the_device(
        tmp_path: Path, central: RedisServer, model: Path) -> None:
    thread = "pop-up"
    with a_and_c(tmp_path, central, model, thread) as (a, c, proxy, _):
        old_epoch = a.http.get(f"/v1/threads/{thread}").json()["epoch"]
        proxy.cut(hold=True)
        turn(c, thread, "C offline", "c-off", time.monotonic() + 60)
        with redis_py.Redis(port=central.port) as admin:  # the thread expires centrally
            admin.delete(*admin.keys(f"eb:{{{thread}}}:*"))
        assert a.http.get(f"/v1/threads/{thread}").status_code == 404

        proxy.resume()
        wait_for(lambda: link(c)["pending"] == 0 and link(c)["link"] == "online",
                 timeout=30, interval=0.2)
        again = a.http.get(f"/v1/threads/{thread}").json()
        assert again["epoch"] != old_epoch  # re-seeded under a new epoch
        assert [content for _, _, content in transcript(a, thread)] == [
            "A online", REPLY, "C offline", REPLY]


def test_offline_changes_reach_a_thread_made_again_since_the_last_heal(
        tmp_path: Path, central: RedisServer, model: Path) -> None:
    """C's replica identity numbers its mutations on from heal to heal; a thread the
    central store made again since (a new epoch counts every device's ids from 1) answers
    a gap, and C numbers its outbox on from the id it expects: nothing is lost."""
    thread = "again"
    with a_and_c(tmp_path, central, model, thread) as (a, c, proxy, _):
        deadline = time.monotonic() + 90
        proxy.cut(hold=True)
        turn(c, thread, "C offline 1", "c-off-1", deadline)
        proxy.resume()
        wait_for(lambda: link(c)["pending"] == 0 and link(c)["link"] == "online",
                 timeout=30, interval=0.2)
        with redis_py.Redis(port=central.port, decode_responses=True) as admin:
            assert admin.hget(f"eb:{{{thread}}}:mids", "devC:replica") == "2"
            admin.delete(*admin.keys(f"eb:{{{thread}}}:*"))  # it expires centrally ...
        a.post("/v1/threads", {"id": thread})  # ... and A starts it again
        turn(a, thread, "A again", "a-again", deadline)
        assert c.http.get(f"/v1/threads/{thread}").status_code == 200
        wait_for(lambda: mirrored(c, central, thread))

        proxy.cut(hold=True)
        turn(c, thread, "C offline 2", "c-off-2", deadline)
        proxy.resume()
        wait_for(lambda: link(c)["pending"] == 0 and link(c)["link"] == "online",
                 timeout=30, interval=0.2)
        assert [content for _, _, content in transcript(a, thread)] == [
            "A again", REPLY, "C offline 2", REPLY]
        with redis_py.Redis(port=central.port, decode_responses=True) as admin:
            assert admin.hget(f"eb:{{{thread}}}:mids", "devC:replica") == "2"
        assert "skips ahead" not in c.run.stderr()


def test_what_needs_the_central_store_fails_clearly_offline(
        tmp_path: Path, central: RedisServer, model: Path) -> None:
    thread = "known"
    with a_and_c(tmp_path, central, model, thread) as (a, c, proxy, run):
        a.post("/v1/threads", {"id": "never-seen-by-c"})
        proxy.cut(hold=True)
        wait_for(lambda: link(c)["link"] == "offline", timeout=20, interval=0.2)

        unknown = c.http.get("/v1/threads/never-seen-by-c")
        assert (unknown.status_code, unknown.json()["error"]) == (503, "offline")
        assert "never seen thread never-seen-by-c" in unknown.json()["message"]
        elsewhere = c.post(f"/v1/threads/{thread}/runs/{run['id']}/cancel", {})
        assert (elsewhere.status_code, elsewhere.json()["error"]) == (503, "offline")
        assert "not one of its own" in elsewhere.json()["message"]
        known = c.http.get(f"/v1/threads/{thread}")  # what it has seen, it serves
        assert known.status_code == 200
        assert [m["content"] for m in known.json()["messages"]] == ["A online", REPLY]
        proxy.resume()


def test_a_reply_streams_to_the_end_through_a_flapping_link(
        tmp_path: Path, central: RedisServer) -> None:
    """The link of the generating device goes down and up every few seconds during a
    long reply: the run (on the central store) rides it out, the reader rejoins after
    its last event each time, and the reply arrives whole, every piece once."""
    model = endless_model(tmp_path, context_length=16384)
    proxy = TcpProxy(central.port).start()
    url = central.url.replace(str(central.port), str(proxy.port))
    tokens = 8000  # ~2 ms a token: a reply long enough for several flaps
    try:
        with sync_devices(url, model, [tmp_path / "C"], ids=("devC",),
                          extra_args=("--offline-after", OFFLINE_AFTER,
                                      "--ctx-size", "16384")) as (c,):
            thread = new_thread(c)["id"]
            body = {"device_id": "devC", "input": {"id": "long", "content": "go on"},
                    "params": {"max_tokens": tokens}}
            events: list[dict[str, Any]] = []
            with c.http.stream("POST", f"/v1/threads/{thread}/runs", json=body) as response:
                for event in read_sse(response):
                    events.append(event)
                    if event["event"] == "message.delta":
                        break
            run_id = next(e["data"]["run"]["id"] for e in events if e["event"] == "run.queued")

            flapping = threading.Event()

            def flap() -> None:
                while not flapping.is_set():
                    proxy.cut(hold=True)
                    time.sleep(3.0)  # long enough for the device to go offline
                    proxy.resume()
                    time.sleep(2.0)

            flapper = threading.Thread(target=flap, daemon=True)
            flapper.start()
            # A slow machine generates slower and so rides out more flaps: what must not
            # happen is a reply that stops coming (no new event for a minute).
            progress = (len(events), time.monotonic())
            while events[-1]["event"] != "done":
                if len(events) != progress[0]:
                    progress = (len(events), time.monotonic())
                assert time.monotonic() - progress[1] < 60, events[-3:]
                last = [e["id"] for e in events if "id" in e][-1]
                try:
                    with c.http.stream("GET", f"/v1/threads/{thread}/runs/{run_id}/events",
                                       headers={"Last-Event-ID": last}) as response:
                        if response.status_code != 200:  # 503 offline: rejoin later
                            response.read()
                            time.sleep(0.3)
                            continue
                        for event in read_sse(response):
                            if event["event"] == "error":
                                break
                            events.append(event)
                except httpx.TransportError:
                    time.sleep(0.3)
            flapping.set()
            flapper.join()
            proxy.resume()

            assert [e["event"] for e in events][-2:] == ["run.completed", "done"]
            pieces = [e["data"] for e in events if e["event"] == "message.delta"]
            assert [p["seq"] for p in pieces] == list(range(1, len(pieces) + 1))
            expected = "Looping" + " forever" * (tokens - 1)
            assert "".join(p["text"] for p in pieces) == expected
            wait_for(lambda: link(c)["link"] == "online", timeout=30, interval=0.2)
            assert messages_of(c, thread)[-1]["content"] == expected
            assert "serving from the local store" in c.run.stderr()  # it did go offline
    finally:
        proxy.stop()
