"""The corporate proxy jail's own environment names (or `--upstream-proxy`): where allowed requests leave.

Read once from jail's environment at start, never from the child's (the child is pointed at jail).
Only `http://` proxies: HTTPS requests go through them with CONNECT, plain HTTP in absolute form.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from jail.model import JailError, canonical_ip, format_authority, normalize_host

logger = logging.getLogger("jail.proxy")

# Which variable serves which scheme; the lower-case one wins, as in curl and requests.
PROXY_VARIABLES = {"https": ("https_proxy", "HTTPS_PROXY"), "http": ("http_proxy", "HTTP_PROXY")}
NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")
# A plain TCP stream goes where HTTPS goes: through the proxy's CONNECT.
STREAM_ROUTE = {"tcp": "https"}


@dataclass(frozen=True)
class ProxyServer:
    host: str
    port: int
    # `Basic ...` for the Proxy-Authorization header, when the URL carried `user:pass@`.
    authorization: str | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def __str__(self) -> str:
        return format_authority("tcp", self.host, self.port)  # no default port: always host:port

    @classmethod
    def parse(cls, value: str) -> ProxyServer:
        """`http://[user:pass@]host[:port]`; a bare `host:port` means http://, as curl reads it."""
        parts = urlsplit(value if "://" in value else f"http://{value}")
        if parts.scheme.lower() != "http":
            raise ValueError(f"{value!r}: only http:// proxies are supported")
        try:
            port = parts.port or 80
        except ValueError:
            raise ValueError(f"{value!r}: bad port") from None
        if not parts.hostname:
            raise ValueError(f"{value!r}: no host")
        authorization = None
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
        return cls(normalize_host(parts.hostname), port, authorization)


@dataclass(frozen=True)
class NoProxy:
    """The hosts `NO_PROXY` sends direct: `*`, names with their subdomains (`example.com` and
    `.example.com` alike), IP addresses and CIDR ranges, each with an optional `:port`."""

    everything: bool = False
    # (name, port or None)
    names: tuple[tuple[str, int | None], ...] = ()
    networks: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None], ...] = ()

    @classmethod
    def parse(cls, value: str) -> NoProxy:
        names: list[tuple[str, int | None]] = []
        networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]] = []
        for raw in value.replace(" ", ",").split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                return cls(everything=True)
            host, port = split_port(entry)
            try:
                networks.append((ipaddress.ip_network(host, strict=False), port))
                continue
            except ValueError:
                pass
            host = host.removeprefix("*").removeprefix(".").rstrip(".")
            if host:
                names.append((host, port))
        return cls(False, tuple(names), tuple(networks))

    def matches(self, host: str, port: int) -> bool:
        """Whether `host` (normalized: lower case, IP literals canonical) on `port` goes direct."""
        if self.everything:
            return True
        for name, wanted in self.names:
            if (wanted is None or wanted == port) and (host == name or host.endswith("." + name)):
                return True
        if self.networks:
            try:
                address = canonical_ip(ipaddress.ip_address(host))
            except ValueError:
                return False
            return any((wanted is None or wanted == port) and address in net for net, wanted in self.networks)
        return False


def split_port(entry: str) -> tuple[str, int | None]:
    """`host:port`, `[v6]:port`, a bare IPv6 address or CIDR (no port), or a host alone."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None


@dataclass(frozen=True)
class UpstreamProxies:
    """Per scheme, the proxy allowed requests leave through (None: straight to the server)."""

    by_scheme: dict[str, ProxyServer] = field(default_factory=dict)
    bypass: NoProxy = field(default_factory=NoProxy)

    def __bool__(self) -> bool:
        return bool(self.by_scheme)

    def route(self, scheme: str, host: str, port: int) -> ProxyServer | None:
        """The proxy a request of `scheme` leaves through (`tcp`: a stream, tunnelled like HTTPS)."""
        proxy = self.by_scheme.get(STREAM_ROUTE.get(scheme, scheme))
        if proxy is None or self.bypass.matches(host, port):
            return None
        return proxy

    def servers(self) -> set[tuple[str, int]]:
        return {proxy.address for proxy in self.by_scheme.values()}

    def describe(self) -> str:
        """One line for --explain and -v."""
        if not self:
            return "none (allowed requests go straight to the server)"
        routes = ", ".join(f"{scheme} via {proxy}" for scheme, proxy in sorted(self.by_scheme.items()))
        return routes + (" (NO_PROXY hosts go direct)" if self.bypass != NoProxy() else "")

    @classmethod
    def configure(cls, explicit: str | None = None, environ: Mapping[str, str] | None = None) -> UpstreamProxies:
        """`--upstream-proxy` for both schemes (a bad one is the user's error), else jail's own
        HTTPS_PROXY / HTTP_PROXY (a bad one is skipped with a warning: it is the host's setting)."""
        environ = os.environ if environ is None else environ
        bypass = NoProxy.parse(next((environ[n] for n in NO_PROXY_VARIABLES if environ.get(n)), ""))
        if explicit is not None:
            try:
                proxy = ProxyServer.parse(explicit)
            except ValueError as exc:
                raise JailError(f"--upstream-proxy: {exc}") from None
            return cls({"http": proxy, "https": proxy}, bypass)
        by_scheme: dict[str, ProxyServer] = {}
        for scheme, names in PROXY_VARIABLES.items():
            name = next((n for n in names if environ.get(n)), None)
            if name is None:
                continue
            try:
                by_scheme[scheme] = ProxyServer.parse(environ[name])
            except ValueError as exc:
                logger.warning("ignoring %s: %s", name, exc)
        return cls(by_scheme, bypass)


class TunnelRefused(Exception):
    """The upstream proxy answered CONNECT with something other than 2xx (its status line), or nothing."""


async def open_tunnel(proxy: ProxyServer, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to `host:port` through the proxy's CONNECT, by name (the proxy resolves it). What
    the server says first (an SSH banner) may come in the same segment as the answer: it stays unread.
    Raises OSError when the proxy cannot be reached, TunnelRefused when it will not connect."""
    reader, writer = await asyncio.open_connection(*proxy.address)
    try:
        authority = format_authority("tcp", host, port)
        head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
        if proxy.authorization:
            head += f"Proxy-Authorization: {proxy.authorization}\r\n"
        writer.write(head.encode() + b"\r\n")
        try:
            answer = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise TunnelRefused("an answer without an end (over 64 KiB)") from None
        except asyncio.IncompleteReadError:
            raise TunnelRefused("the connection closed without an answer") from None
        status = answer.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].startswith("2"):
            raise TunnelRefused(status or "an empty answer")
    except BaseException:
        writer.close()
        raise
    return reader, writer


def is_proxy_setting(name: str) -> bool:
    """Whether an environment variable names a proxy (HTTPS_PROXY, npm_config_https_proxy, YARN_HTTP_PROXY...):
    jail's own are for jail, never for the child, which must go through jail."""
    lowered = name.lower()
    return lowered.endswith("proxy") and not lowered.endswith(("no_proxy", "noproxy"))
