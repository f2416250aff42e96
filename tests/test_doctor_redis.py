"""The doctor's Redis checks against real redis-server processes configured each way
(tests/support/redis_server.py): reachable, version, topology, persistence, eviction
policy, the functions library, and what the configured user may do."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import redis as redis_py
from click.testing import CliRunner

from edgebundle import keys
from edgebundle.cli import cli
from edgebundle.doctor import CheckResult, redis_checks
from edgebundle.fleet import acl
from edgebundle.sync import lua
from edgebundle.sync.client import connect
from tests.support.doctor_env import diagnose
from tests.support.processes import free_port
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer
from tests.support.sync_proxy import ProxyProcess


def test_reachable_redis_passes(home: Path, redis_server: RedisServer) -> None:
    check = diagnose(home, redis_url=redis_server.url, online=True).check("redis.reachable")
    assert check.status == "ok"
    assert f"127.0.0.1:{redis_server.port}" in check.summary


def test_unreachable_redis_fails_quickly(home: Path) -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    check = diagnose(home, redis_url=f"redis://127.0.0.1:{port}/0", online=True).check(
        "redis.reachable"
    )
    assert time.monotonic() - started < 3
    assert check.status == "fail"
    assert check.summary.startswith(f"cannot reach redis at 127.0.0.1:{port}: ")


def test_wrong_password_fails_without_printing_it(
    home: Path, redis_server_with_password: RedisServer
) -> None:
    url = f"redis://:wrong-secret@127.0.0.1:{redis_server_with_password.port}/0"
    report = diagnose(home, redis_url=url, online=True)
    check = report.check("redis.reachable")
    assert check.status == "fail"
    assert "refused the password" in check.summary
    assert check.fix and "password" in check.fix.lower()
    assert "wrong-secret" not in json.dumps(report.to_json())


def test_missing_password_fails_saying_one_is_needed(
    home: Path, redis_server_with_password: RedisServer
) -> None:
    url = f"redis://127.0.0.1:{redis_server_with_password.port}/0"
    check = diagnose(home, redis_url=url, online=True).check("redis.reachable")
    assert check.status == "fail"
    assert "requires a password" in check.summary


def test_right_password_passes_without_printing_it(
    home: Path, redis_server_with_password: RedisServer
) -> None:
    report = diagnose(home, redis_url=redis_server_with_password.url, online=True)
    assert report.check("redis.reachable").status == "ok"
    assert "s3cret-pass" not in json.dumps(report.to_json())


def test_offline_doctor_does_not_contact_redis(home: Path) -> None:
    check = diagnose(home, redis_url=f"redis://127.0.0.1:{free_port()}/0", online=False).check(
        "redis.reachable"
    )
    assert check.status == "skip"


def test_no_redis_configured_is_skipped(home: Path) -> None:
    assert diagnose(home, online=True).check("redis.reachable").status == "skip"


# -- the central Redis, as an operator checks it before trusting it --------------------

ADMIN = "admin-s3cret"


def redis_checks_of(home: Path, url: str, **settings: object) -> dict[str, CheckResult]:
    report = diagnose(home, redis_url=url, online=True, central_redis=True, **settings)
    return {c.id: c for c in report.checks if c.id.startswith("redis.")}


def test_a_well_kept_redis_passes_and_an_admin_user_is_a_warning(
        home: Path, tmp_path: Path) -> None:
    """AOF fsynced, noeviction, 7.x, the library loaded: every check ok but the user's,
    which may also EVAL, CONFIG, SCAN (right for a private Redis, not a central one)."""
    server = RedisServer(tmp_path / "kept", aof=True).start()
    try:
        checks = redis_checks_of(home, server.url)
        assert [checks[i].status for i in redis_checks.IDS] == [
            "ok", "ok", "ok", "ok", "ok", "warn", "warn"]
        assert checks["redis.version"].summary.startswith("redis 7.")
        assert checks["redis.topology"].summary == f"standalone at 127.0.0.1:{server.port}"
        assert "appendfsync always" in checks["redis.persistence"].summary
        assert "noeviction" in checks["redis.maxmemory_policy"].summary
        assert "may load it, so the first sync call does" in checks["redis.functions"].summary
        permissions = checks["redis.permissions"]
        assert "and more: EVAL, FUNCTION LOAD, CONFIG, SCAN, PUBLISH" in permissions.summary
        assert permissions.fix and "edgebundle fleet provision" in permissions.fix

        with redis_py.Redis(port=server.port) as admin:
            admin.function_load(lua.SOURCE)
            admin.function_load(lua._library("0123456789ab"))  # an older version's
        functions = redis_checks_of(home, server.url)["redis.functions"]
        assert functions.status == "ok" and lua.LIBRARY in functions.summary
        assert "also loaded: edgebundle_0123456789ab" in functions.summary
    finally:
        server.stop()


@pytest.mark.parametrize(("extra", "check", "status", "words"), [
    ((), "redis.persistence", "fail", "no persistence (appendonly no, save \"\")"),
    (("--save", "900 1"), "redis.persistence", "warn", "snapshots only (save 900 1)"),
    (("--appendonly", "yes", "--appendfsync", "no"), "redis.persistence", "warn",
     "appendfsync no"),
    (("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"), "redis.maxmemory_policy",
     "fail", "maxmemory-policy allkeys-lru (maxmemory 67108864 bytes)"),
    (("--maxmemory-policy", "volatile-ttl"), "redis.maxmemory_policy", "fail",
     "maxmemory-policy volatile-ttl (no maxmemory)"),
])
def test_a_redis_that_can_lose_threads_is_said_so_with_a_fix(
        home: Path, tmp_path: Path, extra: tuple[str, ...], check: str, status: str,
        words: str) -> None:
    server = RedisServer(tmp_path / "loose", extra=extra).start()
    try:
        result = redis_checks_of(home, server.url)[check]
        assert (result.status, words in result.summary) == (status, True), result
        assert result.fix and "CONFIG SET" in result.fix
    finally:
        server.stop()


# what a provisioned device user sees (it may not read CONFIG)
DEVICE_STATUSES = {
    "redis.reachable": "ok", "redis.version": "ok", "redis.topology": "ok",
    "redis.persistence": "skip", "redis.maxmemory_policy": "skip",
    "redis.functions": "ok", "redis.permissions": "ok"}


def provision_one(admin_url: str, device_id: str, base_url: str,
                  access: str = "direct") -> acl.DeviceCredentials:
    async def provision() -> acl.ProvisionResult:
        admin = await connect(admin_url)
        try:
            return await acl.provision(admin, "shops", [device_id], base_url=base_url,
                                       access=access)
        finally:
            await admin.aclose()
    return asyncio.run(provision()).credentials[0]


def test_as_a_provisioned_device_user_it_can_do_what_it_needs_and_nothing_more(
        home: Path, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "central", password=ADMIN, aclfile=True, aof=True).start()
    try:
        creds = provision_one(server.url, "kiosk-1", server.url)
        checks = redis_checks_of(home, creds.redis_url, fleet="shops")
        assert {i: c.status for i, c in checks.items()} == DEVICE_STATUSES
        assert "user dev:kiosk-1 may not read CONFIG" in checks["redis.persistence"].summary
        assert checks["redis.permissions"].summary == (
            "user dev:kiosk-1 can do what the sync core and the agent need, and EVAL, "
            "FUNCTION LOAD, CONFIG, SCAN, PUBLISH, writes on another device's keys, writes "
            "on the fleet's device set are refused; it may also write every thread's keys "
            "directly (provision with --access proxied behind edgebundle fleet proxy so that "
            "a stolen credential cannot)")
        assert creds.password not in json.dumps(diagnose(
            home, redis_url=creds.redis_url, online=True, central_redis=True).to_json())

        with redis_py.Redis(port=server.port, password=ADMIN) as admin:
            admin.function_flush()  # a restart without persistence, say
            functions = redis_checks_of(home, creds.redis_url)["redis.functions"]
            assert functions.status == "fail" and "may not load it" in functions.summary
            assert functions.fix and "edgebundle fleet load-functions" in functions.fix
            admin.function_load(lua.SOURCE)
            # a user made by an older edgebundle: EVAL and SADD on the fleet's set
            admin.execute_command("ACL", "SETUSER", "dev:kiosk-1", "+eval",
                                  f"(~{keys.fleet_devices('shops')} +srem +sadd)")
            loose = redis_checks_of(home, creds.redis_url, fleet="shops")["redis.permissions"]
            assert loose.status == "warn"
            assert "and more: EVAL, writes on the fleet's device set" in loose.summary
            admin.execute_command("ACL", "SETUSER", "dev:kiosk-1", "-fcall_ro")
            short = redis_checks_of(home, creds.redis_url)
            assert short["redis.functions"].status == "fail"
            assert short["redis.permissions"].status == "fail"
            assert "FCALL_RO (the library's functions)" in short["redis.permissions"].summary
    finally:
        server.stop()


def test_a_proxied_device_user_is_checked_through_the_proxy(home: Path, tmp_path: Path) -> None:
    """Through the sync proxy the device passes and is told its thread keys are
    read-only; with the same credentials straight to Redis it fails, with the fix."""
    server = RedisServer(tmp_path / "central", password=ADMIN, aclfile=True, aof=True).start()
    proxy = ProxyProcess(server.url, tmp_path / "proxy")
    try:
        creds = provision_one(server.url, "kiosk-2", proxy.url, access="proxied")
        checks = redis_checks_of(home, creds.redis_url, fleet="shops")
        assert {i: c.status for i, c in checks.items()} == DEVICE_STATUSES
        assert checks["redis.permissions"].summary.endswith(
            "thread keys are read-only for it (the sync proxy runs the functions)")

        direct = redis_checks_of(home, acl.device_url(server.url, creds.user, creds.password),
                                 fleet="shops")["redis.permissions"]
        assert direct.status == "fail" and "provisioned for the sync proxy" in direct.summary
        assert direct.fix and "edgebundle fleet proxy" in direct.fix
    finally:
        proxy.stop()
        server.stop()


def test_a_cluster_is_checked_on_every_primary(home: Path, cluster_redis: RedisCluster) -> None:
    async def load() -> None:
        redis = await connect(cluster_redis.url)
        try:
            await lua.load_library(redis)
        finally:
            await redis.aclose()
    asyncio.run(load())
    checks = redis_checks_of(home, cluster_redis.url)
    ports = sorted(node.port for node in cluster_redis.nodes)
    assert checks["redis.topology"].status == "ok"
    assert checks["redis.topology"].summary == "Redis Cluster of 3 primaries: " + ", ".join(
        f"127.0.0.1:{port}" for port in ports)
    assert checks["redis.functions"].summary.startswith(f"{lua.LIBRARY} (this version's "
                                                        "library) is loaded on all 3 primaries")
    assert checks["redis.persistence"].status == "fail"  # the test cluster keeps nothing
    assert f"on 127.0.0.1:{ports[0]}" in checks["redis.persistence"].summary


def test_a_redis_older_than_7_fails_the_version_check() -> None:
    """No Redis 6 here: the rule itself, on the facts HELLO would give."""
    old = redis_checks.Server(url="redis://h:1/0", client=None,  # type: ignore[arg-type]
                              user="default", name="redis", version=(6, 2, 14),
                              version_text="6.2.14", cluster=False, primaries=[])
    result = redis_checks._version(old)
    assert result.status == "fail" and "older than 7.0" in result.summary
    assert result.fix == "upgrade the Redis to 7.0 or newer (or Valkey 7.2 or newer)"


def test_the_doctor_command_checks_the_central_redis_and_run_preflight_does_not(
        home: Path, redis_server: RedisServer) -> None:
    """`edgebundle doctor` is the operator's look; `run`'s preflight and a fleet agent's
    checks of a revision (run_doctor's default) only ask whether the Redis answers."""
    shallow = diagnose(home, redis_url=redis_server.url, online=True)
    assert [c.id for c in shallow.checks if c.id.startswith("redis.")] == ["redis.reachable"]

    result = CliRunner().invoke(cli, ["doctor", "--json", "--redis-url", redis_server.url])
    checks = {c["id"]: c["status"] for c in json.loads(result.output)["checks"]}
    assert [i for i in checks if i.startswith("redis.")] == list(redis_checks.IDS)
    assert checks["redis.persistence"] == "fail" and result.exit_code == 1  # keeps nothing
