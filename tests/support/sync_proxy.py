"""The sync proxy (``edgebundle fleet proxy``) as a child process, stopped by its own pid."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.support.processes import stop_child


class ProxyProcess:
    """``python -m edgebundle fleet proxy`` in front of ``redis_url``; ``url`` is where
    devices connect (its first port; a cluster gets one port per node). It listens on
    ports the system picks, read from its "listening" line."""

    def __init__(self, redis_url: str, log_dir: Path, *extra: str) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = log_dir / f"proxy-{time.monotonic_ns()}.stderr"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgebundle", "fleet", "proxy", "--redis-url", redis_url,
                 "--listen", "127.0.0.1:0", *extra],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)
        self.ports = self._wait_ready()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def _wait_ready(self, timeout: float = 30) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"port\(s\) ([\d, ]+)", self.stderr())
            if found:
                return [int(p) for p in found[1].split(",")]
            if self.proc.poll() is not None:
                raise RuntimeError(f"the proxy exited {self.proc.returncode}: {self.stderr()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the proxy did not start: {self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> int:
        return stop_child(self.proc)
