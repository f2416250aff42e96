"""The container tests' engine and images: a real dockerd driven by the Python Docker SDK.

Nothing is pulled from a registry: the base image is Debian bookworm from Debian
packages (deploy/base-image.sh: debootstrap + ``docker import``), the device and central
Redis images build FROM it. Builds keep Docker's layer cache between runs on one
machine, and the device image's Python dependencies come as wheels built by this
machine's pip (deploy/device/wheels.py, pip's wheel cache keeps llama-cpp-python), so a
rebuild after a source change takes seconds. The engine must be there when
EDGEBUNDLE_CI is set (.ci/run starts one): then a missing engine fails, never skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "edgebundle/debian:bookworm-slim"
DEVICE_IMAGE = "edgebundle/device:test"
REDIS_IMAGE = "edgebundle/central-redis:test"
COMPOSE_FILE = REPO / "deploy" / "central" / "compose.yaml"


def engine_expected() -> bool:
    return bool(os.environ.get("EDGEBUNDLE_CI"))


def docker_client() -> Any:
    """A client of a dockerd that answers; skips (fails under CI) when there is none."""
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError as exc:
        if engine_expected():
            pytest.fail(f"EDGEBUNDLE_CI is set but the docker SDK is missing: {exc}")
        pytest.skip("the docker Python SDK is not installed (pip install '.[dev]')")
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any way the engine cannot be reached
        if engine_expected():
            pytest.fail(f"EDGEBUNDLE_CI is set but no Docker engine answers: {exc}")
        pytest.skip(f"no Docker engine answers ({exc})")
    return client


def compose_command() -> list[str]:
    """``docker compose`` (v2) when the CLI has it, else ``docker-compose`` (v1)."""
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed")


def nice(argv: list[str]) -> list[str]:
    return ["nice", "-n", "19", *argv] if shutil.which("nice") else argv


def build_base() -> None:
    subprocess.run(nice([str(REPO / "deploy" / "base-image.sh"), BASE_IMAGE]), check=True)


def build_wheels() -> None:
    """The device image's dependency wheels, from this Python (the image's is 3.11);
    another Python leaves the build to compile what it needs."""
    if sys.version_info[:2] == (3, 11):
        result = subprocess.run(
            nice([sys.executable, str(REPO / "deploy" / "device" / "wheels.py")]),
            capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def build_image(client: Any, dockerfile: str, tag: str, context: Path, **args: str) -> float:
    """Build ``tag`` (legacy builder, layer cache kept, host network for apt and pip);
    returns the seconds it took."""
    started = time.monotonic()
    try:
        client.images.build(path=str(context), dockerfile=dockerfile, tag=tag, rm=True,
                            network_mode="host", buildargs={"BASE": BASE_IMAGE, **args})
    except Exception as exc:
        log = "".join(str(line.get("stream", "")) for line in getattr(exc, "build_log", []))
        raise AssertionError(f"building {tag} failed: {exc}\n{log[-4000:]}") from exc
    return time.monotonic() - started


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
