"""mitmproxy embedded in jail's own event loop, with only the addons a policy proxy needs.

The core, the proxy server, protocol detection, TLS and h2c refusal, plus jail's policy addon;
nothing that records, rewrites or prints flows (bench/run.py compares it with DumpMaster's set).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import options
from mitmproxy.addons import core, disable_h2c, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

from jail.model import JailError
from jail.proxy.addon import PolicyAddon


class StartupErrors(logging.Handler):
    """Keeps mitmproxy's errors while it starts, to explain a failure in one line."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class Ready:
    """Tells the embedding code that the listeners are up."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def running(self) -> None:
        self.event.set()


@dataclass(frozen=True)
class ProxySettings:
    listen_host: str
    listen_port: int
    ca_dir: Path
    upstream_trust: Path | None = None
    # A second listener for connections the firewall redirects (isolated jails only).
    transparent_port: int | None = None

    @property
    def modes(self) -> list[str]:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        modes = [f"regular@{host}:{self.listen_port}"]
        if self.transparent_port is not None:
            modes.append(f"transparent@{host}:{self.transparent_port}")
        return modes


class EmbeddedProxy:
    def __init__(self, settings: ProxySettings, policy: PolicyAddon) -> None:
        self.settings = settings
        self.policy = policy
        self.master: Master | None = None
        self._task: asyncio.Task[None] | None = None
        self.address: tuple[str, int] = (settings.listen_host, settings.listen_port)

    async def start(self) -> tuple[str, int]:
        """Start listening; return the regular listener's (host, port). Raises JailError when it cannot listen."""
        opts = options.Options(
            listen_host=self.settings.listen_host,
            listen_port=self.settings.listen_port,
            confdir=str(self.settings.ca_dir),
            mode=self.settings.modes,
        )
        self.master = Master(opts)
        ready = Ready()
        server = proxyserver.Proxyserver()
        self.master.addons.add(
            core.Core(),
            server,
            next_layer.NextLayer(),
            tlsconfig.TlsConfig(),
            disable_h2c.DisableH2C(),
            self.policy,
            ready,
        )
        self.master.options.update(
            # Never dial at CONNECT time: upstream is contacted only after a request is allowed.
            connection_strategy="lazy",
            # Large bodies stream instead of sitting in memory.
            stream_large_bodies="1m",
            ssl_verify_upstream_trusted_ca=str(self.settings.upstream_trust) if self.settings.upstream_trust else None,
        )
        errors = StartupErrors()
        mitm_logger = logging.getLogger("mitmproxy")
        mitm_logger.addHandler(errors)
        try:
            self._task = asyncio.create_task(self.master.run())
            waiter = asyncio.create_task(ready.event.wait())
            await asyncio.wait({self._task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            addresses = server.listen_addrs() if ready.event.is_set() else []
        finally:
            mitm_logger.removeHandler(errors)
        if len(addresses) < len(self.settings.modes):
            await self.stop()
            why = errors.messages[-1] if errors.messages else "unknown error"
            where = f"{self.settings.listen_host}:{self.settings.listen_port}"
            raise JailError(f"the proxy cannot listen on {where}: {why}")
        self.policy.set_listen_addresses(addresses)
        regular = next(instance for instance in server.servers if instance.mode.type_name == "regular")
        host, port, *_ = regular.listen_addrs[0]
        self.address = (host, port)
        return self.address

    async def stop(self) -> None:
        if self.master is not None and self._task is not None:
            self.master.shutdown()
            try:
                await asyncio.wait_for(self._task, 5)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            except Exception as exc:  # teardown must go on; the error is only worth a diagnostic
                logging.getLogger("jail.proxy").debug("proxy stopped with %r", exc)
        self._task = None
