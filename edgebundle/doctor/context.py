"""The facts every check reads, gathered once per doctor run.

Which runtime ``run`` would use is not decided here: the runner asks
:func:`edgebundle.runtime.launch.choose_runtime`, the function ``run`` starts by,
once the wasmedge checks it depends on have run (``auto`` uses wasmedge only when
they pass).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgebundle.config import Settings
from edgebundle.host import CGROUP_ROOT, PROC_MOUNTINFO, HostInfo
from edgebundle.layout import Layout
from edgebundle.pins import AppPins, RuntimeLock
from edgebundle.runtime.wasmedge import WasmEdgeSetup

# Written by install.sh next to bin/ and plugin/ of an installed runtime.
RUNTIME_MARKER = "edgebundle-runtime.json"


@dataclass(frozen=True)
class RuntimeMarker:
    """What the installer recorded about the runtime it installed."""

    wasmedge_version: str | None
    plugin_version: str | None
    plugin_build: str | None
    variant: str | None
    os: str | None
    arch: str | None


def read_runtime_marker(layout: Layout) -> RuntimeMarker | None:
    """The marker of ``<home>/runtime/current``; None when absent or unreadable."""
    path = layout.runtime_current / RUNTIME_MARKER
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None

    def text(key: str) -> str | None:
        value = data.get(key)
        return value if isinstance(value, str) and value else None

    return RuntimeMarker(
        wasmedge_version=text("wasmedge_version"),
        plugin_version=text("plugin_version"),
        plugin_build=text("plugin_build"),
        variant=text("variant"),
        os=text("os"),
        arch=text("arch"),
    )


@dataclass(frozen=True)
class Context:
    settings: Settings
    environ: Mapping[str, str]
    host: HostInfo
    requested: str  # auto | wasmedge | embedded, as asked
    runtime: str  # wasmedge | embedded, as run chooses it ("" until chosen, see runner)
    setup: WasmEdgeSetup | None  # the located wasmedge, whatever the runtime
    lock: RuntimeLock
    app_pins: AppPins
    online: bool
    meminfo: Path
    cgroup_root: Path = CGROUP_ROOT  # the memory cgroup's limit (host.memory)
    root: Path = Path("/")  # container markers and the read-only root (host.disk)
    mountinfo: Path = PROC_MOUNTINFO  # the mount holding the home (host.disk)
    version_timeout: float = 5.0
    central_redis: bool = False  # of the sync Redis more than redis.reachable (the CLI)
    app_kind: str | None = "edgechat"  # of the app run starts; None when it cannot tell

    @property
    def layout(self) -> Layout:
        return self.settings.layout

    @property
    def uses_wasmedge(self) -> bool:
        return self.runtime == "wasmedge"

    @property
    def marker(self) -> RuntimeMarker | None:
        """The installer's marker, only when `run` would start that installed runtime."""
        if self.setup is None or self.setup.source != "installed":
            return None
        return read_runtime_marker(self.layout)
