"""`jail log FILE...` and `jail policy suggest FILE...` (being written: see issue 6)."""

import click


@click.command()
@click.argument("files", nargs=-1, required=True)
def log(files: tuple[str, ...]) -> None:
    """Summarise audit logs."""
    raise click.ClickException("jail log is not available yet")


@click.command()
@click.argument("files", nargs=-1, required=True)
def suggest(files: tuple[str, ...]) -> None:
    """Suggest a policy file from audit logs."""
    raise click.ClickException("jail policy suggest is not available yet")
