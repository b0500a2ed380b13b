"""The policy addon: every HTTP request becomes a `Request`, is judged, and is forwarded only if allowed.

Nothing reaches upstream before an allow: mitmproxy runs lazily (no dial at CONNECT time), and
`server_connect` refuses any dial that an allowed request of the same client did not ask for,
which also covers tunnels whose content is neither HTTP nor TLS.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mitmproxy import connection, http
from mitmproxy.net.http import url
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_specs import TransparentMode

from jail.audit import AuditSink, Outcome
from jail.model import Decision, Request
from jail.proxy.guard import AddressGuard
from jail.proxy.secrets import Secret, Vault

logger = logging.getLogger("jail.proxy")

METADATA_KEY = "jail"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}

Decide = Callable[[Request], Awaitable[Decision]]


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


def request_from_flow(flow: http.HTTPFlow, host: str | None = None) -> Request:
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
    )


def deny_response(request: Request | None, decision: Decision, status: int = 403) -> http.Response:
    """Short and readable: agents read this body and adapt."""
    what = f"{request.method} {request.url}" if request else "this request"
    body = f"jail: blocked {what}\nreason: {decision.reason}\n"
    return http.Response.make(
        status,
        body.encode(),
        {"content-type": "text/plain; charset=utf-8", "x-jail-decision": "denied", "connection": "close"},
    )


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


class ByteCounter:
    """A mitmproxy stream callable that counts bytes and, given a limit, cuts the rest; an optional
    transform (secret masking) runs first."""

    def __init__(self, limit: int | None = None, transform: Callable[[bytes], bytes] | None = None) -> None:
        self.limit = limit
        self.transform = transform
        self.count = 0

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        if self.transform is not None:
            chunk = self.transform(chunk)
        if self.limit is not None:
            chunk = chunk[: max(0, self.limit - self.count)]
        self.count += len(chunk)
        # An empty chunk on a chunked HTTP/1 connection would read as the end of the body.
        return chunk if chunk else []


@dataclass
class Judged:
    """What the addon remembers about one flow between the decision and the log record."""

    started: float
    request: Request | None
    decision: Decision
    upload: ByteCounter | None = None
    download: ByteCounter | None = None
    address: str = ""
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


def secret_leak_reason(leaks: list[Secret], request: Request) -> str:
    names = ", ".join(sorted(s.name for s in leaks))
    hosts = ", ".join(sorted({h for s in leaks for h in s.hosts}))
    return f"request carries the placeholder of secret {names} to {request.scheme}://{request.host}; it is only for https://{hosts}"


class PolicyAddon:
    def __init__(self, decide: Decide, audit: AuditSink, guard: AddressGuard, vault: Vault | None = None) -> None:
        self.decide = decide
        self.audit = audit
        self.guard = guard
        self.vault = vault or Vault()
        self.destinations = Destinations()
        self.own_addresses: set[tuple[str, int]] = set()

    def set_listen_addresses(self, addresses: list[tuple[str, int]]) -> None:
        self.own_addresses = {(host, port) for host, port, *_ in addresses}

    def _is_proxy_itself(self, request: Request) -> bool:
        return any(
            request.port == port
            and (request.host == host or request.host in LOOPBACK_NAMES or host in ("0.0.0.0", "::"))
            for host, port in self.own_addresses
        )

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
        if judged.decision.max_tx_bytes is not None or flow.request.stream:
            judged.upload = ByteCounter(judged.decision.max_tx_bytes)
            flow.request.stream = judged.upload

    def _read(self, flow: http.HTTPFlow) -> tuple[Request | None, Refusal | None]:
        """The request to judge, or why it cannot be judged at all."""
        try:
            named = redirected_destination(flow) if isinstance(flow.client_conn.proxy_mode, TransparentMode) else None
            request = request_from_flow(flow, named)
        except NoDestination as exc:
            return request_from_flow(flow), (Decision.denied(str(exc), exc.reason_code), 403, "")
        except ValueError as exc:
            return None, (Decision.denied(str(exc), "bad_request"), 400, "")
        if (problem := ambiguity(flow)) is not None:
            return request, (Decision.denied(problem, "malformed_request"), 400, "")
        return request, None

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
        address, guard_refusal = await self.guard.choose(request.host, request.port)
        if guard_refusal is not None:
            return refused(guard_refusal.reason, guard_refusal.reason_code), 403, guard_refusal.address
        assert address is not None
        self._pin_destination(flow, request, address)
        if carried:
            self._inject(flow, carried)
        flow.metadata[METADATA_KEY] = Judged(0.0, request, decision, address=address)
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
        again), on the judged port, with a Host header naming the judged authority and the
        canonical path the rule saw."""
        req = flow.request
        # What the `host` and `port` setters do, once instead of twice: their Host header is
        # overwritten by the host_header setter below, so only an absolute-form authority remains.
        req.data.host = address
        req.data.port = request.port
        if req.data.authority:
            req.authority = url.hostport(req.scheme, address, request.port)
        req.host_header = request.authority
        flow.request.path = request.path + (f"?{request.query}" if request.query else "")
        self.destinations.permit(flow.client_conn.id, address, request.port, request.host)

    def _refuse(self, flow: http.HTTPFlow, judged: Judged, status: int) -> None:
        flow.request.stream = False  # the body is read and dropped; mitmproxy cannot answer mid-stream
        flow.response = deny_response(judged.request, judged.decision, status)
        flow.metadata[METADATA_KEY] = judged

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
        if flow.response.stream is True or masker is not None:
            judged.download = ByteCounter(transform=masker)
            flow.response.stream = judged.download

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
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

    def client_disconnected(self, client: connection.Client) -> None:
        self.destinations.forget(client.id)

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
            error=flow.error.msg if flow.error else "",
            address=judged.address,
        )
        self.audit.record(judged.started, judged.request, judged.decision, outcome)
