from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgebundle.download import EXTRA_CA_ENV
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer
from tests.support.release_server import ReleaseServer
from tests.support.serving import LoopThread
from tests.support.tls import TestCA, make_test_ca


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fast tier first: tests marked ``inprocess`` (the app in process on an engine
    double, seconds in all) run before the real-process ones (guests, servers, minutes),
    so a broken route fails fast. A stable sort: each tier keeps its own order."""
    items.sort(key=lambda item: item.get_closest_marker("inprocess") is None)


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    """One asyncio loop in a thread for a module's engines and chats."""
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server child process on a free port, stopped by pid afterwards."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for one test module (the devices of its tests share it)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server_with_password(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis-auth", password="s3cret-pass").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty EDGEBUNDLE_HOME for the test, so nothing touches the user's real one."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("EDGEBUNDLE_HOME", str(path))
    for name in ("EDGEBUNDLE_REDIS_URL", "EDGEBUNDLE_MODEL", "EDGEBUNDLE_APP", "EDGEBUNDLE_RUNTIME",
                 "EDGEBUNDLE_WASMEDGE", "WASMEDGE_PLUGIN_PATH"):
        monkeypatch.delenv(name, raising=False)
    return path


@pytest.fixture
def release_server(tmp_path: Path) -> Iterator[ReleaseServer]:
    """A local HTTP server standing in for GitHub releases (unreachable here)."""
    server = ReleaseServer(tmp_path / "srv").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A throwaway CA and a 127.0.0.1 server certificate it signed (openssl)."""
    return make_test_ca(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def https_release_server(
    tmp_path: Path, test_ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ReleaseServer]:
    """The release server over HTTPS; this process trusts its CA through
    $EDGEBUNDLE_EXTRA_CA_FILE (added to the system's CAs; verification stays on)."""
    monkeypatch.setenv(EXTRA_CA_ENV, str(test_ca.ca_cert))
    server = ReleaseServer(tmp_path / "srv-tls", tls=test_ca).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def standalone_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the whole session (tests use their own thread ids)."""
    server = RedisServer(tmp_path_factory.mktemp("redis-standalone")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cluster_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A real 3-node Redis Cluster for the whole session."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["standalone", "cluster"])
def sync_redis_url(request: pytest.FixtureRequest) -> str:
    """The URL of a real Redis: each sync test runs on standalone and on a 3-node cluster."""
    if request.param == "standalone":
        server: RedisServer = request.getfixturevalue("standalone_redis")
        return server.url
    cluster: RedisCluster = request.getfixturevalue("cluster_redis")
    return cluster.url
