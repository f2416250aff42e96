"""The sync proxy against a real redis-server with provisioned ACL users.

The attack it closes: Redis runs a function under the caller's user, so a device that
may FCALL the sync functions also holds HSET/DEL on every thread's keys, and its
stolen credential can delete or forge any thread. A device provisioned with
``access="proxied"`` may only read threads, directly or through the proxy; only the
sync functions change them, run by the proxy under its own user. The whole sync core,
the agent, `edgebundle run` devices and a Redis Cluster work through it (see also the
``proxied`` cases of tests/test_fleet_acl.py).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_py
from redis.exceptions import NoPermissionError, ResponseError

from edgebundle import keys
from edgebundle import keys as sync_keys
from edgebundle.errors import RedisAccessError
from edgebundle.fleet import acl
from edgebundle.fleet.proxy import SyncProxy
from edgebundle.fleet.proxy_session import MAX_PENDING
from edgebundle.fleet.resp import MAX_REQUEST_BYTES
from edgebundle.sync import lua
from edgebundle.sync.client import connect
from edgebundle.sync.service import SyncService
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer
from tests.support.sync import new_thread_id, turn

FLEET = "shops"
ADMIN_PASSWORD = "admin-s3cret"


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-proxy"), password=ADMIN_PASSWORD,
                         aclfile=True).start()
    try:
        yield server
    finally:
        server.stop()


async def provision(server_url: str, device_url: str, *device_ids: str,
                    access: str = "proxied", revoke: tuple[str, ...] = ()) -> acl.ProvisionResult:
    admin = await connect(server_url)
    try:
        return await acl.provision(admin, FLEET, device_ids, base_url=device_url,
                                   access=access, revoke_ids=revoke)
    finally:
        await admin.aclose()


def url_of(result: acl.ProvisionResult, device_id: str) -> str:
    return next(c.redis_url for c in result.credentials if c.device_id == device_id)


async def a_thread_with_a_turn(server_url: str) -> str:
    admin = await connect(server_url)
    try:
        sync = SyncService(admin)
        thread_id = (await sync.create_thread(new_thread_id())).id
        await turn(sync, thread_id, "owner", "Hi", "Hello there")
        return thread_id
    finally:
        await admin.aclose()


async def refused(call: object) -> str:
    with pytest.raises(ResponseError) as caught:
        await call  # type: ignore[misc]
    return str(caught.value)


def test_a_stolen_direct_credential_deletes_a_thread_and_a_proxied_one_cannot(
        acl_redis: RedisServer) -> None:
    """The attack, as it works with direct access, and fails with proxied access when
    the thief connects straight to Redis (not through the proxy)."""

    async def main() -> None:
        direct = await provision(acl_redis.url, acl_redis.url, "till-d", access="direct")
        proxied = await provision(acl_redis.url, acl_redis.url, "till-p")
        victim = await a_thread_with_a_turn(acl_redis.url)
        other = await a_thread_with_a_turn(acl_redis.url)

        thief = await connect(url_of(proxied, "till-p"))  # straight to Redis
        try:
            assert await thief.hget(sync_keys.meta(victim), "version") == "3"  # reads
            for attempt in (thief.delete(sync_keys.messages(victim)),
                            thief.hset(sync_keys.messages(victim), "m1", "{}"),
                            thief.set(sync_keys.lock(victim), "mine"),
                            thief.xadd(sync_keys.run_events(victim, "r1"), {"x": "1"}),
                            thief.fcall(lua.function_name("create"), 9,
                                        *lua.script_keys(new_thread_id()), 0, 1000, 1000),
                            thief.eval("return 1", 0)):
                with pytest.raises(NoPermissionError):
                    await attempt
        finally:
            await thief.aclose()

        old = await connect(url_of(direct, "till-d"))  # what direct access allows
        try:
            assert await old.delete(sync_keys.messages(other)) == 1
        finally:
            await old.aclose()
        admin = await connect(acl_redis.url)
        try:
            assert await admin.hlen(sync_keys.messages(victim)) == 2  # untouched
        finally:
            await admin.aclose()

    asyncio.run(main())


def test_through_the_proxy_only_the_sync_functions_change_a_thread(
        acl_redis: RedisServer) -> None:
    async def main() -> None:
        proxy = SyncProxy(acl_redis.url, port=0)
        [port] = await proxy.start()
        try:
            result = await provision(acl_redis.url, f"redis://127.0.0.1:{port}", "till-1")
            victim = await a_thread_with_a_turn(acl_redis.url)
            other = await a_thread_with_a_turn(acl_redis.url)
            device = await connect(url_of(result, "till-1"))
            try:
                assert await device.execute_command("ACL", "WHOAMI") == "dev:till-1"
                # plain commands are the device's own: Redis's ACL refuses writes
                for attempt in (device.delete(sync_keys.messages(victim)),
                                device.hset(sync_keys.meta(victim), "version", "99"),
                                device.keys("*"),
                                device.eval("return 1", 0),
                                device.function_load(lua.SOURCE, replace=True),
                                device.set(keys.desired("till-2"), "{}")):
                    with pytest.raises(NoPermissionError):
                        await attempt
                # functions: the sync ones, on one thread's keys, and nothing else
                fleet_fn = lua.function_name("write_desired")
                assert "sync functions only" in await refused(
                    device.fcall(fleet_fn, 1, keys.desired("till-2"), "{}"))
                assert "thread's keys only" in await refused(device.fcall(
                    lua.function_name("read_run"), 9, keys.rollout(FLEET),
                    *lua.script_keys(victim)[1:], 0, 1000, 1000))
                mixed = lua.script_keys(victim)[:8] + [sync_keys.turn_inputs(other)]
                assert "one thread only" in await refused(device.fcall(
                    lua.function_name("sync"), 9, *mixed, 0, 1000, 1000))
                assert "'eval'" not in await refused(device.fcall("no_such_fn", 0))
                # the sync core works: a turn on a thread of its own, and on the victim's
                sync = SyncService(device)
                mine = (await sync.create_thread(new_thread_id())).id
                await turn(sync, mine, "till-1", "Hi", "Hello")
                await turn(sync, victim, "till-1", "Again", "Sure")
                state = await sync.sync(victim, None, 0)
                assert [m.content for m in sorted(state.messages, key=lambda m: m.position)] \
                    == ["Hi", "Hello there", "Again", "Sure"]
                # pipelined: replies come back in the order asked, from both upstreams
                async with device.pipeline(transaction=False) as pipe:
                    pipe.fcall_ro(lua.function_name("version"), 0)
                    pipe.hget(sync_keys.meta(victim), "version")
                    pipe.fcall_ro(lua.function_name("version"), 0)
                    pipe.execute_command("ACL", "WHOAMI")
                    answers = await pipe.execute()
                assert answers == [lua.VERSION, str(state.version), lua.VERSION, "dev:till-1"]
            finally:
                await device.aclose()
        finally:
            await proxy.close()

    asyncio.run(main())


def raw_exchange(port: int, payload: bytes, wait: float = 2.0) -> bytes:
    """Send bytes to the proxy, read until it closes or ``wait`` passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(payload)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
        return received


def test_hostile_connections_get_nothing(acl_redis: RedisServer) -> None:
    async def main() -> None:
        proxy = SyncProxy(acl_redis.url, port=0)
        [port] = await proxy.start()
        try:
            result = await provision(acl_redis.url, f"redis://127.0.0.1:{port}", "till-3")
            creds = result.credentials[0]
            loop = asyncio.get_running_loop()

            def exchange(payload: bytes, wait: float = 2.0) -> bytes:
                return raw_exchange(port, payload, wait)

            # nothing before AUTH, and no admin rights from the proxy's own connection
            answer = await loop.run_in_executor(None, exchange, b"*1\r\n$4\r\nPING\r\n"
                                                b"*2\r\n$4\r\nKEYS\r\n$1\r\n*\r\n", 0.5)
            assert answer.count(b"-NOAUTH") == 2
            answer = await loop.run_in_executor(None, exchange,
                                                b"*3\r\n$4\r\nAUTH\r\n$10\r\ndev:till-3\r\n"
                                                b"$5\r\nwrong\r\n", 0.5)
            assert answer.startswith(b"-WRONGPASS")
            # no inline commands, no RESP3, no RESET; an oversized request is cut off
            assert b"inline" in await loop.run_in_executor(None, exchange, b"PING\r\n")
            auth = (f"*3\r\n$4\r\nAUTH\r\n${len(creds.user)}\r\n{creds.user}\r\n"
                    f"${len(creds.password)}\r\n{creds.password}\r\n").encode()
            answer = await loop.run_in_executor(
                None, exchange, auth + b"*2\r\n$5\r\nHELLO\r\n$1\r\n4\r\n*1\r\n$5\r\nRESET\r\n"
                b"*1\r\n$4\r\nPING\r\n", 0.5)
            lines = answer.split(b"\r\n")
            assert lines[0] == b"+OK" and lines[1].startswith(b"-NOPROTO")
            assert b"RESET is not available" in lines[2] and lines[3] == b"+PONG"
            huge = f"*2\r\n$4\r\nECHO\r\n${MAX_REQUEST_BYTES + 1}\r\n".encode()
            answer = await loop.run_in_executor(None, exchange, auth + huge)
            assert answer.startswith(b"+OK\r\n") and b"larger than the proxy's limit" in answer
            # FCALL inside MULTI would leave the transaction: refused
            device = await connect(creds.redis_url)
            try:
                async with device.pipeline(transaction=True) as pipe:
                    pipe.fcall_ro(lua.function_name("version"), 0)
                    with pytest.raises(ResponseError):
                        await pipe.execute()
            finally:
                await device.aclose()
        finally:
            await proxy.close()

    asyncio.run(main())


def test_revoking_a_device_closes_its_proxied_connection(acl_redis: RedisServer) -> None:
    async def main() -> None:
        proxy = SyncProxy(acl_redis.url, port=0)
        [port] = await proxy.start()
        url = f"redis://127.0.0.1:{port}"
        try:
            result = await provision(acl_redis.url, url, "till-4")
            device = await connect(url_of(result, "till-4"))
            await device.fcall_ro(lua.function_name("version"), 0)  # both upstreams open
            await provision(acl_redis.url, url, revoke=("till-4",))
            with pytest.raises(Exception):  # noqa: B017 - closed, then refused on reconnect
                await device.fcall_ro(lua.function_name("version"), 0)
            await device.aclose()
            with pytest.raises(RedisAccessError, match="refused the password"):
                await connect(url_of(result, "till-4"))
        finally:
            await proxy.close()

    asyncio.run(main())


def test_a_cluster_through_the_proxy(cluster_redis: RedisCluster) -> None:
    """One proxy port per node; CLUSTER SLOTS and MOVED name the proxy's ports, so the
    device's cluster client never reaches a node itself; turns in every slot range."""

    async def main() -> None:
        proxy = SyncProxy(cluster_redis.url, port=0)
        ports = await proxy.start()
        try:
            assert len(ports) == len(cluster_redis.nodes)
            result = await provision(cluster_redis.url, f"redis://127.0.0.1:{ports[0]}",
                                     "till-c")
            device = await connect(url_of(result, "till-c"))
            try:
                seen = {node.port for node in device.get_nodes()}  # type: ignore[union-attr]
                assert seen == set(ports)
                sync = SyncService(device)
                threads = [new_thread_id() for _ in range(8)]
                for thread_id in threads:
                    await turn(sync, (await sync.create_thread(thread_id)).id, "till-c",
                               "Hi", "Hello there")
                assert {(await sync.sync(t, None, 0)).version for t in threads} == {3}
                with pytest.raises(NoPermissionError):
                    await device.delete(sync_keys.messages(threads[0]))
            finally:
                await device.aclose()
            with redis_py.Redis(port=cluster_redis.nodes[0].port,
                                decode_responses=True) as node:
                moved = node.execute_command("CLUSTER", "SLOTS")
            assert {entry[2][1] for entry in moved} <= {n.port for n in cluster_redis.nodes}
        finally:
            await proxy.close()

    asyncio.run(main())


def test_the_cli_serves_the_proxy(acl_redis: RedisServer, tmp_path: Path) -> None:
    from tests.support.sync_proxy import ProxyProcess

    proxy = ProxyProcess(acl_redis.url, tmp_path)
    try:
        result = asyncio.run(provision(acl_redis.url, proxy.url, "till-5"))

        async def use() -> None:
            device = await connect(url_of(result, "till-5"))
            try:
                sync = SyncService(device)
                await turn(sync, (await sync.create_thread(new_thread_id())).id, "till-5",
                           "Hi", "Hello")
            finally:
                await device.aclose()

        asyncio.run(use())
    finally:
        proxy.stop()
    assert ADMIN_PASSWORD not in proxy.stderr()
    assert result.credentials[0].password not in proxy.stderr()


def test_a_long_pipeline_comes_back_whole_and_in_order(acl_redis: RedisServer) -> None:
    """More commands in flight than the proxy keeps replies for (it stops reading the
    device's commands until the device reads): every reply, in order, from both of the
    device's upstream connections."""

    async def main() -> None:
        proxy = SyncProxy(acl_redis.url, port=0)
        [port] = await proxy.start()
        try:
            result = await provision(acl_redis.url, f"redis://127.0.0.1:{port}", "till-6")
            victim = await a_thread_with_a_turn(acl_redis.url)
            device = await connect(url_of(result, "till-6"))
            try:
                async with device.pipeline(transaction=False) as pipe:
                    for index in range(3 * MAX_PENDING):
                        if index % 2:
                            pipe.fcall_ro(lua.function_name("version"), 0)
                        else:
                            pipe.hget(sync_keys.meta(victim), "version")
                    answers = await pipe.execute()
                assert answers == ["3", lua.VERSION] * (3 * MAX_PENDING // 2)
            finally:
                await device.aclose()
        finally:
            await proxy.close()

    asyncio.run(main())


def test_a_redis_restart_under_a_proxied_device_is_ridden_out(tmp_path: Path) -> None:
    """redis-server SIGKILLed and restarted on its AOF while a device works through the
    proxy: the device's client reconnects by itself (the proxy closes a connection it
    cannot carry on, as Redis would), and every acknowledged turn is still there."""
    server = RedisServer(tmp_path / "redis", password=ADMIN_PASSWORD, aclfile=True,
                         aof=True).start()

    async def main() -> None:
        proxy = SyncProxy(server.url, port=0)
        [port] = await proxy.start()
        try:
            result = await provision(server.url, f"redis://127.0.0.1:{port}", "till-r")
            device = await connect(url_of(result, "till-r"))
            sync = SyncService(device)
            try:
                thread_id = (await sync.create_thread(new_thread_id())).id
                await turn(sync, thread_id, "till-r", "before", "the restart")
                server.kill()
                restart = asyncio.get_running_loop().call_later(0.5, server.start)
                try:
                    await turn(sync, thread_id, "till-r", "after", "it")  # waits it out
                finally:
                    restart.cancel()
                state = await sync.sync(thread_id, None, 0)
                assert [m.content for m in sorted(state.messages, key=lambda m: m.position)] \
                    == ["before", "the restart", "after", "it"]
            finally:
                await sync.aclose()
        finally:
            await proxy.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()
