"""Checks of this device against what its fleet says it must run (``doctor --manifest FILE``).

The device is compared with a :class:`DeviceTarget`: the fleet's revision spec with
this device's overrides applied, which the fleet layer makes from a manifest
(``edgebundle.fleet.selection.device_target``; doctor sits below fleet and takes only
what it compares). Compared: the model file's sha256, the chat template, the runtime
kind and WasmEdge version, and the app's sha256. Each difference is one named check
with a fix, like every other drift; these ids exist only in reports made with a target.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgebundle.doctor.app_checks import configured_app, sha256_file
from edgebundle.doctor.context import Context
from edgebundle.doctor.report import CheckResult, fail, ok, skip
from edgebundle.runtime.launch import default_app

MODEL = "manifest.model"
TEMPLATE = "manifest.template"
RUNTIME = "manifest.runtime"
APP = "manifest.app"
AGENT_FIX = "let the fleet agent apply the revision (edgebundle agent), or install it by hand"


@dataclass(frozen=True)
class DeviceTarget:
    """What a fleet says this device must run."""

    source: str  # where that is said, for people: "manifest shop"
    spec: Mapping[str, Any]  # the revision spec with the device's overrides: model, runtime, app


def checks(ctx: Context, target: DeviceTarget) -> list[CheckResult]:
    spec = target.spec
    where = target.source
    return [_model(ctx, spec["model"], where), _template(ctx, spec["model"], where),
            _runtime(ctx, spec["runtime"], where), _app(ctx, spec["app"], where)]


def _model(ctx: Context, model: dict[str, Any], where: str) -> CheckResult:
    path = ctx.settings.model
    if path is None:
        return fail(MODEL, f"no model configured; {where} wants {model['name']} "
                           f"(sha256 {model['sha256'][:12]}…)", f"{AGENT_FIX} (--model PATH)")
    if not path.is_file():
        return skip(MODEL, f"{path} does not exist (model.file says why)")
    digest = sha256_file(path)
    if digest != model["sha256"]:
        return fail(MODEL, f"{path} has sha256 {digest[:12]}…, {where} wants {model['name']} "
                           f"with {model['sha256'][:12]}…", AGENT_FIX)
    return ok(MODEL, f"{path} is {model['name']} of {where}")


def _template(ctx: Context, model: dict[str, Any], where: str) -> CheckResult:
    configured = ctx.settings.template
    if configured is None:
        return fail(TEMPLATE, f"no template configured; {where} wants {model['template']}",
                    f"pass --template {model['template']} (or set template in config.toml)")
    if configured != model["template"]:
        return fail(TEMPLATE, f"template {configured}; {where} wants {model['template']}",
                    f"pass --template {model['template']} (or set template in config.toml)")
    return ok(TEMPLATE, f"template {configured}, as {where} says")


def _runtime(ctx: Context, runtime: dict[str, Any], where: str) -> CheckResult:
    kind = runtime["kind"]
    if ctx.runtime != kind:
        return fail(RUNTIME, f"this device runs {ctx.runtime}; {where} wants {kind}",
                    f"pass --runtime {kind}" + (" after ./install.sh installed it"
                                                if kind == "wasmedge" else ""))
    if kind == "wasmedge":
        installed = ctx.marker.wasmedge_version if ctx.marker else None
        if installed != runtime["wasmedge"]:
            return fail(RUNTIME, f"WasmEdge {installed or 'of unknown version'} is installed; "
                                 f"{where} wants {runtime['wasmedge']}", AGENT_FIX)
        return ok(RUNTIME, f"WasmEdge {installed}, as {where} says")
    return ok(RUNTIME, f"embedded runtime, as {where} says")


def _app(ctx: Context, app: dict[str, Any], where: str) -> CheckResult:
    path, why = configured_app(ctx)
    if path is None and app["url"].startswith("builtin:"):
        path = default_app()  # what run starts when no app is configured
    if path is None:
        return fail(APP, f"{why}; {where} wants {app['name']}", AGENT_FIX)
    if not Path(path).is_file():
        return skip(APP, f"{path} does not exist (app.wasm says why)")
    digest = sha256_file(path)
    if digest != app["sha256"]:
        return fail(APP, f"{path} has sha256 {digest[:12]}…, {where} wants {app['name']} "
                         f"with {app['sha256'][:12]}…", AGENT_FIX)
    return ok(APP, f"{path} is {app['name']} of {where}")
