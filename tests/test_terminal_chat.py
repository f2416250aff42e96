"""`edgebundle chat` as a real subprocess against real gateways on a real Redis.

Two `python -m edgebundle run` devices (A and B) share a real redis-server; the model
is a scripted tiny GGUF that says "Looping forever forever …" until max_tokens or a
cancel stops it (real llama.cpp inference on the embedded runtime). The chat talks to
A over HTTP (through a real TCP proxy where a test cuts the connection), reads lines
from a pipe and is stopped with real SIGINTs.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgebundle.chat_options import ChatOptions
from edgebundle.chat_session import ChatSession
from edgebundle.terminal_chat import Console
from tests.support.devices import ENDLESS, endless_model, mirrored, sync_devices
from tests.support.processes import free_port
from tests.support.redis_server import RedisServer
from tests.support.serving import RunProcess, healthy_run, wait_for
from tests.support.tcp_proxy import TcpProxy

CONTEXT = 16384  # the scripted tokenizer spells a prompt word in ~10 tokens: room for turns
LONG = 2000  # max_tokens of a reply that is stopped or cut long before it would end
TIMEOUT = 90.0  # generous: CI machines have two cores


class ChatProcess:
    """``python -m edgebundle chat ARGS`` with piped stdin/stdout, read as it streams."""

    def __init__(self, args: list[str], home: Path, env: dict[str, str] | None = None) -> None:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
        environ.update({"EDGEBUNDLE_HOME": str(home), **(env or {})})
        home.mkdir(parents=True, exist_ok=True)
        self.stderr_path = home / "chat.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgebundle", "chat", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=environ,
        )  # fmt: skip
        self._out = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            with self._lock:
                self._out += chunk

    def output(self) -> str:
        with self._lock:
            return self._out.decode("utf-8", errors="replace")

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def wait_output(self, predicate: Callable[[str], Any], timeout: float = TIMEOUT) -> Any:
        """The first truthy ``predicate(output)``; fails with what was printed if none."""
        deadline = time.monotonic() + timeout
        while True:
            found = predicate(self.output())
            if found:
                return found
            if time.monotonic() > deadline or self.proc.poll() is not None:
                found = predicate(self.output())
                assert found, (f"chat output never matched (exit {self.proc.poll()}):\n"
                               f"{self.output()[-3000:]}\nstderr:\n{self.stderr()}")
                return found
            time.sleep(0.01)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def end_input(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()
        self._stderr.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return endless_model(tmp_path_factory.mktemp("models"), CONTEXT)


@pytest.fixture(scope="module")
def devices(redis: RedisServer, model: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunProcess, RunProcess]]:
    homes = [tmp_path_factory.mktemp(name) for name in ("devA", "devB")]
    with sync_devices(redis.url, model, homes, ids=("devA", "devB"),
                      extra_args=("--ctx-size", str(CONTEXT))) as (a, b):
        yield a.run, b.run


@pytest.fixture
def chats(tmp_path: Path) -> Iterator[Callable[..., ChatProcess]]:
    started: list[ChatProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ChatProcess:
        chat = ChatProcess(list(args), tmp_path / f"chat{len(started)}", env)
        started.append(chat)
        return chat

    yield start
    for chat in started:
        chat.close()


def thread_of(chat: ChatProcess) -> str:
    return str(chat.wait_output(lambda out: re.search(r"^thread (\S+) on ", out, re.M))[1])


def reply_line(label: str, nth: int = 1) -> Callable[[str], str | None]:
    """A predicate: the text of the ``nth`` finished ``<label>: …`` line of the output."""
    def find(out: str) -> str | None:
        lines = re.findall(rf"^{re.escape(label)}: (.*)\n", out, re.M)
        return lines[nth - 1] if len(lines) >= nth else None
    return find


def partial_reply(nth: int = 1, label: str = "assistant") -> Callable[[str], bool]:
    """A predicate: the ``nth`` reply line has begun to stream and has not ended yet."""
    start = re.escape(f"{label}: ")
    def find(out: str) -> bool:
        streaming = re.search(rf"^{start}{ENDLESS} forever[^\n]*\Z", out, re.M)
        return bool(streaming) and len(re.findall(f"^{start}", out, re.M)) == nth
    return find


def stored(device: RunProcess, thread: str) -> list[dict[str, Any]]:
    state = httpx.get(f"{device.base_url}/v1/threads/{thread}", timeout=30).json()
    return sorted(state["messages"], key=lambda m: m["position"])


def test_a_reply_streams_as_stored_and_joining_again_shows_the_history(
    devices: tuple[RunProcess, RunProcess], chats: Callable[..., ChatProcess],
) -> None:
    a, _ = devices
    chat = chats("--server", a.base_url, "--max-tokens", "6", "--device-id", "laptop")
    thread = thread_of(chat)
    hint = (f"continue it on another device: edgebundle chat --server {a.base_url} "
            f"--thread {thread}\n")
    chat.wait_output(lambda out: hint in out)  # printed after the thread line
    chat.send("hello there")
    shown = chat.wait_output(reply_line("assistant"))
    chat.end_input()  # Ctrl-D at the prompt
    assert chat.wait() == 0, chat.stderr()
    assert shown == "Looping forever forever forever forever forever"
    messages = stored(a, thread)
    assert [(m["role"], m["content"], m["status"]) for m in messages] == [
        ("user", "hello there", "completed"), ("assistant", shown, "completed")]
    assert "hello there" not in chat.output()  # the user typed it: not printed again

    again = chats("--server", a.base_url, "--thread", thread)
    again.end_input()
    assert again.wait() == 0, again.stderr()
    assert again.output() == (f"thread {thread} on {a.base_url} (this device: "
                              f"{again_device(again)})\n"
                              f"user: hello there\nassistant: {shown}\n")


def again_device(chat: ChatProcess) -> str:
    """The device id a chat made for itself (kept in its state dir)."""
    found = re.search(r"\(this device: (chat-[0-9a-f]{12})\)", chat.output())
    assert found, chat.output()
    return found[1]


def test_a_turn_made_on_device_b_shows_up_while_the_chat_waits(
    devices: tuple[RunProcess, RunProcess], chats: Callable[..., ChatProcess],
) -> None:
    a, b = devices
    chat = chats("--server", a.base_url)
    thread = thread_of(chat)
    finished: list[httpx.Response] = []
    turn = threading.Thread(target=lambda: finished.append(httpx.post(
        f"{b.base_url}/v1/threads/{thread}/runs", timeout=TIMEOUT, json={
            "device_id": "devB", "input": {"content": "asked on B"}, "stream": False,
            "params": {"max_tokens": LONG}})))
    turn.start()
    try:  # B's reply streams into the chat while B generates it ...
        chat.wait_output(partial_reply(label="[devB] assistant"))
        run = httpx.get(f"{b.base_url}/v1/threads/{thread}", timeout=30).json()["active_run"]
        assert run is not None and run["device_id"] == "devB"
    finally:  # ... until B stops it
        stop = httpx.post(f"{b.base_url}/v1/threads/{thread}/runs/{run['id']}/cancel",
                          json={"device_id": "devB"}, timeout=30)
        turn.join(TIMEOUT)
    assert stop.status_code == 200 and finished[0].json()["status"] == "cancelled"
    shown = chat.wait_output(reply_line("[devB] assistant"))
    user_line = "[devB] user: asked on B\n"
    assert user_line in chat.output()
    assert chat.output().index(user_line) < chat.output().index("[devB] assistant: ")
    [question, answer] = stored(a, thread)
    assert (question["content"], answer["content"]) == ("asked on B", shown)
    assert shown.startswith(ENDLESS) and answer["status"] == "incomplete"
    wait_for(lambda: "the reply was stopped on another device" in chat.stderr())

    chat.interrupt()  # Ctrl-C at the prompt
    assert chat.wait() == 0, chat.stderr()
    assert chat.output().count("[devB]") == 2  # each line once


def test_a_cut_connection_mid_reply_is_rejoined_and_no_text_is_repeated(
    devices: tuple[RunProcess, RunProcess], chats: Callable[..., ChatProcess],
) -> None:
    a, _ = devices
    proxy = TcpProxy(a.port).start()
    try:
        chat = chats("--server", proxy.url, "--max-tokens", str(LONG))
        thread = thread_of(chat)
        chat.send("keep talking")
        chat.wait_output(partial_reply())
        assert proxy.cut(hold=True) >= 2  # the reply's stream and the watch
        run = httpx.get(f"{a.base_url}/v1/threads/{thread}", timeout=30).json()["active_run"]
        assert run is not None, "the reply ended before the cut: nothing was rejoined"
        wait_for(lambda: "reconnecting" in chat.stderr(), timeout=TIMEOUT)
        time.sleep(0.5)  # the run goes on generating while the chat cannot reach it
        proxy.resume()
        shown = chat.wait_output(reply_line("assistant"))
        chat.end_input()
        assert chat.wait() == 0, chat.stderr()
    finally:
        proxy.stop()
    [_, answer] = stored(a, thread)
    assert answer["status"] == "completed" and answer["run_id"] == run["id"]
    assert shown == answer["content"]  # everything, exactly once
    assert len(shown.split()) == LONG  # one word a token
    rejoins = [r for r in proxy.requests
               if r.startswith(f"GET /v1/threads/{thread}/runs/{run['id']}/events".encode())]
    assert rejoins and all(b"\r\nlast-event-id: " in r.lower() for r in rejoins)
    assert "reconnected to" in chat.stderr()


def test_a_turn_whose_answer_is_lost_is_sent_again_and_runs_once(
    devices: tuple[RunProcess, RunProcess], chats: Callable[..., ChatProcess],
) -> None:
    a, _ = devices
    proxy = TcpProxy(a.port).start()
    try:
        chat = chats("--server", proxy.url, "--max-tokens", "6")
        thread = thread_of(chat)
        turn_post = f"POST /v1/threads/{thread}/runs ".encode()
        proxy.lose_answer(turn_post)  # the gateway starts the run; the chat hears nothing
        chat.send("only once")
        shown = chat.wait_output(reply_line("assistant"))
        chat.end_input()
        assert chat.wait() == 0, chat.stderr()
    finally:
        proxy.stop()
    assert [r.startswith(turn_post) for r in proxy.requests].count(True) == 2  # one retry
    [question, answer] = stored(a, thread)  # the retry got the run the first one started
    assert (question["content"], answer["content"]) == ("only once", shown)
    assert shown == "Looping forever forever forever forever forever"
    run = httpx.get(f"{a.base_url}/v1/threads/{thread}/runs/{answer['run_id']}",
                    timeout=30).json()
    assert run["input_message_id"] == question["id"]
    assert chat.output().count("assistant: ") == 1  # printed once
    assert "reconnecting" in chat.stderr() and "Traceback" not in chat.stderr()


def test_a_turn_refused_for_another_epoch_syncs_in_full_and_is_sent_again(
    devices: tuple[RunProcess, RunProcess],
) -> None:
    """In process, on real gateway A: the chat's copy is at an epoch the gateway no longer
    has (as for a moment after its device switched between the central Redis and its
    local store), so the turn's POST answers 409 epoch_mismatch."""
    a, _ = devices
    out, err = io.StringIO(), io.StringIO()

    async def chat_with_a_stale_copy() -> str:
        options = ChatOptions(server=a.base_url, device_id="laptop", max_tokens=2)
        with open(os.devnull) as nothing:
            console = Console(nothing.fileno(), out, err)
            async with httpx.AsyncClient(base_url=a.base_url, timeout=TIMEOUT) as http:
                session = ChatSession(options, console, http)
                await session.join()
                session.thread.epoch = "an-epoch-of-another-store"
                await session._turn("after the switch")
                return session.thread.thread_id

    thread = asyncio.run(chat_with_a_stale_copy())
    assert out.getvalue().endswith("assistant: Looping forever\n") and err.getvalue() == ""
    assert [(m["role"], m["content"]) for m in stored(a, thread)] == [
        ("user", "after the switch"), ("assistant", "Looping forever")]


def test_ctrl_c_mid_reply_keeps_exactly_the_text_shown_and_the_chat_goes_on(
    devices: tuple[RunProcess, RunProcess], chats: Callable[..., ChatProcess],
) -> None:
    a, _ = devices
    chat = chats("--server", a.base_url, "--max-tokens", str(LONG))
    thread = thread_of(chat)
    for turn in (1, 2):  # the second proves the chat is still usable after a stop
        chat.send(f"question {turn}")
        chat.wait_output(partial_reply(turn))
        chat.interrupt()
        shown = chat.wait_output(reply_line("assistant", turn))
        count = 2 * turn
        wait_for(lambda: len(stored(a, thread)) == count  # noqa: B023 (used at once)
                 and stored(a, thread)[-1]["status"] != "in_progress", timeout=TIMEOUT)
        messages = stored(a, thread)
        answer = messages[-1]
        assert (answer["role"], answer["status"]) == ("assistant", "incomplete")
        assert answer["content"] == shown  # exactly what was printed, not a word more
        assert shown.startswith(ENDLESS) and len(shown.split()) < LONG
        run = httpx.get(f"{a.base_url}/v1/threads/{thread}/runs/{answer['run_id']}",
                        timeout=30).json()
        assert (run["status"], run["reason"]) == ("cancelled", "cancelled")
    assert chat.proc.poll() is None  # Ctrl-C stopped the reply, not the chat
    chat.interrupt()  # at the prompt: the chat ends
    assert chat.wait() == 0, chat.stderr()
    assert "Traceback" not in chat.stderr()


def test_an_unreachable_gateway_is_one_line_and_exit_1(
    chats: Callable[..., ChatProcess],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    chat = chats("--server", url)
    assert chat.wait() == 1
    [line] = chat.stderr().splitlines()
    assert line.startswith(f"edgebundle: error: cannot reach the gateway at {url} (")
    assert line.endswith("): start it with `edgebundle run`, or pass --server URL")
    assert chat.output() == ""


def test_with_an_api_key_the_chat_sends_it_and_never_shows_it(
    redis: RedisServer, model: Path, chats: Callable[..., ChatProcess], tmp_path: Path,
) -> None:
    key = "s3cret-k3y"
    args = ["--runtime", "embedded", "--no-preflight", "--model", str(model),
            "--redis-url", redis.url]
    with healthy_run(args, home=tmp_path / "gw", env={"EDGEBUNDLE_API_KEY": key}) as gateway:
        refused = chats("--server", gateway.base_url)
        assert refused.wait() == 1
        assert refused.stderr() == (f"edgebundle: error: the gateway at {gateway.base_url} "
                                    "needs an API key: set EDGEBUNDLE_API_KEY (or api_key "
                                    "in config.toml) to its key\n")
        allowed = chats("--server", gateway.base_url, "--max-tokens", "2",
                        env={"EDGEBUNDLE_API_KEY": key})
        allowed.send("hi")
        assert allowed.wait_output(reply_line("assistant")) == "Looping forever"
        allowed.end_input()
        assert allowed.wait() == 0, allowed.stderr()
        assert key not in allowed.output() + allowed.stderr()


def test_the_chat_notes_when_its_device_goes_offline_and_when_it_is_back(
    model: Path, chats: Callable[..., ChatProcess], tmp_path: Path,
) -> None:
    # The device reaches its central Redis through a proxy the test cuts (the partition).
    central = RedisServer(tmp_path / "central", aof=True).start()
    proxy = TcpProxy(central.port).start()
    try:
        with sync_devices([central.url.replace(f":{central.port}/", f":{proxy.port}/")],
                          model, [tmp_path / "C"], ids=("devC",),
                          extra_args=("--offline-after", "1")) as [c]:
            chat = chats("--server", c.run.base_url, "--max-tokens", "2")
            thread = thread_of(chat)
            wait_for(lambda: mirrored(c, central, thread), timeout=TIMEOUT)
            proxy.cut(hold=True)
            wait_for(lambda: "edgebundle: offline, 0 pending: " in chat.stderr(),
                     timeout=TIMEOUT)
            chat.send("anyone?")  # answered by the device's own model, from its copy
            assert chat.wait_output(reply_line("assistant")) == "Looping forever"
            proxy.resume()
            wait_for(lambda: "edgebundle: back online" in chat.stderr(), timeout=TIMEOUT)
            chat.end_input()
            assert chat.wait() == 0, chat.stderr()
            link_notes = [line.split(":")[1] for line in chat.stderr().splitlines()
                          if line.startswith(("edgebundle: offline", "edgebundle: back"))]
            assert link_notes == [" offline, 0 pending", " back online"], chat.stderr()
            assert "Traceback" not in chat.stderr()
            assert [m["content"] for m in stored(c.run, thread)] == ["anyone?",
                                                                     "Looping forever"]
    finally:
        proxy.stop()
        central.stop()
