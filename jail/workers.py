"""The proxy processes of `jail --server --workers N`, seen from the parent that starts them.

One process runs Python on one core (the GIL), so a gateway for many clients runs N copies of the
proxy. The parent binds one listening socket per worker on the same port (SO_REUSEPORT) and each worker
inherits its own: the kernel spreads new connections over them by a hash of the addresses. One socket
shared by all balanced badly (measured): asyncio accepts up to a hundred waiting connections at each
wake-up, so whichever worker woke first took a whole burst of clients. The parent makes the CA, the
workers read it. Each worker builds its own rule engine, logs and proxy in its own event loop, and
appends whole lines to the shared logs (one `os.write` on O_APPEND).

A worker is the session's worker command (`python -m jail --serve-as-worker`) given FD, its end of a
socket pair over which the parent sends the `WorkerSpec` and the worker answers with JSON lines
(`ready`, `error`, `verdicts`). The parent half-closes the pair to stop it; a worker whose parent is gone
sees the same end of file and stops too. Workers run in a session of their own: the terminal's Ctrl-C
and hang-up reach the parent only, which stops them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jail.model import JailError
from jail.platform import LISTEN_BACKLOG, set_nodelay

logger = logging.getLogger("jail")

# After the parent asks, a worker gets this long to finish its requests and close before it is killed.
STOP_GRACE_SECONDS = 8.0
# A worker that dies sooner than this after it became ready is not restarted: the next would die too.
RESTART_MIN_UPTIME_SECONDS = 5.0
_LENGTH = struct.Struct("!I")


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs besides its environment: the run's settings, its place among the workers,
    the CA the parent made, and the number of the inherited listening socket's descriptor."""

    index: int
    jail_id: str
    config: Any  # jail.session.JailConfig (this room does not import the session)
    ca_dir: Path
    listen_fd: int
    # The level of the "jail" logger (-v, -vv): a worker's diagnostics go to the same stderr.
    log_level: int = logging.WARNING


def receive_spec(channel: socket.socket) -> WorkerSpec:
    """The worker's first read: the spec, length-prefixed (the parent wrote it before anything else)."""
    (length,) = _LENGTH.unpack(_read_exactly(channel, _LENGTH.size))
    spec = pickle.loads(_read_exactly(channel, length))
    assert isinstance(spec, WorkerSpec)
    return spec


def _read_exactly(channel: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = channel.recv(size - len(data))
        if not chunk:
            raise JailError("the jail that started this worker is gone")
        data += chunk
    return data


def tell_parent(channel: socket.socket, **message: Any) -> None:
    """One JSON line to the parent; a parent that is gone no longer listens."""
    with contextlib.suppress(OSError):
        channel.setblocking(True)
        channel.sendall(json.dumps(message).encode() + b"\n")


def worker_signals(stop: Callable[[], None]) -> None:
    """A worker signalled by hand stops cleanly (and the parent starts another)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop)


async def parent_gone(channel: socket.socket) -> None:
    """Returns when the parent half-closes the channel (stop) or exits."""
    loop = asyncio.get_running_loop()
    channel.setblocking(False)
    while await loop.sock_recv(channel, 1024):
        pass


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets listening on one address (SO_REUSEPORT), one per worker; with port 0, the port
    the first one got. The kernel gives each new connection to one of them by a hash of its addresses."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        # First as one plain listener would take it: a port another program listens on (another jail's
        # SO_REUSEPORT sockets too, which these would silently join) is refused as without workers.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            port = probe.getsockname()[1]
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(LISTEN_BACKLOG)
            set_nodelay(sock)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise JailError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sockets


def cores() -> int:
    """The cores this process may run on (`--workers auto`)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Worker:
    """One worker process and the parent's end of its channel."""

    def __init__(self, command: Sequence[str], spec: WorkerSpec) -> None:
        self.command = command
        self.spec = spec
        self.process: asyncio.subprocess.Process | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ready_at = 0.0
        self.verdicts: Counter[str] = Counter()

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    async def start(self) -> None:
        """Start the process and return once it accepts connections; JailError with its reason if it cannot."""
        parent_end, worker_end = socket.socketpair()
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.command,
                str(worker_end.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(worker_end.fileno(), self.spec.listen_fd),
                start_new_session=True,
            )
        except OSError as exc:
            parent_end.close()
            raise JailError(f"cannot start a worker: {exc.strerror}") from None
        finally:
            worker_end.close()
        self.reader, self.writer = await asyncio.open_unix_connection(sock=parent_end)
        data = pickle.dumps(self.spec)
        self.writer.write(_LENGTH.pack(len(data)) + data)
        message = await self._next_message()
        if "ready" not in message:
            await self.stop()
            self.writer.close()
            raise JailError(message.get("error") or f"worker {self.spec.index} exited before it accepted connections")
        self.ready_at = time.monotonic()

    async def _next_message(self) -> dict[str, Any]:
        assert self.reader is not None
        try:
            line = await self.reader.readline()
        except (ConnectionError, ValueError):
            line = b""
        return json.loads(line) if line.strip() else {}

    async def ended(self) -> int:
        """Reads the worker's messages until it exits; returns its exit status."""
        assert self.process is not None
        assert self.writer is not None
        while message := await self._next_message():
            self.verdicts.update(message.get("verdicts", {}))
        self.writer.close()
        return await self.process.wait()

    async def stop(self) -> None:
        """Ask the worker to stop (end of file on its channel), then kill it if it does not in time."""
        if self.writer is not None:
            with contextlib.suppress(OSError):
                self.writer.write_eof()
        if self.process is None:
            return
        try:
            await asyncio.wait_for(self.process.wait(), STOP_GRACE_SECONDS)
        except TimeoutError:
            logger.warning("worker %d (pid %d) did not stop in time; killed", self.spec.index, self.pid)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


class WorkerPool:
    """N workers, started together, watched, restarted when one dies after a good start, stopped together."""

    def __init__(self, command: Sequence[str], count: int, spec_for: Callable[[int], WorkerSpec]) -> None:
        self.command = command
        self.count = count
        self.spec_for = spec_for
        self.workers: list[Worker] = []
        self.verdicts: Counter[str] = Counter()
        self.stopping = False
        # Set with the line to say when the pool cannot go on (a worker died and cannot be replaced).
        self.failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._watchers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Start every worker and return when all accept connections; JailError if any cannot."""
        self.workers = [Worker(self.command, self.spec_for(index)) for index in range(self.count)]
        results = await asyncio.gather(*(worker.start() for worker in self.workers), return_exceptions=True)
        if errors := [result for result in results if isinstance(result, BaseException)]:
            raise errors[0]
        for worker in self.workers:
            self._watch(worker)

    def _watch(self, worker: Worker) -> None:
        task = asyncio.create_task(self._supervise(worker))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _supervise(self, worker: Worker) -> None:
        status = await worker.ended()
        self.verdicts.update(worker.verdicts)
        if self.stopping:
            return
        index, pid = worker.spec.index, worker.pid
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        if time.monotonic() - worker.ready_at < RESTART_MIN_UPTIME_SECONDS:
            self._fail(f"worker {index} (pid {pid}) {how} soon after it started; stopping the server")
            return
        print(f"jail: worker {index} (pid {pid}) {how}; starting another", file=sys.stderr, flush=True)
        replacement = Worker(self.command, self.spec_for(index))
        self.workers[index] = replacement
        try:
            await replacement.start()
        except JailError as exc:
            self._fail(f"worker {index} could not be restarted ({exc}); stopping the server")
            return
        if self.stopping:
            await replacement.stop()
        else:
            self._watch(replacement)

    def _fail(self, line: str) -> None:
        if not self.failed.done():
            self.failed.set_result(line)

    async def stop(self) -> None:
        """Stop every worker (each finishes and closes in its own time, within the grace), and gather
        their verdict counts."""
        self.stopping = True
        await asyncio.gather(*(worker.stop() for worker in self.workers))
        if self._watchers:
            await asyncio.wait(self._watchers)
