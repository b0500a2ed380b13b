""" "Always" answers, appended to a policy file as ordinary `[[rule]]` entries that `jail policy check` accepts."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from jail.approvals.protocol import Answer
from jail.approvals.questions import Question, rfc3339
from jail.model import JailError

DEFAULT_SAVE_FILE = "jail-approved.toml"
HEADER = "# Rules approved by a person while jail asked (jail --ask); ordinary jail policy rules.\n"


def save_path(ask_save: Path | None, policy_files: tuple[Path, ...]) -> Path:
    """`--ask-save FILE`, else the first `--policy` file, else ./jail-approved.toml."""
    if ask_save is not None:
        return ask_save.absolute()
    if policy_files:
        return policy_files[0].absolute()
    return Path.cwd() / DEFAULT_SAVE_FILE


class RuleSaver:
    """Appends one rule per "always" answer. The file exists from the start of the run (so the
    filesystem confinement can keep it read-only to the child); one made for the run and never
    written to is removed at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.made = False

    def prepare(self) -> None:
        if self.path.exists():
            return
        try:
            with open(self.path, "x", encoding="utf-8") as file:
                file.write(HEADER)
        except OSError as exc:
            raise JailError(f"--ask-save: cannot create {self.path}: {exc.strerror}") from None
        self.made = True

    def __call__(self, question: Question, answer: Answer, answered_by: str) -> str:
        request = question.request
        when = rfc3339(time.time())
        verb = "allowed" if answer.verdict == "allow" else "denied"
        text = (
            f"\n# jail ask: {verb} always on {when} ({answered_by}), asked by {request.method} "
            f"{request.url} (jail {question.jail_id})\n"
            "[[rule]]\n"
            f"action = {json.dumps(answer.verdict)}\n"
            f"host = {json.dumps(request.host)}\n"
            f"port = {request.port}\n"
            f"reason = {json.dumps(f'{verb} always by a person (jail ask, {when[:10]})')}\n"
        )
        # One append: a reader (jail policy check, a new run) never sees half a rule.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        self.made = False  # it holds a rule now: kept
        return str(self.path)

    def remove_if_unused(self) -> None:
        if self.made and self.path.read_text(encoding="utf-8") == HEADER:
            self.path.unlink(missing_ok=True)
