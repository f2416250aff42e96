"""``run_doctor``: gather the facts once, run every check, return the report."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from edgebundle import resources
from edgebundle.config import RUNTIMES, Settings
from edgebundle.doctor import (
    app_checks,
    host_checks,
    manifest_checks,
    model_checks,
    redis_checks,
    runtime_checks,
    sync_checks,
    wasmedge_checks,
)
from edgebundle.doctor.context import Context, resolve_runtime
from edgebundle.doctor.report import CheckResult, Report, assemble
from edgebundle.errors import UsageError
from edgebundle.fleet.manifest import Manifest
from edgebundle.host import PROC_MEMINFO, HostInfo, detect
from edgebundle.pins import AppPins, RuntimeLock, load_app_pins, load_runtime_lock
from edgebundle.runtime.wasmedge import locate

# In report order; each returns results for its own stable ids.
AREAS: tuple[Callable[[Context], list[CheckResult]], ...] = (
    wasmedge_checks.checks,
    runtime_checks.checks,
    model_checks.checks,
    app_checks.checks,
    redis_checks.checks,
    sync_checks.checks,
    host_checks.checks,
)


def run_doctor(
    settings: Settings,
    *,
    runtime: str | None = None,
    host: HostInfo | None = None,
    environ: Mapping[str, str] | None = None,
    online: bool = True,
    lock: RuntimeLock | None = None,
    app_pins: AppPins | None = None,
    meminfo: Path = PROC_MEMINFO,
    manifest: Manifest | None = None,
    central_redis: bool = False,
    probe: bool = False,
) -> Report:
    """Check everything ``run`` depends on and say, per stable id, what is wrong.

    ``runtime`` overrides ``settings.runtime``; ``host``, ``environ`` and ``meminfo``
    describe the machine (default: this one); ``online=False`` leaves the network
    alone (Redis and the running gateway are skipped). Of the sync Redis only
    ``redis.reachable`` unless ``central_redis``: then also its version, topology,
    persistence, eviction policy,
    functions and the user's permissions (what ``edgebundle doctor`` shows an operator;
    not ``run``'s preflight or a fleet agent's checks of a revision, which must not stop
    a device over how the central Redis is kept). ``lock`` / ``app_pins`` default to
    the shipped pins.
    With ``manifest`` the device is also compared with what that fleet manifest says
    it must run (the ``manifest.*`` checks). ``probe`` adds ``runtime.probe``: a short
    generation on the runtime ``run`` would use (:mod:`edgebundle.doctor.probe`).
    Raises PinError (exit 2) when a shipped lock file is malformed.
    """
    requested = runtime or settings.runtime
    if requested not in RUNTIMES:
        raise UsageError(f"runtime must be one of {', '.join(RUNTIMES)}, got {requested!r}")
    env = dict(os.environ) if environ is None else environ
    setup = locate(settings.layout, settings.wasmedge, env)
    ctx = Context(
        settings=settings,
        environ=env,
        host=host or detect(),
        requested=requested,
        runtime=resolve_runtime(requested, setup),
        setup=setup,
        lock=lock or load_runtime_lock(resources.runtime_lock_file()),
        app_pins=app_pins or load_app_pins(resources.app_pins_file()),
        online=online,
        meminfo=meminfo,
        central_redis=central_redis,
    )
    results = [result for area in AREAS for result in area(ctx)]
    if manifest is not None:
        results.extend(manifest_checks.checks(ctx, manifest))
    if probe:
        from edgebundle.doctor.probe import probe as run_probe  # starts a guest: on demand

        results.append(run_probe(settings))
    return assemble(ctx.runtime, results)
