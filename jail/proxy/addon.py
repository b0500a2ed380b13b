"""The policy addon: every HTTP request becomes a `Request`, is judged, and is forwarded only if allowed.

Nothing reaches upstream before an allow: mitmproxy runs lazily (no dial at CONNECT time), and
`server_connect` refuses any dial that an allowed request of the same client did not ask for,
which also covers tunnels whose content is neither HTTP nor TLS. Such a tunnel (SSH through jail's
ProxyCommand, any client that CONNECTs to a port and speaks its own protocol) is a plain TCP stream,
judged once as `CONNECT tcp://host:port` (at CONNECT time when the client says so with the
`Jail-Tunnel: tcp` header, so that a refusal is a 403 it can show; otherwise when mitmproxy turns the
tunnel into a TCP flow, from the client's first bytes or, when the server speaks first, from its
silence) and, if allowed, dialled to the address the guard checked and relayed; its audit record,
written when it ends, carries the bytes each way and the duration. With an upstream (corporate) proxy,
an allowed request is routed through it (`via`, or absolute form for plain HTTP); the proxy is dialled
only for such a request, and a denied one never reaches it.

A request that fails upstream (no such name, refused, timed out, TLS verification) is answered with a
one-line text/plain 502 that says why, and its audit record carries an `upstream_*` reason code.

One connection, one authority: a request inside a tunnel (or a redirected connection) that names another
server in its absolute URI, Host header or `:authority` is answered 421 before the rule is asked, and
every forwarded request reaches the origin in origin form with the judged Host, so the origin server is
never the one to pick between two names.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import connection, ctx, http, tcp
from mitmproxy.net import encoding
from mitmproxy.net.http import url
from mitmproxy.net.http.http1 import expected_http_body_size
from mitmproxy.proxy import events, layer, layers, server_hooks, tunnel
from mitmproxy.proxy.layers import tls
from mitmproxy.proxy.layers.http._upstream_proxy import HttpUpstreamProxy
from mitmproxy.proxy.mode_specs import RegularMode, TransparentMode

from jail.audit import (
    BODY_LIMIT,
    STREAM_END_CLOSED,
    STREAM_END_DENIED,
    STREAM_END_REFUSED,
    AuditSink,
    Exchange,
    Keep,
    Outcome,
    stream_error,
)
from jail.model import DEFAULT_PORTS, Decision, Request, format_authority, normalize_host
from jail.proxy.clients import ClientAuthError, ClientTokens
from jail.proxy.guard import AddressGuard
from jail.proxy.secrets import Secret, Vault
from jail.proxy.streams import LATE_HANDSHAKE, LATE_HANDSHAKE_REASON, StreamOpening, sniff_seconds
from jail.proxy.upstream import ProxyServer, UpstreamProxies

logger = logging.getLogger("jail.proxy")

METADATA_KEY = "jail"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}

Decide = Callable[[Request], Awaitable[Decision]]
PROXY_AUTH_REQUIRED = 407


class NoDestination(ValueError):
    """A redirected connection that names no server: it is refused, never guessed."""

    def __init__(self, reason: str, reason_code: str) -> None:
        super().__init__(reason)
        self.reason_code = reason_code


def redirected_destination(flow: http.HTTPFlow) -> str:
    """For a connection the firewall redirected, the server it names: TLS SNI, else the Host header."""
    if flow.client_conn.tls:
        if not flow.client_conn.sni:
            raise NoDestination(
                "TLS connection without SNI: jail judges HTTPS by server name and never guesses one", "no_sni"
            )
        return flow.client_conn.sni
    try:
        host, _ = url.parse_authority(flow.request.host_header or "", check=True)
    except ValueError:
        raise NoDestination("HTTP request without a usable Host header", "no_host") from None
    return host


FORBIDDEN_HEADER_BYTES = re.compile(rb"[\r\n\x00]")


def ambiguity(flow: http.HTTPFlow) -> str | None:
    """Why the request could be read differently by the upstream, if it could (smuggling).
    One pass over the raw header fields: it runs for every request."""
    lengths = 0
    transfer_encoding = False
    for name, value in flow.request.headers.fields:
        if FORBIDDEN_HEADER_BYTES.search(name) or FORBIDDEN_HEADER_BYTES.search(value):
            return "a header holds CR, LF or NUL (obs-fold or bare CR): the request is ambiguous"
        lowered = name.lower()
        if lowered == b"content-length":
            lengths += 1
        elif lowered == b"transfer-encoding":
            transfer_encoding = True
    if lengths > 1 or (lengths and transfer_encoding):
        return "conflicting Content-Length / Transfer-Encoding headers: the request is ambiguous"
    return None


def folded_headers(headers: http.Headers) -> dict[str, str]:
    """`{name: ", ".join(headers.get_all(name)) for name in headers}` in one pass over the raw fields
    (that comprehension scans every field once per name)."""
    folded: dict[bytes, tuple[bytes, list[bytes]]] = {}
    for name, value in headers.fields:
        key = name.lower()  # mitmproxy's own case folding
        if (seen := folded.get(key)) is None:
            folded[key] = (name, [value])
        else:
            seen[1].append(value)
    return {
        name.decode("utf-8", "surrogateescape"): ", ".join(v.decode("utf-8", "surrogateescape") for v in values)
        for name, values in folded.values()
    }


def request_from_flow(flow: http.HTTPFlow, host: str | None = None, client: str = "") -> Request:
    """The request as the rule must see it: the destination mitmproxy would dial, the real method and path."""
    req = flow.request
    path, _, query = req.path.partition("?")
    peer = flow.client_conn.peername
    return Request.build(
        method=req.method,
        scheme=req.scheme,
        host=host or req.host,
        port=req.port,
        path=path,
        query=query,
        headers=folded_headers(req.headers),
        requester_ip=peer[0] if peer else "",
        client=client,
    )


def deny_response(request: Request | None, decision: Decision, status: int = 403) -> http.Response:
    """Short and readable: agents read this body and adapt."""
    what = f"{request.method} {request.url}" if request else "this request"
    body = f"jail: blocked {what}\nreason: {decision.reason}\n"
    headers = {"content-type": "text/plain; charset=utf-8", "x-jail-decision": "denied", "connection": "close"}
    if status == PROXY_AUTH_REQUIRED:
        headers["proxy-authenticate"] = 'Basic realm="jail"'
    return http.Response.make(status, body.encode(), headers)


BODYLESS_STATUSES = frozenset({204, 304})


def reframe_for_rewritten_body(flow: http.HTTPFlow) -> None:
    """A body whose bytes are rewritten on the way (a masked secret) may change length, so the upstream's
    Content-Length no longer holds: HTTP/2 frames the body itself, an HTTP/1.1 client gets it chunked."""
    response = flow.response
    assert response is not None
    if (
        "content-length" not in response.headers
        or flow.request.method == "HEAD"
        or response.status_code in BODYLESS_STATUSES
        or response.status_code < 200
    ):
        return
    del response.headers["content-length"]
    if not flow.request.is_http2 and not flow.request.is_http3:
        response.headers["transfer-encoding"] = "chunked"


@dataclass(frozen=True)
class UpstreamFailure:
    """Why an allowed request got no answer from upstream: a reason code for the log, a line for the agent."""

    reason_code: str
    cause: str


TLS_HINT = "add its CA with --upstream-ca FILE or to the bundle SSL_CERT_FILE names in jail's environment"
# errno of a failed connect -> (reason code, what it means)
CONNECT_FAILURES = {
    errno.ECONNREFUSED: ("upstream_refused", "connection refused"),
    errno.ECONNRESET: ("upstream_refused", "connection reset"),
    errno.ETIMEDOUT: ("upstream_timeout", "connection timed out"),
    errno.EHOSTUNREACH: ("upstream_unreachable", "host unreachable"),
    errno.ENETUNREACH: ("upstream_unreachable", "network unreachable"),
}
ERRNO_MESSAGE = re.compile(r"\[Errno (-?\d+)\]")
RESOLVER_ERRORS = {-2, -3, -5}  # EAI_NONAME, EAI_AGAIN, EAI_NODATA (the resolver's errno)


def connect_failure(message: str, target: str) -> UpstreamFailure | None:
    """A failed dial as mitmproxy reports it (`str(OSError)`), or None if `message` is not one."""
    match = ERRNO_MESSAGE.match(message)
    if match is None:
        return None
    number = int(match.group(1))
    if number in RESOLVER_ERRORS:
        return UpstreamFailure("upstream_dns", f"cannot resolve {target}")
    code, meaning = CONNECT_FAILURES.get(number, ("upstream_error", message))
    return UpstreamFailure(code, f"cannot connect to {target}: {meaning}")


def proxy_failure(message: str, target: str, via: str) -> UpstreamFailure | None:
    """The upstream proxy's failure, as mitmproxy reports it: its refusal of the CONNECT for `target`, or
    a failed dial of the proxy itself; None if `message` is neither."""
    if message.startswith("Upstream proxy"):
        return UpstreamFailure("upstream_proxy", f"{message} (for {target})")
    if (failure := connect_failure(message, f"the upstream proxy {via}")) is not None:
        return UpstreamFailure("upstream_proxy", failure.cause)
    return None


def failure_response(request: Request, failure: UpstreamFailure) -> http.Response:
    """The deny body's shape: agents read it and adapt."""
    body = f"jail: upstream failed for {request.method} {request.url}\nreason: {failure.cause}\n"
    return http.Response.make(
        502,
        body.encode(),
        {
            "content-type": "text/plain; charset=utf-8",
            "x-jail-decision": "allowed",
            "x-jail-error": failure.reason_code,
            "connection": "close",
        },
    )


def x509_name(name: Any) -> str:
    """`CN=..., O=...` of a pyOpenSSL X509Name."""
    return ", ".join(f"{k.decode()}={v.decode(errors='replace')}" for k, v in name.get_components()) or "(empty)"


def presented_chain(chain: list[Any]) -> str:
    """Which certificate the server presented, and the issuer its chain ends at (the CA to trust)."""
    if not chain:
        return "no certificate"
    return f"certificate {x509_name(chain[0].get_subject())}, chain issued by {x509_name(chain[-1].get_issuer())}"


class ByteCounter:
    """A mitmproxy stream callable that counts bytes and, given a limit, cuts the rest; an optional
    transform (secret masking) runs first. With `keep`, the first BODY_LIMIT bytes sent on are kept
    for a record sink (a streamed body is not kept by mitmproxy)."""

    def __init__(
        self, limit: int | None = None, transform: Callable[[bytes], bytes] | None = None, keep: bool = False
    ) -> None:
        self.limit = limit
        self.transform = transform
        self.count = 0
        self.kept = bytearray() if keep else None
        self.plain = limit is None and transform is None and not keep

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        if self.plain:  # the common case, once per chunk read: only counted
            self.count += len(chunk)
            return chunk if chunk else []
        if self.transform is not None:
            chunk = self.transform(chunk)
        if self.limit is not None:
            chunk = chunk[: max(0, self.limit - self.count)]
        self.count += len(chunk)
        if self.kept is not None and len(self.kept) < BODY_LIMIT:
            self.kept += chunk[: BODY_LIMIT - len(self.kept)]
        # An empty chunk on a chunked HTTP/1 connection would read as the end of the body.
        return chunk if chunk else []


def length_unknown(flow: http.HTTPFlow, response: bool) -> bool:
    """Whether a body's length is known only at its end (chunked, read to close, HTTP/2 without
    Content-Length). mitmproxy buffers such a body and, past `stream_large_bodies`, switches to streaming
    without a hook to say so, and nothing would count the bytes; jail streams it through a counter
    from its first byte instead."""
    if response:
        assert flow.response is not None
        try:
            return expected_http_body_size(flow.request, flow.response) in (None, -1)
        except ValueError:  # a malformed length is mitmproxy's to refuse
            return False
    headers = flow.request.headers
    if "content-length" in headers:
        return False
    return flow.request.is_http2 or flow.request.is_http3 or "transfer-encoding" in headers


def kept_body(message: http.Message, counter: ByteCounter | None) -> tuple[bytes | None, bool]:
    """A body as it was sent on (masked), decoded from its Content-Encoding and cut at BODY_LIMIT, and
    whether it is incomplete (cut, or not decodable and given as received)."""
    raw = message.raw_content if counter is None else None if counter.kept is None else bytes(counter.kept)
    if raw is None:
        return None, False
    cut = counter is not None and counter.count > len(raw)
    try:
        body = encoding.decode(raw, message.headers.get("content-encoding", "identity"))
    except ValueError:
        return raw[:BODY_LIMIT], True
    assert isinstance(body, bytes)
    return body[:BODY_LIMIT], cut or len(body) > BODY_LIMIT


def exchange_of(flow: http.HTTPFlow, judged: Judged, keeps: Keep) -> Exchange:
    """What a record sink asked to see of the exchange beyond the audit record."""
    exchange = Exchange(http_version=flow.request.http_version)
    response = flow.response
    if response is not None:
        exchange.status_text = response.reason
        exchange.response_headers = list(response.headers.items(multi=True))
    if keeps >= Keep.BODIES:
        exchange.request_body, cut_up = kept_body(flow.request, judged.upload)
        cut_down = False
        if response is not None:
            exchange.response_body, cut_down = kept_body(response, judged.download)
        exchange.truncated = cut_up or cut_down
    return exchange


@dataclass
class Judged:
    """What the addon remembers about one flow between the decision and the log record."""

    started: float
    request: Request | None
    decision: Decision
    upload: ByteCounter | None = None
    download: ByteCounter | None = None
    address: str = ""
    # The upstream proxy the request was sent through.
    via: str = ""
    failure: UpstreamFailure | None = None
    logged: bool = False


@dataclass
class Destinations:
    """Per client connection, the (address, port) pairs allowed requests asked for, and the name
    each was judged under (the TLS name to present upstream)."""

    allowed: dict[str, dict[tuple[str, int], str]] = field(default_factory=dict)

    def permit(self, client_id: str, address: str, port: int, name: str) -> None:
        self.allowed.setdefault(client_id, {})[(address, port)] = name

    def judged_name(self, client_id: str, address: str, port: int) -> str | None:
        return self.allowed.get(client_id, {}).get((address, port))

    def forget(self, client_id: str) -> None:
        self.allowed.pop(client_id, None)


# (decision, HTTP status, the address refused if any)
Refusal = tuple[Decision, int, str]

# A CONNECT with this header says its tunnel carries a plain TCP stream (jail's ssh ProxyCommand sends it).
TUNNEL_HEADER = "jail-tunnel"


@dataclass(eq=False)  # compared (and hashed) by identity: one object per stream
class Stream:
    """A plain TCP stream through a CONNECT tunnel: judged once, recorded once when it ends."""

    started: float
    request: Request
    decision: Decision
    # The address the guard chose (or refused), the name itself through an upstream proxy (which resolves
    # it); empty when nothing may be dialled.
    address: str = ""
    failure: UpstreamFailure | None = None
    # The upstream proxy the stream is tunnelled through (its CONNECT), if any.
    via: ProxyServer | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    opening: StreamOpening = field(default_factory=StreamOpening)

    @property
    def dialable(self) -> bool:
        return self.decision.allow and self.failure is None and bool(self.address)


def misdirection(flow: http.HTTPFlow, request: Request) -> Refusal | None:
    """A request that names another authority than the one its connection was opened for (the CONNECT
    target, or in the isolated modes the TLS SNI / redirected destination), which `request` holds.
    mitmproxy gives a connection an address only then: a plain proxy request has none, and its absolute
    URI is its only name. Over redirected plain HTTP the Host header is the name, so it is not compared."""
    if flow.server_conn.address is None:
        return None
    req = flow.request
    redirected = isinstance(flow.client_conn.proxy_mode, TransparentMode)
    named: list[tuple[str, str]] = []
    if req.data.authority:
        where = ":authority" if req.is_http2 or req.is_http3 else "request URI"
        named.append((where, req.data.authority.decode("utf-8", "surrogateescape")))
    if flow.client_conn.tls or not redirected:
        named += [("Host header", value) for value in req.headers.get_all("host")]
    opened_by = ("TLS SNI" if flow.client_conn.tls else "redirected destination") if redirected else "CONNECT"
    for where, value in named:
        try:
            host, port = url.parse_authority(value, check=True)
            host = normalize_host(host)
        except ValueError:
            reason = f"the {where} {value!r} is not a host[:port]"
            return Decision.denied(reason, "malformed_request"), 400, ""
        port = port or DEFAULT_PORTS.get(request.scheme, 80)
        if (host, port) != (request.host, request.port):
            theirs = format_authority(request.scheme, host, port)
            reason = (
                f"misdirected: the {where} names {theirs}, but this connection was opened for "
                f"{request.authority} ({opened_by}); open a connection for {theirs}"
            )
            return Decision.denied(reason, "misdirected"), 421, ""
    return None


def send_in_origin_form(req: http.Request, authority: str) -> None:
    """The judged authority as Host (`:authority` over HTTP/2), and over HTTP/1 an origin-form target
    (`GET /x`): the request reaches the server with one name only, the judged one."""
    if not (req.is_http2 or req.is_http3):
        req.data.authority = b""
    req.host_header = authority


def secret_leak_reason(leaks: list[Secret], request: Request) -> str:
    names = ", ".join(sorted(s.name for s in leaks))
    hosts = ", ".join(sorted({h for s in leaks for h in s.hosts}))
    return f"request carries the placeholder of secret {names} to {request.scheme}://{request.host}; it is only for https://{hosts}"


class PolicyAddon:
    def __init__(
        self,
        decide: Decide,
        audit: AuditSink,
        guard: AddressGuard,
        vault: Vault | None = None,
        upstream: UpstreamProxies | None = None,
        clients: ClientTokens | None = None,
    ) -> None:
        self.decide = decide
        self.audit = audit
        self.guard = guard
        self.vault = vault or Vault()
        self.upstream = upstream or UpstreamProxies()
        self.destinations = Destinations()
        self.own_addresses: set[tuple[str, int]] = set()
        # Per client, the servers whose TLS verification failed and what they presented.
        self.tls_failures: dict[str, dict[tuple[str, int], str]] = {}
        # --clients: the names clients prove with proxy authentication; per client connection, the name
        # its CONNECT proved (the requests inside the tunnel carry no credentials of their own).
        self.clients = clients
        self.tunnel_clients: dict[str, str] = {}
        # Per client, a stream judged at CONNECT time, until its TCP flow starts.
        self.streams: dict[str, Stream] = {}
        # Streams started and not recorded yet: recorded at shutdown if their end was not seen by then.
        self.unrecorded: set[Stream] = set()
        # Per client, the open tunnel whose content is not known yet: the timer that ends its wait.
        self.silent_tunnels: dict[str, asyncio.Task[None]] = {}

    def set_listen_addresses(self, addresses: list[tuple[str, int]]) -> None:
        self.own_addresses = {(host, port) for host, port, *_ in addresses}
        # An upstream proxy that is jail itself (HTTPS_PROXY left pointing at a `jail --server`) would loop.
        looped = {scheme for scheme, proxy in self.upstream.by_scheme.items() if self._is_own(proxy.host, proxy.port)}
        if looped:
            logger.warning("ignoring the upstream proxy for %s: it is jail's own address", ", ".join(looped))
            routes = {scheme: proxy for scheme, proxy in self.upstream.by_scheme.items() if scheme not in looped}
            self.upstream = UpstreamProxies(routes, self.upstream.bypass)

    def _is_own(self, target: str, target_port: int) -> bool:
        return any(
            target_port == port and (target == host or target in LOOPBACK_NAMES or host in ("0.0.0.0", "::"))
            for host, port in self.own_addresses
        )

    def _is_proxy_itself(self, request: Request) -> bool:
        return self._is_own(request.host, request.port)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        started = time.time()
        request, refusal = self._read(flow)
        if refusal is None:
            assert request is not None
            refusal = await self._judge(flow, request)
        if refusal is not None:
            decision, status, address = refusal
            self._refuse(flow, Judged(started, request, decision, address=address), status)
            return
        assert request is not None
        judged: Judged = flow.metadata[METADATA_KEY]
        judged.started = started
        if judged.failure is not None:
            flow.request.stream = False  # answered already (the name does not resolve)
        elif (
            judged.decision.max_tx_bytes is not None
            or flow.request.stream
            # A body of unknown length is buffered when secrets are on: it is checked for placeholders
            # before it is sent (one past stream_large_bodies is streamed unchecked and uncounted).
            or (not self.vault and length_unknown(flow, response=False))
        ):
            judged.upload = ByteCounter(judged.decision.max_tx_bytes, keep=self.audit.keeps >= Keep.BODIES)
            flow.request.stream = judged.upload

    def _client_of(self, flow: http.HTTPFlow) -> str:
        """The name the client proved (--clients): its tunnel's, from the CONNECT, else this request's own
        proxy authentication. The credentials are taken off the request first: no rule, log or upstream
        server ever sees them. Raises ClientAuthError for wrong ones, or none when a name is required."""
        credentials = flow.request.headers.get_all("proxy-authorization")
        if credentials:
            del flow.request.headers["proxy-authorization"]
        if (tunnel := self.tunnel_clients.get(flow.client_conn.id)) is not None:
            return tunnel  # a request inside the tunnel cannot rename it
        if self.clients is None or not isinstance(flow.client_conn.proxy_mode, RegularMode):
            return ""
        if len(credentials) > 1:
            raise ClientAuthError("more than one Proxy-Authorization header")
        return self.clients.identify(credentials[0] if credentials else None)

    def _name_tunnel(self, flow: http.HTTPFlow) -> bool:
        """At CONNECT time: remember the client the CONNECT names for every request in its tunnel, or
        answer 407 (audited) and return False."""
        started = time.time()
        try:
            self.tunnel_clients[flow.client_conn.id] = self._client_of(flow)
        except ClientAuthError as exc:
            decision = Decision.denied(str(exc), "client_auth")
            peer = flow.client_conn.peername[0] if flow.client_conn.peername else ""
            try:  # recorded as the HTTPS it nearly always is: the tunnel's content is never seen
                request = Request.build("CONNECT", "https", flow.request.host, flow.request.port, "", requester_ip=peer)
            except ValueError:
                request = None
            flow.response = deny_response(request, decision, PROXY_AUTH_REQUIRED)
            if request is not None:
                outcome = Outcome(status=PROXY_AUTH_REQUIRED, duration_ms=(time.time() - started) * 1000)
                self.audit.record(started, request, decision, outcome)
            return False
        return True

    def _read(self, flow: http.HTTPFlow) -> tuple[Request | None, Refusal | None]:
        """The request to judge, or why it cannot be judged at all."""
        unnamed: Refusal | None = None
        try:
            client = self._client_of(flow)
        except ClientAuthError as exc:
            client, unnamed = "", (Decision.denied(str(exc), "client_auth"), PROXY_AUTH_REQUIRED, "")
        try:
            named = redirected_destination(flow) if isinstance(flow.client_conn.proxy_mode, TransparentMode) else None
            request = request_from_flow(flow, named, client)
        except NoDestination as exc:
            return request_from_flow(flow), (Decision.denied(str(exc), exc.reason_code), 403, "")
        except ValueError as exc:
            return None, (Decision.denied(str(exc), "bad_request"), 400, "")
        if unnamed is not None:
            return request, unnamed
        if (problem := ambiguity(flow)) is not None:
            return request, (Decision.denied(problem, "malformed_request"), 400, "")
        return request, misdirection(flow, request)

    async def _judge(self, flow: http.HTTPFlow, request: Request) -> Refusal | None:
        """Ask the rule, then the checks no rule can waive; on success the flow is pinned to what was judged."""
        if self._is_proxy_itself(request):
            return Decision.denied("request addressed to jail's own proxy (loop refused)", "proxy_loop"), 403, ""
        decision = await self.decide(request)
        if not decision.allow:
            return decision, 403, ""

        def refused(reason: str, code: str) -> Decision:
            return Decision.denied(reason, code).stamped(decision.engine, decision.rule_us)

        limit = decision.max_tx_bytes
        if limit is not None:
            declared = flow.request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                reason = f"upload of {declared} bytes exceeds the rule's max_tx_bytes of {limit}"
                return refused(reason, "max_tx_bytes"), 413, ""
        carried: list[Secret] = []
        if self.vault:
            carried = self.vault.carried([*flow.request.headers.values(), request.query, request.path])
            if leaks := self.vault.leaks(carried, request.host, request.scheme):
                return refused(secret_leak_reason(leaks, request), "secret_leak"), 403, ""
        proxy = self.upstream.route(request.scheme, request.host, request.port)
        if proxy is not None:
            # The proxy resolves the name; the guard checks what it can know here (see screen()).
            guard_refusal = await self.guard.screen(request.host, request.port)
            address = ""
        else:
            address, guard_refusal = await self.guard.choose(request.host, request.port)
        if guard_refusal is not None and guard_refusal.reason_code == "resolve_failed":
            failure = UpstreamFailure("upstream_dns", guard_refusal.reason)
            flow.response = failure_response(request, failure)
            flow.metadata[METADATA_KEY] = Judged(0.0, request, decision, failure=failure)
            return None  # allowed, and answered: nothing is dialled
        if guard_refusal is not None:
            return refused(guard_refusal.reason, guard_refusal.reason_code), 403, guard_refusal.address
        if proxy is not None:
            self._pin_via_proxy(flow, request, proxy)
        else:
            assert address is not None
            self._pin_destination(flow, request, address)
        if carried:
            self._inject(flow, carried)
        flow.metadata[METADATA_KEY] = Judged(0.0, request, decision, address=address, via=str(proxy or ""))
        return None

    def _inject(self, flow: http.HTTPFlow, carried: list[Secret]) -> None:
        """Real values in, only now that the destination is pinned; the response comes back uncompressed
        so that an echoed value can be masked again."""
        headers = flow.request.headers
        for name in {name.lower() for name in headers}:
            values = headers.get_all(name)
            if (swapped := [self.vault.inject(value, carried) for value in values]) != values:
                headers.set_all(name, swapped)
        flow.request.path = self.vault.inject(flow.request.path, carried)
        headers.pop("accept-encoding", None)

    def _pin_destination(self, flow: http.HTTPFlow, request: Request, address: str) -> None:
        """Forward exactly what was judged: to the address the guard checked (never looked up
        again), on the judged port, in origin form with a Host header naming the judged authority,
        and the canonical path the rule saw."""
        req = flow.request
        # Not the `host` and `port` setters: they would write the address into the Host header.
        req.data.host = address
        req.data.port = request.port
        send_in_origin_form(req, request.authority)
        flow.request.path = request.path + (f"?{request.query}" if request.query else "")
        self.destinations.permit(flow.client_conn.id, address, request.port, request.host)
        self._set_via(flow, None)

    def _pin_via_proxy(self, flow: http.HTTPFlow, request: Request, proxy: ProxyServer) -> None:
        """Forward exactly what was judged through the upstream proxy, by name (the proxy resolves it):
        HTTPS with CONNECT to the judged host and port, then TLS to it and origin form; plain HTTP in
        absolute form, which is what a proxy needs."""
        req = flow.request
        send_in_origin_form(req, request.authority)
        req.path = request.path + (f"?{request.query}" if request.query else "")
        req.headers.pop("proxy-authorization", None)  # the child's own never reaches the proxy
        if request.scheme == "https":
            req.data.host = request.host
            req.data.port = request.port
            self._set_via(flow, ("http", proxy.address))
        else:
            req.data.host, req.data.port = proxy.address
            req.authority = url.hostport(request.scheme, request.host, request.port)
            if proxy.authorization:
                req.headers["proxy-authorization"] = proxy.authorization
            self._set_via(flow, None)
        self.destinations.permit(flow.client_conn.id, proxy.host, proxy.port, request.host)

    @staticmethod
    def _set_via(flow: http.HTTPFlow, via: tuple[str, tuple[str, int]] | None) -> None:
        """The client's connection object carries `via` into every later request: set it every time."""
        if flow.server_conn.via != via:
            flow.server_conn.via = via  # type: ignore[assignment]

    def _refuse(self, flow: http.HTTPFlow, judged: Judged, status: int) -> None:
        flow.request.stream = False  # the body is read and dropped; mitmproxy cannot answer mid-stream
        flow.response = deny_response(judged.request, judged.decision, status)
        flow.metadata[METADATA_KEY] = judged

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """A CONNECT that says it carries a plain TCP stream is judged now: a refusal is the 403 the client
        shows (jail's ssh ProxyCommand prints its reason), an allowed stream is not judged again."""
        if not self._name_tunnel(flow):
            return
        if flow.request.headers.get(TUNNEL_HEADER, "").strip().lower() != "tcp":
            return
        stream = await self._judge_stream(flow.client_conn, flow.request.host, flow.request.port)
        if stream.dialable:
            self.streams[flow.client_conn.id] = stream
            return
        if stream.failure is not None:
            flow.response = failure_response(stream.request, stream.failure)
        else:
            flow.response = deny_response(stream.request, stream.decision)
        self._record_stream(stream, flow.error.msg if flow.error else "")

    def http_connected(self, flow: http.HTTPFlow) -> None:
        """The tunnel is open and mitmproxy picks what it carries (TLS, HTTP, else TCP) from the client's
        first bytes, but a client whose server speaks first (MySQL, SMTP, a banner) sends none: after
        silence (`sniff_seconds`, as on the redirected path), the tunnel becomes a TCP stream."""
        client = flow.client_conn
        self.silent_tunnels[client.id] = asyncio.create_task(self._end_silence(client, flow.request.port))

    async def _end_silence(self, client: connection.Client, port: int) -> None:
        """After the wait, an empty read: mitmproxy asks `next_layer` with no client bytes."""
        await asyncio.sleep(sniff_seconds(port))
        if (handler := ctx.master.addons.get("proxyserver").connections.get(client.id)) is not None:
            await handler.server_event(events.DataReceived(client, b""))

    def next_layer(self, data: layer.NextLayer) -> None:
        """A silent tunnel's first layer: a TCP stream (judged in `tcp_start`) when the wait ended it,
        else what mitmproxy's own next_layer addon (before this one) chose from the client's bytes."""
        if (silence := self.silent_tunnels.pop(data.context.client.id, None)) is not None:
            silence.cancel()
            if not data.data_client():
                data.layer = layers.TCPLayer(data.context)
        if isinstance(data.layer, layers.TCPLayer):
            self._tunnel_through_upstream(data)

    def _tunnel_through_upstream(self, data: layer.NextLayer) -> None:
        """A plain TCP stream in a CONNECT tunnel leaves through the upstream proxy, as HTTPS does: the
        stream's server connection goes through the proxy's CONNECT (mitmproxy's own upstream tunnel)."""
        server = data.context.server
        if data.context.client.tls or server.address is None or server.via is not None:
            return
        proxy = self.upstream.route("tcp", normalize_host(str(server.address[0])), server.address[1])
        if proxy is None:
            return
        server.via = ("http", proxy.address)
        stack = tunnel.LayerStack()
        stack /= HttpUpstreamProxy.make(data.context, True)
        stack /= data.layer
        data.layer = stack[0]

    async def tcp_start(self, flow: tcp.TCPFlow) -> None:
        """A CONNECT tunnel that carries neither TLS nor HTTP: the stream is judged once (unless it was at
        CONNECT time); if allowed, it is dialled to the address the guard checked, which is the only
        dial `server_connect` lets through for it. The isolated modes' redirected streams are not
        mitmproxy's TCP flows, and a flow on an open connection (an HTTP upgrade) was judged already."""
        if isinstance(flow.client_conn.proxy_mode, TransparentMode) or flow.server_conn.address is None:
            return
        if flow.server_conn.timestamp_start is not None:
            return
        host, port = flow.server_conn.address[:2]
        stream = self.streams.pop(flow.client_conn.id, None) or await self._judge_stream(flow.client_conn, host, port)
        flow.metadata[METADATA_KEY] = stream
        self.unrecorded.add(stream)
        if stream.dialable:
            flow.server_conn.address = (stream.address, stream.request.port)
            dialled = stream.via.address if stream.via else (stream.address, stream.request.port)
            self.destinations.permit(flow.client_conn.id, *dialled, stream.request.host)

    async def _judge_stream(self, client: connection.Client, host: str, port: int) -> Stream:
        """The rule's decision on `tcp://host:port`, then the address guard's (the same checks as for HTTP)."""
        started = time.time()
        peer = client.peername[0] if client.peername else ""
        request = Request.stream(host, port, peer, self.tunnel_clients.get(client.id, ""))
        if self._is_proxy_itself(request):
            loop = Decision.denied("request addressed to jail's own proxy (loop refused)", "proxy_loop")
            return Stream(started, request, loop)
        decision = await self.decide(request)
        if not decision.allow:
            return Stream(started, request, decision)
        if (proxy := self.upstream.route(request.scheme, request.host, request.port)) is not None:
            # The proxy resolves the name; the guard checks what it can know here (as for HTTPS).
            if (screened := await self.guard.screen(request.host, request.port)) is not None:
                guarded = Decision.denied(screened.reason, screened.reason_code).stamped(
                    decision.engine, decision.rule_us
                )
                return Stream(started, request, guarded, address=screened.address)
            return Stream(started, request, decision, address=request.host, via=proxy)
        address, refusal = await self.guard.choose(request.host, request.port)
        if refusal is not None and refusal.reason_code == "resolve_failed":
            return Stream(started, request, decision, failure=UpstreamFailure("upstream_dns", refusal.reason))
        if refusal is not None:
            guarded = Decision.denied(refusal.reason, refusal.reason_code).stamped(decision.engine, decision.rule_us)
            return Stream(started, request, guarded, address=refusal.address)
        assert address is not None
        return Stream(started, request, decision, address=address)

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        """Counts the bytes; a client that opens with TLS or HTTP (`StreamOpening`) is cut off, and mitmproxy
        sends the message as this hook leaves it: emptied, nothing of it reaches the server."""
        stream = flow.metadata.get(METADATA_KEY)
        if not isinstance(stream, Stream):
            return
        message = flow.messages[-1]
        if message.from_client and (admitted := stream.opening.admit(message.content)) is not None:
            message.content = admitted
            stream.bytes_up += len(admitted)
        elif message.from_client or stream.opening.refused:
            message.content = b""
            if stream.failure is None:
                stream.failure = UpstreamFailure(LATE_HANDSHAKE, LATE_HANDSHAKE_REASON)
                self._close_tunnel(flow)
        else:
            stream.bytes_down += len(message.content)
        flow.messages.clear()  # counted: a long stream is not kept in memory

    @staticmethod
    def _close_tunnel(flow: tcp.TCPFlow) -> None:
        """Both ends of a TCP flow, closed now (mitmproxy's TCP layer ignores a killed flow)."""
        if (handler := ctx.master.addons.get("proxyserver").connections.get(flow.client_conn.id)) is None:
            return
        for conn in (flow.client_conn, flow.server_conn):
            if conn in handler.transports:
                handler.close_connection(conn)

    def tcp_end(self, flow: tcp.TCPFlow) -> None:
        if isinstance(stream := flow.metadata.get(METADATA_KEY), Stream):
            self._record_stream(stream, "")

    def tcp_error(self, flow: tcp.TCPFlow) -> None:
        if isinstance(stream := flow.metadata.get(METADATA_KEY), Stream):
            self._record_stream(stream, flow.error.msg if flow.error else "")

    def _record_stream(self, stream: Stream, error: str) -> None:
        """The stream's one audit record: how it ended, bytes each way, how long it lasted."""
        self.unrecorded.discard(stream)
        if not stream.decision.allow:  # nothing was dialled (server_connect's refusal is no error)
            end, status, error = STREAM_END_DENIED, 403, ""
        elif stream.failure is not None:
            end, status, error = STREAM_END_REFUSED, 502, stream.failure.cause
        elif stream.via and (failure := proxy_failure(error, stream.request.authority, str(stream.via))):
            stream.failure = failure
            end, status, error = STREAM_END_REFUSED, 502, failure.cause
        elif error:
            failure = connect_failure(error, stream.request.authority)
            refused = failure is not None and stream.bytes_up + stream.bytes_down == 0
            end, status = (STREAM_END_REFUSED if refused else stream_error(error)), 502
        else:
            end, status = STREAM_END_CLOSED, 200
        outcome = Outcome(
            status=status,
            bytes_up=stream.bytes_up,
            bytes_down=stream.bytes_down,
            duration_ms=(time.time() - stream.started) * 1000,
            error=error,
            address="" if stream.via else stream.address,
            via=str(stream.via or ""),
            reason_code=stream.failure.reason_code if stream.failure else "",
            end=end,
        )
        self.audit.record(stream.started, stream.request, stream.decision, outcome)

    def done(self) -> None:
        """jail stops once the child's processes are gone, so both ends of a stream still open are closed;
        mitmproxy may not have read that yet, and the stream is recorded here instead of never."""
        for stream in list(self.unrecorded):
            self._record_stream(stream, "")

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        address = data.server.address
        name = self.destinations.judged_name(data.client.id, address[0], address[1]) if address else None
        if name is None:
            logger.info("refused an upstream dial to %s that no allowed request asked for", address)
            data.server.error = "jail: no allowed request for this destination"
            return
        if data.server.sni is not None:
            # The TLS name is the judged host, never the client's own SNI (no fronting).
            data.server.sni = name

    def http_connect_upstream(self, flow: http.HTTPFlow) -> None:
        """The CONNECT jail sends the upstream proxy carries jail's credentials for it."""
        for proxy in self.upstream.by_scheme.values():
            if proxy.address == flow.server_conn.address and proxy.authorization:
                flow.request.headers["proxy-authorization"] = proxy.authorization

    def tls_failed_server(self, data: tls.TlsData) -> None:
        """Remember which certificate failed verification, to name it in the 502."""
        if data.conn.address is None or data.ssl_conn is None:
            return
        presented = presented_chain(data.ssl_conn.get_peer_cert_chain() or [])
        self.tls_failures.setdefault(data.context.client.id, {})[data.conn.address] = presented

    def request(self, flow: http.HTTPFlow) -> None:
        """A buffered body is checked for placeholders before anything is sent (streamed bodies are not)."""
        judged: Judged | None = flow.metadata.get(METADATA_KEY)
        if judged is None or judged.request is None or not judged.decision.allow or not self.vault:
            return
        body = (flow.request.raw_content or b"").decode("latin-1")
        if leaks := self.vault.leaks(self.vault.carried([body]), judged.request.host, judged.request.scheme):
            refusal = Decision.denied(secret_leak_reason(leaks, judged.request), "secret_leak")
            self._refuse(flow, Judged(judged.started, judged.request, refusal), 403)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        judged: Judged | None = flow.metadata.get(METADATA_KEY)
        if judged is None or flow.response is None or judged.request is None or not judged.decision.allow:
            return
        masker = self.vault.masker(judged.request.host)
        if masker is not None:
            headers = flow.response.headers
            for name in {name.lower() for name in headers}:
                values = headers.get_all(name)
                if (masked := [masker.mask(v.encode()).decode() for v in values]) != values:
                    headers.set_all(name, masked)
            reframe_for_rewritten_body(flow)
        if flow.response.stream is True or masker is not None or length_unknown(flow, response=True):
            judged.download = ByteCounter(transform=masker, keep=self.audit.keeps >= Keep.BODIES)
            flow.response.stream = judged.download

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        judged: Judged | None = flow.metadata.get(METADATA_KEY)
        if judged is not None and (failure := self._upstream_failure(flow, judged)) is not None:
            # Sent instead of mitmproxy's own error page (see server.send_error_hook_responses).
            assert judged.request is not None
            judged.failure = failure
            flow.response = failure_response(judged.request, failure)
        if METADATA_KEY not in flow.metadata and flow.error is not None:
            # mitmproxy refused the request before any hook (e.g. Content-Length with
            # Transfer-Encoding): audit the refusal too.
            try:
                request = request_from_flow(flow)
            except ValueError:
                return
            refusal = Decision.denied(f"refused by the proxy: {flow.error.msg}", "protocol_error")
            flow.metadata[METADATA_KEY] = Judged(flow.request.timestamp_start, request, refusal)
        self._record(flow)

    def _upstream_failure(self, flow: http.HTTPFlow, judged: Judged) -> UpstreamFailure | None:
        """What failed upstream, from mitmproxy's error message, or None if it was not upstream's doing
        (or the client already has an answer)."""
        if judged.request is None or not judged.decision.allow or flow.response is not None or flow.error is None:
            return None
        message = flow.error.msg
        target = f"{judged.request.host}:{judged.request.port}"
        presented = self.tls_failures.get(flow.client_conn.id, {}).get((flow.request.host, flow.request.port))
        if presented is not None:
            detail = message.removeprefix("Certificate verify failed: ")
            cause = f"TLS verification of {target} failed: {detail} ({presented}); {TLS_HINT}"
            return UpstreamFailure("upstream_tls", cause)
        if judged.via and (failure := proxy_failure(message, target, judged.via)) is not None:
            return failure
        return connect_failure(message, target)

    def client_disconnected(self, client: connection.Client) -> None:
        self.destinations.forget(client.id)
        self.tunnel_clients.pop(client.id, None)
        self.tls_failures.pop(client.id, None)
        self.streams.pop(client.id, None)
        if (silence := self.silent_tunnels.pop(client.id, None)) is not None:
            silence.cancel()

    def _record(self, flow: http.HTTPFlow) -> None:
        judged: Judged | None = flow.metadata.get(METADATA_KEY)
        if judged is None or judged.logged or judged.request is None:
            return
        judged.logged = True
        response = flow.response
        default_status = 400 if judged.decision.reason_code == "protocol_error" else 502
        outcome = Outcome(
            status=response.status_code if response is not None else default_status,
            bytes_up=judged.upload.count if judged.upload else len(flow.request.raw_content or b""),
            bytes_down=judged.download.count
            if judged.download
            else len(response.raw_content or b"")
            if response
            else 0,
            duration_ms=(time.time() - judged.started) * 1000,
            error=judged.failure.cause if judged.failure else flow.error.msg if flow.error else "",
            address=judged.address,
            via=judged.via,
            reason_code=judged.failure.reason_code if judged.failure else "",
            exchange=exchange_of(flow, judged, self.audit.keeps) if self.audit.keeps else None,
        )
        self.audit.record(judged.started, judged.request, judged.decision, outcome)
