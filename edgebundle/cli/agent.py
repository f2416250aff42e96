"""`edgebundle agent`: this device's fleet agent (register, heartbeat, reconcile, report).

Runs until Ctrl-C or SIGTERM; ``--once`` registers, reconciles what is desired now,
reports and exits (0 when the device is healthy or has nothing to do, 1 when the
desired revision failed). One line per state change on stderr.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from edgebundle.config import load_settings
from edgebundle.errors import ConfigError
from edgebundle.fleet.agent import Agent, agent_device_id, parse_labels, run_until_stopped


@click.command()
@click.option("--device-id", help="This device's id (default: the configured one, else made once).")
@click.option("--redis-url", help="The fleet's Redis, redis://[user:password@]host:port[/db].")
@click.option("--label", "labels", multiple=True, metavar="K=V",
              help="A label the manifest's groups select on (repeatable).")
@click.option("--fleet", help="The fleet's name (metadata.name of its manifest).")
@click.option("--bundle", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Offline bundle directory that bundle:<path> URLs are read from.")
@click.option("--serve", is_flag=True,
              help="Also run the chat (edgebundle run) on the current revision.")
@click.option("--once", is_flag=True, help="Reconcile once, report and exit.")
@click.pass_context
def agent(ctx: click.Context, device_id: str | None, redis_url: str | None,
          labels: tuple[str, ...], fleet: str | None, bundle: Path | None, serve: bool,
          once: bool) -> None:
    """Keep this device on the revision its fleet wants, and report how it runs."""
    settings = load_settings({"home": (ctx.obj or {}).get("home"), "device_id": device_id,
                              "redis_url": redis_url, "fleet": fleet})
    if not settings.redis_url:
        raise ConfigError("no Redis: pass --redis-url URL or set EDGEBUNDLE_REDIS_URL")
    if not settings.fleet:
        raise ConfigError("no fleet: pass --fleet NAME or set EDGEBUNDLE_FLEET")
    if once and serve:
        raise ConfigError("--once and --serve do not mix: --serve keeps the chat running")
    the_agent = Agent(settings, settings.redis_url, agent_device_id(settings), settings.fleet,
                      parse_labels(labels), bundle_dir=bundle, serve=serve, log=_log)
    if once:
        state = asyncio.run(the_agent.once())
        ctx.exit(1 if state.status == "failed" else 0)
    asyncio.run(run_until_stopped(the_agent))


def _log(line: str) -> None:
    click.echo(f"agent: {line}", err=True)
