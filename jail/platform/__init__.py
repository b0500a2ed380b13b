"""Isolation backends behind one small interface. They know nothing of rules."""

from __future__ import annotations

from typing import Protocol

from jail.model import ProxyEndpoint


class Backend(Protocol):
    """prepare → run the child → tear down. Resource names derive from the jail id."""

    name: str

    def proxy_listen_host(self) -> str:
        """The address the proxy must listen on for this backend's child to reach it."""

    async def prepare(self) -> None: ...

    def child_environment(self, base: dict[str, str], proxy: ProxyEndpoint) -> dict[str, str]: ...

    def child_command(self, argv: list[str]) -> list[str]: ...

    async def teardown(self) -> None: ...


def select_backend(jail_id: str, weak: bool) -> Backend:
    """The strongest backend available; today that is the environment-only one."""
    from jail.platform.weak import WeakBackend

    return WeakBackend(jail_id)
