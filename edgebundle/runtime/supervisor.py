"""Keep one child process up: start, readiness, restart with backoff, stop by pid.

Rules that matter on a shared device:

- Only the pid we started is ever signalled (SIGTERM, then SIGKILL after a grace
  period); never a process group, never "every wasmedge on the box". One thread
  reaps the child, under the same lock as every signal, so a pid we signal is still
  our unreaped child and cannot have been reused by another process.
- The child gets its own session (``start_new_session``), so a Ctrl-C in the terminal
  reaches only us and we stop the child in order.
- Its stdout and stderr are appended to one log file, interleaved with our own
  timestamped lines ("started pid N: …", "exited with code N, restarting in X s").
- A crash loop backs off exponentially and, after too many restarts in a window,
  gives up with a :class:`SupervisorError` instead of spinning forever.
- Pipe mode (``pipes=True``, for the chat guest): the child's stdin and stdout are
  pipes that belong to whoever talks to it (``on_spawn`` hands over each new child),
  only its stderr goes to the log, and readiness is whatever ``ready`` says (the
  guest's READY line). The supervisor never reads or writes those pipes.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from edgebundle.errors import SupervisorError
from edgebundle.runtime.launch import LaunchSpec

_POLL = 0.05  # seconds between readiness probes / status checks


@dataclass(frozen=True)
class Backoff:
    """Delay before restart n (0-based): initial * factor**n, at most ``maximum``."""

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 30.0

    def delay(self, attempt: int) -> float:
        return float(min(self.initial * self.factor**attempt, self.maximum))


@dataclass(frozen=True)
class RestartLimit:
    """Give up when ``restarts`` restarts already happened within ``window`` seconds."""

    restarts: int = 5
    window: float = 300.0


class Supervisor:
    """Runs ``spec`` as a child process and keeps it running until :meth:`stop`.

    ``ready`` is the readiness probe; None means "ready once it stayed up ``settle``
    seconds" (for apps with nothing to probe). With ``pipes`` the child's stdin and
    stdout are pipes and ``on_spawn`` is called with every child right after it
    started (from the thread that started it); its owner closes those pipes.
    """

    def __init__(
        self,
        spec: LaunchSpec,
        *,
        log_path: Path,
        ready: Callable[[], bool] | None = None,
        backoff: Backoff = Backoff(),
        stable_after: float = 60.0,
        restart_limit: RestartLimit = RestartLimit(),
        stop_grace: float = 10.0,
        settle: float = 1.0,
        pipes: bool = False,
        on_spawn: Callable[[subprocess.Popen[bytes]], None] | None = None,
    ) -> None:
        self.spec = spec
        self.log_path = log_path
        self._ready = ready
        self._backoff = backoff
        self._stable_after = stable_after
        self._limit = restart_limit
        self._stop_grace = stop_grace
        self._settle = settle
        self._pipes = pipes
        self._on_spawn = on_spawn
        self._lock = threading.Lock()  # guards _proc against stop() racing a restart
        self._log_lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._stopping = threading.Event()
        self._done = threading.Event()  # the monitor has ended (stopped or gave up)
        self._stopped = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._thread: threading.Thread | None = None
        self._failure: SupervisorError | None = None
        self._exits = 0
        self._ready_seen = threading.Event()
        self.restarts = 0
        self.delays: list[float] = []  # every backoff delay used, in order
        self.last_exit_code: int | None = None

    # -- state ---------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The pid of the running child, or None between restarts and after stop."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def failure(self) -> SupervisorError | None:
        """Why the supervisor gave up, if it did."""
        return self._failure

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the child and the monitor thread that restarts it."""
        if self._thread is not None:
            raise SupervisorError("this supervisor was already started; make a new one")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._spawn()
        self._thread = threading.Thread(
            target=self._monitor, name="edgebundle-supervisor", daemon=True
        )
        self._thread.start()

    def wait_ready(self, timeout: float, cancel: threading.Event | None = None) -> bool:
        """Block until the first child is ready (True) or ``cancel`` is set (False).

        Raises SupervisorError, with the end of the log, when the child exits before it
        is ready or ``timeout`` seconds pass.
        """
        waiter = cancel if cancel is not None else threading.Event()
        deadline = time.monotonic() + timeout
        while True:
            # Readiness first: a child that was ready and then died is a crash to restart
            # from (the monitor does), not a start-up failure; run_until reports give-ups.
            if self._ready_seen.is_set() or self._is_ready():
                self._ready_seen.set()
                return True
            if self._failure is not None:
                raise self._failure
            if self._exits:
                raise SupervisorError(
                    f"{self._name()} {describe_exit(self.last_exit_code)} before it was ready; "
                    f"{self._log_hint()}"
                )
            if waiter.is_set():
                return False
            if time.monotonic() >= deadline:
                raise SupervisorError(
                    f"{self._name()} was not ready after {timeout:g} s; {self._log_hint()}"
                )
            waiter.wait(_POLL)

    def mark_ready(self) -> None:
        """Record that a child became ready (for probes that learn it from the child's
        own words, e.g. a READY line, the moment it happens rather than at the next poll)."""
        self._ready_seen.set()

    def run_until(self, stop: threading.Event) -> None:
        """Keep supervising until ``stop`` is set; raise if the supervisor gave up."""
        while not stop.wait(_POLL * 2):
            if self._done.is_set():
                break
        if self._failure is not None:
            raise self._failure

    def stop(self) -> None:
        """SIGTERM our child, SIGKILL it after the grace period; idempotent."""
        with self._stop_lock:
            if self._stopped:
                return
            with self._lock:
                self._stopping.set()
                proc = self._proc
                if self._signal(proc, signal.SIGTERM):
                    self._note(f"stopping pid {proc.pid if proc else '?'} (SIGTERM)")
            # The monitor reaps the child and then ends; it is the only one that waits.
            if self._thread is not None and not self._done.wait(self._stop_grace):
                with self._lock:
                    if self._signal(proc, signal.SIGKILL):
                        self._note(
                            f"pid {proc.pid if proc else '?'} still running after "
                            f"{self._stop_grace:g} s (SIGKILL)"
                        )
                self._done.wait()
            if self._thread is not None:
                self._thread.join()
            self._stopped = True

    def _signal(self, proc: subprocess.Popen[bytes] | None, sig: signal.Signals) -> bool:
        """Signal our own child if it has not been reaped. Call with ``_lock`` held.

        Only the monitor reaps, and only under ``_lock``: an unreaped pid is still our
        child (alive or a zombie), so it cannot belong to anyone else.
        """
        if proc is None or proc.returncode is not None:
            return False
        os.kill(proc.pid, sig)
        return True

    # -- internals -----------------------------------------------------------------

    def _spawn(self) -> bool:
        """Start one child; False if a stop is under way. Raises SupervisorError."""
        with self._lock:
            if self._stopping.is_set():
                return False
            try:
                with open(self.log_path, "ab") as log:
                    proc = subprocess.Popen(
                        list(self.spec.argv),
                        env={**os.environ, **self.spec.env},
                        cwd=self.spec.cwd,
                        stdin=subprocess.PIPE if self._pipes else subprocess.DEVNULL,
                        stdout=subprocess.PIPE if self._pipes else log,
                        stderr=log if self._pipes else subprocess.STDOUT,
                        start_new_session=True,
                        bufsize=0,
                    )
            except OSError as exc:
                message = f"cannot start {self.spec.argv[0]}: {exc.strerror or exc}"
                self._note(message)
                hint = "check the path, or run `edgebundle doctor`"
                raise SupervisorError(f"{message}; {hint}") from None
            self._proc = proc
            self._started_at = time.monotonic()
            self._note(f"started pid {proc.pid}: {shlex.join(self.spec.argv)}")
            if self._on_spawn is not None:
                self._on_spawn(proc)
        return True

    def _monitor(self) -> None:
        consecutive = 0
        recent: deque[float] = deque()
        try:
            while True:
                proc = self._proc
                assert proc is not None
                code = self._reap(proc)
                uptime = time.monotonic() - self._started_at
                if self._stopping.is_set():
                    self._note(f"pid {proc.pid} {describe_exit(code)} (stopped)")
                    return
                self.last_exit_code = code
                self._exits += 1
                if uptime >= self._stable_after:
                    consecutive = 0  # it was healthy for a while: a fresh crash, not a loop
                now = time.monotonic()
                while recent and now - recent[0] > self._limit.window:
                    recent.popleft()
                if len(recent) >= self._limit.restarts:
                    message = (
                        f"{self._name()} {describe_exit(code)} again after {len(recent)} restarts "
                        f"within {self._limit.window:g} s; gave up"
                    )
                    self._note(message)
                    self._failure = SupervisorError(f"{message}; {self._log_hint()}")
                    return
                delay = self._backoff.delay(consecutive)
                consecutive += 1
                recent.append(now)
                self.delays.append(delay)
                self._note(f"pid {proc.pid} {describe_exit(code)}, restarting in {delay:g} s")
                if self._stopping.wait(delay) or not self._spawn():
                    return
                self.restarts += 1
        except SupervisorError as exc:
            self._failure = exc
        finally:
            self._done.set()

    def _reap(self, proc: subprocess.Popen[bytes]) -> int:
        """Wait for the child to exit, then reap it under ``_lock`` (see :meth:`_signal`)."""
        if hasattr(os, "waitid"):
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, still unreaped
        else:  # pragma: no cover - platforms without waitid: Popen's own wait
            proc.wait()
        with self._lock:
            return proc.wait()

    def _is_ready(self) -> bool:
        if self.pid is None:
            return False
        if self._ready is not None:
            return self._ready()
        return time.monotonic() - self._started_at >= self._settle

    def _name(self) -> str:
        return Path(self.spec.argv[0]).name

    def note(self, text: str) -> None:
        """Add a timestamped line of ours to the log (e.g. what the child said on a pipe)."""
        self._note(text)

    def _note(self, text: str) -> None:
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        with self._log_lock, open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"{stamp} edgebundle: {text}\n")

    def _log_hint(self) -> str:
        tail = log_tail(self.log_path)
        if not tail:
            return f"log: {self.log_path}"
        return f"last log lines: {tail} (full log: {self.log_path})"


def describe_exit(code: int | None) -> str:
    """``exited with code 3`` / ``was killed by SIGKILL``."""
    if code is None:
        return "exited"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def log_tail(path: Path, lines: int = 5, max_bytes: int = 4096) -> str:
    """The last non-empty lines of a log file, joined on one line."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)
