"""edgebundle: a deployment bundle for running a llama chat on fleets of edge devices.

The CLI (:mod:`edgebundle.cli`) is a thin layer over the core; everything a command
does is reachable without click, through the names below (``from edgebundle import
serve, ask, run_doctor``). They are imported on first use (PEP 562), so ``import
edgebundle`` stays light on a device that has only some of the extras.

Layers, each importing only those below it (the folder tree shows them)::

    cli/                      click commands: parse, call one core function, render
    fleet/                    manifests, rollouts, the agent, ACL users, the sync proxy
    serving.py                run and ask: wiring of everything below
    gateway/                  HTTP: OpenAI API, sync API, web page, metrics
    turns.py, limits.py       a turn on a synced thread, and the device's caps (no HTTP)
    doctor/                   the checks (and --probe)
    completion.py, context_window   prompts, stop strings, context windows
    engine.py                 one supervised chat guest and its protocol
    sync/                     threads in Redis: functions, runs, replication
    runtime/                  wasmedge or the embedded runtime: launch, supervise
    keys, config, layout, host, pins, download, files, sse, errors …   leaves
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "Settings": "edgebundle.config",
    "load_settings": "edgebundle.config",
    "EdgebundleError": "edgebundle.errors",
    "serve": "edgebundle.serving",
    "ask": "edgebundle.serving",
    "launch_spec": "edgebundle.serving",
    "run_doctor": "edgebundle.doctor",
    "Engine": "edgebundle.engine",
    "ChatService": "edgebundle.completion",
    "SyncService": "edgebundle.sync.service",
    "connect": "edgebundle.sync.client",
    "install": "edgebundle.installer",
    "provision": "edgebundle.fleet.acl",
    "SyncProxy": "edgebundle.fleet.proxy",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'edgebundle' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
