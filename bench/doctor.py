"""Benchmark: how long doctor's offline checks take on this machine.

Prints one JSON object per line (docs/api.md "Benchmarks"):

- ``doctor.offline_seconds``: median wall time of ``run_doctor(..., online=False)``
  in this process (imports already loaded), against the 1 s budget of the issue;
- ``doctor.offline_budget_ratio``: that median divided by the 1 s budget;
- ``doctor.cli_seconds``: median wall time of a whole ``python -m edgebundle doctor
  --json`` process (interpreter start and imports included), as a user sees it.

Usage: python bench/doctor.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from edgebundle.config import load_settings
from edgebundle.doctor import run_doctor

BUDGET_SECONDS = 1.0


def _median_seconds(runs: int, step: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _emit(bench: str, value: float, unit: str, baseline: str, goal: str) -> None:
    print(json.dumps({"bench": bench, "value": round(value, 4), "unit": unit,
                      "baseline": baseline, "goal": goal}), flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (well under a minute)")
    args = parser.parse_args()
    runs, cli_runs = (5, 2) if args.quick else (30, 5)

    settings = load_settings()
    run_doctor(settings, online=False)  # warm-up: imports, page cache
    offline = _median_seconds(runs, lambda: run_doctor(settings, online=False))
    _emit("doctor.offline_seconds", offline, "s", "1 s budget", "< 1")
    _emit("doctor.offline_budget_ratio", offline / BUDGET_SECONDS, "ratio", "1 s budget", "< 1")

    # The CLI contacts Redis when one is configured; keep this run offline too.
    env = {k: v for k, v in os.environ.items() if k != "EDGEBUNDLE_REDIS_URL"}
    argv = [sys.executable, "-m", "edgebundle", "doctor", "--json"]
    cli = _median_seconds(
        cli_runs, lambda: subprocess.run(argv, env=env, capture_output=True, check=False)
    )
    _emit("doctor.cli_seconds", cli, "s", "1 s budget", "< 1")


if __name__ == "__main__":
    main()
