"""A rollout end to end: the controller, three real agent processes and simulated agents.

Real parts: a real redis-server; three `python -m edgebundle agent` children that
fetch real model files (file:// URLs, sha256-verified), switch their revision and run
doctor; manifests validated by the real loader; the real controller's ticks. Five more
devices are simulated in-process with the agent's own report/heartbeat functions
(they report healthy for whatever they are given), so the phases have a crowd to move.

One fleet, three revisions: model A everywhere, then model B (canary first, then
everyone), then a model whose sha256 is wrong: the canary (a real agent) fails it,
the controller rolls the canary back to B and nothing else moves.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

from edgebundle import keys
from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.fleet import controller, operator
from edgebundle.fleet.device import beat, read_desired, register, report
from edgebundle.fleet.documents import ActualState, Heartbeat
from edgebundle.fleet.manifest import Manifest
from edgebundle.fleet.manifest_file import load_manifest
from edgebundle.sync.client import Client, connect
from tests.support.fleet import FLEET, AgentProcess
from tests.support.redis_server import RedisServer

REAL = {"c-real": "canary", "m-real1": "main", "m-real2": "main"}
SIMULATED = [f"sim{i}" for i in range(1, 6)]
DEADLINE = 120.0  # s per rollout; generous: two cores, agents poll every 3 s


def write_manifest(path: Path, model: Path, sha256: str) -> Manifest:
    path.write_text(f"""\
apiVersion: edgebundle/v1
kind: Fleet
metadata: {{name: {FLEET}}}
spec:
  model:
    name: {model.stem}
    url: "file://{model}"
    sha256: {sha256}
    template: llama-3-chat
    ctx_size: 2048
  groups:
    - {{name: canary, selector: {{ring: canary}}}}
  rollout:
    phases: [{{group: canary}}, {{percent: 100}}]
    max_unavailable: "100%"
    health: {{window: 0s, failure_threshold: 0}}
    retries: 1
    on_failure: rollback
""")
    return load_manifest(path)


def model_file(directory: Path, reply: str) -> tuple[Path, str]:
    path = write_scripted_model(directory / f"{reply.lower()}.gguf", ScriptedModelSpec(reply=reply))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


async def simulate(redis: Client, handled: dict[str, int]) -> None:
    """The simulated devices: heartbeat, and report healthy on each new generation."""
    now = time.time()
    for device in SIMULATED:
        desired = await read_desired(redis, device)
        if desired is not None and handled.get(device) != desired.generation:
            handled[device] = desired.generation
            await report(redis, device, ActualState(
                generation=desired.generation, revision=desired.revision, status="healthy",
                attempts=1, doctor_ok=True, running_since=now, updated_at=now))
        await beat(redis, device, Heartbeat(at=now, generation=handled.get(device, 0)))


async def roll_until(redis: Client, handled: dict[str, int], statuses: set[str]) -> str:
    """Tick the controller (and the simulated devices) until the rollout is in ``statuses``."""
    deadline = time.monotonic() + DEADLINE
    while True:
        await simulate(redis, handled)
        await controller.Controller(redis, FLEET).tick()
        rollout = (await operator.status(redis, FLEET)).state
        if rollout is not None and rollout.status in statuses:
            return rollout.status
        assert time.monotonic() < deadline, f"rollout stuck: {rollout}"
        await asyncio.sleep(0.3)


async def desired_revisions(redis: Client) -> dict[str, str | None]:
    result: dict[str, str | None] = {}
    for device in [*REAL, *SIMULATED]:
        desired = await read_desired(redis, device)
        result[device] = desired.revision if desired else None
    return result


async def actual_of(redis: Client, device: str) -> operator.DeviceStatus:
    """The device's row of `fleet status` (its actual_* fields are what it reported)."""
    return next(d for d in (await operator.status(redis, FLEET)).devices if d.device == device)


def test_revisions_roll_through_real_and_simulated_agents_and_a_bad_canary_rolls_back(
    redis_server: RedisServer, tmp_path: Path,
) -> None:
    model_a, sha_a = model_file(tmp_path / "models", "Alpha")
    model_b, sha_b = model_file(tmp_path / "models", "Bravo")
    manifest_a = write_manifest(tmp_path / "a.yaml", model_a, sha_a)
    manifest_b = write_manifest(tmp_path / "b.yaml", model_b, sha_b)
    manifest_bad = write_manifest(tmp_path / "bad.yaml", model_b, "f" * 64)
    agents = [AgentProcess(tmp_path / device, device, redis_server.url, "--label", f"ring={ring}")
              for device, ring in REAL.items()]

    async def scenario() -> None:
        redis = await connect(redis_server.url)
        handled: dict[str, int] = {}
        try:
            for device in SIMULATED:
                await register(redis, device, FLEET, {"ring": "main"})
            while await redis.scard(keys.fleet_devices(FLEET)) < len(REAL) + len(SIMULATED):
                await asyncio.sleep(0.1)  # the real agents registered themselves

            first = await operator.apply(redis, manifest_a, source="a.yaml")
            assert await roll_until(redis, handled, {"complete"}) == "complete"
            assert set((await desired_revisions(redis)).values()) == {first.revision}

            second = await operator.apply(redis, manifest_b, source="b.yaml")
            assert await roll_until(redis, handled, {"complete"}) == "complete"
            assert set((await desired_revisions(redis)).values()) == {second.revision}
            for device in REAL:  # the real agents fetched, verified, switched, passed doctor
                row = await actual_of(redis, device)
                assert (row.actual_revision, row.actual_status, row.doctor_ok) == (
                    second.revision, "healthy", True)

            bad = await operator.apply(redis, manifest_bad, source="bad.yaml")
            assert await roll_until(redis, handled, {"rolled_back", "frozen", "failed"}) \
                == "rolled_back"
            rollout = (await operator.status(redis, FLEET)).state
            assert rollout is not None and "c-real" in rollout.message, rollout
            assert (await desired_revisions(redis)) == dict.fromkeys([*REAL, *SIMULATED],
                                                                      second.revision)
            assert bad.revision != second.revision
            # The canary's own log: it refused the bytes, then went back to B.
            deadline = time.monotonic() + DEADLINE  # the canary is back on B, healthy
            while (await actual_of(redis, "c-real")).actual_status != "healthy":
                assert time.monotonic() < deadline, await actual_of(redis, "c-real")
                await asyncio.sleep(0.3)
            assert (await actual_of(redis, "c-real")).actual_revision == second.revision
        finally:
            await redis.aclose()

    try:
        asyncio.run(scenario())
    finally:
        for agent in agents:
            assert agent.stop() == 0, agent.stderr()
    assert "sha256" in agents[0].stderr(), agents[0].stderr()
    for device in REAL:
        assert (tmp_path / device / "fleet" / "current").resolve().name == \
            load_manifest(tmp_path / "b.yaml").revision_id()
