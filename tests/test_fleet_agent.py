"""The device agent against a real redis-server, real files and real agent processes.

The test plays the controller: it writes DesiredState JSON to a device's ``desired``
key and publishes its nudge, exactly as the controller does. Models are scripted tiny
GGUF files (edgebundle.demo_model), served over HTTP by the release server or named by
file:// and bundle: URLs; doctor's real checks run on what the agent placed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as redis_sync

from edgebundle import keys
from edgebundle.bundle import build_bundle
from edgebundle.config import Settings
from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.errors import ConfigError, StateError
from edgebundle.fleet import acl
from edgebundle.fleet.agent import Agent
from edgebundle.fleet.credentials import with_credentials
from edgebundle.fleet.documents import HEARTBEAT_TTL, ActualState, DesiredState, Heartbeat, Revision
from edgebundle.fleet.manifest import RevisionSpec
from edgebundle.host import detect
from edgebundle.pins import load_app_pins, load_runtime_lock
from edgebundle.resources import app_pins_file, runtime_lock_file
from edgebundle.sync.client import connect
from tests.support.fleet import FLEET, AgentProcess
from tests.support.processes import free_port, gone
from tests.support.redis_server import RedisServer
from tests.support.release_server import (
    ReleaseServer,
    make_runtime_archive,
    publish_release,
    sha256,
)
from tests.support.serving import LoopThread, wait_for

EDGECHAT_SHA256 = load_app_pins(app_pins_file()).app("edgechat").sha256  # the shipped guest
DEADLINE = 60.0  # generous: two cores shared with other test runs


def scripted_model(directory: Path, reply: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_scripted_model(directory / "m.gguf", ScriptedModelSpec(reply=reply))


def spec_for(url: str, digest: str, redis_url: str, *, prompt: str = "Be brief.") -> RevisionSpec:
    return RevisionSpec.from_json({
        "runtime": {"kind": "embedded"},
        "model": {"name": "shop-model", "url": url, "sha256": digest,
                  "template": "llama-3-chat", "system_prompt": prompt, "ctx_size": 2048},
        "app": {"name": "edgechat", "url": "builtin:edgechat", "sha256": EDGECHAT_SHA256},
        "sync": {"redis_url": redis_url, "session_ttl": 1800, "multitask": "enqueue"}})


def desire(client: redis_sync.Redis, device: str, generation: int, spec: RevisionSpec,
           retries: int = 2) -> DesiredState:
    """What the controller does: write the device's desired state, then nudge it."""
    state = DesiredState(generation=generation, revision=Revision.id_for(spec), spec=spec,
                         written_at=time.time(), retries=retries)
    client.set(keys.desired(device), json.dumps(state.to_json()))
    client.publish(keys.nudge(device), "1")
    return state


def actual(client: redis_sync.Redis, device: str) -> ActualState | None:
    raw = client.get(keys.actual(device))
    return ActualState.from_json(json.loads(raw)) if raw else None


def wait_status(client: redis_sync.Redis, device: str, generation: int,
                status: str) -> ActualState:
    def done() -> bool:
        state = actual(client, device)
        return state is not None and state.generation == generation and state.status == status
    wait_for(done, DEADLINE, interval=0.1)
    state = actual(client, device)
    assert state is not None
    return state


def current_target(home: Path) -> str:
    return os.readlink(home / "fleet" / "current")


def run_once(home: Path, device: str, redis_url: str,
             *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
    env["EDGEBUNDLE_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "edgebundle", "agent", "--device-id", device, "--redis-url",
         redis_url, "--fleet", FLEET, "--once", *extra],
        capture_output=True, text=True, env=env, timeout=120, check=False)


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis_sync.Redis]:
    connection = redis_sync.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.stop()


def test_agent_registers_and_heartbeats_with_a_ttl(
        tmp_path: Path, redis_server: RedisServer, client: redis_sync.Redis,
        agents: list[AgentProcess]) -> None:
    agents.append(AgentProcess(tmp_path / "home", "kiosk-1", redis_server.url,
                               "--label", "ring=canary", "--label", "city=oslo"))
    wait_for(lambda: client.exists(keys.heartbeat("kiosk-1")) == 1, DEADLINE, interval=0.1)

    assert client.smembers(keys.fleet_devices(FLEET)) == {"kiosk-1"}
    info = client.hgetall(keys.device_info("kiosk-1"))
    assert info["fleet"] == FLEET
    assert json.loads(info["labels"]) == {"ring": "canary", "city": "oslo"}
    assert info["agent_version"] and float(info["registered_at"]) > 0
    assert 0 < client.ttl(keys.heartbeat("kiosk-1")) <= HEARTBEAT_TTL
    first = Heartbeat.from_json(json.loads(str(client.get(keys.heartbeat("kiosk-1")))))
    # No desired state yet: the device says it is here and runs nothing.
    wait_for(lambda: actual(client, "kiosk-1") is not None, DEADLINE, interval=0.1)
    idle = actual(client, "kiosk-1")
    assert idle is not None
    assert (idle.generation, idle.revision, idle.status) == (0, None, "pending")

    # It keeps beating: a later heartbeat replaces the first one, TTL renewed.
    def beat_again() -> bool:
        raw = client.get(keys.heartbeat("kiosk-1"))
        return raw is not None and Heartbeat.from_json(json.loads(raw)).at > first.at
    wait_for(beat_again, DEADLINE, interval=0.2)
    assert 0 < client.ttl(keys.heartbeat("kiosk-1")) <= HEARTBEAT_TTL
    assert "redis://127.0.0.1" in agents[0].stderr()


def test_new_generations_are_fetched_verified_switched_and_reported_healthy(
        tmp_path: Path, redis_server: RedisServer, client: redis_sync.Redis,
        release_server: ReleaseServer, agents: list[AgentProcess]) -> None:
    home = tmp_path / "home"
    first_model = scripted_model(release_server.root / "v1", "first model")
    second_model = scripted_model(tmp_path / "local", "second model")
    agents.append(AgentProcess(home, "kiosk-1", redis_server.url))

    spec1 = spec_for(release_server.url("v1/m.gguf"), sha256(first_model), redis_server.url)
    gen1 = desire(client, "kiosk-1", 1, spec1)
    state1 = wait_status(client, "kiosk-1", 1, "healthy")
    assert state1.revision == gen1.revision
    assert state1.doctor_ok is True and state1.doctor_failed == []
    assert state1.attempts == 1 and state1.last_error is None
    assert current_target(home) == f"revisions/{gen1.revision}"
    placed = home / "fleet" / "current" / "model.gguf"
    assert sha256(placed) == sha256(first_model)
    placed_spec = json.loads((home / "fleet" / "current" / "revision.json").read_text())["spec"]
    assert placed_spec == spec1.to_json()
    assert len(release_server.gets("v1/m.gguf")) == 1

    # Generation 2: another model by file://; the heartbeat follows the new revision.
    spec2 = spec_for(second_model.as_uri(), sha256(second_model), redis_server.url)
    gen2 = desire(client, "kiosk-1", 2, spec2)
    state2 = wait_status(client, "kiosk-1", 2, "healthy")
    assert state2.revision == gen2.revision != gen1.revision
    assert state2.doctor_ok is True
    assert state2.running_since > state1.running_since
    assert current_target(home) == f"revisions/{gen2.revision}"
    assert sha256(home / "fleet" / "current" / "model.gguf") == sha256(second_model)
    # The previous revision is kept for a rollback.
    assert (home / "fleet" / "revisions" / gen1.revision / "model.gguf").is_file()

    def heartbeat_on_gen2() -> bool:
        raw = client.get(keys.heartbeat("kiosk-1"))
        return raw is not None and Heartbeat.from_json(json.loads(raw)).generation == 2
    wait_for(heartbeat_on_gen2, DEADLINE, interval=0.2)
    log = agents[0].stderr()
    assert "applying" in log and "healthy" in log

    # Generation 3 changes only the prompt: the verified model bytes are reused, not fetched.
    spec3 = spec_for(release_server.url("v1/m.gguf"), sha256(first_model), redis_server.url,
                     prompt="Be very brief.")
    gen3 = desire(client, "kiosk-1", 3, spec3)
    assert wait_status(client, "kiosk-1", 3, "healthy").revision == gen3.revision
    revisions = home / "fleet" / "revisions"
    assert ((revisions / gen3.revision / "model.gguf").stat().st_ino
            == (revisions / gen1.revision / "model.gguf").stat().st_ino)
    assert len(release_server.gets("v1/m.gguf")) == 1

    # Generation 4 goes back to revision 1 (a rollback): switched back, nothing fetched.
    desire(client, "kiosk-1", 4, spec1)
    assert wait_status(client, "kiosk-1", 4, "healthy").revision == gen1.revision
    assert current_target(home) == f"revisions/{gen1.revision}"
    assert len(release_server.gets("v1/m.gguf")) == 1


def test_wrong_sha256_fails_after_the_retries_and_the_previous_revision_stays(
        tmp_path: Path, redis_server: RedisServer, client: redis_sync.Redis,
        release_server: ReleaseServer) -> None:
    home = tmp_path / "home"
    good = scripted_model(release_server.root / "good", "good model")
    scripted_model(release_server.root / "bad", "other model")  # served; never matches 0…0
    lines: list[str] = []
    agent = Agent(Settings(home=home), redis_server.url, "kiosk-1", FLEET, log=lines.append,
                  backoff=0.05)

    async def scenario() -> None:
        desire(client, "kiosk-1", 1, spec_for(release_server.url("good/m.gguf"), sha256(good),
                                               redis_server.url))
        await agent.step()
        desire(client, "kiosk-1", 2, spec_for(release_server.url("bad/m.gguf"), "0" * 64,
                                               redis_server.url), retries=3)
        await agent.step()
        await agent.close()

    asyncio.run(scenario())
    state = actual(client, "kiosk-1")
    assert state is not None
    assert (state.generation, state.status, state.attempts) == (2, "failed", 3)
    assert state.last_error is not None and "sha256" in state.last_error
    good_rev = Revision.id_for(spec_for(release_server.url("good/m.gguf"), sha256(good),
                                        redis_server.url))
    assert state.revision == good_rev  # still running the previous revision
    assert current_target(home) == f"revisions/{good_rev}"
    assert len(release_server.gets("bad/m.gguf")) == 3  # one download per attempt
    assert sorted(p.name for p in (home / "fleet" / "revisions").iterdir()) == [good_rev]
    assert any("giving up" in line for line in lines)


def test_doctor_failure_puts_the_previous_revision_back(
        tmp_path: Path, redis_server: RedisServer, client: redis_sync.Redis) -> None:
    home = tmp_path / "home"
    good = scripted_model(tmp_path / "good", "good model")
    not_gguf = tmp_path / "bad" / "m.gguf"
    not_gguf.parent.mkdir()
    not_gguf.write_bytes(b"this is not a model" * 100)  # verified bytes, unusable model
    agent = Agent(Settings(home=home), redis_server.url, "kiosk-1", FLEET, backoff=0.05)

    async def scenario() -> None:
        desire(client, "kiosk-1", 1, spec_for(good.as_uri(), sha256(good), redis_server.url))
        await agent.step()
        desire(client, "kiosk-1", 2, spec_for(not_gguf.as_uri(), sha256(not_gguf),
                                               redis_server.url), retries=1)
        await agent.step()
        await agent.close()

    asyncio.run(scenario())
    state = actual(client, "kiosk-1")
    assert state is not None
    assert (state.generation, state.status, state.doctor_ok) == (2, "failed", False)
    assert state.doctor_failed == ["model.file"]
    assert state.last_error is not None and state.last_error.startswith("doctor: model.file")
    good_rev = Revision.id_for(spec_for(good.as_uri(), sha256(good), redis_server.url))
    assert state.revision == good_rev
    assert current_target(home) == f"revisions/{good_rev}"


def test_reports_made_while_redis_is_down_arrive_when_it_is_back(
        tmp_path: Path, redis_server: RedisServer) -> None:
    home = tmp_path / "home"
    model = scripted_model(tmp_path / "m", "offline model")
    spec = spec_for(model.as_uri(), sha256(model), redis_server.url)
    client = redis_sync.Redis.from_url(redis_server.url, decode_responses=True)
    lines: list[str] = []
    agent = Agent(Settings(home=home), redis_server.url, "kiosk-1", FLEET, log=lines.append)

    async def while_down() -> None:
        desired = desire(client, "kiosk-1", 1, spec)
        await agent.step()  # connects, reads generation 1
        await agent.close()
        client.delete(keys.actual("kiosk-1"))
        redis_server.stop()
        await agent.reconcile(DesiredState(generation=2, revision=desired.revision, spec=spec))
        await agent.close()

    asyncio.run(while_down())
    pending = json.loads((home / "fleet" / "pending-report.json").read_text())
    assert (pending["generation"], pending["status"]) == (2, "healthy")
    assert any("unreachable" in line for line in lines)

    redis_server.start()  # same port, empty: the queued report must be re-sent
    restarted = Agent(Settings(home=home), redis_server.url, "kiosk-1", FLEET)  # a new process

    async def when_back() -> None:
        await restarted.step()
        await restarted.close()

    asyncio.run(when_back())
    client = redis_sync.Redis.from_url(redis_server.url, decode_responses=True)
    state = actual(client, "kiosk-1")
    assert state is not None and (state.generation, state.status) == (2, "healthy")
    assert not (home / "fleet" / "pending-report.json").exists()
    client.close()


def test_a_restarted_agent_keeps_its_generation_and_does_not_redo_it(
        tmp_path: Path, redis_server: RedisServer, client: redis_sync.Redis,
        release_server: ReleaseServer) -> None:
    home = tmp_path / "home"
    model = scripted_model(release_server.root / "v1", "kept model")
    desire(client, "kiosk-1", 1, spec_for(release_server.url("v1/m.gguf"), sha256(model),
                                          redis_server.url))
    first = run_once(home, "kiosk-1", redis_server.url)
    assert first.returncode == 0, first.stderr
    assert "applying" in first.stderr
    before = actual(client, "kiosk-1")
    assert before is not None and before.status == "healthy"
    placed = home / "fleet" / "current" / "model.gguf"
    inode = placed.stat().st_ino

    again = run_once(home, "kiosk-1", redis_server.url)
    assert again.returncode == 0, again.stderr
    assert "applying" not in again.stderr
    assert actual(client, "kiosk-1") == before  # not even re-reported
    assert placed.stat().st_ino == inode
    assert len(release_server.gets("v1/m.gguf")) == 1


def test_once_exits_1_when_the_revision_failed(
        tmp_path: Path, redis_server: RedisServer, client: redis_sync.Redis) -> None:
    model = scripted_model(tmp_path / "m", "model")
    desire(client, "kiosk-1", 1, spec_for(model.as_uri(), "f" * 64, redis_server.url), retries=1)
    done = run_once(tmp_path / "home", "kiosk-1", redis_server.url)
    assert done.returncode == 1, done.stderr
    assert "sha256" in done.stderr and "Traceback" not in done.stderr


def test_a_mis_shaped_desired_state_is_a_state_error_and_the_device_keeps_its_revision(
        tmp_path: Path, redis_server: RedisServer, client: redis_sync.Redis) -> None:
    """The controller's document is at fault, not the command line: exit 1 naming the key.
    The agent's loop logs it and waits for a fix, running what it ran, reporting nothing."""
    model = scripted_model(tmp_path / "m", "model")
    home = tmp_path / "home"
    lines: list[str] = []
    agent = Agent(Settings(home=home), redis_server.url, "kiosk-1", FLEET, log=lines.append,
                  poll_interval=0.1)
    good = desire(client, "kiosk-1", 1, spec_for(model.as_uri(), sha256(model), redis_server.url))
    key = keys.desired("kiosk-1")

    async def logged(text: str) -> None:
        while not any(text in line for line in lines):
            await asyncio.sleep(0.05)

    async def scenario() -> ActualState:
        await agent.step()
        healthy = agent.actual
        client.set(key, json.dumps({**good.to_json(), "generation": 2,
                                    "spec": {"model": {"name": "shop-model"}}}))
        with pytest.raises(StateError, match=re.escape(key)) as caught:
            await agent.step()
        assert "spec.model.url" in str(caught.value)
        task = asyncio.create_task(agent.run_forever())
        try:
            await asyncio.wait_for(logged("cannot reconcile"), DEADLINE)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return healthy

    healthy = asyncio.run(scenario())
    assert (healthy.generation, healthy.status) == (1, "healthy")
    assert agent.actual == healthy  # nothing reported about generation 2
    reported = actual(client, "kiosk-1")
    assert reported is not None and (reported.generation, reported.status) == (1, "healthy")
    assert current_target(home) == f"revisions/{good.revision}"
    assert any(key in line for line in lines if "cannot reconcile" in line)
    done = run_once(home, "kiosk-1", redis_server.url)
    assert done.returncode == 1, done.stderr
    assert key in done.stderr and "Traceback" not in done.stderr


def test_three_agent_processes_reconcile_the_same_revision(
        tmp_path: Path, redis_server: RedisServer, client: redis_sync.Redis,
        release_server: ReleaseServer, agents: list[AgentProcess]) -> None:
    model = scripted_model(release_server.root / "v1", "fleet model")
    devices = ("kiosk-1", "kiosk-2", "kiosk-3")
    for device in devices:
        agents.append(AgentProcess(tmp_path / device, device, redis_server.url,
                                   "--label", "ring=everyone"))
    wait_for(lambda: client.scard(keys.fleet_devices(FLEET)) == 3, DEADLINE, interval=0.1)
    spec = spec_for(release_server.url("v1/m.gguf"), sha256(model), redis_server.url)
    revision = Revision.id_for(spec)
    for device in devices:
        desire(client, device, 1, spec)
    states = [wait_status(client, device, 1, "healthy") for device in devices]
    assert all(s.revision == revision and s.doctor_ok for s in states)
    for device in devices:
        assert current_target(tmp_path / device) == f"revisions/{revision}"
    assert len(release_server.gets("v1/m.gguf")) == 3


def test_bundle_urls_are_read_from_the_bundle_dir_and_cannot_leave_it(
        tmp_path: Path, redis_server: RedisServer, client: redis_sync.Redis) -> None:
    bundle = tmp_path / "bundle"
    model = scripted_model(bundle / "models", "air-gapped model")
    home = tmp_path / "home"
    agent = Agent(Settings(home=home), redis_server.url, "kiosk-1", FLEET, bundle_dir=bundle)
    # A "bundle:../" URL is no revision spec (the schema refuses it before any device
    # reads it); a link in the bundle to a file outside is refused by the agent.
    with pytest.raises(ValueError, match="no '..'"):
        spec_for("bundle:../outside.gguf", sha256(model), redis_server.url)
    shutil.copy(model, tmp_path / "outside.gguf")
    (bundle / "models" / "outside.gguf").symlink_to(tmp_path / "outside.gguf")

    async def scenario() -> tuple[ActualState, ActualState]:
        desire(client, "kiosk-1", 1, spec_for("bundle:models/m.gguf", sha256(model),
                                               redis_server.url))
        await agent.step()
        ok = agent.actual
        desire(client, "kiosk-1", 2, spec_for("bundle:models/outside.gguf", sha256(model),
                                               redis_server.url), retries=1)
        await agent.step()
        await agent.close()
        return ok, agent.actual

    ok, escaped = asyncio.run(scenario())
    assert ok.status == "healthy"
    assert sha256(home / "fleet" / "current" / "model.gguf") == sha256(model)
    assert escaped.status == "failed"
    assert escaped.last_error is not None and "inside the bundle" in escaped.last_error


def test_agent_without_a_fleet_is_a_usage_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
    env["EDGEBUNDLE_HOME"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-m", "edgebundle", "agent", "--redis-url",
                           "redis://127.0.0.1:1/0"], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == ("edgebundle: error: no fleet: pass --fleet NAME or set "
                                   "EDGEBUNDLE_FLEET")


def ask(port: int, prompt: str) -> str:
    response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
        "model": "default", "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 16})
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def test_serve_restarts_edgebundle_run_on_the_new_revision(
        tmp_path: Path, redis_server: RedisServer, client: redis_sync.Redis) -> None:
    home = tmp_path / "home"
    first = scripted_model(tmp_path / "one", "first revision speaking")
    second = scripted_model(tmp_path / "two", "second revision speaking")
    port = free_port()
    agent = Agent(Settings(home=home, port=port), redis_server.url, "kiosk-1", FLEET,
                  serve=True)
    loop = LoopThread()
    try:
        desire(client, "kiosk-1", 1, spec_for(first.as_uri(), sha256(first), redis_server.url))
        loop.run(agent.step(), timeout=300)
        assert agent.actual.status == "healthy", agent.actual
        assert agent.child is not None
        first_pid = agent.child.pid
        assert ask(port, "hi") == "first revision speaking"

        desire(client, "kiosk-1", 2, spec_for(second.as_uri(), sha256(second), redis_server.url))
        loop.run(agent.step(), timeout=300)
        assert agent.actual.status == "healthy", agent.actual
        assert agent.child is not None and agent.child.pid != first_pid
        assert gone(first_pid)
        assert ask(port, "hi") == "second revision speaking"
        second_pid = agent.child.pid
        running_since = agent.actual.running_since

        # The same revision again under a new generation: no restart, same clock.
        desire(client, "kiosk-1", 3, spec_for(second.as_uri(), sha256(second), redis_server.url))
        loop.run(agent.step(), timeout=300)
        assert (agent.actual.generation, agent.actual.status) == (3, "healthy")
        assert agent.child is not None and agent.child.pid == second_pid
        assert agent.actual.running_since == running_since

        # The served process dies between switches: the agent starts it again.
        agent.child.kill()
        agent.child.wait()
        loop.run(agent._keep_child_up(), timeout=300)
        assert agent.child is not None and agent.child.pid != second_pid
        assert ask(port, "hi") == "second revision speaking"
        second_pid = agent.child.pid
    finally:
        loop.run(agent.close(), timeout=60)
        loop.close()
    assert gone(second_pid)


def test_an_agent_process_registers_and_reports_again_after_redis_lost_everything(
        tmp_path: Path, redis_server: RedisServer, agents: list[AgentProcess]) -> None:
    model = scripted_model(tmp_path / "m", "durable model")
    client = redis_sync.Redis.from_url(redis_server.url, decode_responses=True)
    agents.append(AgentProcess(tmp_path / "home", "kiosk-1", redis_server.url))
    desire(client, "kiosk-1", 1, spec_for(model.as_uri(), sha256(model), redis_server.url))
    before = wait_status(client, "kiosk-1", 1, "healthy")
    client.close()

    redis_server.stop()  # no persistence: it comes back empty
    time.sleep(1.0)
    redis_server.start()
    client = redis_sync.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        wait_for(lambda: client.sismember(keys.fleet_devices(FLEET), "kiosk-1") == 1,
                 DEADLINE, interval=0.2)
        wait_for(lambda: client.exists(keys.heartbeat("kiosk-1")) == 1, DEADLINE, interval=0.2)
        wait_for(lambda: actual(client, "kiosk-1") is not None, DEADLINE, interval=0.2)
        assert actual(client, "kiosk-1") == before
        assert agents[0].proc.poll() is None, agents[0].stderr()
    finally:
        client.close()


def test_run_on_a_fleet_device_serves_the_revision_the_controller_assigns(
        tmp_path: Path, redis_server: RedisServer, client: redis_sync.Redis) -> None:
    model = scripted_model(tmp_path / "m", "fleet assigned reply")
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'fleet = "{FLEET}"\ndevice_id = "kiosk-1"\n')
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
    env.update(EDGEBUNDLE_HOME=str(home), EDGEBUNDLE_REDIS_URL=redis_server.url)

    refused = subprocess.run([sys.executable, "-m", "edgebundle", "run", "--model", str(model)],
                             capture_output=True, text=True, env=env, timeout=60, check=False)
    assert refused.returncode == 2
    assert "--model: this device is in fleet shops" in refused.stderr

    desire(client, "kiosk-1", 1, spec_for(model.as_uri(), sha256(model), redis_server.url))
    with (tmp_path / "run.stderr").open("wb") as err:
        run = subprocess.Popen([sys.executable, "-m", "edgebundle", "run", "--port", str(port)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                               env=env)
    try:
        state = wait_status(client, "kiosk-1", 1, "healthy")
        assert state.revision == Revision.id_for(spec_for(model.as_uri(), sha256(model),
                                                          redis_server.url))
        assert ask(port, "hi") == "fleet assigned reply"
    finally:
        run.terminate()
        assert run.wait(30) == 0, (tmp_path / "run.stderr").read_text()
    with pytest.raises(httpx.ConnectError):  # the served child stopped with the agent
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_a_builtin_app_of_another_build_fails_and_credentials_come_from_the_device(
        tmp_path: Path, redis_server_with_password: RedisServer) -> None:
    server = redis_server_with_password
    assert server.password is not None
    shared_url = server.url.replace(f":{server.password}@", "")  # manifests carry no password
    model = scripted_model(tmp_path / "m", "model")
    client = redis_sync.Redis.from_url(server.url, decode_responses=True)
    lines: list[str] = []
    agent = Agent(Settings(home=tmp_path / "home"), server.url, "kiosk-1", FLEET,
                  log=lines.append)

    async def scenario() -> tuple[ActualState, ActualState]:
        desire(client, "kiosk-1", 1, spec_for(model.as_uri(), sha256(model), shared_url))
        await agent.step()
        ok = agent.actual
        other_build = spec_for(model.as_uri(), sha256(model), shared_url).to_json()
        other_build["app"]["sha256"] = "e" * 64
        desire(client, "kiosk-1", 2, RevisionSpec.from_json(other_build), retries=1)
        await agent.step()
        await agent.close()
        return ok, agent.actual

    ok, other = asyncio.run(scenario())
    client.close()
    # doctor reached the sync Redis as this device: the password came from --redis-url
    assert (ok.status, ok.doctor_ok, ok.doctor_failed) == ("healthy", True, [])
    assert other.status == "failed"
    assert other.last_error is not None and "upgrade edgebundle" in other.last_error
    assert server.password not in "\n".join(lines)


def test_a_damaged_copy_in_another_revision_is_fetched_again_not_linked(
        tmp_path: Path, redis_server: RedisServer, client: redis_sync.Redis,
        release_server: ReleaseServer) -> None:
    model = scripted_model(release_server.root / "v1", "first model")
    good = sha256(model)
    lines: list[str] = []
    agent = Agent(Settings(home=tmp_path / "home"), redis_server.url, "kiosk-1", FLEET,
                  log=lines.append)
    spec1 = spec_for(release_server.url("v1/m.gguf"), good, redis_server.url)
    spec2 = spec_for(release_server.url("v1/m.gguf"), good, redis_server.url,
                     prompt="Be very brief.")  # same model bytes: a link candidate
    revisions = tmp_path / "home" / "fleet" / "revisions"

    async def scenario() -> ActualState:
        desire(client, "kiosk-1", 1, spec1)
        await agent.step()
        assert agent.actual.status == "healthy"
        placed = revisions / Revision.id_for(spec1) / "model.gguf"
        with placed.open("r+b") as fh:  # bit rot, or a hand that edited it
            fh.seek(-1, os.SEEK_END)
            last = fh.read(1)
            fh.seek(-1, os.SEEK_END)
            fh.write(bytes([last[0] ^ 0xFF]))
        desire(client, "kiosk-1", 2, spec2)
        await agent.step()
        await agent.close()
        return agent.actual

    state = asyncio.run(scenario())
    second = revisions / Revision.id_for(spec2) / "model.gguf"
    assert sha256(second) == good  # verified bytes, fetched again
    assert second.stat().st_ino != (revisions / Revision.id_for(spec1) / "model.gguf").stat(
        ).st_ino
    assert len(release_server.gets("v1/m.gguf")) == 2
    assert state.status == "healthy"
    assert any("fetching the model again" in line for line in lines)


def test_heartbeats_go_on_while_the_served_run_takes_long_to_stop(
        tmp_path: Path, redis_server: RedisServer, client: redis_sync.Redis) -> None:
    """The served `run` of the previous revision needs 4 s to stop after SIGTERM; the
    agent's loop must keep beating meanwhile (0.2 s here), not freeze until it is gone."""
    model = scripted_model(tmp_path / "m", "served model")
    slow = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time\n"
         "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(4), sys.exit(0)))\n"
         "print('ready', flush=True)\nwhile True: time.sleep(1)\n"],
        stdout=subprocess.PIPE, text=True)
    assert slow.stdout is not None and slow.stdout.readline() == "ready\n"
    agent = Agent(Settings(home=tmp_path / "home", port=free_port()), redis_server.url,
                  "kiosk-1", FLEET, serve=True, heartbeat_interval=0.2, poll_interval=0.2,
                  online_doctor=False)
    agent.child = slow  # the run serving the revision before this one
    loop = LoopThread()

    async def start() -> asyncio.Task[None]:
        return asyncio.create_task(agent.run_forever())

    async def stop(task: asyncio.Task[None]) -> None:
        task.cancel()  # as SIGTERM does: run_forever stops its loops and its child
        with contextlib.suppress(asyncio.CancelledError):
            await task

    task = loop.run(start())
    beats: list[float] = []  # when the test saw a new heartbeat
    try:
        wait_for(lambda: client.exists(keys.heartbeat("kiosk-1")) == 1, DEADLINE, interval=0.05)
        desire(client, "kiosk-1", 1, spec_for(model.as_uri(), sha256(model), redis_server.url))
        seen = None
        while slow.poll() is None or len(beats) < 3:  # until the old run is gone, and after
            raw = client.get(keys.heartbeat("kiosk-1"))
            if raw != seen:
                seen = raw
                beats.append(time.monotonic())
            assert time.monotonic() - beats[0] < DEADLINE
            time.sleep(0.02)
        stopped_at = time.monotonic()
        assert slow.returncode == 0  # it stopped by itself: SIGTERM, then its 4 s
    finally:
        loop.run(stop(task))
        loop.close()
        if slow.poll() is None:
            slow.kill()
            slow.wait()
    during = [b for b in beats if b <= stopped_at]
    gaps = [later - earlier for earlier, later in zip(during, during[1:], strict=False)]
    assert len(during) >= 10 and max(gaps) < 1.5, gaps


# --- the device's credentials: logged in as its ACL user, and only on its own Redis -----


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server with an admin password where `fleet provision` makes device users."""
    server = RedisServer(tmp_path_factory.mktemp("redis-acl"), password="admin-s3cret",
                         aclfile=True).start()
    try:
        yield server
    finally:
        server.stop()


async def provision_async(server: RedisServer, device: str) -> acl.DeviceCredentials:
    """`fleet provision` of one device (again: a new password)."""
    admin = await connect(server.url)
    try:
        [credentials] = (await acl.provision(admin, FLEET, [device],
                                             base_url=server.url)).credentials
    finally:
        await admin.aclose()
    return credentials


def provision(server: RedisServer, device: str) -> acl.DeviceCredentials:
    return asyncio.run(provision_async(server, device))


class Listener:
    """A TCP port that records every byte sent to it (a server the manifest names)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self.sock.accept()
                connection.settimeout(0.5)
                with connection, contextlib.suppress(OSError):
                    while data := connection.recv(4096):
                        self.received += data

    def close(self) -> None:
        self.sock.close()


def test_a_provisioned_device_logs_in_where_the_manifest_names_its_redis(
        tmp_path: Path, acl_redis: RedisServer) -> None:
    device = provision(acl_redis, "kiosk-1")
    assert "dev%3Akiosk-1" in device.redis_url
    shared = f"redis://127.0.0.1:{acl_redis.port}/0"  # what a manifest says: no password
    model = scripted_model(tmp_path / "m", "model")
    admin = redis_sync.Redis.from_url(acl_redis.url, decode_responses=True)
    agent = Agent(Settings(home=tmp_path / "home"), device.redis_url, "kiosk-1", FLEET)
    spec = spec_for(model.as_uri(), sha256(model), shared)

    async def scenario() -> ActualState:
        desire(admin, "kiosk-1", 1, spec)
        await agent.step()
        await agent.close()
        return agent.actual

    state = asyncio.run(scenario())
    admin.close()
    # doctor logged in to the sync Redis as the device (before: as "dev%3Akiosk-1", refused)
    assert (state.status, state.doctor_ok, state.doctor_failed) == ("healthy", True, [])
    url = agent.sync_url(spec)
    assert url is not None and "dev%3Akiosk-1" in url and "%25" not in url  # encoded once
    as_device = redis_sync.Redis.from_url(url)
    try:
        assert as_device.ping() is True
    finally:
        as_device.close()


def test_the_password_goes_to_no_other_redis_than_the_provisioned_one(
        tmp_path: Path, acl_redis: RedisServer) -> None:
    device = provision(acl_redis, "kiosk-2")
    elsewhere = Listener()
    model = scripted_model(tmp_path / "m", "model")
    admin = redis_sync.Redis.from_url(acl_redis.url, decode_responses=True)
    agent = Agent(Settings(home=tmp_path / "home"), device.redis_url, "kiosk-2", FLEET,
                  backoff=0.05)

    async def scenario() -> ActualState:
        desire(admin, "kiosk-2", 1, spec_for(model.as_uri(), sha256(model),
                                             f"redis://127.0.0.1:{elsewhere.port}/0"), retries=1)
        await agent.step()
        await agent.close()
        return agent.actual

    try:
        state = asyncio.run(scenario())
        time.sleep(0.3)
    finally:
        elsewhere.close()
        admin.close()
    assert device.password.encode() not in bytes(elsewhere.received)
    assert bytes(elsewhere.received) == b""
    assert state.status == "failed"
    assert state.last_error is not None
    assert "is not the Redis this device was provisioned for" in state.last_error
    assert device.password not in state.last_error
    assert not (tmp_path / "home" / "fleet" / "current").exists()


def test_with_credentials_encodes_once_and_never_downgrades_tls() -> None:
    own = "rediss://dev%3Akiosk-1:p%40ss@central.example:6380/0"
    assert with_credentials("rediss://central.example:6380/2", own) == (
        "rediss://dev%3Akiosk-1:p%40ss@central.example:6380/2")
    assert with_credentials("redis://CENTRAL/1", "redis://u:p@central:6379") == (
        "redis://u:p@CENTRAL/1")
    for elsewhere in ("redis://central.example:6380/0", "rediss://other.example:6380/0",
                      "rediss://central.example:6379/0", "unix:///tmp/redis.sock"):
        with pytest.raises(ConfigError, match="provisioned for") as caught:
            with_credentials(elsewhere, own)
        assert "p%40ss" not in str(caught.value) and "p@ss" not in str(caught.value)
    with pytest.raises(ConfigError, match="without TLS"):
        with_credentials("redis://central.example:6380/0", own)
    assert with_credentials("redis://anywhere:1/0", "redis://central:6379/0") == (
        "redis://anywhere:1/0")  # a device without credentials has nothing to leak


def test_a_refused_login_fails_the_revision_instead_of_reporting_healthy(
        tmp_path: Path, acl_redis: RedisServer) -> None:
    stale = provision(acl_redis, "kiosk-3")
    model = scripted_model(tmp_path / "m", "model")
    admin = redis_sync.Redis.from_url(acl_redis.url, decode_responses=True)
    shared = f"redis://127.0.0.1:{acl_redis.port}/0"
    agent = Agent(Settings(home=tmp_path / "home"), stale.redis_url, "kiosk-3", FLEET,
                  backoff=0.05)

    async def scenario() -> tuple[ActualState, ActualState]:
        desire(admin, "kiosk-3", 1, spec_for(model.as_uri(), sha256(model), shared))
        await agent.step()
        first = agent.actual
        # The operator provisions the device again: its password rotates; the agent's
        # open connection stays logged in, every new login with the old one is refused.
        await provision_async(acl_redis, "kiosk-3")
        desire(admin, "kiosk-3", 2, spec_for(model.as_uri(), sha256(model), shared,
                                             prompt="Be very brief."), retries=1)
        await agent.step()
        await agent.close()
        return first, agent.actual

    first, second = asyncio.run(scenario())
    admin.close()
    assert first.status == "healthy"
    assert (second.generation, second.status) == (2, "failed")
    assert second.last_error is not None
    assert "refused this device's login as dev:kiosk-3" in second.last_error
    assert stale.password not in second.last_error
    assert second.revision == first.revision  # the previous revision keeps running


# --- revisions on WasmEdge: the runtime is installed and switched with the revision ----
#
# The WasmEdge archives are fabricated by tests/support/release_server.py (their
# `wasmedge` is the recorded-output stand-in, a test double at a process boundary) and
# carried in a real offline bundle (edgebundle.bundle.build_bundle), as an air-gapped
# device gets them; the agent installs them with the installer's own code. The revision
# pins each archive's sha256 (spec.runtime.archives, as the release's SHA256SUM says):
# a bundle never vouches for a runtime on its own.

HOST = detect()


def wasmedge_spec(model: Path, redis_url: str, version: str,
                  archives: dict[str, str] | None = None, *, build: str = "b0001",
                  variant: str = "cpu") -> RevisionSpec:
    spec = spec_for(model.as_uri(), sha256(model), redis_url).to_json()
    spec["runtime"] = {"kind": "wasmedge", "wasmedge": version,
                       "plugin": {"name": "wasi_nn-ggml", "build": build, "variant": variant}}
    if archives:
        spec["runtime"]["archives"] = archives
    return RevisionSpec.from_json(spec)


def runtime_bundle(server: ReleaseServer, workdir: Path, dest: Path, version: str, *,
                   reports: str | None = None) -> dict[str, str]:
    """An offline bundle (in ``dest``, replacing what was there) of a fabricated WasmEdge
    ``version`` + cpu plugin, pinned ``unknown`` as the shipped lock is: the bundle records
    the sha256s. ``reports``: the version its `wasmedge --version` prints instead.
    Returns the release's sha256s by file name (what a manifest pins)."""
    release = publish_release(server, workdir, version, known_sha=False)
    if reports is not None:
        liar = make_runtime_archive(workdir / f"liar-{reports}", reports)
        release.runtime.write_bytes(liar.read_bytes())
    shutil.rmtree(dest, ignore_errors=True)
    build_bundle(dest, load_runtime_lock(release.lock), load_app_pins(release.pins),
                 platforms=[(HOST.os, HOST.arch, "cpu")], wheels=False)
    return {path.name: sha256(path) for path in (release.runtime, release.plugin)}


def tamper(bundle: Path, pattern: str, replacement: Path) -> str:
    """Swap a bundled archive as an attacker with the bundle would: its bytes, and its
    sha256 in the bundle's lock copy and bundle.json, so the bundle agrees with itself."""
    archive = next((bundle / "assets").glob(pattern))
    old, new = sha256(archive), sha256(replacement)
    archive.write_bytes(replacement.read_bytes())
    lock = bundle / "plugins" / "wasmedge.lock.toml"
    lock.write_text(lock.read_text().replace(old, new))
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["files"][f"assets/{archive.name}"] = new
    manifest["files"]["plugins/wasmedge.lock.toml"] = sha256(lock)
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    return new


def runtime_link(home: Path) -> str:
    return os.readlink(home / "runtime" / "current")


def test_a_wasmedge_revision_installs_and_switches_its_runtime_and_rolls_back_offline(
        tmp_path: Path, redis_server: RedisServer, client: redis_sync.Redis,
        release_server: ReleaseServer) -> None:
    home, bundle = tmp_path / "home", tmp_path / "bundle"
    model = scripted_model(tmp_path / "m", "wasmedge model")
    pins1 = runtime_bundle(release_server, tmp_path, bundle, "0.14.1")
    fetched = len(release_server.gets())  # the bundle build; the device fetches nothing
    lines: list[str] = []
    agent = Agent(Settings(home=home), redis_server.url, "kiosk-1", FLEET, bundle_dir=bundle,
                  log=lines.append)
    spec1 = wasmedge_spec(model, redis_server.url, "0.14.1", pins1)
    runtimes = home / "runtime"

    async def step(generation: int, spec: RevisionSpec) -> ActualState:
        desire(client, "kiosk-1", generation, spec)
        await agent.step()
        return agent.actual

    async def first() -> ActualState:
        one = await step(1, spec1)
        await agent.close()
        return one

    state1 = asyncio.run(first())
    assert (state1.status, state1.doctor_ok, state1.doctor_failed) == ("healthy", True, [])
    assert state1.runtime == "wasmedge-0.14.1-cpu"
    assert runtime_link(home) == "wasmedge-0.14.1-cpu"
    marker = json.loads((runtimes / "current" / "edgebundle-runtime.json").read_text())
    assert (marker["wasmedge_version"], marker["plugin_build"], marker["variant"]) == (
        "0.14.1", "b0001", "cpu")
    assert (runtimes / "current" / "plugin" / "libwasmedgePluginWasiNN.so").is_file()
    reported = actual(client, "kiosk-1")
    assert reported is not None and reported.runtime == "wasmedge-0.14.1-cpu"
    assert len(release_server.gets()) == fetched
    binary_inode = (runtimes / "wasmedge-0.14.1-cpu" / "bin" / "wasmedge").stat().st_ino

    # A new bundle arrives with WasmEdge 0.14.2; the next revision runs on it.
    spec2 = wasmedge_spec(model, redis_server.url, "0.14.2",
                          runtime_bundle(release_server, tmp_path, bundle, "0.14.2"))
    fetched = len(release_server.gets())

    async def second_and_back() -> tuple[ActualState, ActualState, ActualState]:
        two = await step(2, spec2)
        assert runtime_link(home) == "wasmedge-0.14.2-cpu"
        back = await step(3, spec1)  # a rollback: 0.14.1 is no longer in the bundle
        embedded = await step(4, spec_for(model.as_uri(), sha256(model), redis_server.url))
        await agent.close()
        return two, back, embedded

    state2, state3, state4 = asyncio.run(second_and_back())
    assert (state2.status, state2.doctor_ok, state2.runtime) == (
        "healthy", True, "wasmedge-0.14.2-cpu")
    assert state2.revision == Revision.id_for(spec2)
    assert (state3.status, state3.revision, state3.runtime) == (
        "healthy", Revision.id_for(spec1), "wasmedge-0.14.1-cpu")
    assert (runtimes / "wasmedge-0.14.1-cpu" / "bin" / "wasmedge").stat().st_ino == binary_inode
    assert any("already installed" in line for line in lines)
    # An embedded revision leaves the runtime link as it was.
    assert (state4.status, state4.runtime) == ("healthy", "embedded")
    assert runtime_link(home) == "wasmedge-0.14.1-cpu"
    assert sorted(p.name for p in runtimes.iterdir()) == [
        "current", "wasmedge-0.14.1-cpu", "wasmedge-0.14.2-cpu"]  # no temp dirs left
    assert len(release_server.gets()) == fetched  # everything came from the bundle


def test_a_wasmedge_archive_with_a_wrong_sha256_fails_and_current_stays(
        tmp_path: Path, redis_server: RedisServer, client: redis_sync.Redis,
        release_server: ReleaseServer) -> None:
    home, bundle = tmp_path / "home", tmp_path / "bundle"
    model = scripted_model(tmp_path / "m", "wasmedge model")
    pins1 = runtime_bundle(release_server, tmp_path, bundle, "0.14.1")
    agent = Agent(Settings(home=home), redis_server.url, "kiosk-1", FLEET, bundle_dir=bundle,
                  backoff=0.05)
    spec1 = wasmedge_spec(model, redis_server.url, "0.14.1", pins1)

    async def scenario() -> tuple[ActualState, ActualState]:
        desire(client, "kiosk-1", 1, spec1)
        await agent.step()
        ok = agent.actual
        pins = runtime_bundle(release_server, tmp_path, bundle, "0.15.0")
        archive = next((bundle / "assets").glob("WasmEdge-0.15.0-*.tar.gz"))
        archive.write_bytes(archive.read_bytes() + b"tampered")  # after bundle.json was written
        desire(client, "kiosk-1", 2, wasmedge_spec(model, redis_server.url, "0.15.0", pins),
               retries=2)
        await agent.step()
        await agent.close()
        return ok, agent.actual

    ok, failed = asyncio.run(scenario())
    assert (ok.status, ok.runtime) == ("healthy", "wasmedge-0.14.1-cpu")
    assert (failed.generation, failed.status, failed.attempts) == (2, "failed", 2)
    assert failed.last_error is not None and "sha256 mismatch" in failed.last_error
    assert (failed.revision, failed.runtime) == (Revision.id_for(spec1), "wasmedge-0.14.1-cpu")
    assert current_target(home) == f"revisions/{Revision.id_for(spec1)}"
    assert runtime_link(home) == "wasmedge-0.14.1-cpu"
    assert sorted(p.name for p in (home / "runtime").iterdir()) == [
        "current", "wasmedge-0.14.1-cpu"]


def test_doctor_checks_the_switched_wasmedge_and_a_failure_restores_both_links(
        tmp_path: Path, redis_server: RedisServer, client: redis_sync.Redis,
        release_server: ReleaseServer) -> None:
    home, bundle = tmp_path / "home", tmp_path / "bundle"
    model = scripted_model(tmp_path / "m", "wasmedge model")
    pins1 = runtime_bundle(release_server, tmp_path, bundle, "0.14.1")
    agent = Agent(Settings(home=home), redis_server.url, "kiosk-1", FLEET, bundle_dir=bundle)
    spec1 = wasmedge_spec(model, redis_server.url, "0.14.1", pins1)

    async def scenario() -> ActualState:
        desire(client, "kiosk-1", 1, spec1)
        await agent.step()
        assert agent.actual.status == "healthy", agent.actual
        # Verified bytes, wrong contents: this "0.15.0" release's wasmedge is a 0.14.9.
        pins = runtime_bundle(release_server, tmp_path, bundle, "0.15.0", reports="0.14.9")
        desire(client, "kiosk-1", 2, wasmedge_spec(model, redis_server.url, "0.15.0", pins),
               retries=1)
        await agent.step()
        await agent.close()
        return agent.actual

    failed = asyncio.run(scenario())
    assert (failed.status, failed.doctor_ok, failed.doctor_failed) == (
        "failed", False, ["wasmedge.version"])
    assert failed.last_error is not None
    assert "wasmedge 0.14.9 is installed, the pin is 0.15.0" in failed.last_error
    assert current_target(home) == f"revisions/{Revision.id_for(spec1)}"
    assert runtime_link(home) == "wasmedge-0.14.1-cpu"
    assert failed.runtime == "wasmedge-0.14.1-cpu"


def test_the_shipped_locks_unknown_sha256s_are_refused_without_a_bundle(
        tmp_path: Path, redis_server: RedisServer, client: redis_sync.Redis) -> None:
    home = tmp_path / "home"
    model = scripted_model(tmp_path / "m", "wasmedge model")
    shipped = load_runtime_lock(runtime_lock_file())
    # noavx: a plugin the shipped lock neither pins nor can verify against a SHA256SUM
    # (the cpu one is verifiable, but only online, and there is no internet here).
    assert not shipped.plugin_asset(HOST.os, HOST.arch, "noavx").checkable  # else: no proof
    spec = wasmedge_spec(model, redis_server.url, shipped.wasmedge_version, variant="noavx",
                         build=shipped.plugin_build_for(HOST.os, HOST.arch, "noavx"))
    agent = Agent(Settings(home=home), redis_server.url, "kiosk-1", FLEET)

    async def scenario() -> ActualState:
        desire(client, "kiosk-1", 1, spec, retries=1)
        await agent.step()
        await agent.close()
        return agent.actual

    failed = asyncio.run(scenario())
    assert failed.status == "failed"
    assert failed.last_error is not None and "no published sha256" in failed.last_error
    assert not (home / "runtime" / "current").exists()
    assert not (home / "fleet" / "current").exists()


def test_a_bundle_is_no_trust_root_for_the_runtime_it_carries(
        tmp_path: Path, redis_server: RedisServer, client: redis_sync.Redis,
        release_server: ReleaseServer) -> None:
    """A bundle whose bundle.json and lock copy list a swapped WasmEdge archive with its
    own (matching) sha256 is refused unless the revision pins that sha256."""
    home, bundle = tmp_path / "home", tmp_path / "bundle"
    model = scripted_model(tmp_path / "m", "wasmedge model")
    published = runtime_bundle(release_server, tmp_path, bundle, "0.14.1")
    evil = make_runtime_archive(tmp_path / "evil", "0.14.1")  # another binary, same layout
    swapped = tamper(bundle, "WasmEdge-0.14.1-*.tar.gz", evil)
    runtime_name = next(name for name in published if not name.startswith("WasmEdge-plugin"))
    agent = Agent(Settings(home=home), redis_server.url, "kiosk-1", FLEET, bundle_dir=bundle,
                  backoff=0.05)
    unpinned = wasmedge_spec(model, redis_server.url, "0.14.1")
    pinned = wasmedge_spec(model, redis_server.url, "0.14.1", published)
    pinned_swap = wasmedge_spec(model, redis_server.url, "0.14.1",
                                {**published, runtime_name: swapped})

    async def step(generation: int, spec: RevisionSpec) -> ActualState:
        desire(client, "kiosk-1", generation, spec, retries=1)
        await agent.step()
        return agent.actual

    async def scenario() -> tuple[ActualState, ActualState, ActualState]:
        alone, wrong = await step(1, unpinned), await step(2, pinned)
        assert not (home / "runtime").exists() or not any((home / "runtime").iterdir())
        operator = await step(3, pinned_swap)  # the operator pinned exactly these bytes
        await agent.close()
        return alone, wrong, operator

    alone, wrong, operator = asyncio.run(scenario())
    assert alone.status == "failed" and alone.last_error is not None
    assert "vouched for only by the bundle" in alone.last_error
    assert "spec.runtime.archives" in alone.last_error
    assert wrong.status == "failed" and wrong.last_error is not None
    assert "sha256 mismatch" in wrong.last_error and published[runtime_name] in wrong.last_error
    assert (operator.status, operator.runtime) == ("healthy", "wasmedge-0.14.1-cpu")
    assert sha256(evil) == swapped
