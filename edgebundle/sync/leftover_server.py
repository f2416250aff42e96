"""A redis-server an earlier ``edgebundle run`` left on a device's state directory.

A server left behind anyway (by an older version, on a host without pdeathsig, or a
``prctl`` that failed) is found through the pidfile Redis keeps in the state
directory (``redis.pid``) and stopped by that pid before the new server starts, but
only once it is proven to be a redis-server on this home's AOF:

- on Linux, from ``/proc/<pid>``: a live (not zombie) process of our own user whose
  name is redis-server and whose working directory is this state directory (Redis
  chdirs into its ``--dir``, where its AOF is);
- elsewhere (or if ``/proc`` cannot tell), from the server itself, on the port we
  record in ``redis.port``: ``INFO server`` says ``process_id`` is that pid and
  ``CONFIG GET`` says its ``dir`` and ``pidfile`` are ours.

A live process that is shown *not* to be one (another user's, another program that
got the pid after a reboot, a redis-server elsewhere) is left alone and the stale
pidfile ignored; one that can be neither proven ours nor ruled out makes ``start``
refuse, naming the pid. Stopping is SIGTERM (Redis fsyncs its AOF, so nothing it
acknowledged is lost), through a pidfd where the kernel has them so the signal can
only reach the process we examined; SIGKILL only through that pidfd, after
``STOP_TIMEOUT``. The leftover is stopped, not adopted: an adopted server would not be
our child (no pdeathsig, nobody to reap it) and would keep whatever settings an older
version gave it; starting ours again on the same AOF costs well under a second.
"""

from __future__ import annotations

import os
import select
import signal
import time
from pathlib import Path
from typing import Any, Literal

import redis

from edgebundle.errors import RedisAccessError

STOP_TIMEOUT = 10.0
PROCFS = Path("/proc/self/stat").exists()

# Whose is a live pid from our pidfile: gone (or a zombie), another process ("other":
# the pidfile is stale), our leftover redis-server ("ours"), or "unknown".
Owner = Literal["gone", "other", "ours", "unknown"]


def stop_leftover(pid: int, directory: Path, port: int | None, *, name: str, procfs: bool,
                  password: str | None) -> bool:
    """Stop the redis-server ``pid`` (from ``directory``'s pidfile) when it is proven ours;
    True when it was. Two servers on one AOF would corrupt it; one that can be neither
    proven ours nor ruled out is refused, naming the pid."""
    pidfd = _open_pidfd(pid)  # before the proof: then it can only be the proven one
    try:
        owner = owner_of(pid, directory, port, names=(name,), procfs=procfs,
                         password=password)
        if owner == "unknown":
            raise RedisAccessError(
                f"a process (pid {pid}) named in {directory / 'redis.pid'} may be a "
                f"redis-server left by an earlier `edgebundle run` on {directory}, but it "
                f"cannot be shown to be one: stop it (kill {pid}) and start again, or pass "
                "--redis-url"
            )
        if owner == "ours":
            _terminate(pid, pidfd)
            return True
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def owner_of(pid: int, directory: Path, port: int | None, *, names: tuple[str, ...] = (),
             procfs: bool = PROCFS, password: str | None = None) -> Owner:
    """Whose is live ``pid`` (read from ``directory``'s pidfile): "ours" only when it is
    proven to be a redis-server on ``directory`` (see above); ``port`` is where
    it was recorded to listen, ``names`` more names its binary may have than
    redis-server, ``procfs`` whether to ask ``/proc`` first, ``password`` what the
    server asks for (a leftover of an older version asks for none)."""
    if procfs:
        owner = _owner_in_proc(pid, directory, ("redis-server", *names))
        if owner != "unknown":
            return owner
    else:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "gone"
        except PermissionError:
            return "other"  # another user's: no `run` of ours started it
    if port is not None and any(_server_says_ours(pid, port, directory, secret)
                                for secret in dict.fromkeys((password, None))):
        return "ours"
    return "unknown"


def _owner_in_proc(pid: int, directory: Path, names: tuple[str, ...]) -> Owner:
    proc = Path("/proc", str(pid))
    if _state(pid) in (None, "Z", "X"):
        return "gone"  # or exited, and its parent has not reaped it yet
    try:
        if proc.stat().st_uid != os.getuid():
            return "other"
        if (proc / "comm").read_text().strip() not in {name[:15] for name in names}:
            return "other"  # the pid went to another program
        cwd = Path(os.readlink(proc / "cwd"))
    except FileNotFoundError:
        return "gone"
    except PermissionError:
        return "unknown"
    return "ours" if cwd == directory.resolve() else "other"


def _server_says_ours(pid: int, port: int, directory: Path, password: str | None) -> bool:
    """Whether the Redis on 127.0.0.1:``port`` is process ``pid`` serving ``directory``."""
    client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2,
                         socket_connect_timeout=2, decode_responses=True)
    try:
        info: dict[str, Any] = client.info("server")
        config = client.config_get("dir", "pidfile")
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()
    here, served, pidfile = directory.resolve(), config.get("dir"), config.get("pidfile")
    return (info.get("process_id") == pid and served is not None and pidfile is not None
            and Path(served).resolve() == here and Path(pidfile).resolve() == here / "redis.pid")


def _terminate(pid: int, pidfd: int | None) -> None:
    """SIGTERM ``pid`` and wait until it exits; SIGKILL through ``pidfd`` if it hangs."""
    if pidfd is not None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return
            if select.select([pidfd], [], [], STOP_TIMEOUT)[0]:  # readable: it exited
                return
        raise RedisAccessError(f"the redis-server (pid {pid}) left by an earlier `edgebundle run` "
                         "did not exit after SIGKILL")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if _exited(pid):
            return
        time.sleep(0.05)
    raise RedisAccessError(f"the redis-server (pid {pid}) left by an earlier `edgebundle run` did "
                     f"not stop within {STOP_TIMEOUT:g} s of SIGTERM: stop it (kill -9 {pid}) "
                     "and start again, or pass --redis-url")


def _exited(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (exited, not reaped by its new parent yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _state(pid) in ("Z", "X")


def _state(pid: int) -> str | None:
    """The state of ``pid`` in /proc ("Z": a zombie), None without an entry."""
    try:
        return Path("/proc", str(pid), "stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return None


def _open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid`` (Linux >= 5.3), else None (gone, or no pidfds here)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
