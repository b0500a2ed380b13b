"""The person's side of the question sockets: what `jail ask` uses (plain blocking sockets)."""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path
from typing import Any

from jail.approvals.protocol import SOCKET_SUFFIX, encode, socket_dirs
from jail.model import JailError

TIMEOUT_SECONDS = 5.0


def jail_sockets() -> dict[str, Path]:
    """jail id -> question socket, for every running jail of this user."""
    found: dict[str, Path] = {}
    for folder in socket_dirs():
        with contextlib.suppress(OSError):
            for path in sorted(folder.glob(f"*{SOCKET_SUFFIX}")):
                found.setdefault(path.name.removesuffix(SOCKET_SUFFIX), path)
    return found


class Connection:
    """One jail's question socket, line by line."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT_SECONDS)
        try:
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise
        self.pending = b""

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(encode(message))

    def receive(self) -> dict[str, Any] | None:
        """The next message, or None when the jail is gone."""
        while b"\n" not in self.pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def messages(self) -> list[dict[str, Any]]:
        """Every complete message that has arrived (after the socket was readable); None ends the list."""
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("jail ended")
        self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def close(self) -> None:
        self.sock.close()


def exchange(path: Path, message: dict[str, Any]) -> dict[str, Any] | None:
    connection = Connection(path)
    try:
        connection.send(message)
        return connection.receive()
    finally:
        connection.close()


def open_questions() -> list[dict[str, Any]]:
    """The open questions of every running jail of this user (a jail that is gone is skipped)."""
    questions: list[dict[str, Any]] = []
    for path in jail_sockets().values():
        try:
            reply = exchange(path, {"op": "list"})
        except (OSError, ValueError):
            continue
        if reply and reply.get("op") == "questions":
            questions += reply["questions"]
    return sorted(questions, key=lambda question: question["asked_at"])


def answer(question_id: str, verdict: str, scope: str) -> dict[str, Any]:
    """Answer one question; raises JailError with jail's reason when it is refused."""
    jail_id = question_id.rpartition("-")[0]
    path = jail_sockets().get(jail_id)
    if path is None:
        raise JailError(f"no running jail {jail_id!r} of this user (question {question_id})")
    try:
        reply = exchange(path, {"op": "answer", "id": question_id, "verdict": verdict, "scope": scope})
    except (OSError, ValueError) as exc:
        raise JailError(f"cannot reach jail {jail_id}: {exc}") from None
    if reply is None:
        raise JailError(f"jail {jail_id} ended before it took the answer")
    if reply.get("op") != "answered":
        raise JailError(f"jail {jail_id} refused the answer: {reply.get('error', reply)}")
    return reply
