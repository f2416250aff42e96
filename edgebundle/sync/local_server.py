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

It dies with ``run``: when ``run`` itself is killed (SIGKILL, e.g. by the OOM killer
of a small device) nothing of ours runs to stop the server, and a server left on the
AOF would keep the next ``run`` out (two servers on one AOF corrupt it), so a
supervised device would stay down. On Linux the child therefore asks the kernel,
between fork and exec, for ``PR_SET_PDEATHSIG`` = SIGTERM (``prctl``, through
ctypes, in ``preexec_fn``): when its parent goes, Redis gets SIGTERM, fsyncs its AOF,
removes its pidfile and exits. If ``run`` died before the ``prctl`` took effect, the
child sees another parent and exits before exec. The kernel's "parent" is the
*thread* that forked, not the process: :meth:`LocalRedis.start` must be called on a
thread that lives until :meth:`LocalRedis.stop`. ``serve`` starts and stops it on the
thread that runs the gateway to the end (the main thread of ``edgebundle run``),
never on a worker thread (an executor, ``asyncio.to_thread``) that could end first
and take the server with it.

A server left behind anyway (by an older version, on a host without pdeathsig, or a
``prctl`` that failed) is found through the pidfile Redis keeps in the state
directory (``redis.pid``) and stopped before the new server starts, but only once it
is proven to be a redis-server on this home's AOF
(:mod:`edgebundle.sync.leftover_server`).

Private means private: the server asks for a password (a random one, made once and
kept in ``redis.conf`` in the state directory, mode 0600, read by redis-server as its
config file, so it never shows on a command line), the directory is 0700 and the
server runs with umask 077, so its AOF, log and pidfile are 0600: another user of the
device can neither connect nor read the threads off the disk. The URL with the
password is in ``redis.url`` (0600) while the server runs, for whoever may read it
(the tests, an operator); what ``run`` prints redacts the password.

:func:`device_id` is the device's identity in the sync protocol: the configured one,
else one generated on first use and kept in ``<home>/state/device-id``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from edgebundle.config import Settings, redact_url
from edgebundle.device_ids import kept_device_id
from edgebundle.errors import RedisAccessError
from edgebundle.sync.leftover_server import PROCFS, STOP_TIMEOUT, stop_leftover

START_TIMEOUT = 10.0  # s; an AOF of a small device loads in well under a second
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def device_id(settings: Settings) -> str:
    """The configured device id, else the one kept in the state directory (made once)."""
    return kept_device_id(settings, "device-id", "dev")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalRedis:
    """One redis-server child: ``start()`` it, use :attr:`url`, ``stop()`` it by its pid.

    Call ``start()`` and ``stop()`` on one thread that lives in between (module
    docstring: the child's pdeathsig fires when the thread that forked it ends).
    """

    def __init__(self, directory: Path, binary: str | None = None, *,
                 procfs: bool = PROCFS) -> None:
        self.directory = directory
        self.binary = binary
        self.procfs = procfs  # whether /proc is asked about a leftover (False: as elsewhere)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.replaced: int | None = None  # the pid of a leftover server start() stopped
        self._password: str | None = None  # once read or made (the directory is walked once)

    @property
    def url(self) -> str:
        """The URL to connect with, password included (print :attr:`shown_url`)."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def shown_url(self) -> str:
        """:attr:`url` with the password redacted."""
        return redact_url(self.url)

    @property
    def config_file(self) -> Path:
        """redis-server's config file: the password (``requirepass``), mode 0600."""
        return self.directory / "redis.conf"

    @property
    def url_file(self) -> Path:
        """The URL with the password, mode 0600, while the server runs."""
        return self.directory / "redis.url"

    @property
    def password(self) -> str:
        """The server's password: made once, kept in :attr:`config_file`."""
        if self._password is None:
            self._password = self._secure_config()
        return self._password

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def pidfile(self) -> Path:
        """Written by redis-server itself at start, removed when it shuts down."""
        return self.directory / "redis.pid"

    @property
    def portfile(self) -> Path:
        """The port of the running server: how a leftover is asked who it is."""
        return self.directory / "redis.port"

    @staticmethod
    def installed() -> bool:
        """Whether a redis-server binary is on PATH."""
        return shutil.which("redis-server") is not None

    def _secure_config(self) -> str:
        """The directory 0700 with its files 0600, and the config file with the
        password (made now if there is none yet); the password."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _private(self.directory)
        try:
            for line in self.config_file.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == "requirepass" and value:
                    return value
        except FileNotFoundError:
            pass
        password = secrets.token_hex(24)
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("# written by edgebundle run: the private redis-server's password\n"
                      f"requirepass {password}\n")
        return password

    def command(self, binary: str, port: int) -> list[str]:
        """The redis-server command line for this directory on ``port`` (its config
        file, with the password, is written first if it is not there yet)."""
        self._secure_config()
        return [
            binary,
            str(self.config_file),  # first: redis-server reads it as its config file
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",  # acknowledged = on disk (module docstring)
            "--save", "",
            "--daemonize", "no",
            "--pidfile", str(self.pidfile),
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip

    def start(self) -> LocalRedis:
        binary = self.binary or shutil.which("redis-server")
        if binary is None:
            raise RedisAccessError(
                "redis-server is not installed and no --redis-url was given: install it "
                "(./install.sh --with-redis, or apt install redis-server) or pass --redis-url"
            )
        self._secure_config()
        self._stop_a_leftover(Path(binary).name)
        log = self.directory / "redis.log"
        self.port = _free_port()
        try:
            # Its own session: a Ctrl-C in the terminal reaches `run`, which stops the
            # gateway first (runs end cleanly in Redis) and then this server.
            self.process = subprocess.Popen(self.command(binary, self.port),
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_dies_with_parent(),
                                            umask=0o077)  # its files: 0600 (module doc)
        except OSError as exc:
            raise RedisAccessError(f"cannot start {binary} ({exc.strerror or exc}): install "
                             "redis-server or pass --redis-url") from None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() \
                    else []
                self.process = None
                raise RedisAccessError(
                    f"the private redis-server exited at start ({' '.join(tail) or 'no log'}); "
                    f"log: {log}, or pass --redis-url"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    self.portfile.write_text(f"{self.port}\n")
                    _write_private(self.url_file, self.url + "\n")
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RedisAccessError(f"the private redis-server did not listen within "
                               f"{START_TIMEOUT:g} s; log: {log}")

    def _stop_a_leftover(self, name: str) -> None:
        """Stop a server an earlier ``run`` left on this directory
        (:mod:`edgebundle.sync.leftover_server`): two servers on one AOF would corrupt it."""
        pid = _read_int(self.pidfile)
        if pid is not None and stop_leftover(pid, self.directory, _read_int(self.portfile),
                                             name=name, procfs=self.procfs,
                                             password=self.password):
            self.replaced = pid

    def stop(self) -> None:
        """SIGTERM (redis-server flushes its AOF and exits), SIGKILL if it hangs."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.portfile.unlink(missing_ok=True)
        self.url_file.unlink(missing_ok=True)


def _private(directory: Path) -> None:
    """``directory`` 0700 and what is in it 0600 (0700 for directories): files an
    older version left readable by all (the AOF holds every thread) are closed too."""
    directory.chmod(0o700)
    for path in directory.rglob("*"):
        if path.is_symlink():
            continue
        # A running server's temporary files (an AOF rewrite's) come and go meanwhile.
        with contextlib.suppress(FileNotFoundError):
            path.chmod(0o700 if path.is_dir() else 0o600)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600 from the start)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _dies_with_parent() -> Callable[[], None] | None:
    """Linux: what the child runs between fork and exec so that the kernel sends it
    SIGTERM when the thread that forked it ends (module docstring); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def in_child() -> None:
        # A failure leaves a server that outlives a killed `run`: the next start stops it.
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # `run` died before the prctl: no signal would come
            os._exit(1)

    return in_child
