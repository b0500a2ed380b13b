"""The agent relay: each socket the command opened talks to a connection of jail's own to the user's agent.

Only what a client needs to log in is passed on: listing the keys and signing with one. Adding, removing,
locking and extensions are answered SSH_AGENT_FAILURE without reaching the agent. Every request is recorded
(a signature with the key's SHA256 fingerprint, as `ssh-keygen -l` shows it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import socket
import struct
from collections.abc import Callable

logger = logging.getLogger("jail.agent")

REQUEST_IDENTITIES = 11
SIGN_REQUEST = 13
PASSED_ON = {REQUEST_IDENTITIES: "list-keys", SIGN_REQUEST: "sign"}
NAMES = {
    9: "remove-all-keys",
    17: "add-key",
    18: "remove-key",
    19: "remove-all-keys",
    22: "lock",
    23: "unlock",
    25: "add-key",
}
NAMES |= {26: "add-smartcard-key", 27: "extension", 20: "add-smartcard-key", 21: "remove-smartcard-key"}
FAILURE = struct.pack(">IB", 1, 5)  # SSH_AGENT_FAILURE
MAX_MESSAGE = 256 * 1024  # OpenSSH's own limit


def fingerprint(key_blob: bytes) -> str:
    digest = base64.b64encode(hashlib.sha256(key_blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def signing_key(payload: bytes) -> str:
    """The fingerprint of the key a SIGN_REQUEST's payload names ("" when it is malformed)."""
    if len(payload) < 4:
        return ""
    (length,) = struct.unpack(">I", payload[:4])
    blob = payload[4 : 4 + length]
    return fingerprint(blob) if len(blob) == length else ""


class AgentRelay:
    """Serves the sockets the supervisor hands over; RECORD gets one audit event per request."""

    def __init__(self, upstream: str, record: Callable[[dict], None]) -> None:
        self.upstream = upstream
        self.record = record
        self._tasks: set[asyncio.Task[None]] = set()

    def serve(self, sock: socket.socket) -> None:
        """Start relaying SOCK (called in the event loop)."""
        task = asyncio.get_running_loop().create_task(self._serve(sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        agent: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                message = await _read_message(reader)
                if message is None:
                    return
                kind = message[4]
                name = PASSED_ON.get(kind)
                if name is None:
                    self._record(NAMES.get(kind, f"type-{kind}"), False)
                    writer.write(FAILURE)
                    await writer.drain()
                    continue
                if agent is None:
                    agent = await asyncio.open_unix_connection(self.upstream)
                agent[1].write(message)
                answer = await _read_message(agent[0])
                if answer is None:
                    return
                self._record(name, True, signing_key(message[5:]) if kind == SIGN_REQUEST else "")
                writer.write(answer)
                await writer.drain()
        except OSError as exc:
            logger.warning("ssh-agent relay: %s", exc)
        finally:
            for _, out in [(reader, writer), *([agent] if agent else [])]:
                out.close()
                with contextlib.suppress(OSError):
                    await out.wait_closed()

    def _record(self, request: str, allowed: bool, key: str = "") -> None:
        event = {
            "kind": "ssh-agent",
            "request": request,
            "decision": "allow" if allowed else "deny",
            "reason": "" if allowed else f"{request} is not for the jailed command",
            "reason_code": "ssh_agent" if allowed else "ssh_agent_refused",
        }
        self.record(event | ({"key": key} if key else {}))


async def _read_message(reader: asyncio.StreamReader) -> bytes | None:
    """One length-prefixed agent message (with its length), None at the end or on an oversized one."""
    try:
        header = await reader.readexactly(4)
        (length,) = struct.unpack(">I", header)
        if not 0 < length <= MAX_MESSAGE:
            return None
        return header + await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        return None
