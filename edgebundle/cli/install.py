"""`edgebundle install`, `edgebundle bundle build`, `edgebundle runtime list|use`.

Thin: parse options, call :mod:`edgebundle.installer` / :mod:`edgebundle.bundle`,
render. Log lines and progress go to stderr; the summary (or ``--json``) to stdout.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from edgebundle import bundle as bundle_core
from edgebundle import config, host, installer, resources
from edgebundle.layout import Layout
from edgebundle.pins import load_app_pins, load_runtime_lock
from edgebundle.progress import terminal_progress

_PATH = click.Path(dir_okay=True, path_type=Path)
_F = TypeVar("_F", bound=Callable[..., Any])


def _layout(ctx: click.Context) -> Layout:
    obj = ctx.find_root().obj or {}
    return config.load_settings({"home": obj.get("home")}).layout


def _log(line: str) -> None:
    click.echo(line, err=True)


def _pins_options(command: _F) -> _F:
    command = click.option(
        "--pins", "pins_file", type=_PATH, envvar="EDGEBUNDLE_PINS",
        help="App/model pins file (default: the wasm/pins.toml edgebundle ships).",
    )(command)
    return click.option(
        "--lock", "lock_file", type=_PATH, envvar="EDGEBUNDLE_LOCK",
        help="Runtime lock file (default: the plugins/wasmedge.lock.toml edgebundle ships).",
    )(command)


@click.command()
@click.option("--bundle", "bundle_dir", type=_PATH, help="Install from an offline bundle (a DIR).")
@click.option(
    "--variant", default=installer.AUTO, show_default=True,
    help="Plugin variant: auto (detect AVX/CUDA), cpu, noavx, cuda-12, ...",
)
@_pins_options
@click.option("--app", "apps", multiple=True, metavar="NAME", help="Also install this pinned app.")
@click.option("--model", "models", multiple=True, metavar="NAME", help="Also install this model.")
@click.option(
    "--allow-unverified", is_flag=True,
    help="Accept pins with neither a published sha256 nor a SHA256SUM to verify against.",
)
@click.option("--require-wasmedge", is_flag=True, help="Fail instead of falling back to embedded.")
@click.option("--no-runtime", is_flag=True, help="Skip WasmEdge; install only apps/models/env.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def install(
    ctx: click.Context,
    bundle_dir: Path | None,
    variant: str,
    lock_file: Path | None,
    pins_file: Path | None,
    apps: tuple[str, ...],
    models: tuple[str, ...],
    allow_unverified: bool,
    require_wasmedge: bool,
    no_runtime: bool,
    as_json: bool,
) -> None:
    """Install the pinned WasmEdge + WASI-NN plugin (and apps/models) into the home."""
    layout = _layout(ctx)
    plan = installer.make_plan(
        host.detect(),
        lock_file=lock_file,
        pins_file=pins_file,
        bundle=bundle_dir,
        variant=variant,
        allow_unverified=allow_unverified,
        require_wasmedge=require_wasmedge,
        runtime=not no_runtime,
        apps=apps,
        models=models,
    )
    result = installer.install(plan, layout, progress=terminal_progress, log=_log)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    if result.runtime == "wasmedge":
        click.echo(f"runtime: wasmedge {result.wasmedge_version} ({result.variant}), "
                   f"{layout.runtime_current} -> {result.active}")
    else:
        click.echo("runtime: embedded (no WasmEdge installed)")
    for verification in result.verified:  # which checksums were pinned, which read now
        click.echo(f"  {verification.describe()}")
    for name, path in {**result.apps, **result.models}.items():
        click.echo(f"{name}: {path}")
    click.echo(f"env file: {result.env_file} (load it with: . {result.env_file})")


@click.group()
def bundle() -> None:
    """Offline bundles for devices without network."""


@bundle.command("build")
@click.argument("dest", type=_PATH)
@click.option("--all", "all_assets", is_flag=True, help="Every pinned OS/arch/variant asset.")
@click.option(
    "--variant", default=installer.AUTO, show_default=True,
    help="Plugin variant for this host's platform (ignored with --all).",
)
@click.option("--app", "apps", multiple=True, metavar="NAME", help="Include this pinned app.")
@click.option("--model", "models", multiple=True, metavar="NAME", help="Include this model.")
@click.option("--no-wheels", is_flag=True, help="Do not build Python wheels into the bundle.")
@_pins_options
def build(
    dest: Path,
    all_assets: bool,
    variant: str,
    apps: tuple[str, ...],
    models: tuple[str, ...],
    no_wheels: bool,
    lock_file: Path | None,
    pins_file: Path | None,
) -> None:
    """Download and verify the pins into DEST for `install --bundle DEST`."""
    lock = load_runtime_lock(lock_file or resources.runtime_lock_file())
    app_pins = load_app_pins(pins_file or resources.app_pins_file())
    platforms: list[bundle_core.Platform] | None = None
    if not all_assets:
        this = host.detect()
        platforms = [(this.os, this.arch, installer.resolve_variant(lock, this, variant))]
    manifest = bundle_core.build_bundle(
        dest,
        lock,
        app_pins,
        platforms=platforms,
        apps=apps,
        models=models,
        wheels=not no_wheels,
        progress=terminal_progress,
        log=_log,
    )
    click.echo(f"bundle: {dest} ({len(manifest.files)} files); install it with "
               f"./install.sh --bundle {dest}")


@click.group()
def runtime() -> None:
    """Installed WasmEdge runtimes: list them, switch between them."""


@runtime.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the runtimes as JSON.")
@click.pass_context
def list_command(ctx: click.Context, as_json: bool) -> None:
    """List installed runtimes; * marks the current one."""
    runtimes = installer.list_runtimes(_layout(ctx))
    if as_json:
        click.echo(json.dumps([r.to_json() for r in runtimes], indent=2))
        return
    if not runtimes:
        click.echo("no WasmEdge runtime installed (edgebundle uses the embedded runtime)")
    for r in runtimes:
        mark = "*" if r.active else " "
        click.echo(f"{mark} {r.name}  wasmedge {r.wasmedge_version or '?'}  "
                   f"plugin {r.plugin_build or '?'}  variant {r.variant or '?'}")


@runtime.command("use")
@click.argument("name")
@click.pass_context
def use_command(ctx: click.Context, name: str) -> None:
    """Make NAME current (upgrade or rollback); no env change needed."""
    layout = _layout(ctx)
    chosen = installer.activate(layout, name)
    click.echo(f"{layout.runtime_current} -> {chosen.name}")
