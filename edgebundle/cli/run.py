"""`edgebundle run`: serve the chat (gateway + supervised guest), or print it with --dry-run.

On a device of a fleet (the ``fleet`` setting: config.toml or EDGEBUNDLE_FLEET) the
fleet agent runs instead and serves the revision the fleet's controller assigns.
"""

from __future__ import annotations

import json

import click

from edgebundle.config import RUNTIMES, load_settings
from edgebundle.errors import ConfigError
from edgebundle.pins import APP_KINDS
from edgebundle.serving import ServeInfo, launch_spec, serve


def _announce(info: ServeInfo) -> None:
    if info.template:  # the chat guest behind the gateway
        click.echo(
            f"serving {info.model} with {info.template} on {info.url} "
            f"(runtime {info.runtime}: {info.reason})"
        )
        return
    where = f" on {info.url}" if info.url else ""
    click.echo(
        f"serving {info.app}{where} (runtime {info.runtime}, pid {info.pid}, logs: {info.log_path})"
    )


# What a fleet's revision sets; the same flag on a fleet device would be silently lost.
FLEET_DECIDES = ("runtime", "model", "app", "app_kind", "template", "system_prompt", "ctx_size")


def _note(text: str) -> None:
    click.echo(f"edgebundle: {text}", err=True)


@click.command()
@click.option("--runtime", type=click.Choice(RUNTIMES), help="Runtime (default auto).")
@click.option("--model", type=click.Path(dir_okay=False), help="GGUF model file.")
@click.option("--app", type=click.Path(dir_okay=False),
              help="App wasm (default: the built-in edgechat.wasm).")
@click.option("--app-kind", type=click.Choice(APP_KINDS), help="App kind if the name does not say.")
@click.option("--template", help="Prompt template, e.g. llama-3-chat.")
@click.option("--system-prompt", help="System prompt for every conversation.")
@click.option("--ctx-size", type=click.IntRange(min=1), help="Context size (default 4096).")
@click.option("--threads", type=click.IntRange(min=0), metavar="N",
              help="llama.cpp threads (default 0: the CPUs this process may use).")
@click.option("--flash-attn", type=click.Choice(["off", "on", "auto"]),
              help="llama.cpp flash attention (default off: slower prompts on CPUs).")
@click.option("--context-policy", metavar="window|fail",
              help="A synced thread longer than the context: window (default) leaves out "
                   "its oldest messages, fail fails the run.")
@click.option("--redis-url", help="Sync Redis, redis://[user:password@]host:port[/db].")
@click.option("--device-id", help="This device's id.")
@click.option("--offline-after", type=click.IntRange(min=1), metavar="SECONDS",
              help="Serve from the local store once the Redis URL has not answered this "
                   "long (default 10).")
@click.option("--host", help="Address to serve on (default 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port to serve on (default 8080).")
@click.option("--wasmedge", type=click.Path(dir_okay=False), help="wasmedge binary to use.")
@click.option("--dry-run", is_flag=True, help="Print the command as JSON and start nothing.")
@click.option("--no-preflight", is_flag=True, help="Start without running doctor's checks first.")
# The fleet agent's own children: serve exactly these settings, even on a fleet device.
@click.option("--no-fleet", is_flag=True, hidden=True)
@click.pass_context
def run(ctx: click.Context, /, dry_run: bool, no_preflight: bool, no_fleet: bool,
        **flags: object) -> None:
    """Serve the chat over an OpenAI-compatible API until Ctrl-C or SIGTERM."""
    settings = load_settings({**flags, "home": (ctx.obj or {}).get("home")})
    if settings.fleet and not no_fleet and not dry_run:
        decided = [name for name in FLEET_DECIDES if flags.get(name) is not None]
        if decided:
            option = "--" + decided[0].replace("_", "-")
            raise ConfigError(f"{option}: this device is in fleet {settings.fleet}, whose "
                              f"revision decides it; drop {option} (or unset EDGEBUNDLE_FLEET "
                              "and fleet in config.toml)")
        from edgebundle.fleet.agent import fleet_managed_run  # only on a fleet's device

        fleet_managed_run(settings, _note)
        return
    if dry_run:
        spec = launch_spec(settings)
        for note in spec.notes:
            _note(note)
        click.echo(json.dumps(spec.to_json(), indent=2))
        return
    serve(settings, preflight=not no_preflight, on_ready=_announce, on_note=_note)
