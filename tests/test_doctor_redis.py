"""redis.reachable against real redis-server processes (tests/support/redis_server.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.support.doctor_env import diagnose
from tests.support.processes import free_port
from tests.support.redis_server import RedisServer


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
