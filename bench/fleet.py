"""Benchmark: a fleet of 10,000 simulated devices against a redis-server it starts itself.

Prints one JSON object per line (docs/api.md "Benchmarks"):

- ``fleet.heartbeats_per_s``: heartbeats written the way the agent writes them (``SET
  eb:dev:{dev:<id>}:hb <Heartbeat JSON> EX 15``, key names from
  :mod:`edgebundle.keys`, JSON from :mod:`edgebundle.fleet.documents`), from
  ``SIMULATORS`` processes running ``CONNECTIONS`` asyncio tasks in all, a connection
  each, pipelining ``BATCH`` devices per round trip (a few client processes standing in
  for many devices; the rate is that of the whole span, first start to last end). Goal
  >= 20,000.
  Printed too: ``fleet.redis_benchmark_set_per_s`` (``redis-benchmark`` SET of the same
  value size with the same connections and pipeline depth, on the same server in the
  same run) and ``fleet.heartbeat_ratio`` (the first over the second).
- ``fleet.redis_bytes_per_device``: ``INFO memory`` used_memory after writing every
  device's info hash, heartbeat, desired and actual documents at realistic sizes (the
  example manifest's spec) and its id in the fleet set, minus before, per device.
  Goal <= 2048.
- ``fleet.tick_s``: one controller pass (``edgebundle.fleet.controller``) over the
  whole fleet right after a rollout of a new revision was applied (every device online,
  healthy on the previous revision; the pass moves max_unavailable of them).
  ``fleet.tick_again_s``: the pass after it. Goal < 1 s.

The redis-server is a child process on a free port (never daemonized), stopped by its
pid. ``--quick`` writes fewer heartbeat rounds and finishes in well under a minute.

Usage: python bench/fleet.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from edgebundle import keys
from edgebundle.fleet import controller, operator
from edgebundle.fleet.documents import (
    HEARTBEAT_TTL,
    ActualState,
    DesiredState,
    Heartbeat,
    Revision,
    dumps,
)
from edgebundle.fleet.manifest import Manifest, RevisionSpec
from edgebundle.sync.client import Client, connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sync import emit, redis_server  # noqa: E402  (the sibling bench's server and output)

FLEET = "shops"
DEVICES = 10_000
SIMULATORS = 2  # processes simulating devices (client-side work, like separate devices)
CONNECTIONS = 8  # connections in all, one asyncio task each
BATCH = 100  # heartbeats per pipelined round trip
WRITE_BATCH = 500  # devices per pipeline while seeding documents

MANIFEST: dict[str, Any] = {  # manifests/canary-waves.yaml, as the controller reads it
    "apiVersion": "edgebundle/v1", "kind": "Fleet", "metadata": {"name": FLEET},
    "spec": {
        "runtime": {"kind": "wasmedge", "wasmedge": "0.14.1",
                    "plugin": {"name": "wasi_nn-ggml", "build": "b5593", "variant": "cpu"}},
        "model": {"name": "shop-assistant",
                  "url": "https://models.example.com/shop-assistant/v3/"
                         "Llama-3.2-1B-Instruct-Q4_K_M.gguf",
                  "sha256": "0123456789abcdef" * 4, "template": "llama-3-chat",
                  "system_prompt": "You are the shop's assistant. Answer briefly; prices are "
                                   "on the shelf labels.",
                  "ctx_size": 4096},
        "app": {"name": "edgechat", "url": "https://models.example.com/apps/edgechat-0.1.0.wasm",
                "sha256": "f7bcf1f5d62791047082ba3c4f14798fc287ee8f8e32aafbfee37338bc134ee6"},
        "sync": {"redis_url": "rediss://redis.shops.example.com:6380/0", "session_ttl": 1800,
                 "multitask": "enqueue"},
        "groups": [{"name": "canary", "selector": {"ring": "canary"}},
                   {"name": "everyone", "selector": {}}],
        "rollout": {"phases": [{"percent": 100}], "max_unavailable": "25%",
                    "health": {"window": "20s", "failure_threshold": 0}, "retries": 2,
                    "offline": "wait", "on_failure": "rollback", "progress_deadline": "10m"},
    },
}


def device_ids() -> list[str]:
    return [f"kiosk-{n:05d}" for n in range(DEVICES)]


def heartbeat_json(now: float, revision: str) -> str:
    return dumps(Heartbeat(at=now, generation=1, revision=revision, doctor_ok=True).to_json())


def revision_spec(model: dict[str, Any]) -> RevisionSpec:
    spec = MANIFEST["spec"]
    return RevisionSpec.from_json({"runtime": spec["runtime"], "model": model, "app": spec["app"],
                                   "sync": spec["sync"]})


# -- heartbeats --------------------------------------------------------------------------


async def simulate_devices(url: str, names: list[str], connections: int, rounds: int,
                           start: Any) -> tuple[float, float]:
    """Beat every name ``rounds`` times over ``connections`` connections: (began, ended)."""
    value = heartbeat_json(time.time(), "rev-0123456789ab")
    clients = [await connect(url) for _ in range(connections)]

    async def beat(client: Client, share: list[str]) -> None:
        for _ in range(rounds):
            for first in range(0, len(share), BATCH):
                pipe = client.pipeline(transaction=False)
                for name in share[first:first + BATCH]:
                    pipe.set(name, value, ex=HEARTBEAT_TTL)
                await pipe.execute()

    try:
        await asyncio.gather(*(client.ping() for client in clients))  # connected before timing
        start.wait()
        began = time.time()
        await asyncio.gather(*(beat(client, names[i::connections])
                               for i, client in enumerate(clients)))
        return began, time.time()
    finally:
        for client in clients:
            await client.aclose()


def simulator(url: str, names: list[str], connections: int, rounds: int,
              start: Any) -> tuple[float, float]:
    return asyncio.run(simulate_devices(url, names, connections, rounds, start))


def heartbeat_rate(url: str, rounds: int) -> float:
    """Heartbeats per second: every device beats ``rounds`` times, from SIMULATORS
    processes with CONNECTIONS connections in all (the devices are separate clients, so
    the client side is spread like theirs; one Python process alone is its own limit)."""
    names = [keys.heartbeat(device_id) for device_id in device_ids()]  # an agent's, once
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(SIMULATORS, context) as pool:
        start = manager.Event()
        runs = [pool.submit(simulator, url, names[i::SIMULATORS], CONNECTIONS // SIMULATORS,
                            rounds, start) for i in range(SIMULATORS)]
        time.sleep(1.0)  # let every simulator connect (each waits for the start)
        start.set()
        spans = [run.result(timeout=600) for run in runs]
    return len(names) * rounds / (max(end for _, end in spans) - min(b for b, _ in spans))


def redis_benchmark_set(port: int, requests: int, value_size: int) -> float:
    """redis-benchmark SET on random keys, same connections, pipeline depth, value size."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        sys.exit("redis-benchmark is not installed (it comes with redis-server)")
    out = subprocess.run(
        [binary, "-p", str(port), "-n", str(requests), "-c", str(CONNECTIONS), "-P", str(BATCH),
         "-r", str(DEVICES), "--csv",
         "SET", "bench:hb:__rand_int__", "x" * value_size, "EX", str(HEARTBEAT_TTL)],
        capture_output=True, text=True, check=True, timeout=300).stdout
    row = out.strip().splitlines()[-1].split(",")
    return float(row[1].strip('"'))


async def heartbeats(url: str, port: int, rounds: int) -> None:
    rate = heartbeat_rate(url, rounds)
    value_size = len(heartbeat_json(time.time(), "rev-0123456789ab"))
    baseline = redis_benchmark_set(port, DEVICES * rounds, value_size)
    emit("fleet.heartbeats_per_s", rate, "heartbeats/s",
         f"{SIMULATORS} processes, {CONNECTIONS} connections, {BATCH} per pipeline, "
         f"{DEVICES} devices", ">= 20000")
    emit("fleet.redis_benchmark_set_per_s", baseline, "requests/s",
         f"redis-benchmark -c {CONNECTIONS} -P {BATCH} SET ({value_size} B) EX", "")
    emit("fleet.heartbeat_ratio", rate / baseline, "ratio",
         "redis-benchmark SET, same server, connections and pipeline depth, same run", "")


# -- memory per device ---------------------------------------------------------------------


async def seed_devices(client: Client, revision: Revision, now: float) -> None:
    """Every device as a running agent leaves it: registered, beating, healthy on ``revision``."""
    ids = device_ids()
    desired = dumps(DesiredState(generation=1, revision=revision.id, spec=revision.spec,
                                 written_at=now).to_json())
    actual = dumps(ActualState(generation=1, revision=revision.id, status="healthy", attempts=1,
                               doctor_ok=True, running_since=now - 3600,
                               updated_at=now).to_json())
    beat = heartbeat_json(now, revision.id)
    await client.hset(keys.revisions(FLEET), revision.id, dumps(revision.to_json()))
    for start in range(0, len(ids), WRITE_BATCH):
        pipe = client.pipeline(transaction=False)
        for n, device_id in enumerate(ids[start:start + WRITE_BATCH], start):
            ring = "canary" if n % 100 == 0 else "stable"
            pipe.hset(keys.device_info(device_id), mapping={
                "fleet": FLEET, "labels": dumps({"ring": ring, "shop": f"shop-{n // 4:04d}"}),
                "agent_version": "0.1.0", "registered_at": repr(now - 86400)})
            pipe.sadd(keys.fleet_devices(FLEET), device_id)
            pipe.set(keys.heartbeat(device_id), beat, ex=HEARTBEAT_TTL * 20)  # outlives the run
            pipe.set(keys.desired(device_id), desired)
            pipe.set(keys.actual(device_id), actual)
        await pipe.execute()


async def bytes_per_device(client: Client, revision: Revision, now: float) -> None:
    await client.flushall()
    before = int((await client.info("memory"))["used_memory"])
    await seed_devices(client, revision, now)
    after = int((await client.info("memory"))["used_memory"])
    emit("fleet.redis_bytes_per_device", (after - before) / DEVICES, "bytes",
         "INFO memory used_memory before seeding (empty server)", "<= 2048")


# -- one controller pass ----------------------------------------------------------------------


async def controller_tick(client: Client, now: float) -> None:
    manifest = dict(MANIFEST)
    manifest["spec"] = {**MANIFEST["spec"],
                        "model": {**MANIFEST["spec"]["model"], "ctx_size": 8192}}
    await operator.apply(client, Manifest.model_validate(manifest), now=now)

    async def one_pass(at: float) -> float:
        started = time.perf_counter()
        await controller.Controller(client, FLEET).tick(at)
        return time.perf_counter() - started

    first = await one_pass(now + 1)
    moved = sum(1 for raw in await client.mget([keys.desired(d) for d in device_ids()])
                if raw is not None and '"generation":2' in raw)
    emit("fleet.tick_s", first, "s",
         f"one pass over {DEVICES} devices after apply (moved {moved})", "< 1")
    emit("fleet.tick_again_s", await one_pass(now + 2), "s",
         f"the next pass over {DEVICES} devices", "< 1")


async def main(quick: bool) -> None:
    with redis_server() as port:
        url = f"redis://127.0.0.1:{port}/0"
        await heartbeats(url, port, 3 if quick else 10)
        client = await connect(url)
        try:
            now = time.time()
            revision_body = revision_spec(MANIFEST["spec"]["model"])
            revision = Revision(id=Revision.id_for(revision_body), fleet=FLEET,
                                spec=revision_body, created_at=now - 86400,
                                manifest="canary-waves.yaml")
            await bytes_per_device(client, revision, now)
            await controller_tick(client, now)
        finally:
            await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer heartbeat rounds, < 1 min")
    asyncio.run(main(parser.parse_args().quick))
