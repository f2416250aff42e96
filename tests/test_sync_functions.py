"""The Redis functions library (edgebundle.sync.lua) on real redis-servers: its name and
version, loading it where the user may (zero setup), side by side with another
version, on every primary of a cluster, and a clear error where Redis has no FCALL.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis as redis_py

from edgebundle.errors import RedisAccessError
from edgebundle.sync import lua
from edgebundle.sync.client import connect
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer
from tests.support.sync import new_thread_id, put, sync_service, turn


def libraries(port: int) -> set[str]:
    with redis_py.Redis(port=port, decode_responses=True) as node:
        return {str(dict(zip(lib[::2], lib[1::2], strict=True))["library_name"])
                for lib in node.function_list()}


def test_the_library_names_its_version_and_every_function_carries_it() -> None:
    assert len(lua.VERSION) == 12 and int(lua.VERSION, 16) >= 0
    assert lua.LIBRARY == f"edgebundle_{lua.VERSION}"
    assert lua.SOURCE.startswith(f"#!lua name={lua.LIBRARY}\n")
    for name in (*lua.SYNC_FUNCTIONS, *lua.FLEET_FUNCTIONS, "version"):
        assert f"function_name='{lua.function_name(name)}'" in lua.SOURCE
    assert lua.function_name("push") == f"eb_{lua.VERSION}_push"
    with pytest.raises(ValueError):
        lua.function_name("eval_anything")
    # the version is the hash of the code: other code, another version
    assert lua._library("0123456789ab") != lua.SOURCE
    assert "EVAL" not in lua.SOURCE.upper().replace("EVALUATE", "")


def test_a_redis_without_the_library_gets_it_loaded_by_the_first_call(
        redis_server: RedisServer) -> None:
    """Zero setup: the default user may load, so the first sync call loads the library."""
    async def main() -> None:
        async with sync_service(redis_server.url) as sync:
            assert libraries(redis_server.port) == set()
            await turn(sync, (await sync.create_thread(new_thread_id())).id, "d", "Hi", "Hello")
            assert libraries(redis_server.port) == {lua.LIBRARY}
            assert await sync.redis.fcall_ro(lua.function_name("version"), 0) == lua.VERSION
            # flushed meanwhile (a restart without persistence): loaded again, once
            await sync.redis.function_flush()
            state = await sync.create_thread(new_thread_id())
            await sync.push(state.id, "d", state.epoch, 0, [put(1, "m", "again")])
            assert libraries(redis_server.port) == {lua.LIBRARY}
    asyncio.run(main())


def test_two_versions_of_the_library_live_side_by_side(redis_server: RedisServer) -> None:
    """A fleet mid-upgrade: another version's library stays, each calls its own code."""
    async def main() -> None:
        async with sync_service(redis_server.url) as sync:
            other = lua._library("0123456789ab")
            await sync.redis.function_load(other)
            state = await sync.create_thread(new_thread_id())
            assert (await sync.push(state.id, "d", state.epoch, 0, [put(1, "m", "x")])).version == 1
            assert libraries(redis_server.port) == {lua.LIBRARY, "edgebundle_0123456789ab"}
            assert await sync.redis.fcall_ro("eb_0123456789ab_version", 0) == "0123456789ab"
    asyncio.run(main())


def test_on_a_cluster_every_primary_gets_the_library(cluster_redis: RedisCluster) -> None:
    async def main() -> None:
        redis = await connect(cluster_redis.url)
        try:
            await redis.function_flush()  # every primary
            assert all(libraries(node.port) == set() for node in cluster_redis.nodes)
            async with sync_service(cluster_redis.url) as sync:
                for thread_id in [new_thread_id() for _ in range(6)]:  # spread over the slots
                    await turn(sync, (await sync.create_thread(thread_id)).id, "d", "Hi", "Yo")
            assert all(libraries(node.port) == {lua.LIBRARY} for node in cluster_redis.nodes)
            assert await lua.load_library(redis) == len(cluster_redis.nodes)  # REPLACE: harmless
        finally:
            await redis.aclose()
    asyncio.run(main())


def test_a_redis_without_fcall_is_refused_clearly(tmp_path: Path) -> None:
    """What a Redis older than 7.0 answers ("unknown command 'FCALL'"), made here by
    renaming the commands away on a real 7.x server."""
    server = RedisServer(tmp_path / "old", extra=(
        "--rename-command", "FCALL", "", "--rename-command", "FCALL_RO", "",
        "--rename-command", "FUNCTION", "")).start()
    try:
        async def main() -> None:
            async with sync_service(server.url) as sync:
                with pytest.raises(RedisAccessError, match=r"older than 7\.0.*Redis 7\.0 or newer"):
                    await sync.create_thread(new_thread_id())
        asyncio.run(main())
    finally:
        server.stop()
