"""Where things live on a device, below ``EDGEBUNDLE_HOME`` (default ``~/.edgebundle``).

::

    <home>/config.toml              settings (flag > env > this file > default)
    <home>/env                      shell env file written by the installer
    <home>/venv/                    the Python environment install.sh made
    <home>/runtime/wasmedge-<version>-<variant>/{bin,lib,plugin}
    <home>/runtime/current -> wasmedge-<version>-<variant>   (switching it = upgrade/rollback)
    <home>/apps/<name>-<version>.wasm
    <home>/apps/<app>/data/         the only directory a LlamaEdge app may touch (--dir .:.)
    <home>/models/<file>.gguf
    <home>/downloads/               partial downloads (<sha-or-name>.part), resumed on retry
    <home>/logs/                    supervisor logs
    <home>/state/                   device id and other small state
    <home>/cache/wasm/              compiled wasm modules of the embedded runtime (safe to delete)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "EDGEBUNDLE_HOME"


def default_home(environ: os._Environ[str] | dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    raw = env.get(HOME_ENV)
    return Path(raw).expanduser() if raw else Path.home() / ".edgebundle"


@dataclass(frozen=True)
class Layout:
    home: Path

    @property
    def config_file(self) -> Path:
        return self.home / "config.toml"

    @property
    def env_file(self) -> Path:
        return self.home / "env"

    @property
    def venv(self) -> Path:
        return self.home / "venv"

    @property
    def runtime_root(self) -> Path:
        return self.home / "runtime"

    @property
    def runtime_current(self) -> Path:
        return self.runtime_root / "current"

    def runtime_dir(self, version: str, variant: str) -> Path:
        return self.runtime_root / f"wasmedge-{version}-{variant}"

    @property
    def apps(self) -> Path:
        return self.home / "apps"

    def app_data(self, app: str) -> Path:
        """The directory app ``app`` (its file name without .wasm) gets as ``.``."""
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", app).lstrip(".") or "app"
        return self.apps / name / "data"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def downloads(self) -> Path:
        return self.home / "downloads"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def state(self) -> Path:
        return self.home / "state"

    @property
    def cache(self) -> Path:
        return self.home / "cache"
