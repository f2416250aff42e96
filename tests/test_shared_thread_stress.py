"""Many devices at once on one thread, with Redis killed mid-way: the conversation holds.

Real parts only: a real redis-server (append-only file, ``appendfsync always``) that
is killed with SIGKILL in the middle of the run and started again on its AOF, two real
``edgebundle run`` gateways on the embedded runtime with a scripted model, and 20
devices (each its own device id, split over the gateways) that each push notes of
their own and take turns on the same thread at the same time, as people would: a
device sends its next turn when it has the answer to the last one.

Every device retries what failed (a 5xx, a cut connection) with the same ids, as
docs/api.md asks: push mutation ids, the turn's input id. Each device keeps a replica of
the thread built only from what it received (push answers, the runs' event streams
and diffs by version). Pass means:

- every acknowledged push and turn is in the thread exactly once;
- every run completed with the scripted reply, and the transcript reads Q A Q A:
  each reply right after its own input (queued turns keep the conversation's shape);
- every run's prompt was its input and the newest messages before it that fit the
  context (the thread outgrows the 2,048-token context several times over): its input
  tokens match the count of exactly those messages on that model;
- every device's replica equals the server's full state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.sync.models import SyncState, ThreadMessage
from edgebundle.sync.replica import Replica
from tests.support.devices import Device, messages_of, prompt_tokens, read_sse, sync_devices
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer

REPLY = "Noted, thank you."
DEVICES = 20
TURNS = 10
CONTEXT = 2048
RETRYABLE = (500, 502, 503, 504)
DEADLINE = 150.0  # s for the whole exchange; the test fails rather than hangs


@dataclass
class Peer:
    """One device (a person's phone, a kiosk…) talking to one of the gateways."""

    name: str
    gateway: Device
    thread_id: str
    replica: Replica = field(init=False)
    http: httpx.Client = field(init=False)
    turns: dict[str, str] = field(default_factory=dict)  # input id -> run id (acknowledged)
    notes: list[str] = field(default_factory=list)  # acknowledged note ids
    retries: int = 0

    def __post_init__(self) -> None:
        self.replica = Replica(self.thread_id)
        self.http = httpx.Client(base_url=self.gateway.run.base_url, timeout=60)

    def retrying(self, send: Callable[[], httpx.Response | None], until: float) -> Any:
        """``send()`` until it answers (None or a 2xx); 5xx and cut connections retry."""
        delay = 0.05
        while True:
            try:
                response = send()
                if response is None:
                    return None
                if response.status_code not in RETRYABLE:
                    assert response.status_code == 200, response.text
                    return response
            except (httpx.TransportError, _Cut):
                pass
            assert time.monotonic() < until, f"{self.name}: no answer before the deadline"
            self.retries += 1
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def join(self, until: float) -> None:
        answer = self.retrying(lambda: self.http.get(f"/v1/threads/{self.thread_id}"), until)
        self.replica.apply_sync(SyncState.from_json(answer.json()))

    def catch_up(self, until: float) -> None:
        epoch, version = self.replica.cursor
        answer = self.retrying(lambda: self.http.get(
            f"/v1/threads/{self.thread_id}", params={"epoch": epoch or "", "since": version}),
            until)
        self.replica.apply_sync(SyncState.from_json(answer.json()))

    def push_note(self, text: str, until: float) -> None:
        note_id = f"note-{self.name}-{len(self.notes)}"
        mutation = self.replica.put_mutation({"id": note_id, "role": "user", "content": text})

        def send() -> httpx.Response:
            epoch, version = self.replica.cursor
            return self.http.post(f"/v1/threads/{self.thread_id}/push", json={
                "device_id": self.name, "epoch": epoch, "since": version,
                "mutations": self.replica.pending})

        answer = self.retrying(send, until)
        self.replica.apply_sync(SyncState.from_json(answer.json()))
        self.replica.acknowledge(mutation["mid"])
        self.notes.append(note_id)

    def turn(self, number: int, streamed: bool, until: float) -> None:
        input_id = f"q-{self.name}-{number}"
        epoch, version = self.replica.cursor
        body = {"device_id": self.name, "epoch": epoch, "since": version,
                "input": {"id": input_id, "content": f"{self.name} asks question {number}"},
                "multitask": "enqueue", "stream": streamed, "params": {"max_tokens": 16}}
        path = f"/v1/threads/{self.thread_id}/runs"
        if not streamed:
            run = self.retrying(lambda: self.http.post(path, json=body), until).json()
            self.turns[input_id] = run["id"]
            return
        last_event: list[str] = []

        def send() -> None:
            headers = {"Last-Event-ID": last_event[-1]} if last_event else {}
            with self.http.stream("POST", path, json=body, headers=headers) as response:
                if response.status_code != 200:
                    response.read()
                    raise _Cut(f"HTTP {response.status_code}: {response.text}")
                for event in read_sse(response):
                    if "id" in event:
                        last_event.append(event["id"])
                    if event["event"] == "error":
                        raise _Cut(str(event["data"]))
                    if event["event"] == "done":
                        return None
                    self.replica.apply_event(event["event"], event["data"])
                    if event["event"] == "run.queued" and input_id not in self.turns:
                        self.turns[input_id] = event["data"]["run"]["id"]
            raise _Cut("the stream ended before done")

        self.retrying(send, until)


class _Cut(Exception):
    """A stream that broke off: retried like a cut connection."""


def _model(directory: Path) -> Path:
    return write_scripted_model(directory / "stress.gguf", ScriptedModelSpec(
        reply=REPLY, context_length=CONTEXT))


def _drive(peers: list[Peer], on_progress: Callable[[int], None]) -> None:
    """Every peer does its turns at the same time; each one's notes and turns in order."""
    until = time.monotonic() + DEADLINE
    done = [0]
    lock = threading.Lock()

    def one(peer: Peer) -> None:
        peer.join(until)
        for number in range(TURNS):
            if number % 3 == 0:
                peer.push_note(f"{peer.name} notes {number}", until)
            peer.turn(number, streamed=(number + len(peer.name)) % 2 == 0, until=until)
            with lock:
                done[0] += 1
                on_progress(done[0])

    with ThreadPoolExecutor(len(peers)) as pool:
        for result in [pool.submit(one, peer) for peer in peers]:
            result.result()
        # Once everyone is done, each device asks for what it has not seen yet: one diff.
        for result in [pool.submit(peer.catch_up, until) for peer in peers]:
            result.result()


def _check(peers: list[Peer], gateway: Device, thread_id: str) -> None:
    full = gateway.http.get(f"/v1/threads/{thread_id}").json()
    assert full["active_run"] is None and full["queued_runs"] == []
    messages = sorted((m for m in full["messages"] if not m["deleted"]),
                      key=lambda m: m["position"])
    by_id = {m["id"]: m for m in messages}
    turns = {input_id: run for peer in peers for input_id, run in peer.turns.items()}
    notes = [note for peer in peers for note in peer.notes]
    assert len(turns) == DEVICES * TURNS and len(notes) == DEVICES * len(range(0, TURNS, 3))
    # Exactly once: one message per acknowledged input and note, one reply per turn.
    assert len(messages) == len(notes) + 2 * len(turns)
    assert set(notes) | set(turns) <= set(by_id)
    contents = [m["content"] for m in messages if m["role"] == "user"]
    assert len(contents) == len(set(contents)), "a pushed or asked message landed twice"

    order = [m["id"] for m in messages]
    for input_id, run_id in turns.items():
        run = gateway.http.get(f"/v1/threads/{thread_id}/runs/{run_id}").json()
        assert (run["status"], run["reason"]) == ("completed", "eos"), run
        assert run["input_message_id"] == input_id
        reply = by_id[run["message_id"]]
        assert (reply["role"], reply["content"], reply["run_id"]) == ("assistant", REPLY, run_id)
        # Q A: the reply sits right after its own input, whatever the interleaving.
        assert order.index(run["message_id"]) == order.index(input_id) + 1

    server = [ThreadMessage.from_json(m).to_json() for m in messages]
    for peer in peers:  # built only from what each device received
        mine = peer.replica.snapshot()
        assert (mine["epoch"], mine["version"]) == (full["epoch"], full["version"]), peer.name
        assert mine["messages"] == server, peer.name


def _prompts_were_the_newest_messages_up_to_each_input(gateway: Device, thread_id: str,
                                                       sample: list[str]) -> list[int]:
    """A run's input tokens = the count of the newest visible messages up to its input
    that it kept (all but ``usage.dropped_messages`` of them); the numbers dropped."""
    messages = messages_of(gateway, thread_id)
    dropped = []
    for run_id in sample:
        run = gateway.http.get(f"/v1/threads/{thread_id}/runs/{run_id}").json()
        asked = next(m["position"] for m in messages if m["id"] == run["input_message_id"])
        upto = [m for m in messages if m["position"] <= asked]
        kept = upto[run["usage"]["dropped_messages"]:]
        assert run["usage"]["input_tokens"] == prompt_tokens(gateway, kept), run_id
        dropped.append(run["usage"]["dropped_messages"])
    return dropped


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return _model(tmp_path)


def test_twenty_devices_on_one_thread_through_a_redis_crash(
        tmp_path: Path, model: Path) -> None:
    redis = RedisServer(tmp_path / "redis", aof=True).start()
    homes = [tmp_path / "gwA", tmp_path / "gwB"]
    crashed = threading.Event()

    def crash_once(done: int) -> None:
        # A third of the way in: SIGKILL, a few seconds down (longer than the clients'
        # own reconnect attempts, so requests fail and are retried), back on its AOF.
        if done == DEVICES * TURNS // 3 and not crashed.is_set():
            crashed.set()
            redis.kill()
            time.sleep(3.0)
            redis.start()

    try:
        with sync_devices(redis.url, model, homes, ids=("gwA", "gwB"),
                          extra_args=("--ctx-size", str(CONTEXT))) as (a, b):
            thread_id = a.post("/v1/threads", {"id": "shop-floor"}).json()["id"]
            peers = [Peer(f"dev{n:02d}", (a, b)[n % 2], thread_id) for n in range(DEVICES)]
            _drive(peers, crash_once)
            assert crashed.is_set()
            _check(peers, b, thread_id)
            # the first turns of a few devices, and the last turns of a few others
            sample = [run for peer in peers[:3] for run in list(peer.turns.values())[:2]]
            sample += [run for peer in peers[-3:] for run in list(peer.turns.values())[-2:]]
            dropped = _prompts_were_the_newest_messages_up_to_each_input(a, thread_id, sample)
            assert min(dropped) == 0 and max(dropped) > 100  # a long session kept going
            assert sum(peer.retries for peer in peers) > 0  # the crash was felt, and retried
        for gateway in (a, b):
            assert "Traceback" not in gateway.run.stderr(), gateway.run.stderr()
    finally:
        redis.stop()


def test_twenty_devices_on_one_thread_on_redis_cluster(
        tmp_path: Path, model: Path) -> None:
    cluster = RedisCluster(tmp_path / "cluster").start()
    try:
        with sync_devices(cluster.url, model, [tmp_path / "gwA", tmp_path / "gwB"],
                          ids=("gwA", "gwB"), extra_args=("--ctx-size", str(CONTEXT))) as (a, b):
            thread_id = a.post("/v1/threads", {"id": "kiosk-cluster"}).json()["id"]
            peers = [Peer(f"dev{n:02d}", (a, b)[n % 2], thread_id) for n in range(DEVICES)]
            _drive(peers, lambda done: None)
            _check(peers, a, thread_id)
    finally:
        cluster.stop()
