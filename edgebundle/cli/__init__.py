"""The ``edgebundle`` command line: parse options, call one core function, render.

Errors from the core (:mod:`edgebundle.errors`) become one line on stderr and their
exit code here, and nowhere else; ``--debug`` shows the traceback too.

Each command's module is imported only when that command runs (click's lazy group):
``edgebundle exec``, the embedded runtime's guest process, loads the runtime and not
the gateway, fleet, doctor or installer; ``edgebundle run`` loads what serving needs.
``--help`` lists every command from :data:`COMMANDS` without importing any of them.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from typing import Any

import click

from edgebundle import __version__
from edgebundle.errors import EdgebundleError

# name -> (module, attribute, the command's help up to its first blank line): what
# `edgebundle --help` shows; tests/test_cli_lazy.py checks it against each command.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "agent": ("edgebundle.cli.agent", "agent",
              "Keep this device on the revision its fleet wants, and report how it runs."),
    "ask": ("edgebundle.cli.ask", "ask",
            "Answer PROMPT once (the text streams as it is generated)."),
    "bundle": ("edgebundle.cli.install", "bundle", "Offline bundles for devices without network."),
    "chat": ("edgebundle.cli.chat", "chat",
             "Chat in the terminal; every device on the thread sees the same conversation."),
    "doctor": ("edgebundle.cli.doctor", "doctor",
               "Check this device: runtime, plugin, model, app, Redis, the link of its running "
               "gateway, CPU, memory, disk."),
    "exec": ("edgebundle.cli.exec_", "exec_cmd",
             "Run APP.wasm like `wasmedge` does, on the embedded runtime."),
    "fleet": ("edgebundle.cli.fleet", "fleet",
              "Roll revisions out to a fleet of devices, in phases, and watch them."),
    "install": ("edgebundle.cli.install", "install",
                "Install the pinned WasmEdge + WASI-NN plugin (and apps/models) into the home."),
    "run": ("edgebundle.cli.run", "run",
            "Serve the chat over an OpenAI-compatible API until Ctrl-C or SIGTERM."),
    "runtime": ("edgebundle.cli.install", "runtime",
                "Installed WasmEdge runtimes: list them, switch between them."),
}


class _Boundary(click.Group):
    """Maps edgebundle errors to exit codes; hides tracebacks unless --debug. Its
    commands are :data:`COMMANDS`, each imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module, attribute, _ = COMMANDS[cmd_name]
            command = getattr(importlib.import_module(module), attribute)
            self.add_command(command, cmd_name)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's listing, from :data:`COMMANDS`' help texts: nothing imported."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(map(len, names))
        rows: list[tuple[str, str]] = []
        for name in names:
            shown = self.commands.get(name) or click.Command(name, help=COMMANDS[name][2])
            rows.append((name, shown.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgebundleError as exc:
            if ctx.find_root().params.get("debug"):
                traceback.print_exc()
            click.echo(f"edgebundle: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("edgebundle: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Boundary, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgebundle")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=str),
    envvar="EDGEBUNDLE_HOME",
    help="State directory (default ~/.edgebundle).",
)
@click.pass_context
def cli(ctx: click.Context, debug: bool, home: str | None) -> None:
    """Run a llama chat on edge devices with WasmEdge."""
    ctx.ensure_object(dict)
    ctx.obj["home"] = home


def main() -> None:
    try:
        cli.main(prog_name="edgebundle")
    except BrokenPipeError:
        sys.stderr.close()
