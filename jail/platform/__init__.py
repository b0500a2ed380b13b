"""Isolation backends behind one small interface. They know nothing of rules."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Protocol

from jail.model import JailError, ProxyEndpoint


class Backend(Protocol):
    """prepare → run the child → tear down. Resource names derive from the jail id."""

    name: str

    def proxy_listen_host(self) -> str:
        """The address the proxy must listen on for this backend's child to reach it."""

    def proxy_modes(self) -> list[str]:
        """["regular"], plus "transparent" when the backend redirects connections to the proxy."""

    def dns_address(self) -> tuple[str, int] | None:
        """Where jail's own resolver must listen, if this backend gives the child one."""

    async def prepare(self) -> None: ...

    def attach_proxy(self, regular_port: int, transparent_port: int | None) -> None:
        """Called once the proxy listens: steer the child's traffic to these ports."""

    def child_environment(self, base: dict[str, str], proxy: ProxyEndpoint) -> dict[str, str]: ...

    def child_command(self, argv: list[str]) -> list[str]: ...

    async def teardown(self) -> None: ...


def select_backend(jail_id: str, weak: bool, user: str | None = None, docker_run: bool = False) -> Backend:
    """The strongest backend available: a network namespace as root, else weak mode (said once on stderr)."""
    from jail.platform.netns import NetnsBackend, strong_mode_unavailable
    from jail.platform.weak import WeakBackend

    if docker_run:
        from jail.platform.docker import DockerBackend

        return DockerBackend(jail_id)
    if weak:
        return WeakBackend(jail_id)
    reason = strong_mode_unavailable()
    if reason is None:
        return NetnsBackend(jail_id, user)
    if user is not None:
        raise JailError(f"--user needs the strong mode, which is unavailable: {reason}")
    print(f"jail: weak mode ({reason}): only programs that honour proxy variables are judged", file=sys.stderr)
    return WeakBackend(jail_id)


def cleanup_orphans() -> list[str]:
    """Remove what jails that were killed left behind (namespaces, links, nft tables, containers,
    networks); returns their ids."""
    from jail.platform.docker import cleanup_orphans as remove_docker_orphans
    from jail.platform.netns import cleanup_orphans as remove_netns_orphans
    from jail.platform.netns import strong_mode_unavailable

    removed = remove_netns_orphans() if strong_mode_unavailable() is None else []
    removed += [jail_id for jail_id in remove_docker_orphans() if jail_id not in removed]
    for jail_id in removed:
        # The killed jail's work and temp dirs (names start with its id).
        for leftover in Path(tempfile.gettempdir()).glob(f"jail-{jail_id}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return removed
