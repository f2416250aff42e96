"""A private redis-server for a device that was given no Redis URL (``edgebundle run``).

Without ``--redis-url`` a device still needs somewhere to keep its threads: it starts
its own redis-server as a child process under ``<home>/state/redis`` with the
append-only file on (threads survive a restart of the device), listening on the
loopback only, on a free port.

Durability: ``appendfsync always``: Redis writes and fsyncs the AOF before it
replies, so a write it acknowledged (a message, a batch of generated text, the end
of a run) survives a crash of the server (SIGKILL) and a power cut or kernel crash
of the device too. With Redis's default ``everysec`` a killed server usually loses
nothing (the write reached the OS before the reply), but a power cut loses up to
the last second, and a busy disk lets Redis postpone its writes by up to two
seconds, when even a kill loses them. The price is one fsync per write; a turn
writes a few times per second (text is batched every 20 ms), which a device's
storage affords.

Never daemonized: it is our child, stopped by its pid when ``run`` ends.

:func:`device_id` is the device's identity in the sync protocol: the configured one,
else one generated on first use and kept in ``<home>/state/device-id``.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

from edgebundle.config import Settings
from edgebundle.errors import RedisError
from edgebundle.sync import keys

START_TIMEOUT = 10.0  # s; an AOF of a small device loads in well under a second
STOP_TIMEOUT = 10.0


def device_id(settings: Settings) -> str:
    """The configured device id, else the one kept in the state directory (made once)."""
    if settings.device_id:
        return keys.check_id("device", settings.device_id)
    path = settings.layout.state / "device-id"
    if path.is_file():
        kept = path.read_text().strip()
        if kept:
            return keys.check_id("device", kept)
    made = f"dev-{secrets.token_hex(6)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(made + "\n")
    return made


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalRedis:
    """One redis-server child: ``start()`` it, use :attr:`url`, ``stop()`` it by its pid."""

    def __init__(self, directory: Path, binary: str | None = None) -> None:
        self.directory = directory
        self.binary = binary
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @staticmethod
    def installed() -> bool:
        """Whether a redis-server binary is on PATH."""
        return shutil.which("redis-server") is not None

    def start(self) -> LocalRedis:
        binary = self.binary or shutil.which("redis-server")
        if binary is None:
            raise RedisError(
                "redis-server is not installed and no --redis-url was given: install it "
                "(./install.sh --with-redis, or apt install redis-server) or pass --redis-url"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        self._refuse_a_leftover()
        log = self.directory / "redis.log"
        self.port = _free_port()
        argv = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",  # acknowledged = on disk (module docstring)
            "--save", "",
            "--daemonize", "no",
            "--pidfile", str(self.pidfile),
            "--logfile", str(log),
        ]  # fmt: skip
        try:
            # Its own session: a Ctrl-C in the terminal reaches `run`, which stops the
            # gateway first (runs end cleanly in Redis) and then this server.
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True)
        except OSError as exc:
            raise RedisError(f"cannot start {binary} ({exc.strerror or exc}): install "
                             "redis-server or pass --redis-url") from None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() \
                    else []
                self.process = None
                raise RedisError(
                    f"the private redis-server exited at start ({' '.join(tail) or 'no log'}); "
                    f"log: {log}, or pass --redis-url"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RedisError(f"the private redis-server did not listen within {START_TIMEOUT:g} s; "
                         f"log: {log}")

    @property
    def pidfile(self) -> Path:
        return self.directory / "redis.pid"

    def _refuse_a_leftover(self) -> None:
        """Two servers on one AOF would corrupt it: refuse while an earlier one lives
        (left behind by a `run` that was killed with SIGKILL)."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"redis-server" in cmdline:
            raise RedisError(
                f"a redis-server (pid {pid}) left by an earlier `edgebundle run` still uses "
                f"{self.directory}: stop it (kill {pid}) and start again, or pass --redis-url"
            )

    def stop(self) -> None:
        """SIGTERM (redis-server flushes its AOF and exits), SIGKILL if it hangs."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
