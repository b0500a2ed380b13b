"""The Docker backend's child process: `python -m jail.platform.docker_attach SPEC_FILE`.

Creates the container jail's backend described (network, DNS, CA mounts, variables), attaches
stdin (with -i), stdout and stderr (one stream with -t), starts it, forwards SIGINT, SIGTERM and
SIGHUP to it, and exits with its status. With --rm the container is removed on every way out,
also when jail itself dies (the parent-death signal kills the container first).
Exit statuses follow `docker run`: 125 for a Docker failure, 126/127 when the command cannot run.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import docker
from docker.utils.socket import frames_iter

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Sent to this process by the kernel when jail dies: the container must not outlive it.
PARENT_DIED = signal.SIGUSR2
PR_SET_PDEATHSIG = 1
DOCKER_FAILURE = 125
OUTPUT_DRAIN_SECONDS = 5.0


def fail(message: str, status: int = DOCKER_FAILURE) -> None:
    print(f"jail: docker: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def start_status(error: docker.errors.APIError) -> int:
    """docker run's statuses for a command that cannot be started."""
    text = str(error).lower()
    if "not found" in text or "no such file" in text:
        return 127
    if "permission denied" in text:
        return 126
    return DOCKER_FAILURE


class Attachment:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.client = docker.from_env(timeout=None)
        self.container: Any = None
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.terminal: list[Any] | None = None

    def create(self) -> None:
        create = dict(self.spec["create"])
        image = create.pop("image")
        try:
            self.container = self.client.containers.create(image, **create)
        except docker.errors.ImageNotFound:
            print(f"Unable to find image '{image}' locally", file=sys.stderr, flush=True)
            try:
                self.client.images.pull(image)
                self.container = self.client.containers.create(image, **create)
            except docker.errors.APIError as exc:
                fail(str(exc))
        except docker.errors.APIError as exc:
            fail(str(exc))

    def attach(self) -> Any:
        params = {"stdin": int(self.spec["interactive"]), "stdout": 1, "stderr": 1, "stream": 1}
        return self.client.api.attach_socket(self.container.id, params=params)

    def run(self) -> int:
        self.create()
        try:
            stream = self.attach()
            self.container.start()
        except docker.errors.APIError as exc:
            self.remove()
            fail(str(exc.explanation or exc), start_status(exc))
        raw = getattr(stream, "_sock", stream)
        self._raw_terminal()
        self._resize()
        output = threading.Thread(target=self._copy_output, args=(stream,), daemon=True)
        output.start()
        if self.spec["interactive"]:
            threading.Thread(target=self._copy_input, args=(raw,), daemon=True).start()
        threading.Thread(target=self._wait, daemon=True).start()
        try:
            while True:
                kind, value = self.events.get()
                if kind == "exit":
                    output.join(OUTPUT_DRAIN_SECONDS)
                    return value
        finally:
            self._restore_terminal()
            with contextlib.suppress(OSError):
                raw.close()

    def _wait(self) -> None:
        try:
            status = int(self.container.wait()["StatusCode"])
        except Exception as exc:  # the daemon went away: say so and fail as docker run does
            print(f"jail: docker: lost the container: {exc}", file=sys.stderr, flush=True)
            status = DOCKER_FAILURE
        self.events.put(("exit", status))

    def _copy_output(self, stream: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            for stream_id, data in frames_iter(stream, self.spec["tty"]):
                target = sys.stderr if stream_id == 2 else sys.stdout
                target.buffer.write(data)
                target.buffer.flush()

    def _copy_input(self, raw: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := os.read(sys.stdin.fileno(), 65536):
                raw.sendall(data)
            raw.shutdown(socket.SHUT_WR)  # end of input closes the container's stdin

    def _raw_terminal(self) -> None:
        if not (self.spec["tty"] and self.spec["interactive"] and sys.stdin.isatty()):
            return
        import termios
        import tty

        self.terminal = termios.tcgetattr(sys.stdin.fileno())
        tty.setraw(sys.stdin.fileno())

    def _restore_terminal(self) -> None:
        if self.terminal is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self.terminal)

    def _resize(self) -> None:
        if not self.spec["tty"]:
            return
        with contextlib.suppress(OSError, docker.errors.APIError):
            size = os.get_terminal_size(sys.stdout.fileno())
            self.container.resize(height=size.lines, width=size.columns)

    def forward(self, sig: int) -> None:
        """Called from a signal handler: the Docker call runs on its own thread."""
        if self.container is None:
            return
        name = "SIGKILL" if sig == PARENT_DIED else signal.Signals(sig).name

        def kill() -> None:
            with contextlib.suppress(docker.errors.APIError):
                self.container.kill(signal=name)

        threading.Thread(target=kill, daemon=True).start()

    def remove(self) -> None:
        if self.spec["remove"] and self.container is not None:
            with contextlib.suppress(docker.errors.APIError):
                self.container.remove(force=True, v=True)


def die_with_parent() -> None:
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, PARENT_DIED, 0, 0, 0)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m jail.platform.docker_attach SPEC_FILE", file=sys.stderr)
        return 2
    parent = os.getppid()
    die_with_parent()
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    spec_path.unlink(missing_ok=True)  # it may hold values of `-e NAME`
    attachment = Attachment(spec)
    for sig in (*FORWARDED_SIGNALS, PARENT_DIED):
        signal.signal(sig, lambda number, _frame: attachment.forward(number))
    if hasattr(signal, "SIGWINCH"):
        signal.signal(signal.SIGWINCH, lambda _number, _frame: threading.Thread(target=attachment._resize).start())
    if os.getppid() != parent:  # jail died before the parent-death signal was armed
        return DOCKER_FAILURE
    try:
        return attachment.run()
    finally:
        attachment.remove()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
