"""`jail policy check FILE...`: verify the inline `[[expect]]` examples of policy files.

The files are composed in the order given, exactly as `jail --policy A --policy B` would, and every
example of every file is judged by that composition (hooks included). One line per example;
exit 0 when all pass, 1 when one fails, 2 when a file is broken.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from jail.model import Decision, JailError
from jail.policies import Judge
from jail.policies.policy_file import Expectation, PolicyEngine

FAILED_EXIT_STATUS = 1
BROKEN_EXIT_STATUS = 2


def verdict(allow: bool) -> str:
    return "allow" if allow else "deny"


def report_line(example: Expectation, decision: Decision) -> str:
    what = f"{example.request.method} {example.request.url}"
    got = verdict(decision.allow)
    if decision.allow == example.allow:
        return f"ok   {what} -> {got} (rule {decision.rule or decision.engine})"
    detail = f"rule {decision.rule}: {decision.reason}" if decision.reason else f"rule {decision.rule}"
    return f"FAIL {example.where}: {what}: expected {verdict(example.allow)}, got {got} ({detail})"


async def judge_examples(engine: PolicyEngine) -> list[tuple[Expectation, Decision]]:
    await engine.start()
    try:
        judge = Judge(engine)
        return [(example, await judge.decide(example.request)) for example in engine.policy.expectations]
    finally:
        await engine.close()


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
def check(files: tuple[Path, ...]) -> None:
    """Verify the inline [[expect]] examples of policy FILES (composed in order).

    Exit 0 when every example gets its expected decision, 1 when one does not, 2 for a broken file.
    """
    try:
        engine = PolicyEngine(files)
        results = asyncio.run(judge_examples(engine))
    except JailError as exc:
        click.echo(f"jail: error: {exc}", err=True)
        sys.exit(BROKEN_EXIT_STATUS)
    failed = 0
    for example, decision in results:
        click.echo(report_line(example, decision))
        failed += decision.allow != example.allow
    if not results:
        click.echo(f"jail: no [[expect]] examples in {', '.join(map(str, files))}", err=True)
    # `jail policy ...` runs click with standalone_mode=False: a ctx.exit() status would be dropped.
    sys.exit(FAILED_EXIT_STATUS if failed else 0)
