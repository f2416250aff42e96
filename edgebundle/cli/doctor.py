"""`edgebundle doctor`: resolve settings, run the checks, render a table or JSON.

Exit 0 when no check fails, 1 when one does; bad options and settings exit 2 through
the CLI's error boundary.
"""

from __future__ import annotations

import json
import os
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from edgebundle.config import RUNTIMES, load_settings
from edgebundle.doctor import Report, Status, run_doctor
from edgebundle.fleet.manifest_file import device_target, load_manifest

PIPED_WIDTH = 120
# status -> (symbol, fallback for terminals that cannot print it, rich style)
_LOOK: dict[Status, tuple[str, str, str]] = {
    "ok": ("✓", "ok", "green"),
    "warn": ("!", "warn", "yellow"),
    "fail": ("✗", "FAIL", "bold red"),
    "skip": ("-", "skip", "dim"),
}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--runtime", type=click.Choice(RUNTIMES), help="Runtime to check (default auto).")
@click.option("--model", metavar="PATH", help="GGUF model file.")
@click.option("--app", metavar="PATH", help="wasm app file.")
@click.option("--template", metavar="NAME", help="Chat template name.")
@click.option(
    "--redis-url", metavar="URL", help="Sync Redis, redis://[user:password@]host:port/db."
)
@click.option(
    "--wasmedge", metavar="PATH", help="wasmedge binary to check instead of the installed one."
)
@click.option("--manifest", metavar="FILE",
              help="Also compare this device with what a fleet manifest says it must run.")
@click.option("--probe", is_flag=True,
              help="Also run a short generation with the demo model on the runtime run "
                   "would use: tokens/s, first-token time, anything odd on its stdout.")
@click.pass_context
def doctor(
    ctx: click.Context,
    as_json: bool,
    runtime: str | None,
    model: str | None,
    app: str | None,
    template: str | None,
    redis_url: str | None,
    wasmedge: str | None,
    manifest: str | None,
    probe: bool,
) -> None:
    """Check this device: runtime, plugin, model, app, Redis, the link of its running
    gateway, CPU, memory, disk."""
    flags: dict[str, Any] = {
        "home": (ctx.obj or {}).get("home"),
        "runtime": runtime,
        "model": model,
        "app": app,
        "template": template,
        "redis_url": redis_url,
        "wasmedge": wasmedge,
    }
    settings = load_settings(flags)
    # a bad manifest: exit 2; doctor gets only what this device must run
    target = device_target(load_manifest(manifest), settings.device_id) if manifest else None
    report = run_doctor(settings, target=target, central_redis=True, probe=probe)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        render(report, _console())
    ctx.exit(0 if report.ok else 1)


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Piped into a log or a ticket: wider than rich's 80 so paths wrap less.
        console.width = PIPED_WIDTH
    return console


def render(report: Report, console: Console) -> None:
    """The report as a table, each problem's fix on an indented line under it."""
    fancy = console.encoding.lower().replace("-", "").startswith("utf")
    table = Table(show_edge=False, box=None, pad_edge=False, header_style="bold")
    table.add_column("status", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("summary", overflow="fold")
    for check in report.checks:
        symbol, word, style = _LOOK[check.status]
        summary = Text(check.summary)
        if check.fix and check.status != "ok":
            summary.append("\n  fix: ", style="bold")
            summary.append(check.fix)
        table.add_row(Text(symbol if fancy else word, style=style), check.id, summary)
    with console.capture() as captured:
        console.print(table)
    # Cells are padded to the column width; trailing blanks only clutter logs and diffs.
    console.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    console.print(verdict(report), soft_wrap=True)  # one line, however long, for logs


def verdict(report: Report) -> str:
    """The last line: ready or not, and the runtime ``run`` would use, in run's own words.

    Under ``--runtime auto`` a device whose only failures are WasmEdge's still runs, on
    the embedded runtime (run's preflight checks that runtime, not WasmEdge), so the
    line says that rather than NOT READY alone.
    """
    failed, warned = report.count("fail"), report.count("warn")
    counts = f"{failed} failed, {warned} warning{'s' if warned != 1 else ''}"
    runtime = f"the {report.runtime} runtime" + (f" ({report.reason})" if report.reason else "")
    if report.refusal is not None:
        return f"doctor: NOT READY ({counts}); run would not start: {report.refusal}"
    fallback = report.runtime == "embedded"  # wasmedge.* failures do not stop it
    blocking = [c for c in report.checks
                if c.status == "fail" and not (fallback and c.id.startswith("wasmedge."))]
    if blocking:
        return f"doctor: NOT READY ({counts}); run would use {runtime}"
    if failed:
        return f"doctor: NOT READY for WasmEdge ({counts}); run will use {runtime}"
    return f"doctor: ready ({counts}); run will use {runtime}"
