"""Isolation backends behind one small interface. They know nothing of rules."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from jail.model import JailError, ProxyEndpoint

LISTEN_BACKLOG = 1024
# Where the backends' system tools (ip, nft, unshare, nsenter, setpriv, mount) are looked for, whatever the
# caller's PATH: root's tools live in sbin, which a user's (or a service's) PATH often lacks.
TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
JAIL_ID = re.compile(r"[0-9a-f]{8}")
# In a run's work dir: "PID START_TIME" of the jail process that made it.
OWNER_FILE = "jail.pid"
UNMARKED_GRACE_SECONDS = 60.0


@dataclass
class Listeners:
    """The sockets a backend bound for its child: the proxy's, and jail's resolver's when it gives one.

    Bound before the proxy stack is loaded, so the child can start at once: its first connections
    wait in the listening backlog until the proxy serves them.
    """

    regular: socket.socket
    # Connections the firewall redirected to the proxy (isolated backends).
    transparent: socket.socket | None = None
    # jail's resolver (isolated backends, which redirect every TCP port): each name gets an address of
    # its own, which tells jail the name a connection is for.
    dns: socket.socket | None = None

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.regular, self.transparent, self.dns) if s is not None]

    def close(self) -> None:
        for sock in self.sockets():
            sock.close()


def system_tool(name: str) -> str | None:
    """The absolute path of a system tool, or None when it is not installed."""
    return shutil.which(name, path=TOOL_PATH)


def tool_path(name: str) -> str:
    """The absolute path of a system tool (its bare name when missing, so running it fails with its name)."""
    return system_tool(name) or name


def listening_socket(host: str, port: int = 0) -> socket.socket:
    """A TCP socket listening on host:port, with room in its backlog for a burst before the proxy serves it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)
    except OSError as exc:
        raise JailError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    set_nodelay(sock)
    return sock


def set_nodelay(sock: socket.socket) -> None:
    """Accepted connections inherit it. asyncio sets it only on sockets made with proto IPPROTO_TCP, which
    create_server's are not: without it, each small response waits for Nagle (~40 ms per request)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def datagram_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise JailError(f"cannot listen on {host}:{port} (UDP): {exc.strerror}") from None
    return sock


class Backend(Protocol):
    """prepare → run the child → tear down. Resource names derive from the jail id."""

    name: str
    # Whether the child can reach nothing but jail (the proxy then refuses private addresses too).
    isolated: bool

    async def prepare(self) -> Listeners:
        """Build the isolation and bind the sockets the child will reach jail on."""

    def child_environment(self, base: dict[str, str], proxy: ProxyEndpoint) -> dict[str, str]: ...

    def child_command(self, argv: list[str]) -> list[str]: ...

    async def teardown(self) -> None: ...


def choose_mode(
    weak: bool, user: str | None = None, docker_run: bool = False, allow_weak: bool = False
) -> tuple[str, str]:
    """The backend a run gets ("docker", "strong", "rootless", "namespace" or "weak") and, when a stronger
    one was unavailable, why; raises JailError when the command cannot be isolated and weak mode was
    not allowed.

    The strongest available wins: a network namespace with nftables as root; a user namespace with
    nftables; the same namespace without a firewall (only the proxy variables lead out); weak mode only
    when asked for (`--weak`) or allowed (`--allow-weak`)."""
    from jail.platform.netns import strong_mode_unavailable
    from jail.platform.rootless import nftables_unavailable, rootless_unavailable

    if docker_run:
        return "docker", ""
    if weak:
        return "weak", "--weak"
    root = os.geteuid() == 0
    if not root and user is not None:
        raise JailError("--user needs root (the strong mode runs the command as another user)")
    reason = strong_mode_unavailable() if root else None
    if root and reason is None:
        return "strong", ""
    if user is not None:
        raise JailError(f"--user needs the strong mode, which is unavailable: {reason}")
    namespace_reason = rootless_unavailable()
    if namespace_reason is None:
        firewall_reason = nftables_unavailable()
        if firewall_reason is None:
            return "rootless", reason or ""
        return "namespace", firewall_reason
    reason = f"{reason}; and {namespace_reason}" if reason else namespace_reason
    if not allow_weak:
        raise JailError(
            f"cannot isolate the command: {reason}; pass --allow-weak (or --weak) to run it with proxy"
            " variables only, which programs may ignore"
        )
    return "weak", reason


# What an unasked-for fallback says once on stderr, by mode.
FALLBACK_NOTICES = {
    "rootless": "jail: isolated in a user namespace, not the strong mode: {reason}",
    "namespace": "jail: isolated without a firewall ({reason}): only programs that use the proxy variables get out",
    "weak": "jail: weak mode ({reason}): only programs that honour proxy variables are judged",
}


def select_backend(
    jail_id: str, weak: bool, user: str | None = None, docker_run: bool = False, allow_weak: bool = False
) -> Backend:
    """The backend `choose_mode` picks; a fallback to a weaker one is said once on stderr."""
    mode, reason = choose_mode(weak, user, docker_run, allow_weak)
    if reason and mode in FALLBACK_NOTICES and not weak:
        print(FALLBACK_NOTICES[mode].format(reason=reason), file=sys.stderr)
    if mode == "docker":
        from jail.platform.docker import DockerBackend

        return DockerBackend(jail_id)
    if mode == "strong":
        from jail.platform.netns import NetnsBackend

        return NetnsBackend(jail_id, user)
    if mode in ("rootless", "namespace"):
        from jail.platform.rootless import RootlessBackend

        return RootlessBackend(jail_id, firewall=mode == "rootless")
    from jail.platform.weak import WeakBackend

    return WeakBackend(jail_id)


def cleanup_orphans() -> list[str]:
    """Remove what jails that were killed left behind (namespaces, links, nft tables, containers,
    networks, work dirs); returns their ids."""
    from jail.platform.docker import cleanup_orphans as remove_docker_orphans
    from jail.platform.netns import cleanup_orphans as remove_netns_orphans
    from jail.platform.netns import strong_mode_unavailable

    removed = remove_netns_orphans() if strong_mode_unavailable() is None else []
    removed += [jail_id for jail_id in remove_docker_orphans() if jail_id not in removed]
    for jail_id in removed:
        remove_dirs_of(jail_id)
    removed += [jail_id for jail_id in remove_orphan_dirs() if jail_id not in removed]
    return removed


def make_workdir(jail_id: str) -> Path:
    """The run's private work dir: named from the jail id (as every temp dir of the run is) and marked
    with jail's pid and start time, so a later run can tell a killed jail's leftovers from a live one's."""
    path = Path(tempfile.mkdtemp(prefix=f"jail-{jail_id}-"))
    process = psutil.Process()
    (path / OWNER_FILE).write_text(f"{process.pid} {process.create_time()}")
    return path


def remove_dirs_of(jail_id: str) -> None:
    """Every temp dir of the run, read-only folders included (Go makes its module folders 0555 in a cache
    layer, overlayfs its work folder 000): a non-root jail could not empty them otherwise."""
    for leftover in Path(tempfile.gettempdir()).glob(f"jail-{jail_id}-*"):
        for folder, subfolders, _ in os.walk(leftover):
            for name in subfolders:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(folder, name), 0o700, follow_symlinks=False)
        shutil.rmtree(leftover, ignore_errors=True)


def remove_orphan_dirs() -> list[str]:
    """Remove the temp dirs (this user's) of jails that are no longer running; returns their ids."""
    by_id: dict[str, list[Path]] = {}
    for path in Path(tempfile.gettempdir()).glob("jail-*-*"):
        jail_id = path.name.split("-")[1]
        with contextlib.suppress(OSError):
            if JAIL_ID.fullmatch(jail_id) and path.lstat().st_uid == os.geteuid() and path.is_dir():
                by_id.setdefault(jail_id, []).append(path)
    removed = []
    for jail_id, paths in by_id.items():
        owners = [path / OWNER_FILE for path in paths if (path / OWNER_FILE).exists()]
        if owners:
            dead = not any(_owner_alive(owner) for owner in owners)
        else:  # no mark (yet): a jail starting this moment, or one that died while starting
            dead = all(time.time() - path.stat().st_mtime > UNMARKED_GRACE_SECONDS for path in paths)
        if dead:
            remove_dirs_of(jail_id)
            removed.append(jail_id)
    return removed


def _owner_alive(owner: Path) -> bool:
    try:
        pid, started = owner.read_text().split()
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < 0.01
    except (OSError, ValueError, psutil.Error):
        return False
