"""Approvals: ask a person about a request the rule would not allow on its own.

questions.py holds the questions and answers, protocol.py the JSON messages, channels.py the question
socket (`jail ask`) and `--ask-fd`, saved.py the "always" answers written as policy rules. The proxy
addon sees only `Approvals.decide`, awaited in place of the rule's decide.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_ASK_TIMEOUT = 60.0


@dataclass(frozen=True)
class AskSettings:
    """`--ask`, `--ask-timeout`, `--ask-save` (resolved: where "always" answers go, None: nowhere) and `--ask-fd`."""

    ask_denials: bool = False
    timeout: float = DEFAULT_ASK_TIMEOUT
    save_to: Path | None = None
    fd: str | None = None
