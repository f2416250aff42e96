"""Put the device image's Python dependencies in deploy/device/wheels as wheels.

    python deploy/device/wheels.py          (with the Python the image runs: 3.11)

Built by this machine's pip, whose wheel cache keeps llama-cpp-python's source build
(~3 min the first time, seconds after), pinned to the versions this Python has
installed (constraints.txt), so the image runs what the tests ran here. The image's
build then installs them without compiling anything; the files are the same bytes
every time, so its Docker layers stay cached.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WHEELS = REPO / "deploy" / "device" / "wheels"


def requirements() -> list[str]:
    """What the image installs, plus what its Python needs that this one may not
    (redis-py wants async-timeout below Python 3.11.3; Debian bookworm has 3.11.2)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["embedded"],
            "hatchling>=1.21", "async-timeout>=4.0.3"]


def main() -> int:
    WHEELS.mkdir(parents=True, exist_ok=True)
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                            check=True, capture_output=True, text=True).stdout
    pins = sorted(line for line in freeze.splitlines()
                  if "==" in line and not line.lower().startswith("edgebundle=="))
    constraints = WHEELS / "constraints.txt"
    text = "".join(f"{line}\n" for line in pins)
    if not constraints.exists() or constraints.read_text() != text:
        constraints.write_text(text)
    reqs = WHEELS / "requirements.txt"
    reqs.write_text("".join(f"{r}\n" for r in requirements()))
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
         "--find-links", str(WHEELS), "-w", str(WHEELS), "-c", str(constraints),
         "-r", str(reqs)], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
