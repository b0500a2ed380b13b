"""`jail ask`: answer the questions of this user's running jails (see jail/approvals)."""

from __future__ import annotations

import json
import selectors
import sys
from typing import Any

import click

from jail.approvals.client import Connection, answer, jail_sockets, open_questions
from jail.model import JailError

# key -> (verdict, scope, what it means)
KEYS = {
    "a": ("allow", "once", "allow once"),
    "r": ("allow", "run", "allow this host for the run"),
    "A": ("allow", "always", "allow always (saved as a rule)"),
    "d": ("deny", "once", "deny once"),
    "D": ("deny", "always", "deny always (saved as a rule)"),
}
RESCAN_SECONDS = 1.0


@click.command()
@click.argument("question_id", required=False, metavar="[ID")
@click.argument("verdict", required=False, type=click.Choice(["allow", "deny"]), metavar="allow|deny]")
@click.option("--for", "scope", type=click.Choice(["once", "run", "always"]), default="once", show_default=True)
@click.option("--list", "list_only", is_flag=True, help="Print the open questions and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --list: one JSON array.")
def ask(question_id: str | None, verdict: str | None, scope: str, list_only: bool, as_json: bool) -> None:
    """Answer the questions of your running jails (jail --ask).

    \b
      jail ask                          watch and answer, one key per question
      jail ask --list [--json]          the open questions
      jail ask ID allow --for run       allow ID's host for the rest of that run
    """
    if list_only:
        questions = open_questions()
        if as_json:
            click.echo(json.dumps(questions, indent=2))
        else:
            for question in questions:
                click.echo(describe(question))
        return
    if question_id is not None:
        if verdict is None:
            raise click.UsageError("give the answer: jail ask ID allow|deny [--for once|run|always]")
        reply = answer(question_id, verdict, scope)
        saved = f"; saved to {reply['saved_to']}" if reply.get("saved_to") else ""
        click.echo(f"jail: {question_id}: {verdict} ({scope}){saved}")
        return
    Watcher().run()


def describe(question: dict[str, Any]) -> str:
    return f"{question['id']}  {question['method']} {question['url']}  ({question['reason']})"


class Watcher:
    """Shows every question of every running jail as it comes, and takes one key per question."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.connections: dict[str, Connection] = {}
        self.questions: dict[str, dict[str, Any]] = {}
        self.shown: str | None = None
        self.skipped: set[str] = set()

    def run(self) -> None:
        self.selector.register(sys.stdin, selectors.EVENT_READ)
        click.echo("jail ask: waiting for questions (Ctrl-C to stop)", err=True)
        try:
            while True:
                self._connect_new_jails()
                for key, _ in self.selector.select(RESCAN_SECONDS):
                    if key.fileobj is sys.stdin:
                        self._take_key(sys.stdin.readline())
                    else:
                        self._receive(key.data)
                self._prompt()
        except KeyboardInterrupt:
            pass

    def _connect_new_jails(self) -> None:
        for jail_id, path in jail_sockets().items():
            if jail_id in self.connections:
                continue
            try:
                connection = Connection(path)
                connection.send({"op": "watch"})
            except OSError:
                continue
            self.connections[jail_id] = connection
            self.selector.register(connection.sock, selectors.EVENT_READ, jail_id)

    def _receive(self, jail_id: str) -> None:
        connection = self.connections[jail_id]
        try:
            messages = connection.messages()
        except (OSError, ValueError):
            self.selector.unregister(connection.sock)
            connection.close()
            del self.connections[jail_id]
            self.questions = {k: q for k, q in self.questions.items() if q["jail_id"] != jail_id}
            return
        for message in messages:
            if message.get("op") == "questions":
                self.questions.update({q["id"]: q for q in message["questions"]})
            elif message.get("op") == "question":
                self.questions[message["question"]["id"]] = message["question"]
            elif message.get("op") == "answered":
                self.questions.pop(message["id"], None)
                if self.shown == message["id"]:
                    click.echo(f"  -> {message['verdict']} ({message['scope']}, by {message['answered_by']})")
                    self.shown = None

    def _prompt(self) -> None:
        waiting = [q for q in self.questions.values() if q["id"] not in self.skipped]
        if self.shown in self.questions or not waiting:
            return
        question = min(waiting, key=lambda q: q["asked_at"])
        self.shown = question["id"]
        keys = ", ".join(f"{key}={meaning}" for key, (_, _, meaning) in KEYS.items())
        click.echo(f"\n{describe(question)}\n  {keys}, s=skip? ", nl=False)

    def _take_key(self, line: str) -> None:
        key = line.strip()
        if not line:
            raise KeyboardInterrupt  # stdin closed
        if self.shown is None:
            return
        if key == "s":
            self.skipped.add(self.shown)
            self.shown = None
            return
        if key not in KEYS:
            click.echo(f"  one of {', '.join(KEYS)} or s? ", nl=False)
            return
        verdict, scope, _ = KEYS[key]
        try:
            answer(self.shown, verdict, scope)
        except JailError as exc:  # e.g. answered elsewhere meanwhile: said, and the next question comes
            click.echo(f"  {exc}")
            self.questions.pop(self.shown, None)
            self.shown = None
