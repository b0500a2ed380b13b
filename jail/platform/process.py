"""Running the child: its own process group, signals passed on, the whole tree killed at the end.

jail makes itself a child subreaper, so descendants that daemonise are re-parented to jail
rather than to init and can still be found and killed; they are recognised by the JAIL_ID
marker in their environment, which engine helpers (rule scripts, rule programs) do not carry.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys

import psutil

logger = logging.getLogger("jail.child")

PR_SET_CHILD_SUBREAPER = 36
TERMINATE_GRACE_SECONDS = 2.0


def become_subreaper() -> None:
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        logger.debug("cannot become a child subreaper: %s", os.strerror(ctypes.get_errno()))


def exit_status(returncode: int) -> int:
    """A shell's convention: a child killed by signal N makes jail exit 128+N."""
    return 128 - returncode if returncode < 0 else returncode


class Child:
    def __init__(self, argv: list[str], env: dict[str, str], jail_id: str, pass_fds: tuple[int, ...] = ()) -> None:
        self.argv = argv
        self.pass_fds = pass_fds
        self.env = env
        self.jail_id = jail_id
        self.process: asyncio.subprocess.Process | None = None
        self._terminal_fd: int | None = None

    async def spawn(self) -> None:
        become_subreaper()
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, process_group=0, pass_fds=self.pass_fds
            )
        except FileNotFoundError:
            raise ChildError(f"command not found: {self.argv[0]}", 127) from None
        except PermissionError:
            raise ChildError(f"command not executable: {self.argv[0]}", 126) from None
        self._give_terminal()

    def _give_terminal(self) -> None:
        """An interactive child owns the terminal, so Ctrl-C and job control reach it as usual."""
        assert self.process is not None
        with contextlib.suppress(OSError):
            fd = sys.stdin.fileno()
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
                try:
                    os.tcsetpgrp(fd, self.process.pid)
                    self._terminal_fd = fd
                finally:
                    signal.signal(signal.SIGTTOU, previous)

    def _take_terminal_back(self) -> None:
        if self._terminal_fd is None:
            return
        previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            with contextlib.suppress(OSError):
                os.tcsetpgrp(self._terminal_fd, os.getpgrp())
        finally:
            signal.signal(signal.SIGTTOU, previous)
        self._terminal_fd = None

    def send(self, sig: int) -> None:
        """Pass a signal to the child's process group."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, sig)

    async def wait(self) -> int:
        assert self.process is not None
        returncode = await self.process.wait()
        self._take_terminal_back()
        return exit_status(returncode)

    def _tree(self) -> list[psutil.Process]:
        """Every process of the child's tree still alive, including daemonised ones."""
        found: dict[int, psutil.Process] = {}
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(self.process.pid)
                found[root.pid] = root
                found.update((p.pid, p) for p in root.children(recursive=True))
        for candidate in psutil.Process().children(recursive=True):
            if candidate.pid in found:
                continue
            with contextlib.suppress(psutil.Error):
                if candidate.environ().get("JAIL_ID") == self.jail_id:
                    found[candidate.pid] = candidate
        return list(found.values())

    async def kill_tree(self) -> None:
        """SIGTERM everything of the child's, then SIGKILL what is left; reap what jail inherited."""
        main_pid = self.process.pid if self.process is not None else None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            victims = self._tree()
            if not victims:
                break
            for victim in victims:
                with contextlib.suppress(psutil.Error):
                    victim.send_signal(sig)
            others = [p for p in victims if p.pid != main_pid]
            await asyncio.to_thread(psutil.wait_procs, others, timeout=TERMINATE_GRACE_SECONDS)
            if self.process is not None and self.process.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.process.wait(), TERMINATE_GRACE_SECONDS)
        self._take_terminal_back()


class ChildError(Exception):
    """The command could not be started; carries the shell's exit status for it."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
