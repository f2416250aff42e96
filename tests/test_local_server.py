"""The private redis-server of `edgebundle run` (no --redis-url) never keeps a device down.

Real processes only: real `python -m edgebundle run` children on the embedded runtime
(the demo model), real redis-servers, real HTTP; `run` is killed with SIGKILL as the
OOM killer of a small device would. A "leftover" is a redis-server started here with
the exact command line `run` uses (``LocalRedis.command``) but, as an older version
or a host without pdeathsig would leave it, not tied to any `run`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from edgebundle.errors import RedisAccessError
from edgebundle.sync.leftover_server import owner_of
from edgebundle.sync.local_server import LocalRedis, _private
from tests.support.processes import children, exited, free_port
from tests.support.redis_server import RedisServer
from tests.support.serving import RunProcess, wait_for
from tests.support.sync import put, sync_service

ARGS = ["--runtime", "embedded", "--no-preflight"]


def private_pid(run: RunProcess) -> int:
    """The pid of the private redis-server, from the note `run` prints as it starts it."""
    [note] = [line for line in run.stderr().splitlines()
              if "started a private redis-server" in line]
    return int(note.split("(pid ")[1].split(",")[0])


def write_thread(base_url: str) -> None:
    """Thread "kept" with one user message, through the sync API."""
    with httpx.Client(base_url=base_url, timeout=10) as http:
        made = http.post("/v1/threads", json={"id": "kept"})
        assert made.status_code == 201, made.text
        thread = made.json()
        pushed = http.post("/v1/threads/kept/push", json={
            "device_id": "tester", "epoch": thread["epoch"], "since": thread["version"],
            "mutations": [{"mid": 1, "op": "put", "message": {
                "id": "q1", "role": "user", "content": "remember me"}}]})
        assert pushed.status_code == 200, pushed.text


async def write_thread_into(redis_url: str) -> None:
    """Thread "kept" with the same message, written straight into a Redis."""
    async with sync_service(redis_url) as sync:
        thread = await sync.create_thread("kept")
        await sync.push("kept", "tester", thread.epoch, thread.version,
                        [put(1, "q1", "remember me")])


def read_thread(base_url: str) -> list[tuple[str, str, str]]:
    response = httpx.get(f"{base_url}/v1/threads/kept", timeout=10)
    assert response.status_code == 200, response.text
    return [(m["id"], m["role"], m["content"]) for m in response.json()["messages"]]


def leftover(state: Path) -> subprocess.Popen[bytes]:
    """A redis-server on ``state`` started as `run` starts it, listening, pidfile written."""
    binary = shutil.which("redis-server")
    assert binary is not None
    port = free_port()
    server = subprocess.Popen(LocalRedis(state).command(binary, port),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (state / "redis.pid").exists() and listens(port), timeout=10)
    return server


def listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def port_of(server: subprocess.Popen[bytes]) -> int:
    argv = server.args
    assert isinstance(argv, list)
    return int(argv[argv.index("--port") + 1])


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "home" / "state" / "redis"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def left(state: Path) -> Iterator[subprocess.Popen[bytes]]:
    server = leftover(state)
    try:
        yield server
    finally:
        if server.poll() is None:
            server.terminate()
        server.wait(10)


def test_a_sigkilled_run_takes_its_redis_server_along_and_the_next_run_keeps_the_thread(
    state: Path,
) -> None:
    home = state.parents[1]
    run = RunProcess(ARGS, home=home)
    pid = 0
    try:
        run.read_line()
        pid = private_pid(run)
        assert pid in children(run.proc.pid)
        write_thread(run.base_url)
        assert run.stop(signal.SIGKILL) == -signal.SIGKILL
        wait_for(lambda: exited(pid), timeout=5)  # pdeathsig: SIGTERM as its parent died
    finally:
        run.close()
        if pid and not exited(pid) and owner_of(pid, state, None) == "ours":
            os.kill(pid, signal.SIGTERM)  # the test failed: leave no orphan behind
    log = (state / "redis.log").read_text()
    assert "Received SIGTERM" in log and "ready to exit" in log.splitlines()[-1]
    assert not (state / "redis.pid").exists()  # a clean shutdown removes it

    again = RunProcess(ARGS, home=home)
    try:
        again.read_line()
        assert "stopped a redis-server" not in again.stderr()
        assert read_thread(again.base_url) == [("q1", "user", "remember me")]
        assert again.stop() == 0, again.stderr()
    finally:
        again.close()


def test_a_redis_server_left_on_the_state_directory_is_stopped_by_its_pid_writes_kept(
    state: Path, left: subprocess.Popen[bytes],
) -> None:
    """As an older version leaves it: no pdeathsig, no port recorded, only its pidfile."""
    home = state.parents[1]
    # What the older `run` wrote through its gateway before it was killed.
    password = LocalRedis(state).password
    asyncio.run(write_thread_into(f"redis://:{password}@127.0.0.1:{port_of(left)}/0"))
    assert left.poll() is None

    run = RunProcess(ARGS, home=home)
    try:
        run.read_line()
        assert (f"edgebundle: stopped a redis-server (pid {left.pid}) left on {state} by an "
                "earlier `edgebundle run`") in run.stderr().splitlines()
        assert left.wait(5) == 0  # SIGTERM: it fsynced its AOF and exited cleanly
        assert private_pid(run) != left.pid
        assert read_thread(run.base_url) == [("q1", "user", "remember me")]
        assert run.stop() == 0, run.stderr()
    finally:
        run.close()


def test_a_redis_server_that_only_names_the_pidfile_is_left_alone(tmp_path: Path,
                                                                  state: Path) -> None:
    """It serves another directory (another AOF): not ours, so the pidfile is stale."""
    other = RedisServer(tmp_path / "elsewhere", extra=("--pidfile", str(state / "redis.pid")))
    other.start()
    try:
        wait_for(lambda: (state / "redis.pid").exists(), timeout=5)
        assert other.pid is not None and owner_of(other.pid, state, other.port) == "other"
        run = RunProcess(ARGS, home=state.parents[1])
        try:
            run.read_line()
            assert private_pid(run) != other.pid
            assert "stopped a redis-server" not in run.stderr()
            assert run.stop() == 0, run.stderr()
        finally:
            run.close()
        assert other.process is not None and other.process.poll() is None
    finally:
        other.stop()


def test_whose_a_pid_is(tmp_path: Path, state: Path, left: subprocess.Popen[bytes]) -> None:
    """From /proc, and from the server itself (what a host without /proc has)."""
    pid, port, elsewhere = left.pid, port_of(left), tmp_path / "elsewhere"
    assert owner_of(pid, state, None) == "ours"
    assert owner_of(pid, elsewhere, None) == "other"  # a redis-server, but not on our AOF
    assert owner_of(os.getpid(), state, None) == "other"  # not a redis-server
    password = LocalRedis(state).password
    assert owner_of(pid, state, port, procfs=False, password=password) == "ours"
    assert owner_of(pid, state, port, procfs=False) == "unknown"  # it wants its password
    assert owner_of(pid, elsewhere, port, procfs=False, password=password) == "unknown"
    assert owner_of(pid, state, None, procfs=False) == "unknown"  # no port recorded
    assert owner_of(os.getpid(), state, port, procfs=False) == "unknown"  # not who answers
    assert owner_of(pid, state, free_port(), procfs=False) == "unknown"  # nobody answers
    left.terminate()
    wait_for(lambda: exited(pid), timeout=10)
    assert owner_of(pid, state, None) == "gone"  # a zombie: exited, not reaped yet
    left.wait()
    assert owner_of(pid, state, port) == owner_of(pid, state, port, procfs=False) == "gone"


def test_without_proc_a_leftover_is_stopped_only_when_it_answers_as_ours(
    state: Path, left: subprocess.Popen[bytes],
) -> None:
    local = LocalRedis(state, procfs=False)
    with pytest.raises(RedisAccessError) as refused:
        local.start()  # no port recorded (an older version): it cannot be asked
    assert str(refused.value) == (
        f"a process (pid {left.pid}) named in {state / 'redis.pid'} may be a redis-server "
        f"left by an earlier `edgebundle run` on {state}, but it cannot be shown to be one: "
        f"stop it (kill {left.pid}) and start again, or pass --redis-url")
    assert left.poll() is None and local.process is None

    (state / "redis.port").write_text(f"{port_of(left)}\n")  # as `run` records it now
    local.start()
    try:
        assert local.replaced == left.pid and left.wait(5) == 0
        assert local.pid is not None and local.pid != left.pid
        assert (state / "redis.port").read_text() == f"{local.port}\n"
    finally:
        local.stop()
    assert not (state / "redis.port").exists()


def test_the_private_redis_wants_a_password_and_keeps_its_files_to_its_owner(
    state: Path,
) -> None:
    """Issue 12: no password, and an AOF every user of the device could read. A file an
    older version left readable by all is closed at the next start."""
    home = state.parents[1]
    (state / "appendonlydir").mkdir()
    old = state / "appendonlydir" / "left-by-an-older-version"
    old.write_text("")
    old.chmod(0o644)
    run = RunProcess(ARGS, home=home)
    try:
        run.read_line()
        write_thread(run.base_url)
        url = (state / "redis.url").read_text().strip()
        password = (state / "redis.conf").read_text().split("requirepass ")[1].split()[0]
        assert len(password) >= 32 and url.startswith(f"redis://:{password}@127.0.0.1:")
        [note] = [line for line in run.stderr().splitlines()
                  if "started a private redis-server" in line]
        assert password not in run.stderr() and "redis://:***@127.0.0.1:" in note
        assert str(state / "redis.url") in note
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        stranger = redis.Redis(port=port, socket_timeout=5)
        try:
            with pytest.raises(redis.AuthenticationError):
                stranger.get("anything")
        finally:
            stranger.close()
        owner = redis.Redis.from_url(url, socket_timeout=5)
        try:
            assert owner.dbsize() > 0  # the thread is in it
        finally:
            owner.close()
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        files = [path for path in state.rglob("*") if path.is_file()]
        assert {path.name for path in files} >= {"redis.conf", "redis.url", "redis.log",
                                                 "redis.pid", old.name}
        assert any(path.suffix == ".aof" for path in files)
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert run.stop() == 0, run.stderr()
        assert not (state / "redis.url").exists()  # only while it runs
    finally:
        run.close()


def test_making_the_store_private_ignores_files_the_running_server_removes_meanwhile(
        tmp_path: Path) -> None:
    """The running redis-server creates and removes temporary files (an AOF rewrite's)
    while `run` walks its directory to close its files: one gone between the listing
    and its chmod once crashed `run` at start (FileNotFoundError)."""
    store = LocalRedis(tmp_path / "redis")
    store.directory.mkdir(parents=True)
    churn = store.directory / "appendonlydir"
    churn.mkdir()
    stop = threading.Event()

    def rewrite_forever() -> None:  # what the server does with temp-rewriteaof-*.aof
        n = 0
        while not stop.is_set():
            temp = churn / f"temp-rewriteaof-{n}.aof"
            temp.write_bytes(b"*")
            temp.unlink()
            n += 1

    writer = threading.Thread(target=rewrite_forever, daemon=True)
    writer.start()
    try:
        for _ in range(300):
            _private(store.directory)
    finally:
        stop.set()
        writer.join()
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    # Read once, then kept: asking for the URL again does not walk the directory.
    assert store.password == store.password
