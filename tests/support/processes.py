"""Small process and port helpers shared by the tests that start real children."""

from __future__ import annotations

import os
import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gone(pid: int) -> bool:
    """True when no process has this pid any more (it exited and was reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def children(pid: int) -> list[int]:
    """The pids of the live children of ``pid`` (from /proc, every thread's list)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as listing:
                found += [int(child) for child in listing.read().split()]
        except FileNotFoundError:
            continue  # the thread ended meanwhile
    return sorted(set(found))


def cmdline(pid: int) -> list[str]:
    """The argv of process ``pid`` (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as raw:
            return [part.decode(errors="replace") for part in raw.read().split(b"\0") if part]
    except FileNotFoundError:
        return []


def exited(pid: int) -> bool:
    """True when ``pid`` is gone, or a zombie: it exited and nobody reaped it yet (an
    orphan's new parent, e.g. a container's pid 1, may never do so)."""
    if gone(pid):
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def stop_child(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    """SIGTERM a child we started, SIGKILL it after ``timeout`` s; its exit code."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
