"""The embedded mitmproxy and its policy addon. Knows rules only through `decide`."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from jail.model import ProxyEndpoint

if TYPE_CHECKING:
    from jail.audit import AuditSink
    from jail.proxy.addon import Decide
    from jail.proxy.guard import AddressGuard
    from jail.proxy.secrets import Vault


async def start_proxy(
    listen: tuple[str, int],
    decide: Decide,
    audit: AuditSink,
    ca_dir: Path | None,
    upstream_ca: Path | None,
    workdir: Path,
    guard: AddressGuard,
    vault: Vault,
    transparent: bool = False,
) -> tuple[ProxyEndpoint, Callable[[], Awaitable[None]]]:
    """Start the proxy; return where clients reach it and the coroutine function that stops it.

    With `transparent`, a second listener on the same host takes connections that a firewall
    redirected to it (their destination is read from the connection tracking).
    """
    # mitmproxy is imported here, not with the package: `--test`, `--explain` and the tools never need it.
    from jail.proxy.addon import PolicyAddon
    from jail.proxy.ca import CertificateAuthority, upstream_trust_bundle
    from jail.proxy.server import EmbeddedProxy, ProxySettings

    ca = CertificateAuthority.ensure(ca_dir)
    trust = upstream_trust_bundle(upstream_ca, workdir) if upstream_ca else None
    transparent_port = free_port(listen[0]) if transparent else None
    settings = ProxySettings(listen[0], listen[1], ca.directory, trust, transparent_port)
    proxy = EmbeddedProxy(settings, PolicyAddon(decide, audit, guard, vault))
    host, port = await proxy.start()
    return ProxyEndpoint(host, port, ca.cert_path, ca.bundle_path, transparent_port), proxy.stop


def free_port(host: str) -> int:
    # mitmproxy refuses two listeners that both ask for port 0 on one host, so pick this one here.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
