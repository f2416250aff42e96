"""What ``run`` and ``ask`` start: one :class:`LaunchSpec` (argv, env, cwd), resolved from Settings.

``run --dry-run`` prints exactly the spec the supervisor would start, so the two can
never disagree. Both runtimes run the same app with the same argv tail::

    <wasmedge> [--dir .:.] --nn-preload <alias>:GGML:AUTO:<model> <app.wasm> <tail>
    <python> -m edgebundle exec [--dir .:.] --nn-preload <alias>:GGML:AUTO:<model> <app.wasm> <tail>

(``edgebundle exec`` takes wasmedge's flags and runs the app on the embedded
runtime), with absolute paths. What the guest may touch on disk is decided here:

- the edgechat guest gets no preopened directory at all (its model comes through
  ``--nn-preload``, its prompts through stdin), so it sees no file of the device;
- the LlamaEdge apps, which read and write their own files relative to ``.``, get
  ``--dir .:.`` with the working directory ``<home>/apps/<app>/data``
  (:meth:`~edgebundle.layout.Layout.app_data`): that directory and nothing else.

Never the home itself: a guest that could write there could replace ``venv/bin``,
the runtime, the plugin or ``config.toml``. For wasmedge, ``WASMEDGE_PLUGIN_PATH``
is always set explicitly (plus PATH and LD_LIBRARY_PATH for the installed runtime),
so that an inherited value cannot pick other plugins (see
:mod:`edgebundle.runtime.wasmedge` for what it is set to).

The app defaults to the packaged chat guest ``edgechat.wasm`` and the model to the
built-in demo model; ``--runtime auto`` uses wasmedge when doctor's wasmedge checks
pass, else the embedded runtime (:func:`choose_runtime`, the same function doctor's
verdict comes from). Every such choice is reported in ``reason`` / ``notes``, so the
user reads which runtime and model run, and why.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgebundle import apps, resources
from edgebundle.config import Settings
from edgebundle.demo_model import demo_model_path
from edgebundle.errors import EdgebundleError, RuntimeNotFoundError, UsageError
from edgebundle.guest_protocol import FRAME_ENV, new_frame
from edgebundle.host import usable_cpus
from edgebundle.layout import HOME_ENV
from edgebundle.pins import load_app_pins
from edgebundle.resources import app_pins_file
from edgebundle.runtime import wasmedge

DEFAULT_APP = "edgechat.wasm"
DEMO_MODEL_NOTE = (
    "no model configured: using the built-in demo model (it only says one sentence); "
    "pass --model FILE.gguf"
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
    model: Path | None = None
    ctx_size: int = 0  # the context size the app loads the model with
    reason: str = ""  # why this runtime, e.g. "auto: no wasmedge found"
    frame: str = ""  # edgechat: the token its protocol lines carry (guest_protocol)
    notes: tuple[str, ...] = ()  # what the user must be told (e.g. the demo model is used)

    def to_json(self) -> dict[str, Any]:
        """The ``run --dry-run`` object of docs/api.md."""
        return {
            "runtime": self.runtime,
            "argv": list(self.argv),
            "env": dict(self.env),
            "cwd": str(self.cwd),
        }


def default_app() -> Path:
    """The packaged chat guest."""
    return resources.wasm_dir() / DEFAULT_APP


WasmEdgeFailures = Callable[[Settings, Mapping[str, str]], Sequence[str]]


def resolve_launch(settings: Settings, environ: Mapping[str, str] | None = None, *,
                   wasmedge_failures: WasmEdgeFailures | None = None) -> LaunchSpec:
    """The one spec ``run`` / ``ask`` start for these settings (inputs checked first).

    ``wasmedge_failures(settings, environ)``: the ids of doctor's ``wasmedge.*`` checks
    that fail, which ``--runtime auto`` decides by. It is passed in from above
    (``edgebundle.serving.launch_spec`` gives doctor's), because runtime/ sits below
    doctor; without it a wasmedge that is found counts as passing.
    """
    env = os.environ if environ is None else environ
    notes: list[str] = []
    model = settings.model
    if model is None:
        model = _demo_model(settings)
        notes.append(DEMO_MODEL_NOTE)
    app = settings.app if settings.app is not None else default_app()
    model, app = _existing_inputs(model, app)
    kind = apps.app_kind(app, settings.app_kind)
    if kind == "llama-chat":
        raise UsageError(
            f"{app.name} is an interactive terminal app and `run` has no terminal to give it: "
            "use `edgebundle ask`, or start it yourself with `edgebundle exec` / `wasmedge` "
            "(same flags); `run` serves the edgechat app or llama-api-server"
        )
    choice = choose_runtime(
        settings,
        kind=kind,
        wasmedge_found=wasmedge.locate(settings.layout, settings.wasmedge, env) is not None,
        wasmedge_failures=lambda: wasmedge_failures(settings, env) if wasmedge_failures else [],
    )
    if choice.refusal is not None:
        raise choice.refusal
    if choice.runtime == "embedded":
        spec = embedded_launch(settings, app=app, model=model, kind=kind)
    else:
        spec = wasmedge_launch(settings, app=app, model=model, kind=kind, environ=env)
    return replace(spec, reason=choice.reason, notes=tuple(notes))


def _demo_model(settings: Settings) -> Path:
    try:
        return demo_model_path(settings.layout.models)
    except ImportError as exc:  # gguf/numpy come with the embedded extra
        raise RuntimeNotFoundError(
            f"no model configured, and the built-in demo model cannot be generated here "
            f"({exc.name or exc} is not installed): pass --model FILE.gguf, or install "
            "edgebundle[embedded]"
        ) from None


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime ``run`` starts for some settings, and why (doctor's verdict names it)."""

    runtime: str  # wasmedge | embedded: the one run starts, or needs when it refuses
    reason: str  # e.g. "auto: doctor's wasmedge checks pass"
    refusal: EdgebundleError | None = None  # run stops with this instead of starting


def choose_runtime(
    settings: Settings,
    *,
    kind: str,
    wasmedge_found: bool,
    wasmedge_failures: Callable[[], Sequence[str]],
) -> RuntimeChoice:
    """The one rule for ``settings.runtime``: ``run`` starts by it, doctor's verdict reports it.

    ``wasmedge_failures`` gives the ids of doctor's ``wasmedge.*`` checks that fail
    (asked only under ``auto`` with a wasmedge found): ``run`` computes them
    (``resolve_launch``'s ``wasmedge_failures``, doctor's
    :func:`~edgebundle.doctor.failed_wasmedge_checks`); doctor's verdict passes the
    results it already has.
    """
    if settings.runtime == "wasmedge":
        return RuntimeChoice("wasmedge", "chosen with --runtime")
    if settings.runtime == "embedded":
        try:
            _require_embeddable(kind, "--runtime embedded")
        except UsageError as exc:
            return RuntimeChoice("embedded", str(exc), exc)
        return RuntimeChoice("embedded", "chosen with --runtime")
    if kind != "edgechat":
        # LlamaEdge's apps need WasmEdge's socket extension: there is nothing to fall back to.
        if not wasmedge_found:
            refusal = RuntimeNotFoundError(
                f"{_no_wasmedge_message(settings)} ({kind} runs only on WasmEdge; the built-in "
                "edgechat app also runs without it: drop --app)"
            )
            return RuntimeChoice("wasmedge", str(refusal), refusal)
        return RuntimeChoice("wasmedge", f"auto: {kind} runs only on WasmEdge")
    if not wasmedge_found:
        return RuntimeChoice("embedded", "auto: no wasmedge found")
    failed = wasmedge_failures()
    if failed:
        return RuntimeChoice(
            "embedded", f"auto: wasmedge fails doctor's {', '.join(failed)} check(s)"
        )
    return RuntimeChoice("wasmedge", "auto: doctor's wasmedge checks pass")


def _require_embeddable(kind: str, why: str) -> None:
    if kind != "edgechat":
        raise UsageError(
            f"{why}: {kind} cannot run on the embedded runtime (it needs WasmEdge's socket "
            "extension); pass --runtime wasmedge, or drop --app to serve the built-in edgechat app"
        )


def embedded_launch(settings: Settings, *, app: Path, model: Path, kind: str) -> LaunchSpec:
    """``python -m edgebundle exec …``: the app on the embedded runtime, wasmedge's argv.

    Its home is this one (``EDGEBUNDLE_HOME``, for the compiled-module cache), whatever
    the environment says."""
    model, app = _existing_inputs(model, app)
    _require_embeddable(kind, "the embedded runtime")
    options = _options(settings, app=app, model=model, kind=kind)
    frame = new_frame() if kind == "edgechat" else ""
    argv = (
        sys.executable, "-m", "edgebundle", "exec",
        *_runtime_args(options, model, kind, frame), str(app), *apps.app_args(kind, options),
    )  # fmt: skip
    return LaunchSpec(
        runtime="embedded",
        argv=argv,
        env={HOME_ENV: str(_absolute(settings.home))},
        cwd=app_cwd(settings, app, kind),
        kind=kind,
        app=app,
        model=model,
        ctx_size=options.ctx_size,
        frame=frame,
    )


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
    options = _options(settings, app=app, model=model, kind=app_kind)
    frame = new_frame() if app_kind == "edgechat" else ""
    argv = (
        str(_absolute(setup.binary)),
        *_runtime_args(options, model, app_kind, frame), str(app),
        *apps.app_args(app_kind, options),
    )  # fmt: skip
    launch_env = dict(setup.env)
    # Explicit even when empty: an inherited value would silently pick other plugins.
    launch_env[wasmedge.PLUGIN_PATH_ENV] = setup.plugin_path_value()
    return LaunchSpec(
        runtime="wasmedge",
        argv=argv,
        env=launch_env,
        cwd=app_cwd(settings, app, app_kind),
        kind=app_kind,
        app=app,
        model=model,
        ctx_size=options.ctx_size,
        frame=frame,
    )


def _runtime_args(options: apps.AppOptions, model: Path, kind: str,
                  frame: str = "") -> tuple[str, ...]:
    """wasmedge's own flags, the same for ``wasmedge`` and ``edgebundle exec``.

    ``--dir .:.`` (the working directory, see :func:`app_cwd`) only for the apps that
    need files of their own; the edgechat guest gets no directory at all, and its
    protocol frame (:mod:`edgebundle.guest_protocol`) in its environment.
    """
    preload = ("--nn-preload", f"{options.model_alias}:GGML:AUTO:{model}")
    if kind == "edgechat":
        return ("--env", f"{FRAME_ENV}={frame}", *preload) if frame else preload
    return ("--dir", ".:.", *preload)


def app_cwd(settings: Settings, app: Path, kind: str) -> Path:
    """The working directory of ``app``, made if missing; never the home for a preopen.

    The edgechat guest has no preopened directory, so its working directory is only
    the host process's (the home). Every other app gets ``<home>/apps/<app>/data``,
    the one directory its ``--dir .:.`` maps.
    """
    settings.home.mkdir(parents=True, exist_ok=True)
    if kind == "edgechat":
        return _absolute(settings.home)
    data = settings.layout.app_data(app.stem)
    data.mkdir(parents=True, exist_ok=True)
    return _absolute(data)


def _options(settings: Settings, *, app: Path, model: Path, kind: str) -> apps.AppOptions:
    chat_guest = kind == "edgechat"
    return apps.AppOptions(
        # edgechat is handed rendered prompts; the LlamaEdge apps render themselves.
        template="" if chat_guest else _template(settings, model, kind),
        ctx_size=effective_ctx_size(settings.ctx_size, model) if chat_guest else settings.ctx_size,
        model_name=model.stem,
        host=settings.host,
        port=settings.port,
        model_alias=_model_alias(app),
        system_prompt=settings.system_prompt,
        threads=settings.threads or usable_cpus(),
        flash_attn=settings.flash_attn,
    )


def effective_ctx_size(requested: int, model: Path) -> int:
    """``requested``, clipped to the context the model was trained for (if it says)."""
    from edgebundle.model_info import load_model_info

    try:
        trained = load_model_info(model).context_length
    except (EdgebundleError, OSError, ValueError):
        return requested  # unreadable metadata: the guest reports the broken model itself
    return min(requested, trained) if trained else requested


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
