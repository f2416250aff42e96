"""What ``run`` starts: one :class:`LaunchSpec` (argv, env, cwd), resolved from Settings.

``run --dry-run`` prints exactly the spec the supervisor would start, so the two can
never disagree. For the ``wasmedge`` runtime the command is::

    <wasmedge> --dir .:. --nn-preload <alias>:GGML:AUTO:<model> <app.wasm> <app args>

with absolute paths, the working directory ``EDGEBUNDLE_HOME`` (what ``--dir .:.``
maps), and ``WASMEDGE_PLUGIN_PATH`` always set explicitly (plus PATH and
LD_LIBRARY_PATH for the installed runtime), because WasmEdge otherwise loads whichever
plugin copy it meets first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgebundle import apps
from edgebundle.config import Settings
from edgebundle.errors import RuntimeNotFoundError, UsageError
from edgebundle.pins import load_app_pins
from edgebundle.resources import app_pins_file
from edgebundle.runtime import wasmedge

EMBEDDED_UNAVAILABLE = (
    "the embedded runtime is not part of this build yet; install WasmEdge with "
    "./install.sh or pass --runtime wasmedge"
)


@dataclass(frozen=True)
class LaunchSpec:
    """A process to start: the argv list, the variables we set on top of os.environ, cwd."""

    runtime: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: Path
    kind: str = ""  # app kind (apps.APP_KINDS); decides the readiness probe
    app: Path | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``run --dry-run`` object of API.md."""
        return {
            "runtime": self.runtime,
            "argv": list(self.argv),
            "env": dict(self.env),
            "cwd": str(self.cwd),
        }


def resolve_launch(settings: Settings, environ: Mapping[str, str] | None = None) -> LaunchSpec:
    """The one spec ``run`` starts for these settings (inputs checked before the runtime)."""
    env = os.environ if environ is None else environ
    model = _require_model(settings)
    app = settings.app if settings.app is not None else _installed_default_app(settings)
    if app is None:
        raise UsageError(
            "no app given: pass --app PATH to llama-api-server.wasm or llama-chat.wasm, "
            "set EDGEBUNDLE_APP, or install the pinned app with ./install.sh"
        )
    model, app = _existing_inputs(model, app)
    kind = apps.app_kind(app, settings.app_kind)
    if settings.runtime == "embedded":
        raise RuntimeNotFoundError(EMBEDDED_UNAVAILABLE)
    found = wasmedge.locate(settings.layout, settings.wasmedge, env)
    if settings.runtime == "auto" and found is None:
        # auto falls back to the embedded runtime where no wasmedge is installed.
        raise RuntimeNotFoundError(
            f"{_no_wasmedge_message(settings)} (the embedded fallback is not part of this "
            "build yet)"
        )
    return wasmedge_launch(settings, app=app, model=model, kind=kind, environ=env)


def wasmedge_launch(
    settings: Settings,
    *,
    app: Path,
    model: Path,
    kind: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> LaunchSpec:
    """The ``wasmedge --nn-preload …`` command for ``app`` serving ``model``."""
    env = os.environ if environ is None else environ
    model, app = _existing_inputs(model, app)
    app_kind = apps.app_kind(app, kind)
    setup = wasmedge.locate(settings.layout, settings.wasmedge, env)
    if setup is None:
        raise RuntimeNotFoundError(_no_wasmedge_message(settings))
    options = apps.AppOptions(
        template=_template(settings, model, app_kind),
        ctx_size=settings.ctx_size,
        model_name=model.stem,
        host=settings.host,
        port=settings.port,
        model_alias=_model_alias(app),
        system_prompt=settings.system_prompt,
    )
    argv = (
        str(_absolute(setup.binary)),
        "--dir", ".:.",
        "--nn-preload", f"{options.model_alias}:GGML:AUTO:{model}",
        str(app),
        *apps.app_args(app_kind, options),
    )  # fmt: skip
    launch_env = dict(setup.env)
    # Explicit even when empty: an inherited value would silently pick other plugins.
    launch_env[wasmedge.PLUGIN_PATH_ENV] = setup.plugin_path_value()
    settings.home.mkdir(parents=True, exist_ok=True)
    return LaunchSpec(
        runtime="wasmedge",
        argv=argv,
        env=launch_env,
        cwd=_absolute(settings.home),
        kind=app_kind,
        app=app,
    )


def _absolute(path: Path) -> Path:
    # abspath, not resolve(): keep <home>/runtime/current so a restart follows the link.
    return Path(os.path.abspath(path.expanduser()))


def _existing_inputs(model: Path, app: Path) -> tuple[Path, Path]:
    """Both files as absolute paths; a UsageError naming the flag if one is missing."""
    model, app = _absolute(model), _absolute(app)
    if not model.is_file():
        raise UsageError(f"model file not found: {model} (from --model / EDGEBUNDLE_MODEL)")
    if not app.is_file():
        raise UsageError(f"app file not found: {app} (from --app / EDGEBUNDLE_APP)")
    return model, app


def _require_model(settings: Settings) -> Path:
    if settings.model is None:
        raise UsageError(
            "no model given: pass --model PATH to a .gguf file or set EDGEBUNDLE_MODEL"
        )
    return settings.model


def _no_wasmedge_message(settings: Settings) -> str:
    if settings.wasmedge is not None:
        return (
            f"wasmedge binary {settings.wasmedge} (from --wasmedge / EDGEBUNDLE_WASMEDGE) does "
            "not exist: fix the path, or install WasmEdge with ./install.sh"
        )
    installed = settings.layout.runtime_current / "bin" / "wasmedge"
    return (
        f"no wasmedge found (looked at {installed} and PATH): install it with ./install.sh, "
        "put wasmedge on PATH, or pass --wasmedge PATH"
    )


def _installed_default_app(settings: Settings) -> Path | None:
    """The pinned llama-api-server the installer put under <home>/apps, if it is there."""
    for pin in load_app_pins(app_pins_file()).apps:
        candidate = settings.layout.apps / f"{pin.name}-{pin.version}.wasm"
        if pin.kind == "llama-api-server" and candidate.is_file():
            return candidate
    return None


def _template(settings: Settings, model: Path, kind: str) -> str:
    if settings.template:
        return settings.template
    # A pinned model knows its template; match it by the downloaded file name.
    for pin in load_app_pins(app_pins_file()).models:
        if pin.filename == model.name:
            return pin.template
    raise UsageError(
        f"{kind} needs a prompt template for {model.name}: pass --template NAME "
        "(e.g. llama-3-chat, chatml) or set EDGEBUNDLE_TEMPLATE"
    )


def _model_alias(app: Path) -> str:
    """The alias a pinned app expects (matched by file name); LlamaEdge's default otherwise."""
    for pin in load_app_pins(app_pins_file()).apps:
        if app.name in (pin.filename, f"{pin.name}-{pin.version}.wasm"):
            return pin.model_alias
    return apps.DEFAULT_MODEL_ALIAS
