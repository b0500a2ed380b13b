"""`jail log FILE...` (reports from audit logs) and `jail policy suggest FILE...` (a policy from them)."""

from __future__ import annotations

from pathlib import Path

import click

from jail.audit.report import (
    AuditLog,
    filter_entries,
    load_audit_logs,
    parse_since,
    render_html,
    render_markdown,
    render_text,
    suggest_policy,
    summarize,
)
from jail.model import JailError

LOG_FILES = click.argument("files", nargs=-1, required=True, metavar="FILE...")


def read_logs(files: tuple[str, ...]) -> AuditLog:
    """Load the logs; each skipped line is one warning on stderr."""
    audit_log = load_audit_logs(files)
    for warning in audit_log.warnings():
        click.echo(f"jail: warning: {warning}", err=True)
    return audit_log


def write_output(text: str, output: str | None) -> None:
    """To stdout (no -o, or `-o -`), else to the file."""
    if output in (None, "-"):
        click.echo(text, nl=False)
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise JailError(f"cannot write {output}: {exc.strerror or exc}") from None


@click.command()
@LOG_FILES
@click.option("--denied", is_flag=True, help="Only denied and would-deny requests.")
@click.option("--host", "hosts", multiple=True, metavar="HOST", help="Only this host, or *.example.com; repeatable.")
@click.option("--since", metavar="TIME", help="Only from TIME on: RFC3339 (2025-01-31T12:00:00Z) or ago (15m, 2h, 1d).")
@click.option("--markdown", is_flag=True, help="GitHub Markdown (e.g. >> $GITHUB_STEP_SUMMARY).")
@click.option("--html", is_flag=True, help="One self-contained HTML page (needs -o FILE, or -o - for stdout).")
@click.option("-o", "--output", metavar="FILE", help="Write the report to FILE instead of stdout.")
def log(
    files: tuple[str, ...],
    denied: bool,
    hosts: tuple[str, ...],
    since: str | None,
    markdown: bool,
    html: bool,
    output: str | None,
) -> None:
    """Summarise audit logs (--audit-log): requests per host and method, and what was denied.

    \b
      jail log audit.jsonl
      jail log audit.jsonl --denied --since 1h
      jail log audit.jsonl --markdown >> "$GITHUB_STEP_SUMMARY"
      jail log audit.jsonl --html -o report.html
    """
    if markdown and html:
        raise click.UsageError("give --markdown or --html, not both")
    if html and output is None:
        raise click.UsageError("--html writes a whole page: give -o report.html (or -o - for stdout)")
    try:
        cutoff = parse_since(since) if since is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    audit_log = read_logs(files)
    entries = filter_entries(audit_log.entries, denied=denied, hosts=hosts, since=cutoff)
    summary = summarize(entries)
    if html:
        text = render_html(entries, summary, audit_log.files)
    elif markdown:
        text = render_markdown(summary)
    else:
        text = render_text(summary)
    write_output(text, output)


@click.command()
@LOG_FILES
@click.option("-o", "--output", metavar="FILE", help="Write the policy to FILE instead of stdout.")
@click.option("--include-denied", is_flag=True, help="Also allow requests that were denied (not only would-deny).")
def suggest(files: tuple[str, ...], output: str | None, include_denied: bool) -> None:
    """Suggest a policy file (TOML) allowing exactly what audit logs show.

    Run the agent with --audit --audit-log FILE first: every request is let through and the ones the
    rule would deny are recorded; the suggestion allows all of them (requests denied in enforce mode
    only with --include-denied).
    """
    audit_log = read_logs(files)
    write_output(suggest_policy(audit_log.entries, include_denied, audit_log.files), output)
