"""`edgebundle doctor` (being written)."""

import click


@click.command()
def doctor() -> None:
    """(not yet implemented)"""
    raise click.UsageError("doctor is not implemented yet")
