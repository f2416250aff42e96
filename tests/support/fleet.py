"""Fleet test helpers: a real ``edgebundle agent`` child process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.processes import stop_child

FLEET = "shops"


class AgentProcess:
    """``python -m edgebundle agent …`` as a child process, stopped by its own pid."""

    def __init__(self, home: Path, device: str, redis_url: str, *extra: str) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.stderr_path = home / "agent.stderr"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
        env["EDGEBUNDLE_HOME"] = str(home)
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgebundle", "agent", "--device-id", device,
                 "--redis-url", redis_url, "--fleet", FLEET, *extra],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> int:
        return stop_child(self.proc)
