"""`jail policy check FILE...` (being written: see issue 6)."""

import click


@click.command()
@click.argument("files", nargs=-1, required=True)
def check(files: tuple[str, ...]) -> None:
    """Verify the inline [[expect]] examples of policy files."""
    raise click.ClickException("jail policy check is not available yet")
