"""A real 3-node Redis Cluster for tests: three redis-server children on free ports.

The nodes are joined with ``redis-cli --cluster create`` (no replicas) and stopped by
their own pids, like :class:`tests.support.redis_server.RedisServer`.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.processes import free_port
from tests.support.redis_server import RedisServer

_MAX_CLUSTER_PORT = 55535  # a node's bus port is port + 10000


def cluster_port() -> int:
    """A free port a cluster node can use (its bus port, +10000, must exist too)."""
    while True:
        port = free_port()
        if port <= _MAX_CLUSTER_PORT:
            return port


@dataclass
class RedisCluster:
    directory: Path
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, size: int = 3) -> RedisCluster:
        try:
            for i in range(size):
                node = RedisServer(
                    self.directory / f"node{i}",
                    port=cluster_port(),
                    extra=("--cluster-enabled", "yes",
                           "--cluster-config-file", "nodes.conf",
                           "--cluster-node-timeout", "2000"),
                )
                self.nodes.append(node.start())
            cli = shutil.which("redis-cli")
            if cli is None:
                raise RuntimeError("redis-cli is not installed (it comes with redis-server)")
            addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
            subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0",
                 "--cluster-yes"],
                check=True, capture_output=True, timeout=30,
            )
            self._wait_ok(cli)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ok(self, cli: str) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states = [
                subprocess.run([cli, "-p", str(n.port), "cluster", "info"],
                               capture_output=True, text=True, timeout=5).stdout
                for n in self.nodes
            ]
            if all("cluster_state:ok" in s for s in states):
                return
            time.sleep(0.05)
        raise RuntimeError("the test Redis Cluster did not reach cluster_state:ok in 20 s")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()
