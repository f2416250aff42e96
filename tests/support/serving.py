"""Helpers for the serving tests: a real `edgebundle run` child, and an event loop thread.

No doubles here: :class:`RunProcess` starts ``python -m edgebundle run …`` as a child
process on a free port (stopped by its own pid), and :class:`LoopThread` runs one
asyncio loop in a thread so a module-scoped engine can serve many tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.support.processes import free_port

T = TypeVar("T")


def wait_for(condition: Any, timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval)


def started_pids(log: Path) -> list[int]:
    """The pids the supervisor started, from its log (edgechat.log), oldest first."""
    return [int(line.split("started pid ")[1].split(":")[0])
            for line in log.read_text().splitlines() if "edgebundle: started pid " in line]


class LoopThread:
    """One asyncio loop in a daemon thread; :meth:`run` runs a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class RunProcess:
    """``python -m edgebundle run ARGS --port N`` as a child; read its line, probe, stop it."""

    def __init__(self, args: Sequence[str], *, home: Path, port: int | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
        # A child that will not stop is made to print every thread's stack (SIGABRT).
        environ.update({"EDGEBUNDLE_HOME": str(home), "PYTHONFAULTHANDLER": "1",
                        **(env or {})})
        self.stderr_path = home / "run.stderr"
        home.mkdir(parents=True, exist_ok=True)
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgebundle", "run", *args, "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=self._stderr, env=environ, text=True,
        )  # fmt: skip

    def read_line(self, timeout: float = 30.0) -> str:
        """The next stdout line (the "serving …" line); fails with stderr if none comes."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no output in {timeout} s; stderr: {self.stderr()}"
        line = self.proc.stdout.readline()
        assert line, f"run exited ({self.proc.wait(5)}); stderr: {self.stderr()}"
        return line

    def healthz(self) -> httpx.Response:
        return httpx.get(f"{self.base_url}/healthz", timeout=5)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        wait_for(lambda: self.healthz().status_code == 200, timeout, interval=0.05)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # faulthandler: its stacks to stderr
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            raise AssertionError(f"edgebundle run did not stop in {timeout:g} s after "
                                 f"{sig.name}; stderr:\n{self.stderr()}") from None
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()

    def stderr(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")


@contextmanager
def healthy_run(args: Sequence[str], *, home: Path,
                env: Mapping[str, str] | None = None) -> Iterator[RunProcess]:
    """``edgebundle run ARGS`` serving (healthz 200); afterwards it must stop with exit 0."""
    run = RunProcess(args, home=home, env=env)
    try:
        run.read_line()
        run.wait_healthy()
        yield run
        assert run.stop() == 0, run.stderr()
    finally:
        run.close()
