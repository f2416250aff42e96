"""Real redis-server processes for tests: started as children on free ports, stopped by pid.

Never daemonized and never stopped by name: each server is our own child process.
A server keeps its port and directory, so it can be stopped (SIGTERM, or ``kill()``
for SIGKILL) and started again on them: with ``aof=True`` (append-only file,
``appendfsync always``) it comes back with every write it acknowledged. With
``aclfile=True`` its ACL users are kept in ``users.acl`` in its directory (``ACL SAVE``
writes it, a restart loads it); ``password`` is then the admin (default user)'s.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.processes import free_port


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: run ./install.sh --dev --with-redis")
    return binary


@dataclass
class RedisServer:
    directory: Path
    port: int = field(default_factory=free_port)
    password: str | None = None
    extra: tuple[str, ...] = ()
    aof: bool = False  # append-only file, fsynced before every reply
    aclfile: bool = False  # ACL users saved to / loaded from <directory>/users.acl
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.aof else "no",
            "--appendfsync", "always",
            "--logfile", str(self.directory / "redis.log"),
        ]
        if self.aclfile:
            acl_path = self.directory / "users.acl"
            acl_path.touch()
            argv += ["--aclfile", str(acl_path)]
        if self.password:
            argv += ["--requirepass", self.password]
        argv += list(self.extra)
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text()
                raise RuntimeError(f"redis-server exited: {log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not start listening within 10 s")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last write (what a crash or a power cut does)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
