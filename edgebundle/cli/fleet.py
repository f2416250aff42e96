"""`edgebundle fleet …`: manifests and rollouts of a fleet of devices.

``fleet provision NAME --device ID…`` gives each device its own Redis ACL user
(:mod:`edgebundle.fleet.acl`) and writes their credentials to a file only its owner
can read; passwords reach stdout only with ``--json``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from edgebundle.config import load_settings
from edgebundle.errors import UsageError
from edgebundle.fleet.acl import default_credentials_path, provision_fleet, read_device_ids


@click.group()
def fleet() -> None:
    """Manifests and staged rollouts of a fleet of devices."""


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
@click.option("--json", "as_json", is_flag=True,
              help="Print the credentials (passwords included) as JSON.")
@click.pass_context
def provision(ctx: click.Context, name: str, devices: tuple[str, ...],
              devices_from: Path | None, revoke: tuple[str, ...], out: Path | None,
              redis_url: str | None, device_url: str | None, as_json: bool) -> None:
    """One Redis ACL user per device: its own keys, the fleet's state, the sync keys."""
    settings = load_settings({"home": (ctx.obj or {}).get("home"), "redis_url": redis_url})
    if not settings.redis_url:
        raise UsageError("no Redis to provision: pass --redis-url URL (an admin user) "
                         "or set EDGEBUNDLE_REDIS_URL")
    device_ids = list(devices) + (read_device_ids(devices_from) if devices_from else [])
    path = out or default_credentials_path(settings.home, name)
    result, document = asyncio.run(provision_fleet(
        settings.redis_url, name, device_ids, out=path, base_url=device_url,
        revoke_ids=revoke))
    if as_json:
        click.echo(json.dumps({"fleet": name, "file": str(path), "persisted": result.persisted,
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
