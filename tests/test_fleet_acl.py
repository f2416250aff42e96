"""Per-device Redis ACL users on a real redis-server with an admin password and an aclfile.

A device user can do what the agent and the sync core do (its own keys, read the
fleet's state, the sync Redis functions end to end through FCALL, its nudge channel)
and gets NOPERM for everything else: other devices' keys, the fleet's writable state
and its device set (provisioning adds the device, revoking removes it), EVAL, EVALSHA,
SCRIPT and FUNCTION (no busy loop of its own), KEYS, SCAN, FLUSH*, CONFIG, DEBUG, ACL,
PUBLISH, other channels. Re-provisioning rotates the password, revoking deletes the
user, the users survive a restart through the aclfile, and the CLI writes a 0600
credentials file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
from redis.exceptions import NoPermissionError, RedisClusterException, ResponseError

from edgebundle import keys
from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.errors import RedisAccessError, UsageError
from edgebundle.fleet import acl, controller, operator
from edgebundle.fleet.device import register
from edgebundle.fleet.documents import DesiredState, Heartbeat, Revision, dumps
from edgebundle.fleet.manifest import Manifest, Model, RevisionSpec, builtin_app
from edgebundle.sync import lua
from edgebundle.sync.client import Client, connect
from edgebundle.sync.service import SyncService
from tests.support.devices import (
    Device,
    endless_model,
    new_thread,
    read_sse,
    serving,
    text_of,
    types,
)
from tests.support.fleet import AgentProcess
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer
from tests.support.serving import RunProcess
from tests.support.sync import collect, new_thread_id, put, turn
from tests.support.sync_proxy import ProxyProcess

FLEET = "shops"
ADMIN_PASSWORD = "admin-s3cret"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server whose default user is the admin, keeping ACL users in an aclfile
    (DEBUG enabled, so that refusing it to devices is the ACL's doing)."""
    server = RedisServer(tmp_path_factory.mktemp("redis-acl"), password=ADMIN_PASSWORD,
                         aclfile=True, extra=("--enable-debug-command", "yes")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def acl_proxy(acl_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory,
              ) -> Iterator[ProxyProcess]:
    """The sync proxy (`edgebundle fleet proxy`) in front of ``acl_redis``, as the admin."""
    proxy = ProxyProcess(acl_redis.url, tmp_path_factory.mktemp("proxy"))
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(params=acl.ACCESS_MODES)
def access(request: pytest.FixtureRequest) -> str:
    """Each device test runs with devices on Redis directly and through the sync proxy."""
    return str(request.param)


def device_base_url(server: RedisServer, access: str, request: pytest.FixtureRequest) -> str:
    if access == "direct":
        return server.url
    return str(request.getfixturevalue("acl_proxy").url)


async def provisioned(server: RedisServer, *device_ids: str,
                      revoke: tuple[str, ...] = (), fleet: str = FLEET,
                      access: str = "direct", base_url: str | None = None,
                      ) -> acl.ProvisionResult:
    admin = await connect(server.url)
    try:
        return await acl.provision(admin, fleet, device_ids, base_url=base_url or server.url,
                                   revoke_ids=revoke, access=access)
    finally:
        await admin.aclose()


async def denied(call: Awaitable[Any]) -> str:
    """The NOPERM message of a command the device may not run (fails if it may)."""
    with pytest.raises(NoPermissionError) as caught:
        await call
    return str(caught.value)


async def script_denied(call: Awaitable[Any]) -> None:
    """A script refused by the ACL: at the call (declared keys) or inside it."""
    with pytest.raises(ResponseError, match=r"no permissions|user executing the script can't"):
        await call


def url_of(result: acl.ProvisionResult, device_id: str) -> str:
    return next(c.redis_url for c in result.credentials if c.device_id == device_id)


def test_the_device_user_can_do_what_the_agent_does(acl_redis: RedisServer) -> None:
    async def main() -> None:
        result = await provisioned(acl_redis, "kiosk-1")
        assert result.persisted  # the server has an aclfile
        creds = result.credentials[0]
        assert creds.user == "dev:kiosk-1" and len(creds.password) >= 40
        admin = await connect(acl_redis.url)
        device = await connect(creds.redis_url)
        try:
            assert await device.execute_command("ACL", "WHOAMI") == "dev:kiosk-1"
            revision = Revision(id="rev-0123456789ab", fleet=FLEET, spec=RevisionSpec(
                model=Model(name="m", url="file:///m.gguf", sha256="0" * 64), app=builtin_app()))
            await admin.hset(keys.revisions(FLEET), revision.id, dumps(revision.to_json()))
            await admin.set(keys.rollout(FLEET), dumps({"revision": revision.id}))
            await admin.set(keys.paused(FLEET), "1")
            desired = DesiredState(generation=3, revision=revision.id, spec=revision.spec)
            await admin.set(keys.desired("kiosk-1"), dumps(desired.to_json()))

            # register (the agent's own code), heartbeat, report: the agent's writes
            await register(device, "kiosk-1", FLEET, {"ring": "canary"})
            await device.set(keys.heartbeat("kiosk-1"), dumps(Heartbeat(at=1.0).to_json()),
                             ex=15)
            await device.set(keys.actual("kiosk-1"), dumps({"generation": 3}))
            assert 0 < await device.ttl(keys.heartbeat("kiosk-1")) <= 15
            # read what the controller wrote
            raw_desired = await device.get(keys.desired("kiosk-1"))
            assert raw_desired is not None and json.loads(raw_desired)["generation"] == 3
            assert await device.hget(keys.revisions(FLEET), revision.id) is not None
            assert await device.get(keys.rollout(FLEET)) is not None
            assert await device.exists(keys.paused(FLEET)) == 1
            # and the admin sees the device's writes; provisioning made it a member
            assert await admin.hget(keys.device_info("kiosk-1"), "fleet") == FLEET
            assert await admin.sismember(keys.fleet_devices(FLEET), "kiosk-1")
            assert await admin.get(keys.actual("kiosk-1")) == dumps({"generation": 3})
        finally:
            await device.aclose()
            await admin.aclose()

    asyncio.run(main())


def test_the_device_user_gets_its_nudges_and_no_other_channel(acl_redis: RedisServer) -> None:
    async def main() -> None:
        result = await provisioned(acl_redis, "kiosk-2")
        admin = await connect(acl_redis.url)
        device = await connect(url_of(result, "kiosk-2"))
        pubsub = device.pubsub()
        try:
            await pubsub.subscribe(keys.nudge("kiosk-2"))
            assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
            assert await admin.publish(keys.nudge("kiosk-2"), "1") == 1
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=10)
            assert message is not None and message["data"] == "1"
            other = device.pubsub()
            try:  # the refusal is the reply to SUBSCRIBE, read like any message
                await other.subscribe(keys.nudge("kiosk-1"))
                await denied(other.get_message(timeout=5))
            finally:
                await other.aclose()  # type: ignore[no-untyped-call]
            await denied(device.publish(keys.nudge("kiosk-2"), "1"))
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await device.aclose()
            await admin.aclose()

    asyncio.run(main())


def test_everything_else_is_refused(acl_redis: RedisServer) -> None:
    async def main() -> None:
        result = await provisioned(acl_redis, "kiosk-3", "kiosk-4")
        admin = await connect(acl_redis.url)
        await admin.set(keys.desired("kiosk-4"), "{}")
        await admin.set(keys.rollout(FLEET), "{}")
        device = await connect(url_of(result, "kiosk-3"))
        try:
            other = keys.desired("kiosk-4")
            await denied(device.get(other))
            await denied(device.set(other, "{}"))
            await denied(device.set(keys.heartbeat("kiosk-4"), "{}", ex=15))
            await denied(device.hset(keys.device_info("kiosk-4"), "fleet", FLEET))
            # the fleet's state is read-only, its device set out of reach: a device
            # cannot enrol anything (a bad id, a ghost, another fleet's device)
            await denied(device.sadd(keys.fleet_devices(FLEET), "kiosk-3"))
            await denied(device.sadd(keys.fleet_devices(FLEET), "bad}id"))
            await denied(device.sadd(keys.fleet_devices("other-fleet"), "kiosk-3"))
            await denied(device.hset(keys.revisions(FLEET), "rev-x", "{}"))
            await denied(device.set(keys.rollout(FLEET), "{}"))
            await denied(device.delete(keys.rollout(FLEET)))
            await denied(device.set(keys.paused(FLEET), "1"))
            await denied(device.srem(keys.fleet_devices(FLEET), "kiosk-4"))
            await denied(device.smembers(keys.fleet_devices(FLEET)))
            await denied(device.get(keys.controller_lock(FLEET)))
            await denied(device.get(keys.rollout("other-fleet")))
            # commands that key patterns cannot limit, and the server's controls
            await denied(device.scan(0))
            await denied(device.keys("*"))
            await denied(device.flushall())
            await denied(device.flushdb())
            await denied(device.config_get("*"))
            await denied(device.execute_command("DEBUG", "SLEEP", "0"))
            await denied(device.execute_command("ACL", "LIST"))
            await denied(device.execute_command("ACL", "SETUSER", "dev:kiosk-3", "+@all"))
            await denied(device.info("memory"))
            await denied(device.execute_command("CLIENT", "KILL", "USER", "dev:kiosk-4"))
            await denied(device.execute_command("SHUTDOWN", "NOSAVE"))
            await denied(device.execute_command("MODULE", "LIST"))
            # no Lua of its own at all; the library's functions under the same rules
            await denied(device.eval("return redis.call('GET', KEYS[1])", 1, other))
            await denied(device.eval("return redis.call('FLUSHALL')", 0))
            await script_denied(device.fcall(lua.function_name("write_rollout"), 4,
                                             keys.rollout(FLEET), keys.controller_lock(FLEET),
                                             keys.revisions(FLEET), keys.paused(FLEET),
                                             "{}", "{}", "", "", "", ""))
            await script_denied(device.fcall(lua.function_name("read_run"), 9,
                                             *lua.script_keys("t")[:8], other, 1, 1000, 1000,
                                             "r"))
            assert await admin.get(other) == "{}" and await admin.get(keys.rollout(FLEET)) == "{}"
            assert (await device.info("cluster"))["cluster_enabled"] == 0  # connect's probe
        finally:
            await device.aclose()
            await admin.aclose()

    asyncio.run(main())


BUSY_LOOP = "local n = 0 while true do n = n + 1 end"


def test_a_device_runs_only_the_functions_an_admin_loaded(acl_redis: RedisServer) -> None:
    """No EVAL, EVALSHA, SCRIPT or FUNCTION for a device: a busy loop (which would answer
    BUSY to every client until killed) is refused before it runs; FCALL runs the loaded
    library, and nothing a device could load, since it can load nothing."""
    async def main() -> None:
        result = await provisioned(acl_redis, "kiosk-13")
        admin = await connect(acl_redis.url)
        device = await connect(url_of(result, "kiosk-13"))
        try:
            await denied(device.eval(BUSY_LOOP, 0))
            await denied(device.execute_command("EVAL_RO", BUSY_LOOP, 0))
            await denied(device.evalsha("0" * 40, 0))
            await denied(device.script_load(BUSY_LOOP))
            await denied(device.function_load(
                f"#!lua name=spin\nredis.register_function('spin', function() {BUSY_LOOP} end)"))
            await denied(device.function_delete(lua.LIBRARY))
            await denied(device.function_flush())
            await denied(device.execute_command("FUNCTION", "KILL"))
            await denied(device.execute_command("SCRIPT", "KILL"))
            started = asyncio.get_running_loop().time()
            assert await admin.ping()  # nothing is running: the server answers at once
            assert asyncio.get_running_loop().time() - started < 1
            assert await device.fcall_ro(lua.function_name("version"), 0) == lua.VERSION
            with pytest.raises(ResponseError, match="Function not found"):
                await device.fcall("spin", 0)
            rules = acl.device_rules(FLEET, "kiosk-13")
            assert {"+fcall", "+fcall_ro"} <= set(rules)
            assert not {r for r in rules if r.startswith(("+eval", "+script", "+function"))}
        finally:
            await device.aclose()
            await admin.aclose()

    asyncio.run(main())


def test_a_device_says_clearly_when_the_library_is_missing_until_an_admin_loads_it(
        acl_redis: RedisServer, tmp_path: Path) -> None:
    async def main() -> None:
        result = await provisioned(acl_redis, "kiosk-14")
        admin = await connect(acl_redis.url)
        device = await connect(url_of(result, "kiosk-14"))
        try:
            await admin.function_flush()  # e.g. a restart without persistence
            with pytest.raises(RedisAccessError,
                               match=rf"functions \({lua.LIBRARY}\) are not loaded"
                                     r".*may not load them.*fleet load-functions"):
                await SyncService(device).create_thread(new_thread_id())
            loaded = edgebundle("fleet", "load-functions", "--redis-url", acl_redis.url,
                                home=tmp_path)
            assert loaded.returncode == 0, loaded.stderr
            assert loaded.stdout.strip() == f"loaded {lua.LIBRARY} on 1 node(s)"
            state = await SyncService(device).create_thread(new_thread_id())
            assert state.version == 0
            refused = edgebundle("fleet", "load-functions", "--redis-url",
                                 url_of(result, "kiosk-14"), home=tmp_path)
            assert refused.returncode == 1 and "may not load functions" in refused.stderr
            assert result.credentials[0].password not in refused.stderr
            # a user made by an older edgebundle (EVAL, no FCALL) is told what to do
            await admin.execute_command("ACL", "SETUSER", "dev:kiosk-14", "-fcall", "+eval")
            with pytest.raises(RedisAccessError,
                               match=r"may not run edgebundle's functions .*'fcall'"
                                     r".*provision it again"):
                await SyncService(device).create_thread(new_thread_id())
        finally:
            await device.aclose()
            await admin.aclose()

    asyncio.run(main())


def test_the_sync_core_runs_end_to_end_as_a_device(
        acl_redis: RedisServer, access: str, request: pytest.FixtureRequest) -> None:
    """Every sync script (create, push, start, acquire, delta, renew, finish, cancel,
    read) and the direct reads (watch's HMGET, events' XRANGE/XREAD, acquire's BLPOP),
    on two device users sharing one thread (straight to Redis, or through the proxy)."""
    base_url = device_base_url(acl_redis, access, request)

    async def main() -> None:
        result = await provisioned(acl_redis, f"phone-{access}", f"laptop-{access}",
                                   access=access, base_url=base_url)
        phone_redis = await connect(url_of(result, f"phone-{access}"))
        laptop_redis = await connect(url_of(result, f"laptop-{access}"))
        try:
            phone = SyncService(phone_redis, renew_ms=50, delta_batch_ms=0)
            laptop = SyncService(laptop_redis)
            created = await phone.create_thread(new_thread_id())
            tid = created.id
            pushed = await phone.push(tid, "phone", created.epoch, 0,
                                      [put(1, "s", "be brief", role="system")])
            watch = laptop.watch(tid, None, 0, interval=0.05)
            first = await anext(watch)
            assert [m.content for m in first.messages] == ["be brief"]

            ticket = await phone.start_run(tid, "phone", epoch=pushed.epoch,
                                           since=pushed.version, content="What is Redis?")
            lease = await phone.acquire(ticket)
            queued = await laptop.start_run(tid, "laptop", epoch=pushed.epoch,
                                            since=pushed.version, content="And Valkey?")
            waiting = asyncio.create_task(laptop.acquire(queued))  # BLPOPs its wake-up
            async with lease:
                await lease.delta("An in-memory")
                await asyncio.sleep(0.3)  # the watchdog renews the lease (renew script)
                await lease.delta(" data store.")
                await lease.finish("eos", {"input_tokens": 3, "output_tokens": 4})
            changed = await asyncio.wait_for(anext(watch), 30)
            assert any(m.content == "What is Redis?" for m in changed.messages)
            await watch.aclose()  # type: ignore[attr-defined]

            second = await asyncio.wait_for(waiting, 30)
            await second.delta("A fork.")
            await second.flush()
            cancelled = await phone.cancel_run(tid, queued.run.id, "phone")
            assert cancelled.status == "cancelled"
            await second.close()

            events = await collect(laptop, tid, ticket.run.id)
            assert [e.type for e in events if e.type == "message.delta"] == ["message.delta"] * 2
            assert events[-2].type == "run.completed" and events[-1].type == "done"
            assert (await laptop.get_run(tid, ticket.run.id)).status == "completed"
            state = await laptop.sync(tid, None, 0)
            in_order = sorted(state.messages, key=lambda m: m.position)
            assert [(m.role, m.content) for m in in_order] == [
                ("system", "be brief"), ("user", "What is Redis?"),
                ("assistant", "An in-memory data store."), ("user", "And Valkey?"),
                ("assistant", "A fork.")]
        finally:
            await phone_redis.aclose()
            await laptop_redis.aclose()

    asyncio.run(main())


def test_a_provisioned_agent_and_the_controller_roll_out_with_no_eval(
        acl_redis: RedisServer, tmp_path: Path, access: str,
        request: pytest.FixtureRequest) -> None:
    """The real `edgebundle agent` under its device user (register, heartbeat, nudge,
    desired, reconcile, report) and the controller as the admin: a revision rolls out to
    the device provisioning put in the fleet, and the server ran no EVAL at all."""
    fleet = f"roll-out-{access}"  # a fleet of its own on the module's server
    device = f"kiosk-20-{access}"
    result = asyncio.run(provisioned(acl_redis, device, fleet=fleet, access=access,
                                     base_url=device_base_url(acl_redis, access, request)))
    model = write_scripted_model(tmp_path / "m.gguf", ScriptedModelSpec(reply="Hi."))
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    manifest = {"apiVersion": "edgebundle/v1", "kind": "Fleet", "metadata": {"name": fleet},
                "spec": {"runtime": {"kind": "embedded"},
                         "model": {"name": "m", "url": model.as_uri(), "sha256": digest,
                                   "template": "llama-3-chat", "ctx_size": 2048},
                         "rollout": {"phases": [{"percent": 100}], "max_unavailable": "100%",
                                     "health": {"window": 0}}}}
    with redis_py.Redis(port=acl_redis.port, password=ADMIN_PASSWORD) as stats:
        stats.config_resetstat()
    agent = AgentProcess(tmp_path / "home", device, url_of(result, device),
                         "--fleet", fleet)  # the last --fleet wins
    try:
        async def roll_out() -> controller.TickSummary:
            admin = await connect(acl_redis.url)
            try:
                while not await admin.exists(keys.heartbeat(device)):
                    assert agent.proc.poll() is None, agent.stderr()
                    await asyncio.sleep(0.1)
                await operator.apply(admin, Manifest.model_validate(manifest))
                ctl = controller.Controller(admin, fleet)
                summary = await ctl.tick()
                assert device in summary.moved, summary
                for _ in range(600):
                    summary = await ctl.tick()
                    if summary.status == "complete":
                        return summary
                    await asyncio.sleep(0.1)
                raise AssertionError(f"no rollout: {summary}\n{agent.stderr()}")
            finally:
                await admin.aclose()

        done = asyncio.run(roll_out())
        assert done.counts.get("healthy", 0) >= 1
    finally:
        assert agent.stop() == 0, agent.stderr()
    assert "NOPERM" not in agent.stderr() and result.credentials[0].password not in agent.stderr()
    with redis_py.Redis(port=acl_redis.port, password=ADMIN_PASSWORD,
                        decode_responses=True) as stats:
        used = stats.info("commandstats")
    assert "cmdstat_fcall" in used and not {"cmdstat_eval", "cmdstat_evalsha"} & set(used)


def test_two_edgebundle_run_devices_share_a_thread_under_their_own_users(
    acl_redis: RedisServer, tmp_path: Path, access: str, request: pytest.FixtureRequest,
) -> None:
    """The real gateways (`edgebundle run`, sync on, real llama.cpp inference on the
    scripted model) work under the device users: a turn on one, the next on the other,
    the other's watch; no NOPERM and no password in their logs."""
    result = asyncio.run(provisioned(acl_redis, "till-1", "till-2", access=access,
                                     base_url=device_base_url(acl_redis, access, request)))
    model = endless_model(tmp_path / "models")
    runs = [RunProcess(["--runtime", "embedded", "--no-preflight", "--model", str(model),
                        "--template", "llama-3-chat", "--device-id", creds.device_id],
                       home=tmp_path / creds.device_id,
                       env={"EDGEBUNDLE_REDIS_URL": creds.redis_url})
            for creds in result.credentials]
    with serving(runs):
        one, two = (Device(run, creds.device_id)
                    for run, creds in zip(runs, result.credentials, strict=True))
        thread = new_thread(one)
        tid = thread["id"]
        first = one.run_turn(tid, "first question", params={"max_tokens": 3})
        assert types(first)[-2:] == ["run.completed", "done"]
        assert text_of(first) == "Looping forever forever"
        with two.http.stream("GET", f"/v1/threads/{tid}/watch") as watching:
            opening = next(e for e in read_sse(watching) if e["event"] == "sync")
        assert [m["content"] for m in opening["data"]["messages"]] == [
            "first question", "Looping forever forever"]
        second = two.run_turn(tid, "second question", params={"max_tokens": 2})
        assert types(second)[-2:] == ["run.completed", "done"]
        assert second[-2]["data"]["run"]["device_id"] == "till-2"
        final = one.http.get(f"/v1/threads/{tid}").json()
        assert [m["role"] for m in final["messages"]] == ["user", "assistant"] * 2
    for run, creds in zip(runs, result.credentials, strict=True):
        logs = run.stderr()
        assert "NOPERM" not in logs and creds.password not in logs


def test_on_a_cluster_every_node_gets_the_user(cluster_redis: RedisCluster) -> None:
    """ACL users are per node: a device's cluster client reaches every node under its
    user (CLUSTER SLOTS, COMMAND, then keys in every slot), fenced the same way."""

    async def main() -> None:
        admin = await connect(cluster_redis.url)
        try:
            await admin.function_flush()  # provisioning loads it on every primary
            result = await acl.provision(admin, FLEET, ["kiosk-c1"], base_url=cluster_redis.url)
            assert result.library == lua.LIBRARY
            for node in cluster_redis.nodes:
                with redis_py.Redis(port=node.port, decode_responses=True) as direct:
                    assert direct.fcall_ro(lua.function_name("version"), 0) == lua.VERSION
            device = await connect(url_of(result, "kiosk-c1"))
            try:
                await device.set(keys.heartbeat("kiosk-c1"), "{}", ex=15)
                await denied(device.get(keys.heartbeat("kiosk-c2")))
                sync = SyncService(device)
                threads = [new_thread_id() for _ in range(6)]  # spread over the slots
                for thread_id in threads:
                    await turn(sync, (await sync.create_thread(thread_id)).id, "kiosk-c1",
                               "Hi", "Hello there")
                assert {(await sync.sync(t, None, 0)).version for t in threads} == {3}
            finally:
                await device.aclose()
            done = await acl.provision(admin, FLEET, [], base_url=cluster_redis.url,
                                       revoke_ids=["kiosk-c1"])
            assert done.revoked == ["kiosk-c1"]
            for node in cluster_redis.nodes:  # gone from every node
                with pytest.raises(RedisAccessError, match="refused the password"):
                    await connect(device_url_on(node, result))
        finally:
            await admin.aclose()

    asyncio.run(main())


def device_url_on(node: RedisServer, result: acl.ProvisionResult) -> str:
    creds = result.credentials[0]
    return acl.device_url(node.url, creds.user, creds.password)


def test_reprovisioning_rotates_and_revoke_deletes(acl_redis: RedisServer) -> None:
    async def main() -> None:
        first = await provisioned(acl_redis, "kiosk-5")
        old = await connect(url_of(first, "kiosk-5"))
        second = await provisioned(acl_redis, "kiosk-5")
        assert second.credentials[0].password != first.credentials[0].password
        with pytest.raises(RedisAccessError, match="refused the password"):
            await connect(url_of(first, "kiosk-5"))
        new = await connect(url_of(second, "kiosk-5"))
        await new.set(keys.actual("kiosk-5"), "{}")
        await denied(new.get(keys.actual("kiosk-4")))  # same rules after the rotation

        admin = await connect(acl_redis.url)
        assert await admin.sismember(keys.fleet_devices(FLEET), "kiosk-5")
        revoked = await provisioned(acl_redis, revoke=("kiosk-5", "never-there"))
        assert revoked.revoked == ["kiosk-5"] and revoked.credentials == []
        assert not await admin.sismember(keys.fleet_devices(FLEET), "kiosk-5")
        await admin.aclose()
        for client in (old, new):  # deleting the user closed its connections
            with pytest.raises(Exception):  # noqa: B017 - closed, then refused on reconnect
                await client.ping()
            await client.aclose()
        with pytest.raises(RedisAccessError, match="refused the password"):
            await connect(url_of(second, "kiosk-5"))
        again = await provisioned(acl_redis, revoke=("kiosk-5",))
        assert again.revoked == []  # idempotent

    asyncio.run(main())


def test_users_survive_a_restart_through_the_aclfile(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", password=ADMIN_PASSWORD, aclfile=True).start()
    try:
        result = asyncio.run(provisioned(server, "kiosk-6"))
        assert result.persisted
        server.stop()
        server.start()

        async def still_fenced() -> None:
            device = await connect(url_of(result, "kiosk-6"))
            try:
                await device.set(keys.heartbeat("kiosk-6"), "{}", ex=15)
                await denied(device.keys("*"))
            finally:
                await device.aclose()

        asyncio.run(still_fenced())
    finally:
        server.stop()


def test_without_an_aclfile_the_result_says_not_persisted(redis_server: RedisServer) -> None:
    result = asyncio.run(provisioned(redis_server, "kiosk-7"))
    assert not result.persisted and result.credentials[0].device_id == "kiosk-7"


def test_a_user_without_acl_rights_cannot_provision(acl_redis: RedisServer) -> None:
    async def main() -> None:
        result = await provisioned(acl_redis, "kiosk-8")
        device: Client = await connect(url_of(result, "kiosk-8"))
        try:
            with pytest.raises(RedisAccessError, match="may not manage ACL users"):
                await acl.provision(device, FLEET, ["kiosk-9"], base_url=acl_redis.url)
        finally:
            await device.aclose()

    asyncio.run(main())


def test_credentials_urls_and_device_lists() -> None:
    url = acl.device_url("redis://:admin@redis.example:6380/2", "dev:k:1", "p-_w")
    assert url == "redis://dev%3Ak%3A1:p-_w@redis.example:6380/2"
    with pytest.raises(UsageError, match="unix socket"):
        acl.device_url("unix:///run/redis.sock", "dev:k", "p")
    with pytest.raises(UsageError, match="invalid device id"):
        acl.user_name("a b")
    rules = acl.device_rules(FLEET, "k1")
    assert rules[0] == "-@all" and "~*" not in rules and "allkeys" not in rules
    assert not {"+keys", "+scan", "+flushall", "+config", "+debug", "+publish"} & set(rules)


def test_errors_never_show_the_password() -> None:
    """redis-py quotes whole commands in some errors (a cluster that cannot route one)."""
    quoted = RedisClusterException("Command: ('SETUSER', 'dev:k', 'on', '>hunter2-xyz')")
    error = acl._refused(quoted, "hunter2-xyz")
    assert "hunter2-xyz" not in str(error) and "***" in str(error)


def test_read_device_ids_reports_the_bad_line(tmp_path: Path) -> None:
    listing = tmp_path / "devices.txt"
    listing.write_text("# shop 1\nkiosk-1\n\nkiosk-2  # the back door\nbad id\n")
    with pytest.raises(UsageError, match=r"devices.txt:5: invalid device id 'bad id'"):
        acl.read_device_ids(listing)
    listing.write_text("# shop 1\nkiosk-1\n\nkiosk-2  # the back door\n")
    assert acl.read_device_ids(listing) == ["kiosk-1", "kiosk-2"]


def edgebundle(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "EDGEBUNDLE_HOME": str(home)}
    env.pop("EDGEBUNDLE_REDIS_URL", None)
    return subprocess.run([sys.executable, "-m", "edgebundle", *args], env=env, text=True,
                          capture_output=True, timeout=120)


def test_cli_writes_a_private_credentials_file(acl_redis: RedisServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    listing = tmp_path / "devices.txt"
    listing.write_text("kiosk-11\nkiosk-12\n")
    done = edgebundle("fleet", "provision", FLEET, "--device", "kiosk-10", "--devices-from",
                      str(listing), "--redis-url", acl_redis.url, home=home)
    assert done.returncode == 0, done.stderr
    path = home / "fleet" / f"{FLEET}.credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    assert sorted(document["devices"]) == ["kiosk-10", "kiosk-11", "kiosk-12"]
    for creds in document["devices"].values():  # secrets are in the file, not on screen
        assert creds["password"] not in done.stdout + done.stderr
    assert "kiosk-10: Redis user dev:kiosk-10" in done.stdout

    revoked = edgebundle("fleet", "provision", FLEET, "--revoke", "kiosk-11", "--json",
                         "--redis-url", acl_redis.url, home=home)
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["revoked"] == ["kiosk-11"]
    assert sorted(json.loads(path.read_text())["devices"]) == ["kiosk-10", "kiosk-12"]

    rotated = edgebundle("fleet", "provision", FLEET, "--device", "kiosk-10", "--json",
                         "--redis-url", acl_redis.url, home=home)
    shown = json.loads(rotated.stdout)["provisioned"][0]
    assert shown["password"] != document["devices"]["kiosk-10"]["password"]
    assert json.loads(path.read_text())["devices"]["kiosk-10"]["password"] == shown["password"]

    nothing = edgebundle("fleet", "provision", FLEET, "--redis-url", acl_redis.url, home=home)
    assert nothing.returncode == 2 and "no devices" in nothing.stderr
    assert len(nothing.stderr.strip().splitlines()) == 1  # one line, no traceback
