"""`edgebundle run` (being written)."""

import click


@click.command()
def run() -> None:
    """(not yet implemented)"""
    raise click.UsageError("run is not implemented yet")
