"""--ssh-agent: jail answers the command's Unix stream sockets through a seccomp user notification.

The command may not open Unix sockets (Landlock cannot restrict connect() to a path socket, so an open
socket could reach the Docker socket). With --ssh-agent the launcher installs `agent_socket_filter`
instead, whose listener it sends to jail, and this supervisor answers:

- socket(AF_UNIX, SOCK_STREAM): a new socket pair; one end is put into the command as the call's result
  (SECCOMP_IOCTL_NOTIF_ADDFD), the other goes to the agent relay. Every Unix stream socket the command
  holds is thus already connected, to jail: connecting it anywhere else fails with EISCONN in the kernel.
  Other types and protocols: EACCES.
- connect() with an address length that is not an IP one: on one of those sockets, success if the
  address is the agent path jail gave the command in SSH_AUTH_SOCK (OpenSSH connects to a path), EACCES
  otherwise; the call is never passed on, so the address (read once from the command's memory) cannot be
  swapped under jail's feet. On any other socket the kernel decides, as without --ssh-agent (CONTINUE):
  an IP socket cannot reach a Unix path, and the command's other Unix sockets (socket pairs, inherited
  ones) are connected already.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable

logger = logging.getLogger("jail.agent")

# include/uapi/linux/seccomp.h: _IOWR('!', 0, struct seccomp_notif) and friends.
NOTIF_RECV = 0xC0502100
NOTIF_SEND = 0xC0182101
NOTIF_ID_VALID = 0x40082102
NOTIF_ADDFD = 0x40182103
NOTIF = struct.Struct("<QIIiIQ6Q")  # id, pid, flags, data.nr, data.arch, data.ip, data.args
RESPONSE = struct.Struct("<QqiI")  # id, val, error, flags
ADDFD = struct.Struct("<QIIII")  # id, flags, srcfd, newfd, newfd_flags
FLAG_CONTINUE = 1
ADDFD_FLAG_SEND = 1 << 1
SOCK_TYPE_MASK = 0xF
SOCK_CLOEXEC = 0o2000000
SOCK_NONBLOCK = 0o4000
SUN_PATH_OFFSET = 2
SOCKADDR_UN_SIZE = 110
POLL_SECONDS = 0.2


class Supervisor:
    """Answers the notifications of one command's filter, in a thread of its own (the calls block)."""

    def __init__(
        self,
        listener: int,
        agent_path: str,
        nr_socket: int,
        nr_connect: int,
        hand_over: Callable[[socket.socket], None],
    ) -> None:
        self.listener = listener
        self.agent_path = os.fsencode(agent_path)
        self.nr_socket = nr_socket
        self.nr_connect = nr_connect
        # Called (in this thread) with jail's end of each socket handed to the command.
        self.hand_over = hand_over
        # Inode numbers of the ends handed to the command: kept for the whole run, so a socket whose
        # relay has ended is still known as one of them.
        self.agent_sockets: set[int] = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jail-ssh-agent", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        os.close(self.listener)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        while not self._stopping.is_set():
            events = poller.poll(POLL_SECONDS * 1000)
            if not events:
                continue
            if not events[0][1] & select.POLLIN:
                return  # every process of the command has exited (POLLHUP)
            self._answer_one()

    def _answer_one(self) -> None:
        buffer = bytearray(NOTIF.size)
        try:
            fcntl.ioctl(self.listener, NOTIF_RECV, buffer, True)
        except OSError:
            return  # the calling process died in between (ENOENT)
        notif_id, pid, _, nr, _, _, *args = NOTIF.unpack(buffer)
        try:
            if nr == self.nr_socket:
                self._answer_socket(notif_id, args)
            elif nr == self.nr_connect:
                self._answer_connect(notif_id, pid, args)
            else:
                self._respond(notif_id, error=errno.EACCES)
        except OSError as exc:
            logger.debug("ssh-agent: notification %d: %s", notif_id, exc)
            with contextlib.suppress(OSError):
                self._respond(notif_id, error=errno.EACCES)

    def _answer_socket(self, notif_id: int, args: list[int]) -> None:
        kind, protocol = args[1] & 0xFFFFFFFF, args[2] & 0xFFFFFFFF
        if kind & ~(SOCK_CLOEXEC | SOCK_NONBLOCK) != socket.SOCK_STREAM or protocol != 0:
            self._respond(notif_id, error=errno.EACCES)
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            theirs.setblocking(not kind & SOCK_NONBLOCK)  # O_NONBLOCK belongs to the shared file
            inode = os.fstat(theirs.fileno()).st_ino
            self.agent_sockets.add(inode)
            request = bytearray(
                ADDFD.pack(notif_id, ADDFD_FLAG_SEND, theirs.fileno(), 0, os.O_CLOEXEC if kind & SOCK_CLOEXEC else 0)
            )
            try:
                fcntl.ioctl(self.listener, NOTIF_ADDFD, request, True)
            except OSError:
                ours.close()
                raise
        self.hand_over(ours)

    def _answer_connect(self, notif_id: int, pid: int, args: list[int]) -> None:
        fd, address, length = args[0] & 0xFFFFFFFF, args[1], args[2] & 0xFFFFFFFF
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            target = ""
        if not self._is_agent_socket(target):
            self._respond(notif_id, flags=FLAG_CONTINUE)
            return
        named = self._read_address(pid, address, min(length, SOCKADDR_UN_SIZE))
        # The pid read from must still be the caller: the notification is still pending.
        fcntl.ioctl(self.listener, NOTIF_ID_VALID, bytearray(struct.pack("<Q", notif_id)), True)
        self._respond(notif_id, error=0 if named == self.agent_path else errno.EACCES)

    def _is_agent_socket(self, target: str) -> bool:
        if not (target.startswith("socket:[") and target.endswith("]")):
            return False
        return int(target[len("socket:[") : -1]) in self.agent_sockets

    @staticmethod
    def _read_address(pid: int, address: int, length: int) -> bytes | None:
        """The path of the sockaddr_un at ADDRESS in PID's memory; None for anything else."""
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = os.pread(fd, length, address)
        finally:
            os.close(fd)
        if len(raw) <= SUN_PATH_OFFSET or int.from_bytes(raw[:2], "little") != socket.AF_UNIX:
            return None
        return raw[SUN_PATH_OFFSET:].split(b"\0", 1)[0] or None

    def _respond(self, notif_id: int, error: int = 0, flags: int = 0) -> None:
        fcntl.ioctl(self.listener, NOTIF_SEND, bytearray(RESPONSE.pack(notif_id, 0, -error, flags)), True)
