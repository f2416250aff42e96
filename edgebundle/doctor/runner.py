"""``run_doctor``: gather the facts once, run every check, return the report."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from edgebundle import apps, resources
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
from edgebundle.doctor.context import Context
from edgebundle.doctor.manifest_checks import DeviceTarget
from edgebundle.doctor.report import CheckResult, Report, assemble
from edgebundle.errors import UsageError
from edgebundle.host import CGROUP_ROOT, PROC_MEMINFO, PROC_MOUNTINFO, HostInfo, detect
from edgebundle.pins import AppPins, RuntimeLock, load_app_pins, load_runtime_lock
from edgebundle.runtime.launch import RuntimeChoice, choose_runtime, default_app
from edgebundle.runtime.wasmedge import locate

# In report order; each returns results for its own stable ids. The wasmedge area runs
# first and apart: which runtime run uses depends on its results.
AREAS: tuple[Callable[[Context], list[CheckResult]], ...] = (
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
    target: DeviceTarget | None = None,
    central_redis: bool = False,
    probe: bool = False,
    cgroup_root: Path = CGROUP_ROOT,
    root: Path = Path("/"),
    mountinfo: Path = PROC_MOUNTINFO,
) -> Report:
    """Check everything ``run`` depends on and say, per stable id, what is wrong.

    ``runtime`` overrides ``settings.runtime``; ``host``, ``environ``, ``meminfo``,
    ``cgroup_root`` (a memory limit), ``root`` (container markers, a read-only root)
    and ``mountinfo`` (the mount holding the home) describe the machine (default: this
    one); ``online=False`` leaves the network
    alone (Redis and the running gateway are skipped). Of the sync Redis only
    ``redis.reachable`` unless ``central_redis``: then also its version, topology,
    persistence, eviction policy,
    functions and the user's permissions (what ``edgebundle doctor`` shows an operator;
    not ``run``'s preflight or a fleet agent's checks of a revision, which must not stop
    a device over how the central Redis is kept). ``lock`` / ``app_pins`` default to
    the shipped pins.
    With ``target`` the device is also compared with what its fleet says it must run
    (the ``manifest.*`` checks; the fleet layer makes the target from a manifest).
    ``probe`` adds ``runtime.probe``: a short generation on the runtime ``run`` would
    use (:mod:`edgebundle.doctor.probe`).
    The report's runtime and reason come from :func:`choose_runtime`, the function
    ``run`` starts by, given these wasmedge checks' results.
    Raises PinError (exit 2) when a shipped lock file is malformed.
    """
    ctx = _context(settings, runtime, host, environ, online, lock, app_pins, meminfo,
                   central_redis)  # fmt: skip
    ctx = replace(ctx, cgroup_root=cgroup_root, root=root, mountinfo=mountinfo)
    wasmedge = wasmedge_checks.checks(ctx)
    choice = _choose(ctx, wasmedge)
    ctx = replace(ctx, runtime=choice.runtime)
    results = [*wasmedge, *(result for area in AREAS for result in area(ctx))]
    if target is not None:
        results.extend(manifest_checks.checks(ctx, target))
    if probe:
        from edgebundle.doctor.probe import probe as run_probe  # starts a guest: on demand

        results.append(run_probe(settings, failed_wasmedge_checks))
    refusal = str(choice.refusal) if choice.refusal is not None else None
    return assemble(ctx.runtime, results, reason=choice.reason, refusal=refusal)


def wasmedge_results(
    settings: Settings,
    *,
    environ: Mapping[str, str] | None = None,
    host: HostInfo | None = None,
    lock: RuntimeLock | None = None,
) -> list[CheckResult]:
    """Only the ``wasmedge.*`` checks, exactly as :func:`run_doctor` makes them (what
    ``run --runtime auto`` decides by, without the rest of doctor)."""
    ctx = _context(settings, None, host, environ, False, lock, None, PROC_MEMINFO, False)
    return wasmedge_checks.checks(ctx)


def failed_wasmedge_checks(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """The ids of the ``wasmedge.*`` checks that fail for ``settings``: what
    ``--runtime auto`` decides by (given to ``runtime.launch.resolve_launch``)."""
    return [c.id for c in wasmedge_results(settings, environ=environ) if c.status == "fail"]


def _context(
    settings: Settings,
    runtime: str | None,
    host: HostInfo | None,
    environ: Mapping[str, str] | None,
    online: bool,
    lock: RuntimeLock | None,
    app_pins: AppPins | None,
    meminfo: Path,
    central_redis: bool,
) -> Context:
    requested = runtime or settings.runtime
    if requested not in RUNTIMES:
        raise UsageError(f"runtime must be one of {', '.join(RUNTIMES)}, got {requested!r}")
    env = dict(os.environ) if environ is None else environ
    kind, _ = _app_kind(settings)
    return Context(
        settings=settings,
        environ=env,
        host=host or detect(),
        requested=requested,
        runtime="",  # chosen once the wasmedge checks have run (_choose)
        setup=locate(settings.layout, settings.wasmedge, env),
        lock=lock or load_runtime_lock(resources.runtime_lock_file()),
        app_pins=app_pins or load_app_pins(resources.app_pins_file()),
        online=online,
        meminfo=meminfo,
        central_redis=central_redis,
        app_kind=kind,
    )


def _app_kind(settings: Settings) -> tuple[str | None, UsageError | None]:
    """The kind of the app ``run`` starts (the packaged edgechat guest unless --app)."""
    app = settings.app if settings.app is not None else default_app()
    try:
        return apps.app_kind(app, settings.app_kind), None
    except UsageError as exc:
        return None, exc


def _choose(ctx: Context, wasmedge: list[CheckResult]) -> RuntimeChoice:
    failed = [c.id for c in wasmedge if c.status == "fail"]
    kind, unknown = _app_kind(ctx.settings)
    choice = choose_runtime(
        replace(ctx.settings, runtime=ctx.requested),
        kind=kind or "edgechat",
        wasmedge_found=ctx.setup is not None,
        wasmedge_failures=lambda: failed,
    )
    if unknown is not None:
        # run stops at the app before it chooses a runtime.
        return replace(choice, reason=str(unknown), refusal=unknown)
    return choice
