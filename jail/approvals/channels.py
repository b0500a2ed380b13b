"""Where a person answers: the question socket (`jail ask`) and an inherited fd (`--ask-fd`).

Both speak jail/approvals/protocol.py. The socket is a path socket in a 0700 folder of the user's own;
a peer is let in only if it is that user (or root), in jail's network namespace, and not a process of
the jailed command (jail is the command's child subreaper: all of them descend from it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

from jail.approvals.protocol import (
    MAX_LINE_BYTES,
    SOCKET_SUFFIX,
    ProtocolError,
    decode,
    encode,
    error,
    parse_answer,
    socket_dirs,
)
from jail.approvals.questions import Approvals
from jail.model import JailError

logger = logging.getLogger("jail.ask")

PR_SET_DUMPABLE = 4
PID_SUFFIX = ".pid"


def own_private_dir(path: Path) -> Path:
    """`path` as a 0700 folder owned by this user, made if missing; anything else is refused."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=False)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise JailError(f"{path} is not a folder of this user's own: jail will not put its question socket there")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def hide_from_same_user() -> None:
    """Non-dumpable: a process of the same user (the jailed command in the weak mode) can neither
    ptrace jail nor open /proc/<jail>/fd/N (the --ask-fd pipe) or read its memory."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", data)


def process_identity(pid: int | str) -> str:
    """`PID STARTTIME`: names one process, never a later one that got the same pid."""
    with open(f"/proc/{pid}/stat", "rb") as file:
        fields = file.read().rsplit(b")", 1)[1].split()
    return f"{pid if pid != 'self' else os.getpid()} {int(fields[19])}"


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat", "rb") as file:
                # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'.
                pid = int(file.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return True  # gone or unreadable: not known to be the person's, refused
    return False


def same_network_namespace(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False


def running_jails() -> set[int]:
    """The pids of this user's running jails, each written beside its socket: a process that descends from
    any of them is a jailed command (of this jail or another), never the person."""
    pids = {os.getpid()}
    for folder in socket_dirs():
        with contextlib.suppress(OSError):
            for path in folder.glob(f"*{PID_SUFFIX}"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    identity = path.read_text()
                    pid = identity.split()[0]
                    if process_identity(pid) == identity:  # that jail still runs (a killed one's file is stale)
                        pids.add(int(pid))
    return pids


def remove_stale(folder: Path) -> None:
    """The socket and pid file of a jail that was killed (its process is gone or is another one now)."""
    for pid_file in folder.glob(f"*{PID_SUFFIX}"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            identity = pid_file.read_text()
            try:
                alive = process_identity(identity.split()[0]) == identity
            except OSError:
                alive = False
            if not alive:
                pid_file.with_suffix(SOCKET_SUFFIX).unlink(missing_ok=True)
                pid_file.unlink()


def refusal(pid: int, uid: int) -> str | None:
    """Why a peer may not answer, or None when it may."""
    if uid not in (os.geteuid(), 0):
        return f"peer uid {uid} is not jail's user"
    if pid <= 0:
        return "peer pid unknown"
    if any(descends_from(pid, jail) for jail in running_jails()):
        return f"peer pid {pid} is a process of a jailed command"
    if not same_network_namespace(pid):
        return f"peer pid {pid} is in another network namespace (the jail's)"
    return None


class Conversation:
    """One peer: reads protocol lines, answers them, and (when watching) gets every event."""

    def __init__(self, approvals: Approvals, channel: str, write: Any) -> None:
        self.approvals = approvals
        self.channel = channel
        self.write = write  # bytes -> None

    def watch(self) -> None:
        self.approvals.listeners.append(self.push)

    def unwatch(self) -> None:
        with contextlib.suppress(ValueError):
            self.approvals.listeners.remove(self.push)

    def push(self, event: dict[str, Any]) -> None:
        self.write(encode(event))

    def handle(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            message = decode(line)
            if message["op"] == "answer":
                self.write(encode(self.approvals.answer(parse_answer(message), self.channel)))
                return
            self.write(encode(self.listing()))
            if message["op"] == "watch":
                self.watch()
        except ProtocolError as exc:
            self.approvals.refuse(self.channel, f"bad message: {exc}")
            self.write(encode(error(str(exc))))

    def listing(self) -> dict[str, Any]:
        return {"op": "questions", "jail_id": self.approvals.jail_id, "questions": self.approvals.questions()}


class SocketChannel:
    """`jail ask`'s way in: <socket dir>/<jail id>.sock."""

    def __init__(self, approvals: Approvals) -> None:
        self.approvals = approvals
        folder = own_private_dir(socket_dirs()[0])
        self.path = folder / f"{approvals.jail_id}{SOCKET_SUFFIX}"
        self.pid_file = folder / f"{approvals.jail_id}{PID_SUFFIX}"
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        remove_stale(self.pid_file.parent)
        self.pid_file.write_text(process_identity("self"))
        self.path.unlink(missing_ok=True)
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_LINE_BYTES)
        os.chmod(self.path, 0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        conversation = Conversation(self.approvals, "cli", writer.write)
        try:
            pid, uid, _ = peer_credentials(writer.get_extra_info("socket"))
            if (why := refusal(pid, uid)) is not None:
                self.approvals.refuse("cli", why, peer_pid=pid, peer_uid=uid)
                writer.write(encode(error(f"refused: {why}")))
                return
            while line := await reader.readline():
                conversation.handle(line)
                await writer.drain()
        except (ConnectionError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            conversation.unwatch()
            with contextlib.suppress(Exception):
                writer.close()
            if task is not None:
                self.tasks.discard(task)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        self.path.unlink(missing_ok=True)
        self.pid_file.unlink(missing_ok=True)


def parse_fds(value: str) -> tuple[int, int]:
    """`N` (one bidirectional fd, e.g. a socketpair end) or `R,W` (a pipe pair)."""
    try:
        fds = [int(part) for part in value.split(",")]
    except ValueError:
        fds = []
    if len(fds) not in (1, 2) or any(fd < 0 for fd in fds):
        raise JailError(f"--ask-fd: expected N or R,W (file descriptor numbers), not {value!r}")
    for fd in fds:
        try:
            os.fstat(fd)
        except OSError:
            raise JailError(f"--ask-fd: file descriptor {fd} is not open") from None
    return fds[0], fds[-1]


class FdChannel:
    """`--ask-fd`: every event is written without being asked; answer lines are read."""

    def __init__(self, approvals: Approvals, read_fd: int, write_fd: int) -> None:
        self.approvals = approvals
        self.read_fd, self.write_fd = read_fd, write_fd
        for fd in {read_fd, write_fd}:
            os.set_inheritable(fd, False)  # never the child's
        os.set_blocking(read_fd, False)
        self.pending = b""
        self.conversation = Conversation(approvals, "fd", self._write)

    def start(self) -> None:
        self.conversation.watch()
        asyncio.get_running_loop().add_reader(self.read_fd, self._readable)

    def _write(self, data: bytes) -> None:
        try:
            os.write(self.write_fd, data)  # events are small; a pipe takes 64 KiB before it blocks
        except OSError as exc:
            logger.debug("--ask-fd: cannot write: %s", exc)

    def _readable(self) -> None:
        try:
            chunk = os.read(self.read_fd, MAX_LINE_BYTES)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(self.read_fd)
            return
        self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            self.conversation.handle(line)
        if len(self.pending) > MAX_LINE_BYTES:
            self.pending = b""
            self.conversation.handle(b"x" * (MAX_LINE_BYTES + 1))

    def close(self) -> None:
        self.conversation.unwatch()
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.read_fd)
