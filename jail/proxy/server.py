"""mitmproxy embedded in jail's own event loop, with only the addons a policy proxy needs.

The core, the proxy server, protocol detection, TLS and h2c refusal, plus jail's policy addon;
nothing that records, rewrites or prints flows (bench/run.py compares it with DumpMaster's set).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import http, options
from mitmproxy.addons import core, disable_h2c, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers.http import (
    HttpStream,
    RequestHeaders,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    SendHttp,
)
from mitmproxy.proxy.layers.http._http1 import Http1Client
from mitmproxy.proxy.mode_servers import ServerInstance

from jail.model import JailError
from jail.proxy import bulk
from jail.proxy.addon import PolicyAddon


def skip_debug_type_checks() -> None:
    """Build flows as under `python -O`: without -O, mitmproxy checks the field types of every request and
    response it makes (`if __debug__:` in mitmproxy/http.py), ~9 % of the proxy's CPU under load."""
    if "__post_init__" in vars(http.MessageData):
        http.MessageData.__post_init__ = _unchecked  # type: ignore[method-assign]


def _unchecked(self: http.MessageData) -> None:
    pass


def send_error_hook_responses() -> None:
    """When a request fails upstream, mitmproxy runs the `error` hook and then sends the client its own
    HTML error page, whatever the hook did. Here, a response the hook set (jail's one-line text/plain
    502) is sent instead, as a whole response, when the client has had no response headers yet."""
    if getattr(HttpStream.handle_protocol_error, "jail_sends_hook_response", False):
        return
    original = HttpStream.handle_protocol_error

    def handle_protocol_error(self: HttpStream, event: object) -> layer.CommandGenerator[None]:
        answered_before = self.flow.response is not None
        steps = original(self, event)
        reply = None
        while True:
            try:
                command = steps.send(reply)
            except StopIteration as finished:
                return finished.value
            reply = None
            response = self.flow.response
            if (
                not answered_before
                and response is not None
                and isinstance(command, SendHttp)
                and isinstance(command.event, ResponseProtocolError)
                and command.connection is self.context.client
            ):
                client = self.context.client
                yield SendHttp(ResponseHeaders(self.stream_id, response, False), client)
                yield SendHttp(ResponseData(self.stream_id, response.raw_content or b""), client)
                yield SendHttp(ResponseEndOfMessage(self.stream_id), client)
            else:
                reply = yield command

    handle_protocol_error.jail_sends_hook_response = True  # type: ignore[attr-defined]
    HttpStream.handle_protocol_error = handle_protocol_error  # type: ignore[method-assign]


def frame_converted_request_bodies() -> None:
    """An HTTP/2 (or 3) request sent on to an HTTP/1 upstream keeps its headers: when its body came in DATA
    frames without a Content-Length, mitmproxy sent it with neither Content-Length nor chunked framing,
    and the upstream read the body as the next request on the connection, one no rule had judged (any
    method, any path on the allowed host). Such a body now goes chunked; mitmproxy chunks what the
    header says (11.0 and 12.x alike)."""
    if getattr(Http1Client.send, "jail_frames_bodies", False):
        return
    original = Http1Client.send

    def send(self: Http1Client, event: object) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestHeaders) and not event.end_stream:
            request = event.request
            headers = request.headers
            if (request.is_http2 or request.is_http3) and "content-length" not in headers:
                headers["transfer-encoding"] = "chunked"
        return (yield from original(self, event))

    send.jail_frames_bodies = True  # type: ignore[attr-defined]
    Http1Client.send = send  # type: ignore[method-assign]


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
    ca_dir: Path
    # Bound by the caller (the backend) before mitmproxy was even imported; connections that came
    # meanwhile wait in their backlog.
    regular: socket.socket
    # Connections a firewall redirected here: their destination is read from connection tracking. They
    # are served by jail.proxy.streams, which hands HTTP and TLS to `EmbeddedProxy.redirected`.
    transparent: socket.socket | None = None
    # The CAs upstream servers are verified against (the host's trust, plus --upstream-ca).
    upstream_trust: Path | None = None

    def listeners(self) -> list[tuple[str, socket.socket]]:
        return [("regular", self.regular)] + ([("transparent", self.transparent)] if self.transparent else [])


class EmbeddedProxy:
    def __init__(self, settings: ProxySettings, policy: PolicyAddon) -> None:
        self.settings = settings
        self.policy = policy
        self.master: Master | None = None
        self._task: asyncio.Task[None] | None = None
        self._servers: list[asyncio.Server] = []
        # Takes one connection the firewall redirected (its first bytes HTTP or TLS) once the proxy runs.
        self.redirected: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]] | None = None

    async def start(self) -> None:
        """Serve the given sockets. Raises JailError when mitmproxy cannot start."""
        skip_debug_type_checks()
        send_error_hook_responses()
        frame_converted_request_bodies()
        bulk.install()
        # No mode of mitmproxy's own: it would bind listeners; jail serves the sockets it was given.
        opts = options.Options(confdir=str(self.settings.ca_dir), mode=[])
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
        finally:
            mitm_logger.removeHandler(errors)
        if not ready.event.is_set():
            await self.stop()
            raise JailError(f"the proxy cannot start: {errors.messages[-1] if errors.messages else 'unknown error'}")
        self.policy.set_listen_addresses([sock.getsockname() for _, sock in self.settings.listeners()])
        regular = ServerInstance.make("regular", server)
        self._servers.append(await asyncio.start_server(regular.handle_stream, sock=self.settings.regular))
        self.redirected = ServerInstance.make("transparent", server).handle_stream

    async def stop(self) -> None:
        for listener in self._servers:
            listener.close()
        self._servers = []
        if self.master is not None and self._task is not None:
            self.master.shutdown()
            try:
                await asyncio.wait_for(self._task, 5)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            except Exception as exc:  # teardown must go on; the error is only worth a diagnostic
                logging.getLogger("jail.proxy").debug("proxy stopped with %r", exc)
        self._task = None
