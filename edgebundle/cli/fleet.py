"""`edgebundle fleet …`: validate manifests, roll them out to a fleet and watch it.

Each command parses its options, calls one core function of :mod:`edgebundle.fleet`
and renders the result; errors go through the CLI's boundary (one line, exit 2 for
usage, 1 for the rest).

``fleet validate FILE…`` is a check, like ``doctor``: it prints
``FILE: ok (fleet NAME, N phases, revision rev-…)`` or every problem as
``file:line:column: key.path: what is wrong`` and exits 0 when every file is valid,
1 when one is not (2 only for a wrong command line). Commands that act on a manifest
(plan, apply) refuse an invalid one with exit 2 (ManifestError, a usage error).

``fleet provision NAME --device ID…`` gives each device its own Redis ACL user
(:mod:`edgebundle.fleet.acl`), adds it to the fleet and writes their credentials to a
file only its owner can read; passwords reach stdout only with ``--json``. ``fleet
load-functions`` loads this version's Redis functions (:mod:`edgebundle.sync.lua`),
which provisioned devices call but may not load: run it as an admin after upgrading.
``fleet proxy`` is the sync proxy (:mod:`edgebundle.fleet.proxy`) that devices
provisioned with ``--access proxied`` connect through.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import click
from redis.exceptions import NoPermissionError
from rich.console import Console
from rich.table import Table

from edgebundle.config import load_settings, redact_url
from edgebundle.errors import RedisAccessError, UsageError
from edgebundle.fleet import controller, operator
from edgebundle.fleet.acl import (
    ACCESS_MODES,
    default_credentials_path,
    provision_fleet,
    read_device_ids,
)
from edgebundle.fleet.manifest_file import load_manifest, validate_files
from edgebundle.fleet.proxy import SyncProxy, parse_listen, server_tls
from edgebundle.sync import lua
from edgebundle.sync.client import Client, connect

T = TypeVar("T")
PIPED_WIDTH = 160

_redis_option = click.option(
    "--redis-url", metavar="URL", envvar="EDGEBUNDLE_REDIS_URL",
    help="The fleet's Redis (default: EDGEBUNDLE_REDIS_URL, then the manifest's spec.sync).")


def _with_redis(url: str, work: Callable[[Client], Awaitable[T]]) -> T:
    async def main() -> T:
        redis = await connect(url)
        try:
            return await work(redis)
        finally:
            await redis.aclose()
    return asyncio.run(main())


def _console() -> Console:
    return Console(width=None if os.isatty(1) else PIPED_WIDTH, highlight=False)


@click.group()
def fleet() -> None:
    """Roll revisions out to a fleet of devices, in phases, and watch them."""


@fleet.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE…",
                type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.pass_context
def validate(ctx: click.Context, files: tuple[str, ...], as_json: bool) -> None:
    """Check fleet manifests: every problem as file:line:column: key.path: what is wrong."""
    results = validate_files(files)
    ok = all(result.ok for result in results)
    if as_json:
        click.echo(json.dumps({"ok": ok, "files": [r.to_json() for r in results]}, indent=2))
    else:
        for result in results:
            click.echo(result.summary())
    ctx.exit(0 if ok else 1)


@fleet.command("plan")
@click.argument("manifest_file", metavar="FILE", type=click.Path(dir_okay=False))
@_redis_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(manifest_file: str, redis_url: str | None, as_json: bool) -> None:
    """Show what `fleet apply FILE` would change, per device."""
    manifest = load_manifest(manifest_file)
    url = operator.redis_url(redis_url, manifest)
    result = _with_redis(url, lambda r: operator.plan(r, manifest))
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    table = Table("DEVICE", "DESIRED NOW", "NEW", "PHASE", "ACTION", box=None)
    for change in result.changes:
        table.add_row(change.device, change.current or "-", change.new or "-",
                      "-" if change.phase is None else str(change.phase), change.action)
    console = _console()
    console.print(f"fleet {result.fleet}: {result.message}")
    console.print(table)


@fleet.command("apply")
@click.argument("manifest_file", metavar="FILE", type=click.Path(dir_okay=False))
@_redis_option
@click.option("--wait", is_flag=True, help="Wait until the rollout completes, rolls back or stops.")
@click.option("--timeout", type=float, default=0.0, metavar="SECONDS",
              help="With --wait: give up after this long (0 = no limit).")
def apply_cmd(manifest_file: str, redis_url: str | None, wait: bool, timeout: float) -> None:
    """Store the manifest's revision and start rolling it out (the controller moves devices)."""
    manifest = load_manifest(manifest_file)
    url = operator.redis_url(redis_url, manifest)
    result = _with_redis(url, lambda r: operator.apply(r, manifest, source=manifest_file))
    click.echo(f"fleet {result.fleet}: {result.message}")
    if not wait:
        return
    click.echo(f"waiting for the controller (edgebundle fleet controller {result.fleet}) …")
    final = _with_redis(url, lambda r: operator.wait(r, result.fleet, result.revision,
                                                       timeout))
    click.echo(f"fleet {result.fleet}: {final.status}: {final.message}")
    if final.status != "complete":
        raise click.exceptions.Exit(1)


@fleet.command("status")
@click.argument("name")
@_redis_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_cmd(name: str, redis_url: str | None, as_json: bool) -> None:
    """Per device: what it should run and what it runs; and the rollout."""
    result = _with_redis(operator.redis_url(redis_url), lambda r: operator.status(r, name))
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    console = _console()
    console.print(_rollout_line(result))
    table = Table("DEVICE", "LABELS", "DESIRED", "ACTUAL", "STATE", "ONLINE", "LAST ERROR",
                  box=None)
    for device in result.devices:
        labels = ",".join(f"{k}={v}" for k, v in sorted(device.labels.items())) or "-"
        desired = (f"{device.desired_revision}/{device.desired_generation}"
                   if device.desired_revision else "-")
        actual = (f"{device.actual_revision or '-'}/{device.actual_status}"
                  if device.actual_status else "-")
        table.add_row(device.device, labels, desired, actual, device.state or "-",
                      "yes" if device.online else "no", device.last_error or "")
    console.print(table)
    if result.ignored:
        console.print(f"ignored: {_ignored(result.ignored)}", soft_wrap=True)


def _ignored(ignored: dict[str, str], limit: int = 10) -> str:
    """Set members the controller leaves out, with why (at most ``limit`` of them)."""
    shown = [f"{device!r} ({why})" for device, why in list(ignored.items())[:limit]]
    more = len(ignored) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _rollout_line(result: operator.FleetStatus) -> str:
    rollout = result.state
    if rollout is None:
        return f"fleet {result.fleet}: no rollout (edgebundle fleet apply FILE)"
    line = (f"fleet {result.fleet}: {rollout.revision} {rollout.status}, "
            f"phase {rollout.phase}, previous {rollout.previous or '-'}")
    if result.paused:
        line += " (PAUSED)"
    return line + (f": {rollout.message}" if rollout.message else "")


@fleet.command("pause")
@click.argument("name")
@_redis_option
def pause_cmd(name: str, redis_url: str | None) -> None:
    """Pause the rollout: the controller moves nothing until resume."""
    paused = _with_redis(operator.redis_url(redis_url), lambda r: operator.pause(r, name))
    click.echo(f"fleet {name}: " + ("paused" if paused else "was already paused"))


@fleet.command("resume")
@click.argument("name")
@_redis_option
def resume_cmd(name: str, redis_url: str | None) -> None:
    """Resume a paused rollout (time spent paused does not count against its deadline)."""
    resumed = _with_redis(operator.redis_url(redis_url), lambda r: operator.resume(r, name))
    click.echo(f"fleet {name}: " + ("resumed" if resumed else "was not paused"))


@fleet.command("rollback")
@click.argument("name")
@_redis_option
def rollback_cmd(name: str, redis_url: str | None) -> None:
    """Move every device of the rollout back to the previous revision now."""
    summary = _with_redis(operator.redis_url(redis_url), lambda r: operator.rollback(r, name))
    click.echo(f"fleet {name}: {summary.status}: {summary.message} "
               f"({len(summary.rolled_back)} device(s) moved back this time)")


@fleet.command("controller")
@click.argument("name")
@_redis_option
@click.option("--interval", type=float, default=controller.TICK_INTERVAL, show_default=True,
              metavar="SECONDS", help="Time between passes over the fleet.")
def controller_cmd(name: str, redis_url: str | None, interval: float) -> None:
    """Run the fleet's controller until interrupted (one acts at a time; others stand by)."""
    url = operator.redis_url(redis_url)
    last: list[str] = []

    def report(summary: controller.TickSummary) -> None:
        line = (f"{summary.status or '-'} phase {summary.phase}: {summary.message}"
                + (f"; moved {', '.join(summary.moved)}" if summary.moved else "")
                + (f"; rolled back {', '.join(summary.rolled_back)}"
                   if summary.rolled_back else "")
                + (f"; ignored {_ignored(summary.ignored)}" if summary.ignored else ""))
        if last[-1:] != [line]:
            click.echo(f"fleet {name}: {line}")
            last[:] = [line]

    async def run(redis: Client) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGTERM, stop.set)
        await controller.run_controller(redis, name, interval=interval, stop=stop,
                                        on_tick=report)

    _with_redis(url, run)


@fleet.command()
@click.argument("name")
@click.option("--device", "devices", multiple=True, metavar="ID",
              help="Device to provision (repeatable); again = a new password.")
@click.option("--devices-from", type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE", help="File of device ids, one per line (# comments).")
@click.option("--revoke", "revoke", multiple=True, metavar="ID",
              help="Delete this device's Redis user (repeatable).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Credentials file, mode 0600 (default <home>/fleet/NAME.credentials.json).")
@click.option("--redis-url", metavar="URL",
              help="The central Redis, as a user allowed to manage ACL users.")
@click.option("--device-url", metavar="URL",
              help="The Redis address devices use (default: --redis-url's host, port, db).")
@click.option("--access", type=click.Choice(ACCESS_MODES), default="direct", show_default=True,
              help="proxied: devices reach Redis through `edgebundle fleet proxy` (pass its "
                   "address as --device-url) and may only read threads directly.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the credentials (passwords included) as JSON.")
@click.pass_context
def provision(ctx: click.Context, name: str, devices: tuple[str, ...],
              devices_from: Path | None, revoke: tuple[str, ...], out: Path | None,
              redis_url: str | None, device_url: str | None, access: str,
              as_json: bool) -> None:
    """One Redis ACL user per device (its own keys, the fleet's state, the sync keys,
    FCALL unless proxied), and the device in the fleet."""
    settings = load_settings({"home": (ctx.obj or {}).get("home"), "redis_url": redis_url})
    if not settings.redis_url:
        raise UsageError("no Redis to provision: pass --redis-url URL (an admin user) "
                         "or set EDGEBUNDLE_REDIS_URL")
    device_ids = list(devices) + (read_device_ids(devices_from) if devices_from else [])
    path = out or default_credentials_path(settings.home, name)
    result, document = asyncio.run(provision_fleet(
        settings.redis_url, name, device_ids, out=path, base_url=device_url,
        revoke_ids=revoke, access=access))
    if as_json:
        click.echo(json.dumps({"fleet": name, "file": str(path), "persisted": result.persisted,
                               "access": result.access,
                               "provisioned": [c.to_json() for c in result.credentials],
                               "revoked": result.revoked}, indent=2))
    else:
        for creds in result.credentials:
            click.echo(f"{creds.device_id}: Redis user {creds.user} (new password)")
        for device_id in revoke:
            done = "deleted" if device_id in result.revoked else "had no user"
            click.echo(f"{device_id}: {done}")
        if result.credentials:
            click.echo(f"credentials of {len(document['devices'])} device(s) in {path} (mode 0600)")
    if not result.persisted:
        click.echo("edgebundle: warning: Redis keeps these users in memory only; give it an "
                   "aclfile (redis.conf: aclfile /etc/redis/users.acl) so they survive a "
                   "restart, then provision again", err=True)


@fleet.command("proxy")
@click.option("--redis-url", metavar="URL",
              help="The central Redis, as the user that runs the sync functions for devices.")
@click.option("--listen", default="127.0.0.1:6390", show_default=True, metavar="HOST:PORT",
              help="Where devices connect (a cluster: one port per node from PORT up).")
@click.option("--advertise", metavar="HOST",
              help="The host devices reach the proxy at (cluster redirections name it; "
                   "default: the --listen host).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True), metavar="FILE",
              help="Serve devices over TLS (rediss://) with this certificate chain ...")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), metavar="FILE",
              help="... and this private key.")
@click.pass_context
def proxy_cmd(ctx: click.Context, redis_url: str | None, listen: str, advertise: str | None,
              tls_cert: str | None, tls_key: str | None) -> None:
    """The sync proxy: devices provisioned with --access proxied connect here; it runs
    the sync functions for them, so their own Redis users can only read threads."""
    settings = load_settings({"home": (ctx.obj or {}).get("home"), "redis_url": redis_url})
    upstream = settings.redis_url
    if not upstream:
        raise UsageError("no Redis to proxy: pass --redis-url URL or set EDGEBUNDLE_REDIS_URL")
    host, port = parse_listen(listen)
    server = SyncProxy(upstream, host=host, port=port, advertise=advertise,
                       tls=server_tls(tls_cert, tls_key))

    def ready(ports: list[int]) -> None:
        shown = ", ".join(str(p) for p in ports)
        click.echo(f"edgebundle: sync proxy for {redact_url(upstream)} listening on "
                   f"{host} port(s) {shown}", err=True)

    try:
        asyncio.run(server.serve_forever(ready))
    except KeyboardInterrupt:
        pass


@fleet.command("load-functions")
@click.option("--redis-url", metavar="URL",
              help="The central Redis, as a user allowed to load functions (an admin).")
@click.pass_context
def load_functions(ctx: click.Context, redis_url: str | None) -> None:
    """Load this version's Redis functions (devices call them; they may not load them)."""
    settings = load_settings({"home": (ctx.obj or {}).get("home"), "redis_url": redis_url})
    if not settings.redis_url:
        raise UsageError("no Redis to load the functions into: pass --redis-url URL (an "
                         "admin user) or set EDGEBUNDLE_REDIS_URL")
    nodes = _with_redis(settings.redis_url, _load_library)
    click.echo(f"loaded {lua.LIBRARY} on {nodes} node(s)")


async def _load_library(redis: Client) -> int:
    try:
        return await lua.load_library(redis)
    except NoPermissionError as exc:
        raise RedisAccessError(f"this Redis user may not load functions ({exc}): pass --redis-url "
                         "with an admin user's credentials") from None
