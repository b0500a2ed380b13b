"""The approvals protocol: line-delimited JSON, the same on the question socket and on `--ask-fd`.

Client -> jail:   {"op": "list"} | {"op": "watch"} | {"op": "answer", "id": ID, "verdict": V, "scope": S}
Jail -> client:   {"op": "questions", "jail_id": ..., "questions": [...]} | {"op": "question", "question": {...}}
                  {"op": "answered", "id": ..., "verdict": ..., "scope": ..., "answered_by": ..., "saved_to": ...}
                  {"op": "error", "error": "one line"}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERDICTS = ("allow", "deny")
SCOPES = ("once", "run", "always")
CHANNELS = ("cli", "ui", "fd")
MAX_LINE_BYTES = 64 * 1024
SOCKET_SUFFIX = ".sock"


class ProtocolError(ValueError):
    """A message that is not one of the protocol's; its text goes back to the sender."""


@dataclass(frozen=True)
class Answer:
    question_id: str
    verdict: str
    scope: str


def encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


def error(text: str) -> dict[str, Any]:
    return {"op": "error", "error": text}


def decode(line: bytes) -> dict[str, Any]:
    """One message; raises ProtocolError for anything else."""
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError(f"message longer than {MAX_LINE_BYTES} bytes")
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(message, dict) or message.get("op") not in ("list", "watch", "answer"):
        raise ProtocolError('expected {"op": "list" | "watch" | "answer", ...}')
    return message


def parse_answer(message: dict[str, Any]) -> Answer:
    question_id, verdict, scope = message.get("id"), message.get("verdict"), message.get("scope", "once")
    if not isinstance(question_id, str) or not question_id:
        raise ProtocolError("answer needs an id (a question's id)")
    if verdict not in VERDICTS:
        raise ProtocolError(f'verdict must be "allow" or "deny", not {json.dumps(verdict)}')
    if scope not in SCOPES:
        raise ProtocolError(f'scope must be "once", "run" or "always", not {json.dumps(scope)}')
    return Answer(question_id, verdict, scope)


def socket_dirs() -> list[Path]:
    """Where the question sockets of this user's jails are, in order of preference: the runtime dir
    (when it is the user's own), else a folder of the user's in /tmp. `jail ask` looks in both."""
    dirs = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        try:
            if os.stat(runtime).st_uid == os.geteuid():
                dirs.append(Path(runtime) / "jail.ask")
        except OSError:
            pass
    dirs.append(Path("/tmp") / f"jail.ask.{os.geteuid()}")
    return dirs
