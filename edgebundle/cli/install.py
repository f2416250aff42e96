"""`edgebundle install` and `edgebundle bundle` (being written)."""

import click


@click.command()
def install() -> None:
    """(not yet implemented)"""
    raise click.UsageError("install is not implemented yet")


@click.group()
def bundle() -> None:
    """Offline bundles."""
