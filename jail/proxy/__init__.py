"""The embedded mitmproxy and its policy addon. Knows rules only through `decide`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from jail.audit import AuditSink
from jail.model import ProxyEndpoint
from jail.proxy.addon import Decide, PolicyAddon
from jail.proxy.ca import CertificateAuthority, upstream_trust_bundle
from jail.proxy.server import EmbeddedProxy, ProxySettings


async def start_proxy(
    listen: tuple[str, int],
    decide: Decide,
    audit: AuditSink,
    ca_dir: Path | None,
    upstream_ca: Path | None,
    workdir: Path,
) -> tuple[ProxyEndpoint, Callable[[], Awaitable[None]]]:
    """Start the proxy; return where clients reach it and the coroutine function that stops it."""
    ca = CertificateAuthority.ensure(ca_dir)
    trust = upstream_trust_bundle(upstream_ca, workdir) if upstream_ca else None
    proxy = EmbeddedProxy(ProxySettings(listen[0], listen[1], ca.directory, trust), PolicyAddon(decide, audit))
    host, port = await proxy.start()
    return ProxyEndpoint(host, port, ca.cert_path, ca.bundle_path), proxy.stop
