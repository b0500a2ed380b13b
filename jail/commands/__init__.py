"""`jail log ...` and `jail policy ...`: tools that read policy files and logs; they run no jail."""

from __future__ import annotations

import click

from jail.commands.ask import ask
from jail.commands.check import check
from jail.commands.report import log, suggest


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def tools() -> None:
    """jail's tools: reports from audit logs, policy checks and suggestions."""


@tools.group()
def policy() -> None:
    """Check policy files, or suggest one from an audit log."""


tools.add_command(log)
tools.add_command(ask)
policy.add_command(check)
policy.add_command(suggest)
