"""The fleet agent's served ``edgebundle run``: one child started per revision, by pid.

Owns starting it (own log file, no password in argv), waiting for its ``/healthz`` and
stopping it (SIGTERM, then SIGKILL after a grace; only the pid we started). Unlike
:class:`~edgebundle.runtime.supervisor.Supervisor` it does not restart on its own: the
agent decides when a revision's ``run`` starts again, so a restart never races a switch.
The waits run in threads, so the agent's heartbeats and nudges go on meanwhile.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from edgebundle.errors import SupervisorError

STOP_GRACE = 20.0  # s a served run gets to stop after SIGTERM, then SIGKILL
HEALTHZ_TIMEOUT = 120.0  # s a started run gets to load its model


class RunChild:
    """At most one child process; ``process`` is the running one (None: none started)."""

    def __init__(self, log_file: Path) -> None:
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` (the caller stopped the previous child), output appended to the log."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            self.process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=out, env=dict(env))
        return self.process

    async def wait_healthy(self, url: str, timeout: float = HEALTHZ_TIMEOUT) -> None:
        """Until ``url`` answers 200; SupervisorError if the child exits or time runs out."""
        child = self.process
        assert child is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise SupervisorError(f"edgebundle run exited with {child.returncode}"
                                      f"{last_error(self.log_file)}; see {self.log_file}")
            if await asyncio.to_thread(_healthz_ok, url):
                return
            await asyncio.sleep(0.2)
        raise SupervisorError(f"edgebundle run did not answer {url} within {timeout:.0f} s")

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the child, SIGKILL after ``grace`` s (the grace is longer than the
        heartbeat's TTL: a blocked event loop would make the device look offline)."""
        child, self.process = self.process, None
        if child is None or child.poll() is not None:
            return
        child.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(child.wait, grace)
        except subprocess.TimeoutExpired:
            child.kill()
            await asyncio.to_thread(child.wait)


def last_error(log: Path) -> str:
    """``: <the last error line>`` of ``edgebundle run``'s log, or "" when it has none."""
    try:
        with log.open("rb") as fh:
            fh.seek(max(0, log.stat().st_size - 8192))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("edgebundle: error: ")]
    return f": {errors[-1][len('edgebundle: error: '):]}" if errors else ""


def _healthz_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (our own http URL)
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False
