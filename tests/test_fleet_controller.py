"""The rollout controller against a real redis-server, with simulated agents in-process.

The agents here write exactly the documents a real agent writes (registration,
heartbeat, ActualState from edgebundle.fleet.documents) and the controller is driven one
pass at a time with an explicit clock (``tick(now=…)``), so every rule (phases,
``after``, health window, thresholds, deadline, offline, pins, budget) is checked
deterministically. Heartbeats are real TTL keys; "offline" deletes the key, which is
what its expiry does.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from edgebundle import keys
from edgebundle.cli import cli
from edgebundle.fleet import controller, operator
from edgebundle.fleet.controller import Controller
from edgebundle.fleet.documents import HEARTBEAT_TTL, ActualState, DesiredState, Heartbeat, dumps
from edgebundle.fleet.manifest import Manifest
from edgebundle.sync.client import Client, connect
from tests.support.redis_server import RedisServer

FLEET = "shops"
T0 = 1_000_000.0
CANARY_PHASES: list[dict[str, Any]] = [{"group": "canary"}, {"percent": 50, "after": "30s"},
                 {"percent": 100, "after": "30s"}]
IDS = ["c1"] + [f"d{n:02d}" for n in range(1, 10)]  # c1 sorts first: 50% = c1, d01..d04


def manifest(model: str, **changes: Any) -> Manifest:
    """The fleet's manifest (:func:`manifest_data`), validated as ``fleet apply`` does."""
    return Manifest.model_validate(manifest_data(model, **changes))


def manifest_data(model: str, *, phases: list[dict[str, Any]] | None = None,
                  devices: dict[str, Any] | None = None, fleet: str = FLEET,
                  **rollout: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"phases": phases or [{"percent": 100}],
                                "max_unavailable": "100%",
                                "health": {"window": "20s", "failure_threshold": 0},
                                "offline": "wait", "on_failure": "rollback"}
    settings.update(rollout)
    return {"apiVersion": "edgebundle/v1", "kind": "Fleet", "metadata": {"name": fleet},
            "spec": {"runtime": {"kind": "embedded"},
                     "model": {"name": model, "url": f"file:///models/{model}.gguf",
                               "sha256": "0" * 64, "template": "llama-3-chat",
                               "ctx_size": 4096},
                     "sync": {"redis_url": "redis://127.0.0.1:6379/0"},
                     "groups": [{"name": "canary", "selector": {"ring": "canary"}},
                                {"name": "everyone", "selector": {}}],
                     "rollout": settings, "devices": devices or {}}}


class Agent:
    """A simulated device agent: the documents of edgebundle.fleet.documents, written directly."""

    def __init__(self, redis: Client, device_id: str, labels: dict[str, str],
                 fleet: str = FLEET) -> None:
        self.redis, self.id, self.labels, self.fleet = redis, device_id, labels, fleet

    async def register(self) -> None:
        await self.redis.hset(keys.device_info(self.id), mapping={
            "fleet": self.fleet, "labels": json.dumps(self.labels), "agent_version": "test",
            "registered_at": str(T0)})
        await self.redis.sadd(keys.fleet_devices(self.fleet), self.id)
        await self.beat()

    async def beat(self) -> None:
        await self.redis.set(keys.heartbeat(self.id), dumps(Heartbeat(at=T0).to_json()),
                             ex=HEARTBEAT_TTL)

    async def go_offline(self) -> None:
        await self.redis.delete(keys.heartbeat(self.id))

    async def desired(self) -> DesiredState | None:
        raw = await self.redis.get(keys.desired(self.id))
        return DesiredState.from_json(json.loads(raw)) if raw else None

    async def report(self, status: str, now: float, error: str | None = None) -> None:
        """Report on the current desired generation as the agent does after applying it."""
        desired = await self.desired()
        assert desired is not None
        await self.redis.set(keys.actual(self.id), dumps(ActualState(
            generation=desired.generation, revision=desired.revision, status=status,
            attempts=1, last_error=error, doctor_ok=status == "healthy",
            doctor_failed=[] if status == "healthy" else ["model.file"],
            running_since=now, updated_at=now).to_json()))

    async def converge(self, now: float) -> bool:
        """Apply the desired revision if not done yet; True when it did something."""
        desired = await self.desired()
        raw = await self.redis.get(keys.actual(self.id))
        actual = ActualState.from_json(json.loads(raw)) if raw else ActualState()
        if desired is None or actual.generation == desired.generation:
            return False
        await self.report("healthy", now)
        return True


@asynccontextmanager
async def fleet_of(server: RedisServer, ids: Iterable[str] = IDS
                   ) -> AsyncIterator[tuple[Client, dict[str, Agent]]]:
    redis = await connect(server.url)
    try:
        agents = {device: Agent(redis, device, {"ring": "canary" if device.startswith("c")
                                                else "main", "site": "s1"})
                  for device in ids}
        for agent in agents.values():
            await agent.register()
        yield redis, agents
    finally:
        await redis.aclose()


async def converge_online(agents: dict[str, Agent], now: float) -> None:
    for agent in agents.values():
        if await agent.redis.exists(keys.heartbeat(agent.id)):
            await agent.converge(now)


async def tick(server: RedisServer, now: float) -> controller.TickSummary:
    """One pass by a brand-new controller on a brand-new connection: state only from Redis."""
    redis = await connect(server.url)
    try:
        return await Controller(redis, FLEET).tick(now=now)
    finally:
        await redis.aclose()


async def revisions(agents: dict[str, Agent]) -> dict[str, tuple[str | None, int]]:
    result: dict[str, tuple[str | None, int]] = {}
    for device, agent in agents.items():
        desired = await agent.desired()
        result[device] = (desired.revision, desired.generation) if desired else (None, 0)
    return result


async def rollout_of(redis: Client) -> dict[str, Any]:
    raw = await redis.get(keys.rollout(FLEET))
    assert raw is not None
    return dict(json.loads(raw))


async def settle_on(server: RedisServer, redis: Client, agents: dict[str, Agent], model: str,
                    now: float) -> str:
    """Roll the whole fleet out to a first revision in one phase; its id."""
    applied = await operator.apply(redis, manifest(model, health={"window": 0}), now=now)
    await tick(server, now)
    await converge_online(agents, now)
    summary = await tick(server, now + 1)
    assert summary.status == "complete", summary
    return applied.revision


def test_a_rollout_moves_the_canary_then_half_then_everyone_waiting_for_health_and_after(
        redis_server: RedisServer) -> None:
    async def main() -> None:
        async with fleet_of(redis_server) as (redis, agents):
            rev_a = await settle_on(redis_server, redis, agents, "model-a", T0 - 100)
            applied = await operator.apply(redis, manifest("model-b", phases=CANARY_PHASES,
                                                             retries=4), now=T0)
            rev_b = applied.revision
            assert (applied.changed, applied.previous) == (True, rev_a)

            # phase 0: only the canary group
            assert (await tick(redis_server, T0)).moved == ["c1"]
            assert (await revisions(agents))["c1"] == (rev_b, 2)
            assert (await agents["c1"].desired()).retries == 4  # type: ignore[union-attr]
            assert (await revisions(agents))["d01"] == (rev_a, 1)
            await agents["c1"].converge(T0 + 1)
            # healthy, but not for the whole 20 s window yet: the phase holds
            held = await tick(redis_server, T0 + 15)
            assert (held.phase, held.moved) == (0, [])
            advanced = await tick(redis_server, T0 + 21)
            assert (advanced.phase, advanced.moved) == (1, [])

            # phase 1 (50%: c1, d01..d04) opens 30 s after phase 0 completed
            assert (await tick(redis_server, T0 + 40)).moved == []
            assert (await tick(redis_server, T0 + 52)).moved == ["d01", "d02", "d03", "d04"]
            await converge_online(agents, T0 + 53)
            assert (await tick(redis_server, T0 + 80)).phase == 2
            assert (await tick(redis_server, T0 + 111)).moved == [
                "d05", "d06", "d07", "d08", "d09"]
            await converge_online(agents, T0 + 112)
            assert (await tick(redis_server, T0 + 120)).status == "progressing"
            done = await tick(redis_server, T0 + 140)
            assert done.status == "complete"
            assert await revisions(agents) == {device: (rev_b, 2) for device in IDS}
            assert (await rollout_of(redis))["previous"] == rev_a
            again = await operator.apply(redis, manifest("model-b", phases=CANARY_PHASES,
                                                           retries=4), now=T0 + 200)
            assert not again.changed and "no change" in again.message
    asyncio.run(main())


@pytest.mark.parametrize("on_failure", ["rollback", "freeze"])
def test_a_failing_canary_rolls_the_moved_devices_back_or_freezes_the_fleet(
        redis_server: RedisServer, on_failure: str) -> None:
    async def main() -> None:
        async with fleet_of(redis_server) as (redis, agents):
            rev_a = await settle_on(redis_server, redis, agents, "model-a", T0 - 100)
            rev_b = (await operator.apply(redis, manifest(
                "model-b", phases=CANARY_PHASES, on_failure=on_failure), now=T0)).revision
            assert (await tick(redis_server, T0)).moved == ["c1"]
            await agents["c1"].report("failed", T0 + 1, error="sha256 mismatch")

            summary = await tick(redis_server, T0 + 2)
            rollout = await rollout_of(redis)
            assert "c1" in rollout["message"]
            if on_failure == "rollback":
                assert (summary.status, summary.rolled_back) == ("rolled_back", ["c1"])
                # back to the previous revision, with a new generation the agent will act on
                assert (await revisions(agents))["c1"] == (rev_a, 3)
            else:
                assert (summary.status, summary.rolled_back) == ("frozen", [])
                assert (await revisions(agents))["c1"] == (rev_b, 2)
            # nothing more moves, however much later
            later = await tick(redis_server, T0 + 10_000)
            assert (later.moved, later.rolled_back) == ([], [])
            assert {device: rev for device, (rev, _) in (await revisions(agents)).items()
                    if device != "c1"} == {device: rev_a for device in IDS[1:]}
    asyncio.run(main())


def test_an_offline_device_is_waited_for_not_failed_and_catches_up_when_back(
        redis_server: RedisServer) -> None:
    async def main() -> None:
        async with fleet_of(redis_server) as (redis, agents):
            await settle_on(redis_server, redis, agents, "model-a", T0 - 100)
            await agents["d03"].go_offline()
            rev_b = (await operator.apply(redis, manifest(
                "model-b", progress_deadline="60s"), now=T0)).revision
            moved = (await tick(redis_server, T0)).moved
            assert moved == [device for device in IDS if device != "d03"]
            await converge_online(agents, T0)
            # far past the progress deadline: the offline device is pending, not failed
            waiting = await tick(redis_server, T0 + 500)
            assert waiting.status == "progressing"
            assert waiting.counts == {"healthy": 9, "old": 1}
            assert "1 offline" in waiting.message
            state = {d.device: d for d in (await operator.status(redis, FLEET)).devices}
            assert (state["d03"].online, state["d03"].state) == (False, "old")

            await agents["d03"].beat()
            assert (await tick(redis_server, T0 + 501)).moved == ["d03"]
            await agents["d03"].converge(T0 + 502)
            assert (await tick(redis_server, T0 + 530)).status == "complete"
            assert (await revisions(agents))["d03"] == (rev_b, 2)
    asyncio.run(main())


def test_offline_skip_completes_without_the_offline_device_which_is_moved_when_back(
        redis_server: RedisServer) -> None:
    async def main() -> None:
        async with fleet_of(redis_server) as (redis, agents):
            rev_a = await settle_on(redis_server, redis, agents, "model-a", T0 - 100)
            await agents["d03"].go_offline()
            rev_b = (await operator.apply(redis, manifest("model-b", offline="skip"),
                                            now=T0)).revision
            await tick(redis_server, T0)
            await converge_online(agents, T0)
            assert (await tick(redis_server, T0 + 20)).status == "complete"
            assert (await revisions(agents))["d03"] == (rev_a, 1)
            await agents["d03"].beat()
            straggler = await tick(redis_server, T0 + 60)
            assert (straggler.status, straggler.moved) == ("complete", ["d03"])
            assert (await revisions(agents))["d03"] == (rev_b, 2)
    asyncio.run(main())


def test_pause_stops_every_move_and_resume_continues_with_the_deadline_shifted(
        redis_server: RedisServer) -> None:
    async def main() -> None:
        async with fleet_of(redis_server) as (redis, agents):
            rev_a = await settle_on(redis_server, redis, agents, "model-a", T0 - 100)
            await operator.apply(redis, manifest("model-b", progress_deadline="60s"), now=T0)
            deadline = (await rollout_of(redis))["deadline_at"]
            assert await operator.pause(redis, FLEET, now=T0)
            assert not await operator.pause(redis, FLEET, now=T0 + 1)
            paused = await tick(redis_server, T0 + 5)
            assert (paused.acted, paused.moved) == (False, [])
            assert {rev for rev, _ in (await revisions(agents)).values()} == {rev_a}
            assert (await operator.status(redis, FLEET)).paused

            assert await operator.resume(redis, FLEET, now=T0 + 100)
            assert not await operator.resume(redis, FLEET, now=T0 + 101)
            assert (await rollout_of(redis))["deadline_at"] == deadline + 100
            assert len((await tick(redis_server, T0 + 101)).moved) == len(IDS)
    asyncio.run(main())


def test_a_restarted_controller_continues_and_a_second_controller_does_not_act_meanwhile(
        redis_server: RedisServer) -> None:
    async def main() -> None:
        async with fleet_of(redis_server) as (redis, agents):
            await settle_on(redis_server, redis, agents, "model-a", T0 - 100)
            await operator.apply(redis, manifest("model-b", phases=CANARY_PHASES), now=T0)
            first = Controller(redis, FLEET, token="first", lease_ms=600)
            assert (await first.tick(now=T0)).moved == ["c1"]
            await agents["c1"].converge(T0)

            other = await connect(redis_server.url)
            try:
                second = Controller(other, FLEET, token="second", lease_ms=600)
                blocked = await second.tick(now=T0 + 25)
                assert (blocked.acted, blocked.phase) == (False, None)
                assert (await rollout_of(redis))["phase"] == 0
                # the first controller "dies" (its lease is not renewed): once the lease
                # runs out the second takes over from what Redis says
                await asyncio.sleep(1.0)
                assert (await second.tick(now=T0 + 25)).phase == 1
                assert (await second.tick(now=T0 + 60)).moved == ["d01", "d02", "d03", "d04"]
                late = await first.tick(now=T0 + 61)
                assert not late.acted
            finally:
                await other.aclose()
    asyncio.run(main())


def test_run_controller_loops_hold_the_lease_one_at_a_time(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with fleet_of(redis_server) as (redis, agents):
            await settle_on(redis_server, redis, agents, "model-a", T0 - 100)
            await operator.apply(redis, manifest("model-b", max_unavailable=1))
            acted: dict[str, list[controller.TickSummary]] = {"a": [], "b": []}
            stops = {"a": asyncio.Event(), "b": asyncio.Event()}

            def loop(name: str) -> asyncio.Task[None]:
                return asyncio.create_task(controller.run_controller(
                    redis, FLEET, interval=0.05, lease_ms=5_000, stop=stops[name],
                    on_tick=lambda s: acted[name].append(s) if s.acted else None))

            task_a = loop("a")
            await asyncio.sleep(0.3)
            task_b = loop("b")
            for _ in range(200):  # the fleet converges one device at a time
                await converge_online(agents, 0.0)
                await asyncio.sleep(0.05)
                if (await rollout_of(redis))["status"] == "complete":
                    break
            assert (await rollout_of(redis))["status"] == "complete"
            assert acted["a"] and not acted["b"]
            stops["a"].set()
            await task_a  # releases the lease on the way out
            seen = len(acted["b"])
            for _ in range(100):
                await asyncio.sleep(0.05)
                if len(acted["b"]) > seen:
                    break
            assert len(acted["b"]) > seen
            stops["b"].set()
            await task_b
            assert await redis.get(keys.controller_lock(FLEET)) is None
    asyncio.run(main())


def test_a_pinned_device_stays_and_a_device_override_changes_only_its_spec(
        redis_server: RedisServer) -> None:
    async def main() -> None:
        async with fleet_of(redis_server) as (redis, agents):
            rev_a = await settle_on(redis_server, redis, agents, "model-a", T0 - 100)
            devices = {"d05": {"pin": rev_a}, "d06": {"model": {"ctx_size": 2048}}}
            new = manifest("model-b", devices=devices)
            plan = {change.device: change for change in (await operator.plan(redis, new)).changes}
            assert (plan["d05"].action, plan["d05"].new) == ("none", rev_a)
            assert (plan["d01"].action, plan["d01"].phase) == ("update", 0)
            rev_b = (await operator.apply(redis, new, now=T0)).revision
            assert "d05" not in (await tick(redis_server, T0)).moved
            await converge_online(agents, T0)
            assert (await tick(redis_server, T0 + 20)).status == "complete"
            desired = {device: await agent.desired() for device, agent in agents.items()}
            assert (desired["d05"].revision, desired["d05"].generation) == (rev_a, 1)  # type: ignore[union-attr]
            assert desired["d06"].revision == rev_b  # type: ignore[union-attr]
            assert desired["d06"].spec.model.ctx_size == 2048  # type: ignore[union-attr]
            assert desired["d06"].spec.model.name == "model-b"  # type: ignore[union-attr]
            assert desired["d01"].spec.model.ctx_size == 4096  # type: ignore[union-attr]
    asyncio.run(main())


@pytest.mark.parametrize("on_failure", ["freeze", "rollback"])
def test_the_progress_deadline_fails_a_rollout_stuck_on_online_devices(
        redis_server: RedisServer, on_failure: str) -> None:
    async def main() -> None:
        async with fleet_of(redis_server, ["d01", "d02"]) as (redis, agents):
            rev_a = await settle_on(redis_server, redis, agents, "model-a", T0 - 100)
            await operator.apply(redis, manifest("model-b", progress_deadline="60s",
                                                   on_failure=on_failure), now=T0)
            await tick(redis_server, T0)
            await agents["d01"].converge(T0)  # d02 stays "applying" forever
            assert (await tick(redis_server, T0 + 59)).status == "progressing"
            summary = await tick(redis_server, T0 + 61)
            rollout = await rollout_of(redis)
            assert "progress deadline" in rollout["message"] and "d02" in rollout["message"]
            if on_failure == "freeze":
                assert summary.status == "failed"
            else:
                assert summary.status == "rolled_back"
                assert {rev for rev, _ in (await revisions(agents)).values()} == {rev_a}
    asyncio.run(main())


def test_max_unavailable_bounds_devices_updating_or_failed_at_once(
        redis_server: RedisServer) -> None:
    async def main() -> None:
        async with fleet_of(redis_server) as (redis, agents):
            await settle_on(redis_server, redis, agents, "model-a", T0 - 100)
            await operator.apply(redis, manifest(
                "model-b", max_unavailable=2, health={"window": 0, "failure_threshold": 3}),
                now=T0)
            assert (await tick(redis_server, T0)).moved == ["c1", "d01"]
            assert (await tick(redis_server, T0 + 1)).moved == []  # both still applying
            await agents["c1"].converge(T0 + 2)
            await agents["d01"].report("failed", T0 + 2, error="doctor: model.file")
            # c1 is healthy, d01's failure is tolerated but still takes a slot
            assert (await tick(redis_server, T0 + 3)).moved == ["d02"]
            assert (await tick(redis_server, T0 + 4)).moved == []
    asyncio.run(main())


def test_operator_rollback_moves_every_moved_device_back_and_nothing_moves_after(
        redis_server: RedisServer) -> None:
    async def main() -> None:
        async with fleet_of(redis_server) as (redis, agents):
            rev_a = await settle_on(redis_server, redis, agents, "model-a", T0 - 100)
            await operator.apply(redis, manifest("model-b", max_unavailable=2), now=T0)
            await tick(redis_server, T0)
            summary = await operator.rollback(redis, FLEET, now=T0 + 1)
            assert (summary.status, summary.rolled_back) == ("rolled_back", ["c1", "d01"])
            assert (await revisions(agents))["c1"] == (rev_a, 3)
            assert (await tick(redis_server, T0 + 100)).moved == []
            assert {rev for rev, _ in (await revisions(agents)).values()} == {rev_a}
    asyncio.run(main())


def test_members_that_are_no_device_of_the_fleet_are_ignored_and_reported(
        redis_server: RedisServer) -> None:
    """What a device could once SADD into its fleet's set (ids that break key names,
    ghosts that never registered, another fleet's device) neither fails a pass, nor
    stalls an `offline: wait` phase, nor gets this fleet's revision."""
    async def main() -> None:
        async with fleet_of(redis_server, ["c1", "d01", "d02"]) as (redis, agents):
            neighbour = Agent(redis, "their-kiosk", {"ring": "main"}, fleet="other")
            await neighbour.register()
            await redis.sadd(keys.fleet_devices(FLEET), "bad}id", "bad id", "ghost-1",
                             "their-kiosk")
            await operator.apply(redis, manifest("model-a", health={"window": 0},
                                                   offline="wait"), now=T0)
            first = await tick(redis_server, T0)
            assert first.moved == ["c1", "d01", "d02"]
            assert first.ignored == {
                "bad id": "not a valid device id", "bad}id": "not a valid device id",
                "ghost-1": "never registered: no agent has run as this device",
                "their-kiosk": "registered for fleet other"}
            await converge_online(agents, T0 + 1)
            assert (await tick(redis_server, T0 + 2)).status == "complete"  # no ghost stalls it
            assert await neighbour.desired() is None  # never given this fleet's revision
            assert await redis.get(keys.desired("ghost-1")) is None

            shown = await operator.status(redis, FLEET, now=T0 + 3)
            assert [d.device for d in shown.devices] == ["c1", "d01", "d02"]
            assert shown.ignored == first.ignored
    asyncio.run(main())

    table = CliRunner().invoke(cli, ["fleet", "status", FLEET, "--redis-url", redis_server.url])
    assert table.exit_code == 0, table.output
    assert "ignored: 'bad id' (not a valid device id)" in table.output
    assert "'their-kiosk' (registered for fleet other)" in table.output


def test_one_pass_over_ten_thousand_devices_moves_exactly_the_budget(
        redis_server: RedisServer) -> None:
    async def main() -> None:
        redis = await connect(redis_server.url)
        try:
            ids = [f"dev-{n:05d}" for n in range(10_000)]
            pipe = redis.pipeline(transaction=False)
            for device in ids:
                pipe.hset(keys.device_info(device), mapping={"fleet": FLEET, "labels": "{}"})
                pipe.set(keys.heartbeat(device), "{}", ex=HEARTBEAT_TTL * 20)
            pipe.sadd(keys.fleet_devices(FLEET), *ids)
            await pipe.execute()
            await operator.apply(redis, manifest("model-b", max_unavailable="5%"), now=T0)
            summary = await Controller(redis, FLEET).tick(now=T0)
            assert summary.moved == ids[:500]
            assert summary.counts == {"old": 10_000}
            assert (await Controller(redis, FLEET).tick(now=T0 + 1)).moved == []
        finally:
            await redis.aclose()
    asyncio.run(main())


def test_a_rollout_and_its_rollback_work_the_same_on_a_redis_cluster(
        sync_redis_url: str) -> None:
    async def main() -> None:
        redis = await connect(sync_redis_url)
        fleet = f"cl-{uuid.uuid4().hex[:8]}"  # the Redis is shared by the session
        try:
            agents = [Agent(redis, f"{fleet}-{n}", {"ring": "main"}, fleet) for n in range(6)]
            for agent in agents:
                await agent.register()
            ctl = Controller(redis, fleet, token="only")
            rev_a = (await operator.apply(redis, manifest(
                "model-a", fleet=fleet, health={"window": 0}), now=T0)).revision
            assert len((await ctl.tick(now=T0)).moved) == 6
            for agent in agents:
                await agent.converge(T0)
            assert (await ctl.tick(now=T0 + 1)).status == "complete"
            await operator.apply(redis, manifest("model-b", fleet=fleet, max_unavailable=2),
                                   now=T0 + 2)
            assert len((await ctl.tick(now=T0 + 2)).moved) == 2
            await agents[0].report("failed", T0 + 3, error="doctor failed")
            summary = await ctl.tick(now=T0 + 4)
            assert (summary.status, len(summary.rolled_back)) == ("rolled_back", 2)
            assert {(await agent.desired()).revision for agent in agents} == {rev_a}  # type: ignore[union-attr]
        finally:
            await redis.aclose()
    asyncio.run(main())


def test_cli_status_table_json_apply_plan_pause_and_errors(
        redis_server: RedisServer, tmp_path: Path) -> None:
    async def setup() -> None:
        async with fleet_of(redis_server, ["c1", "d01", "d02"]) as (redis, agents):
            await settle_on(redis_server, redis, agents, "model-a", T0 - 100)
            await operator.apply(redis, manifest("model-b", max_unavailable=1), now=T0)
            await tick(redis_server, T0)
            await agents["c1"].report("failed", T0 + 1, error="sha256 mismatch for model-b")
            await agents["d02"].go_offline()
    asyncio.run(setup())
    runner = CliRunner()
    url = ["--redis-url", redis_server.url]

    table = runner.invoke(cli, ["fleet", "status", FLEET, *url])
    assert table.exit_code == 0, table.output
    lines = {line.split()[0]: line for line in table.output.splitlines()[2:] if line.strip()}
    assert "progressing, phase 0" in table.output.splitlines()[0]
    assert "ring=canary,site=s1" in lines["c1"] and "/2" in lines["c1"]
    assert "failed" in lines["c1"] and "sha256 mismatch for model-b" in lines["c1"]
    assert "healthy" in lines["d01"] and "/1" in lines["d01"]
    assert lines["d02"].split()[5] == "no" and lines["d01"].split()[5] == "yes"

    as_json = runner.invoke(cli, ["fleet", "status", FLEET, "--json", *url])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    devices = {d["device"]: d for d in data["devices"]}
    assert data["rollout"]["status"] == "progressing" and data["paused"] is False
    assert (devices["c1"]["desired_generation"], devices["c1"]["actual_status"],
            devices["c1"]["state"]) == (2, "failed", "failed")
    assert devices["c1"]["last_error"] == "sha256 mismatch for model-b"
    assert (devices["d02"]["online"], devices["d02"]["labels"]) == (False, {"ring": "main",
                                                                          "site": "s1"})
    # the JSON's keys are a contract: the stored rollout document and each device's status
    assert sorted(data) == ["devices", "fleet", "ignored", "paused", "rollout"]
    assert sorted(data["rollout"]) == ["deadline_at", "groups", "message", "phase",
                                       "phase_started_at", "pins", "previous", "revision",
                                       "rollout", "started_at", "status"]
    assert data["rollout"]["rollout"]["health"] == {"window": 20.0, "failure_threshold": 0}
    assert sorted(devices["c1"]) == [
        "actual_generation", "actual_revision", "actual_status", "attempts", "desired_generation",
        "desired_revision", "device", "doctor_failed", "doctor_ok", "labels", "last_error",
        "online", "state"]
    assert operator.DeviceStatus.from_json(devices["c1"]).to_json() == devices["c1"]

    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(manifest_data("model-c")))
    planned = runner.invoke(cli, ["fleet", "plan", str(path), *url, "--json"])
    assert planned.exit_code == 0, planned.output
    assert {c["action"] for c in json.loads(planned.output)["changes"]} == {"update"}
    applied = runner.invoke(cli, ["fleet", "apply", str(path), *url])
    assert applied.exit_code == 0 and "rolling out rev-" in applied.output
    again = runner.invoke(cli, ["fleet", "apply", str(path), *url])
    assert again.exit_code == 0 and "no change" in again.output
    assert "paused" in runner.invoke(cli, ["fleet", "pause", FLEET, *url]).output
    assert "(PAUSED)" in runner.invoke(cli, ["fleet", "status", FLEET, *url]).output
    assert "resumed" in runner.invoke(cli, ["fleet", "resume", FLEET, *url]).output

    missing = runner.invoke(cli, ["fleet", "status", FLEET], env={"EDGEBUNDLE_REDIS_URL": ""})
    assert missing.exit_code == 2
    assert "pass --redis-url or set EDGEBUNDLE_REDIS_URL" in missing.output
    bad = runner.invoke(cli, ["fleet", "apply", str(tmp_path / "nope.yaml"), *url])
    assert bad.exit_code == 2 and "cannot read the manifest" in bad.output


def test_the_controller_command_rolls_out_while_apply_wait_waits_for_complete(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """Real processes: `fleet controller` loops (lease, ticks), `fleet apply --wait` returns
    0 once the simulated agents are healthy; SIGTERM stops the loop and frees the lease."""
    async def register() -> None:
        async with fleet_of(redis_server, ["c1", "d01", "d02"]):
            pass
    asyncio.run(register())
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(manifest_data("model-a", health={"window": 0})))
    url = ["--redis-url", redis_server.url]
    logs = {name: (tmp_path / f"{name}.log").open("w+") for name in ("controller", "apply")}
    ctl = subprocess.Popen([sys.executable, "-m", "edgebundle", "fleet", "controller", FLEET,
                            "--interval", "0.2", *url], stdout=logs["controller"],
                           stderr=subprocess.STDOUT)
    applying = subprocess.Popen([sys.executable, "-m", "edgebundle", "fleet", "apply", str(path),
                                 "--wait", "--timeout", "120", *url], stdout=logs["apply"],
                                stderr=subprocess.STDOUT)
    try:
        async def agents_apply_until_done() -> None:
            redis = await connect(redis_server.url)
            try:
                agents = {d: Agent(redis, d, {}) for d in ("c1", "d01", "d02")}
                while applying.poll() is None:
                    await converge_online(agents, time.time())
                    await asyncio.sleep(0.1)
            finally:
                await redis.aclose()
        asyncio.run(asyncio.wait_for(agents_apply_until_done(), timeout=150))
        logs["apply"].seek(0)
        output = logs["apply"].read()
        assert applying.returncode == 0, output
        assert "rolling out rev-" in output and "complete" in output
    finally:
        for process in (applying, ctl):
            if process.poll() is None:
                process.terminate()
        assert ctl.wait(timeout=30) == 0
        applying.wait(timeout=30)
    logs["controller"].seek(0)
    assert "moved c1, d01, d02" in logs["controller"].read()
    async def lease_gone() -> bool:
        redis = await connect(redis_server.url)
        try:
            return await redis.get(keys.controller_lock(FLEET)) is None
        finally:
            await redis.aclose()
    assert asyncio.run(lease_gone())
