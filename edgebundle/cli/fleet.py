"""`edgebundle fleet …`: manifests and rollouts of a fleet of devices.

``fleet validate FILE…`` is a check, like ``doctor``: it prints
``FILE: ok (fleet NAME, N phases, revision rev-…)`` or every problem as
``file:line:column: key.path: what is wrong`` and exits 0 when every file is valid,
1 when one is not (2 only for a wrong command line). Commands that act on a manifest
refuse an invalid one with exit 2 (ManifestError, a usage error of their input).
"""

from __future__ import annotations

import json

import click

from edgebundle.fleet.manifest import validate_files


@click.group()
def fleet() -> None:
    """Manifests and staged rollouts of a fleet of devices."""


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
