"""--ssh-agent: the command uses the user's SSH agent through jail, never reaching it (or any socket) itself.

The launcher installs a seccomp filter whose listener it sends over an inherited socket (`AgentChannel`);
the supervisor answers the command's Unix socket calls with sockets connected to the relay, which passes
on what a client needs to log in to the user's SSH_AUTH_SOCK and records each use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
from collections.abc import Callable

from jail.agent.relay import AgentRelay
from jail.agent.supervisor import Supervisor
from jail.model import JailError


def agent_path(jail_id: str) -> str:
    """The SSH_AUTH_SOCK the command gets: a name only jail answers; nothing is created there."""
    return os.path.join(tempfile.gettempdir(), f"jail-{jail_id}-ssh-agent")


def user_agent() -> str:
    """The user's agent socket, from jail's own environment."""
    path = os.environ.get("SSH_AUTH_SOCK", "")
    if not path:
        raise JailError("--ssh-agent needs an SSH agent: SSH_AUTH_SOCK is not set (start one with ssh-agent)")
    return path


class AgentChannel:
    """The socket pair over which the launcher sends the filter's listener; `launcher_end` is inherited."""

    def __init__(self) -> None:
        self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._theirs.set_inheritable(True)
        self._supervisor: Supervisor | None = None
        self._relay: AgentRelay | None = None

    @property
    def launcher_end(self) -> int:
        return self._theirs.fileno()

    def spawned(self) -> None:
        """The command has started: only the launcher holds its end now."""
        self._theirs.close()

    async def serve(
        self, jail_id: str, upstream: str, record: Callable[[dict], None], syscalls: tuple[int, int]
    ) -> None:
        """Wait for the listener, then answer the command's sockets until `close`. SYSCALLS: the numbers of
        socket() and connect() on this machine, which the launcher's filter sends here."""
        received = await asyncio.to_thread(socket.recv_fds, self._ours, 1, 1)
        self._ours.close()
        fds = received[1]
        if not fds:
            return  # the launcher failed before installing the filter (it said why)
        loop = asyncio.get_running_loop()
        self._relay = AgentRelay(upstream, record)
        nr_socket, nr_connect = syscalls
        relay = self._relay

        def hand_over(sock: socket.socket) -> None:
            loop.call_soon_threadsafe(relay.serve, sock)

        self._supervisor = Supervisor(fds[0], agent_path(jail_id), nr_socket, nr_connect, hand_over)
        self._supervisor.start()

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            self._ours.shutdown(socket.SHUT_RDWR)  # a receive still waiting ends
        if self._supervisor is not None:
            await asyncio.to_thread(self._supervisor.stop)
        if self._relay is not None:
            await self._relay.close()
        self._ours.close()
        self._theirs.close()
