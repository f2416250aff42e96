"""The ``edgebundle`` command line: parse options, call one core function, render.

Errors from the core (:mod:`edgebundle.errors`) become one line on stderr and their
exit code here, and nowhere else; ``--debug`` shows the traceback too.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

import click

from edgebundle import __version__
from edgebundle.cli import agent, ask, chat, doctor, exec_, fleet, install, run
from edgebundle.errors import EdgebundleError


class _Boundary(click.Group):
    """Maps edgebundle errors to exit codes; hides tracebacks unless --debug."""

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


cli.add_command(doctor.doctor)
cli.add_command(run.run)
cli.add_command(ask.ask)
cli.add_command(chat.chat)
cli.add_command(install.install)
cli.add_command(install.bundle)
cli.add_command(exec_.exec_cmd)
cli.add_command(install.runtime)
cli.add_command(fleet.fleet)
cli.add_command(agent.agent)


def main() -> None:
    try:
        cli.main(prog_name="edgebundle")
    except BrokenPipeError:
        sys.stderr.close()
