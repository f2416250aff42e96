"""``<home>/env``: the shell file that puts the active runtime on PATH."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from edgebundle import files
from edgebundle.installed_runtimes import current_name
from edgebundle.layout import Layout
from edgebundle.runtime.wasmedge import PLUGIN_PATH_ENV, runtime_env


def write_env_file(layout: Layout) -> Path:
    """Write ``<home>/env`` (bash). It names ``current``, so switching runtimes needs no edit."""
    home = layout.home
    lines = [
        "# Written by `edgebundle install`; load it with:  . " + shlex.quote(str(layout.env_file)),
        f"export EDGEBUNDLE_HOME={shlex.quote(str(home))}",
    ]
    prefix = [str(layout.venv / "bin")]
    if current_name(layout) is not None:
        env = runtime_env(layout.runtime_current, {})
        prefix.append(env["PATH"])
        if "LD_LIBRARY_PATH" in env:
            lines.append(_prepend("LD_LIBRARY_PATH", env["LD_LIBRARY_PATH"]))
        lines.append(f"export {PLUGIN_PATH_ENV}={shlex.quote(env[PLUGIN_PATH_ENV])}")
    else:
        lines.append("# no WasmEdge installed: edgebundle uses its embedded runtime")
    lines.append(_prepend("PATH", os.pathsep.join(prefix)))
    files.write_text(layout.env_file, "\n".join(lines) + "\n")
    return layout.env_file


def _prepend(name: str, value: str) -> str:
    return f'export {name}={shlex.quote(value)}"${{{name}:+:${name}}}"'

