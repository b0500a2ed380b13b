"""Every TCP connection the firewall redirected to jail, on any port: HTTP and TLS go to the intercepting
proxy, anything else is a plain TCP stream judged once by name.

    child ──(nft redirect, any port)──► RedirectedConnections: original destination, first bytes
        TLS ClientHello / HTTP request line ──► the proxy's transparent mode (judged per request)
        anything else, or nothing in SNIFF_SECONDS ──► TcpStreams: `CONNECT tcp://name:port` judged,
            the name resolved, the address guard asked, the server dialled, bytes relayed both ways
            (unless the client then opens with TLS or HTTP after all: `StreamOpening`)

The first bytes are only peeked (MSG_PEEK): the proxy reads the connection from its first byte. The
wait is short and bounded because many protocols (SSH's server, Postgres's client aside: MySQL, Redis,
SMTP, FTP) have the server speak first, and their client sends nothing until it has.

A connection to a synthetic address (jail.proxy.dns.SyntheticNames) is judged by the name the address
stands for; one to an address of the synthetic range that stands for no name is refused before any
rule is asked. A synthetic address is never dialled: only what the guard chose for the judged name is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from jail.audit import (
    STREAM_END_CLIENT,
    STREAM_END_DENIED,
    STREAM_END_REFUSED,
    STREAM_END_SERVER,
    AuditSink,
    Outcome,
    stream_error,
)
from jail.model import Decision, Request
from jail.proxy.dns import SyntheticNames
from jail.proxy.guard import AddressGuard
from jail.proxy.upstream import TunnelRefused, UpstreamProxies, open_tunnel

logger = logging.getLogger("jail.streams")

SNIFF_SECONDS = 0.3
# On the web's ports clients always speak first, and a loaded machine may take a while to send its
# ClientHello: there silence is waited out longer before a connection counts as a server-first stream
# (which a rule for https would deny).
WEB_PORTS = frozenset({80, 443, 8080, 8443})
WEB_SNIFF_SECONDS = 5.0
SNIFF_BYTES = 64
# While the first bytes are still a possible start of an HTTP request line, look again this often.
SNIFF_RETRY_SECONDS = 0.01
DIAL_SECONDS = 10.0
RELAY_CHUNK = 256 * 1024
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h (and IP6T_SO_ORIGINAL_DST)
SOL_IPV6 = 41

Decide = Callable[[Request], Awaitable[Decision]]
# mitmproxy's handler of a transparent connection (asyncio streams in, the flow's whole life out).
ProxyHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

# `METHOD SP` then an origin-form, asterisk-form or absolute-form target: an HTTP/1 request line (and
# HTTP/2's prior-knowledge preface `PRI * HTTP/2.0`). A Redis inline command (`PING\r\n`) or SSH's
# `SSH-2.0-...` is not one.
HTTP_REQUEST_LINE = re.compile(rb"[A-Z][A-Z_-]{0,19} (?:/|\*|https?://)")
HTTP_METHOD_SO_FAR = re.compile(rb"[A-Z][A-Z_-]{0,19}(?: (.*))?", re.DOTALL)
ABSOLUTE_TARGETS = (b"http://", b"https://")
TLS_HANDSHAKE = 0x16
# A stream whose client opens with TLS or HTTP once it was judged as plain TCP (`StreamOpening`): its
# record's reason_code and error.
LATE_HANDSHAKE = "late_handshake"
LATE_HANDSHAKE_REASON = (
    "TLS or HTTP on a connection judged as a plain TCP stream (its client was silent first): "
    "refused, TLS and HTTP are judged per request"
)


def for_the_proxy(data: bytes) -> bool | None:
    """Whether the first bytes are a TLS handshake or an HTTP request (True), something else (False),
    or too short to tell yet (None)."""
    if not data:
        return False
    if data[0] == TLS_HANDSHAKE:
        return None if len(data) < 2 else data[1] == 3  # the record's major version: 3 for SSL 3 to TLS 1.3
    if HTTP_REQUEST_LINE.match(data):
        return True
    so_far = HTTP_METHOD_SO_FAR.fullmatch(data)
    if so_far is None:
        return False
    target = so_far.group(1)
    return None if target is None or any(form.startswith(target) for form in ABSOLUTE_TARGETS) else False


def sniff_seconds(port: int) -> float:
    """How long a silent client may take before its connection is a server-first stream."""
    return WEB_SNIFF_SECONDS if port in WEB_PORTS else SNIFF_SECONDS


def original_destination(conn: socket.socket) -> tuple[str, int]:
    """Where the child meant to connect, before the firewall's redirect (connection tracking)."""
    if "." in conn.getsockname()[0]:  # IPv4, or IPv4-mapped: asking the IPv6 option would be wrong
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, address = struct.unpack_from("!2xH4s", raw)
        return socket.inet_ntop(socket.AF_INET, address), port
    raw = conn.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
    port, address = struct.unpack_from("!2xH4x16s", raw)
    return socket.inet_ntop(socket.AF_INET6, address), port


async def first_bytes(conn: socket.socket, wait: float) -> bytes:
    """What the client sent first, left unread, once it tells HTTP/TLS from anything else or `wait` ends."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    data = b""
    while (remaining := deadline - loop.time()) > 0:
        readable = loop.create_future()
        loop.add_reader(conn.fileno(), _wake, readable)
        try:
            await asyncio.wait_for(readable, remaining)
        except TimeoutError:
            break
        finally:
            loop.remove_reader(conn.fileno())
        try:
            data = conn.recv(SNIFF_BYTES, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        if not data or for_the_proxy(data) is not None:
            return data
        await asyncio.sleep(SNIFF_RETRY_SECONDS)  # a partial request line: the rest is on its way
    return data


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class StreamOpening:
    """The client's first bytes on a stream judged as plain TCP, held back until they are told from TLS and HTTP.

    A connection becomes a stream when its client stays silent (a server-first protocol), or opens with
    bytes too short to tell; the rule judged only `tcp://host:port`. Such a client must not go on to
    speak TLS or HTTP through the uninspected relay, or a rule about paths and methods would never see
    its requests. Only the opening is checked: the clients of server-first protocols answer in their
    own (EHLO, a MySQL handshake, SSH's version), and a STARTTLS upgrade comes after those words."""

    def __init__(self) -> None:
        self.held = b""
        self.passed = False
        self.refused = False

    def admit(self, data: bytes) -> bytes | None:
        """What of the client's `data` may go to the server now (b"" while the opening is still too short
        to tell), or None once the stream opened with TLS or HTTP: then nothing more may."""
        if self.refused:
            return None
        if self.passed or not data:
            return data
        opening = self.held + data
        verdict = for_the_proxy(opening)
        if verdict is None:
            self.held = opening
            return b""
        self.held = b""
        self.refused, self.passed = verdict, not verdict
        return None if verdict else opening

    def rest(self) -> bytes:
        """What is still held back when the client ends its side: it can start no TLS record or request."""
        rest, self.held = self.held, b""
        return b"" if self.refused else rest


class LateHandshake(Exception):
    """The client of a stream opened with TLS or HTTP (`StreamOpening`)."""


@dataclass
class Relayed:
    """What went through one stream."""

    bytes_up: int = 0
    bytes_down: int = 0
    end: str = ""
    # Why jail cut the stream (LATE_HANDSHAKE), empty when one side ended it.
    refused: str = ""


class TcpStreams:
    """Judges a plain TCP stream once, by name, and relays it when allowed; one audit record each."""

    def __init__(
        self,
        decide: Decide,
        audit: AuditSink,
        guard: AddressGuard,
        names: SyntheticNames,
        upstream: UpstreamProxies | None = None,
    ) -> None:
        self.decide = decide
        self.audit = audit
        self.guard = guard
        self.names = names
        # A corporate proxy: allowed streams leave through its CONNECT, as HTTPS does.
        self.upstream = upstream or UpstreamProxies()

    async def serve(
        self, conn: socket.socket, destination: tuple[str, int], client: str, said: bytes, started: float
    ) -> None:
        """`said`: the bytes the client sent first (still unread), to tell an SSH client why it was refused;
        `started`: when the connection was accepted."""
        address, port = destination
        host = self.names.name_for(address) if self.names.covers(address) else address
        if host is None:
            request = Request.stream(address, port, client)
            reason = f"{address} is a synthetic address jail's resolver never gave to a name"
            decision = Decision.denied(reason, "unknown_synthetic").stamped("jail", 0)
        else:
            request = Request.stream(host, port, client)
            decision = await self.decide(request)
        if not decision.allow:
            self._refuse(conn, said, request, decision)
            self.audit.record(started, request, decision, Outcome(end=STREAM_END_DENIED))
            return
        outcome = await self._connect_and_relay(conn, request)
        outcome.duration_ms = (time.time() - started) * 1000
        self.audit.record(started, request, decision, outcome)

    def _refuse(self, conn: socket.socket, said: bytes, request: Request, decision: Decision) -> None:
        if said.startswith(b"SSH-"):
            # RFC 4253 4.2: lines before the server's version string are the server's to say; OpenSSH
            # shows them with -v ("banner line 0: ..."), then the closed connection.
            line = f"jail: denied {request.url}: {decision.reason}".encode("ascii", "replace")
            with contextlib.suppress(OSError):
                conn.send(line.replace(b"\r", b" ").replace(b"\n", b" ")[:1000] + b"\r\n")
                # Read what was only peeked: closing with unread data would reset the connection, and
                # the client might lose the line.
                conn.recv(len(said))
        conn.close()

    async def _connect_and_relay(self, conn: socket.socket, request: Request) -> Outcome:
        proxy = self.upstream.route(request.scheme, request.host, request.port)
        if proxy is not None:
            # The proxy resolves the name; the guard checks what it can know here (as for HTTPS).
            address, refusal = "", await self.guard.screen(request.host, request.port)
        else:
            found, refusal = await self.guard.choose(request.host, request.port)
            address = found or ""
        if refusal is not None or not (address or proxy):
            assert refusal is not None
            conn.close()
            return Outcome(
                error=refusal.reason, address=refusal.address, reason_code=refusal.reason_code, end=STREAM_END_REFUSED
            )
        via = str(proxy or "")
        try:
            if proxy is not None:
                dial = open_tunnel(proxy, request.host, request.port)
            else:
                dial = asyncio.open_connection(address, request.port)
            server = await asyncio.wait_for(dial, DIAL_SECONDS)
        except TunnelRefused as refused:
            conn.close()
            error = f"the upstream proxy {proxy} refused CONNECT {request.authority}: {refused}"
            return Outcome(error=error, via=via, reason_code="upstream_proxy", end=STREAM_END_REFUSED)
        except (OSError, TimeoutError) as exc:
            conn.close()
            problem = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            if proxy is not None:
                error = f"cannot connect to the upstream proxy {proxy}: {problem}"
                return Outcome(error=error, via=via, reason_code="upstream_proxy", end=STREAM_END_REFUSED)
            code = "upstream_refused" if isinstance(exc, ConnectionRefusedError) else "upstream_connect"
            end = STREAM_END_REFUSED if isinstance(exc, ConnectionRefusedError) else stream_error(problem)
            return Outcome(
                error=f"cannot connect to {address} port {request.port}: {problem}",
                address=address,
                reason_code=code,
                end=end,
            )
        try:
            child = await asyncio.open_connection(sock=conn)
        except OSError as exc:
            server[1].close()
            conn.close()
            return Outcome(address=address, end=stream_error(exc.strerror or str(exc)))
        relayed = await relay(child, server)
        return Outcome(
            bytes_up=relayed.bytes_up,
            bytes_down=relayed.bytes_down,
            address=address,
            via=via,
            end=relayed.end,
            reason_code=relayed.refused,
            error=LATE_HANDSHAKE_REASON if relayed.refused else "",
        )


Pair = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def relay(child: Pair, server: Pair) -> Relayed:
    """Copy both ways until both sides have finished; an end of one direction is passed on as a
    half-close, so a client that shuts down its sending side still gets the server's answer. A client
    that opens with TLS or HTTP is cut off before any of it reaches the server (`StreamOpening`)."""
    relayed = Relayed()
    opening = StreamOpening()

    async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, upward: bool) -> None:
        while data := await source.read(RELAY_CHUNK):
            if upward:
                if (data := opening.admit(data)) is None:
                    raise LateHandshake
                relayed.bytes_up += len(data)
            else:
                relayed.bytes_down += len(data)
            sink.write(data)
            await sink.drain()
        if upward and (rest := opening.rest()):
            relayed.bytes_up += len(rest)
            sink.write(rest)
        relayed.end = relayed.end or (STREAM_END_CLIENT if upward else STREAM_END_SERVER)
        if sink.can_write_eof():
            sink.write_eof()

    up = asyncio.ensure_future(pump(child[0], server[1], True))
    down = asyncio.ensure_future(pump(server[0], child[1], False))
    try:
        # A reset on either side ends both directions: nothing more can be said over the stream.
        done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if isinstance(exc := task.exception(), LateHandshake):
                relayed.end, relayed.refused = STREAM_END_REFUSED, LATE_HANDSHAKE
            elif exc is not None:
                # After one side has closed, the other's reset is only how it ended.
                relayed.end = relayed.end or stream_error(getattr(exc, "strerror", None) or type(exc).__name__)
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        for _, writer in (child, server):
            writer.close()
    return relayed


class RedirectedConnections:
    """Serves the transparent socket: each connection goes to the proxy or to `TcpStreams`."""

    def __init__(self, sock: socket.socket, streams: TcpStreams, proxy: ProxyHandler) -> None:
        self.sock = sock
        self.streams = streams
        self.proxy = proxy
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.sock.setblocking(False)
        self._accepting = asyncio.create_task(self._accept())

    async def stop(self) -> None:
        tasks = [task for task in (self._accepting, *self._connections) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(self.sock)
            except OSError as exc:  # out of descriptors, a connection reset before accept: go on
                logger.warning("accepting a redirected connection failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            task = asyncio.create_task(self._handle(conn, peer[0]))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _handle(self, conn: socket.socket, client: str) -> None:
        started = time.time()
        try:
            destination = original_destination(conn)
            said = await first_bytes(conn, sniff_seconds(destination[1]))
            if for_the_proxy(said):
                reader, writer = await asyncio.open_connection(sock=conn)
                await self.proxy(reader, writer)
            else:
                await self.streams.serve(conn, destination, client, said, started)
        except Exception:  # one connection's failure must never stop the others
            logger.exception("redirected connection from %s failed", client)
            conn.close()
