"""The embedded mitmproxy and its policy addon. Knows rules only through `decide`."""

from __future__ import annotations

import asyncio
import importlib
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from jail.proxy.ca import CertificateAuthority, TrustSources

IMPORT_THREAD_PREFIX = "jail: import "
IMPORT_SWITCH_INTERVAL_SECONDS = 0.0002

if TYPE_CHECKING:
    from types import ModuleType

    from jail.audit import AuditSink
    from jail.proxy.addon import Decide
    from jail.proxy.clients import ClientTokens
    from jail.proxy.dns import SyntheticNames
    from jail.proxy.guard import AddressGuard
    from jail.proxy.secrets import Vault
    from jail.proxy.upstream import UpstreamProxies


async def start_proxy(
    ca: CertificateAuthority,
    regular: socket.socket,
    decide: Decide,
    audit: AuditSink,
    trust: TrustSources,
    workdir: Path,
    guard: AddressGuard,
    vault: Vault,
    transparent: socket.socket | None = None,
    upstream: UpstreamProxies | None = None,
    clients: ClientTokens | None = None,
    names: SyntheticNames | None = None,
) -> Callable[[], Awaitable[None]]:
    """Serve the bound sockets; return the coroutine function that stops the proxy.

    With `transparent`, that socket takes connections a firewall redirected to it (their
    destination is read from the connection tracking): HTTP and TLS are judged per request, any
    other TCP stream once, by the name `names` gave its synthetic address (jail.proxy.streams). Upstream servers are verified against
    `trust`; allowed requests leave through `upstream` when it names a proxy. With `clients`, a client
    names itself with proxy authentication (jail/proxy/clients.py).
    """
    # mitmproxy takes most of a second to import: jail's child is already running meanwhile, and
    # `--test`, `--explain` and the tools never load it.
    server = await import_in_background("jail.proxy.server")
    from jail.proxy.addon import PolicyAddon

    settings = server.ProxySettings(ca.directory, regular, transparent, ca.write_upstream_trust(trust, workdir))
    policy = PolicyAddon(decide, audit, guard, vault, upstream, clients)
    proxy = server.EmbeddedProxy(settings, policy)
    await proxy.start()
    if transparent is None:
        return proxy.stop
    from jail.proxy.dns import SyntheticNames
    from jail.proxy.streams import RedirectedConnections, TcpStreams

    assert proxy.redirected is not None
    # The policy's upstream, once it has dropped a proxy that is jail itself (it knows its own address).
    streams = TcpStreams(decide, audit, guard, names or SyntheticNames(), policy.upstream)
    redirected = RedirectedConnections(transparent, streams, proxy.redirected)
    redirected.start()

    async def stop() -> None:
        await redirected.stop()
        await proxy.stop()

    return stop


def import_in_background(name: str) -> asyncio.Future[ModuleType]:
    """Import a module in a daemon thread, so the event loop (and the child's supervision) goes on,
    and an exit meanwhile does not wait for the import to finish."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[ModuleType] = loop.create_future()

    def settle(module: ModuleType | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(module)

    def run() -> None:
        try:
            module = importlib.import_module(name)
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, module, None)
        finally:
            sys.setswitchinterval(switch_interval)

    # The import holds the GIL for most of a second: the event loop (the child's exit, signals, the
    # first connections) must get it back within a fraction of a millisecond, not the default 5 ms
    # each time it wakes.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(IMPORT_SWITCH_INTERVAL_SECONDS)

    threading.Thread(target=run, name=f"{IMPORT_THREAD_PREFIX}{name}", daemon=True).start()
    return done


def import_in_flight() -> bool:
    """Whether a background import is still running (the interpreter must then not be finalized under it)."""
    return any(thread.name.startswith(IMPORT_THREAD_PREFIX) for thread in threading.enumerate())
