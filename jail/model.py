"""The two types every room speaks: the `Request` a rule judges and the `Decision` it returns."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import socket
import string
from dataclasses import dataclass, field, replace
from json.encoder import encode_basestring_ascii as json_string
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# A plain TCP stream (neither TLS nor HTTP): judged once, as `CONNECT tcp://host:port` with no path,
# query or headers. It has no default port, so its URL always shows the port.
TCP = "tcp"


class JailError(Exception):
    """A mistake the user can fix: shown as one line on stderr, never as a traceback."""


IPV4_ANY_NOTATION = re.compile(r"(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}")


def canonical_ip(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """IPv4-mapped and IPv4-compatible IPv6 addresses are the IPv4 address they carry."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if 1 < int(address) < 2**32:  # ::a.b.c.d, the deprecated IPv4-compatible form
            return ipaddress.IPv4Address(int(address))
    return address


def normalize_host(host: str) -> str:
    """Lower-case, no brackets, no trailing dot, IDNA (punycode) for non-ASCII names; an IP literal
    in any notation (decimal 2130706433, octal 0177.0.0.1, hex, short 127.1, IPv4-mapped IPv6) becomes
    its canonical form, so a rule and the address guard see the address that would be dialled."""
    host = host.strip().strip("[]").rstrip(".").lower()
    if IPV4_ANY_NOTATION.fullmatch(host):
        with contextlib.suppress(OSError):
            return socket.inet_ntoa(socket.inet_aton(host))
    # Any IPv4 literal was taken above, so only an IPv6 one (it has a colon) is left to try; a name
    # skips the parse and its exception, which cost more than the rest of this function.
    if ":" in host:
        try:
            return str(canonical_ip(ipaddress.ip_address(host)))
        except ValueError:
            pass
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"invalid host name {host!r}: {exc}") from None


PERCENT_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in UNRESERVED else match.group(0)


def canonical_path(path: str) -> str:
    """RFC 3986 normalisation: percent-escaped unreserved characters decoded (so `%2e%2e` is `..`),
    then dot segments removed: `/ok/%2e%2e/admin` is `/admin`. Other escapes stay as they are (an
    encoded slash `%2F` is data to APIs such as GitLab's)."""
    if not path.startswith("/"):
        return path or "/"
    if "%" not in path and "/." not in path:
        return path  # nothing to decode and no dot segment: already canonical (the usual case)
    output: list[str] = []
    segments = PERCENT_ESCAPE.sub(_decode_unreserved, path).split("/")[1:]
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if output:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/" + "/".join(output)


def format_authority(scheme: str, host: str, port: int) -> str:
    """`host[:port]`, IPv6 in brackets, the scheme's default port left out."""
    shown = f"[{host}]" if ":" in host else host
    return shown if DEFAULT_PORTS.get(scheme) == port else f"{shown}:{port}"


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request as a rule sees it. Every engine, both logs and `--test` use this."""

    method: str
    scheme: str
    host: str
    port: int
    path: str
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    requester_ip: str = ""
    # The name a `jail --server` client proved with proxy authentication (--clients); "" for none.
    client: str = ""

    @classmethod
    def build(
        cls,
        method: str,
        scheme: str,
        host: str,
        port: int | None,
        path: str,
        query: str = "",
        headers: dict[str, str] | None = None,
        requester_ip: str = "",
        client: str = "",
    ) -> Request:
        scheme = scheme.lower()
        return cls(
            method=method.upper(),
            scheme=scheme,
            host=normalize_host(host),
            port=port if port is not None else DEFAULT_PORTS.get(scheme, 80),
            path="" if scheme == TCP else canonical_path(path),
            query=query,
            headers={k.lower(): v for k, v in (headers or {}).items()},
            requester_ip=requester_ip,
            client=client,
        )

    @classmethod
    def stream(cls, host: str, port: int, requester_ip: str = "", client: str = "") -> Request:
        """A plain TCP stream to `host:port` (a name, or the IP literal the child dialled)."""
        return cls.build("CONNECT", TCP, host, port, "", requester_ip=requester_ip, client=client)

    @classmethod
    def from_url(cls, url: str, method: str = "GET") -> Request:
        """Parse `scheme://host[:port]/path?query`, or `tcp://host:port` (a stream: its method is
        always CONNECT); raises ValueError with a readable message."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https", TCP) or not parts.hostname:
            raise ValueError(
                f"not an http(s) URL: {url!r} (expected e.g. https://example.com/path, or tcp://example.com:22)"
            )
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"bad port in URL {url!r}") from None
        if scheme == TCP:
            if port is None or parts.path not in ("", "/") or parts.query:
                raise ValueError(f"a tcp URL is tcp://host:port, with no path or query: {url!r}")
            return cls.stream(parts.hostname, port)
        return cls.build(method, parts.scheme, parts.hostname, port, parts.path, parts.query)

    @property
    def authority(self) -> str:
        return format_authority(self.scheme, self.host, self.port)

    @property
    def url(self) -> str:
        query = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{self.authority}{self.path}{query}"

    def to_dict(self) -> dict[str, Any]:
        """The object a rule receives: every field plus `url`. Built by hand: it runs per request,
        and dataclasses.asdict (a deep copy) costs several times more."""
        return {
            "method": self.method,
            "scheme": self.scheme,
            "host": self.host,
            "port": self.port,
            "path": self.path,
            "query": self.query,
            "headers": dict(self.headers),
            "requester_ip": self.requester_ip,
            "client": self.client,
            "url": self.url,
        }

    def to_json(self) -> str:
        """`to_dict()` as compact JSON. Written out by hand, the same text as json.dumps in half the
        time: the JS and proc engines send it with every request."""
        if type(self.port) is not int:
            return json.dumps(self.to_dict(), separators=(",", ":"))
        try:
            headers = ",".join([f"{json_string(name)}:{json_string(value)}" for name, value in self.headers.items()])
            return (
                f'{{"method":{json_string(self.method)},"scheme":{json_string(self.scheme)},'
                f'"host":{json_string(self.host)},"port":{self.port},"path":{json_string(self.path)},'
                f'"query":{json_string(self.query)},"headers":{{{headers}}},'
                f'"requester_ip":{json_string(self.requester_ip)},"client":{json_string(self.client)},'
                f'"url":{json_string(self.url)}}}'
            )
        except TypeError:  # a field that is not a string: json.dumps knows how to write it
            return json.dumps(self.to_dict(), separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Decision:
    """What a rule answered, and what the log and the proxy need to act on it."""

    allow: bool
    reason: str = ""
    reason_code: str = ""
    engine: str = ""
    max_tx_bytes: int | None = None
    rule_us: int = 0
    # Which rule decided, when the engine can name one (a policy file's rule, e.g. "ci.toml:12").
    rule: str = ""
    # Audit mode: the rule denied, but the request was let through and recorded.
    would_deny: bool = False
    # A person was asked (jail/approvals), and which channel answered: cli, ui, fd or timeout.
    asked: bool = False
    answered_by: str = ""

    @classmethod
    def allowed(cls, reason: str = "", max_tx_bytes: int | None = None, rule: str = "") -> Decision:
        return cls(True, reason, "rule_allow", max_tx_bytes=max_tx_bytes, rule=rule)

    @classmethod
    def denied(cls, reason: str, reason_code: str = "rule_deny", rule: str = "") -> Decision:
        return cls(False, reason, reason_code, rule=rule)

    @classmethod
    def asking(cls, reason: str = "", rule: str = "") -> Decision:
        """The rule asks a person. Not an allow: where nobody can be asked (`--test`), it denies."""
        return cls(False, reason or "the rule asks a person", "ask", rule=rule)

    @property
    def asks(self) -> bool:
        return not self.allow and self.reason_code == "ask"

    def stamped(self, engine: str, rule_us: int) -> Decision:
        # Every field by position: it runs per request, and dataclasses.replace costs twice as much.
        return Decision(
            self.allow,
            self.reason,
            self.reason_code,
            engine,
            self.max_tx_bytes,
            rule_us,
            self.rule,
            self.would_deny,
            self.asked,
            self.answered_by,
        )

    def audited(self) -> Decision:
        """Audit mode: a deny becomes an allow that remembers it would have been denied."""
        return self if self.allow else replace(self, allow=True, would_deny=True)

    @property
    def verdict(self) -> str:
        return "would_deny" if self.would_deny else "allow" if self.allow else "deny"


@dataclass(frozen=True)
class ProxyEndpoint:
    """Where the child reaches the proxy, and what it must trust."""

    host: str
    port: int
    ca_cert: Path
    ca_bundle: Path
    # Files the child must never get (the CA's private key in every form): a backend that mounts
    # paths into the child refuses any mount that would include one of them.
    private_files: tuple[Path, ...] = ()

    @property
    def address(self) -> str:
        """HOST:PORT, the IPv6 host in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"
