"""The proxy itself, driven by raw sockets and httpx through `jail --server`."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import ssl
import subprocess
import time

import httpx
import pytest

from tests.conftest import UPSTREAM_HOST, wait_for


def connect_tunnel(proxy_port: int, host: str, port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def tls_tunnel(server, bundle, host: str, port: int, sni: str | None = None) -> ssl.SSLSocket:
    raw = connect_tunnel(server.port, host, port)
    context = ssl.create_default_context(cafile=str(bundle))
    context.check_hostname = False
    return context.wrap_socket(raw, server_hostname=sni or host)


def test_host_header_inside_tunnel_cannot_redirect(jail_server, https_upstream):
    server = jail_server("--js", f"r.host === '{UPSTREAM_HOST}'")
    with tls_tunnel(server, server.bundle, UPSTREAM_HOST, https_upstream.port) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
        status, _, body = read_response(sock)
    assert status == 421, body
    assert https_upstream.connections == []


def test_absolute_uri_inside_tunnel_is_refused_whatever_the_rule(jail_server, https_upstream):
    server = jail_server("--js", "r.host === 'evil.example'")
    with tls_tunnel(server, server.bundle, UPSTREAM_HOST, https_upstream.port) as sock:
        sock.sendall(b"GET https://evil.example/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
        status, headers, body = read_response(sock)
    assert status == 421 and headers["x-jail-decision"] == "denied"
    assert f"https://{UPSTREAM_HOST}:{https_upstream.port}/x" in body.decode()
    assert https_upstream.connections == []


def test_sni_inside_tunnel_cannot_front_another_name(jail_server, https_upstream):
    """The upstream TLS name is the judged host, whatever SNI the client sent."""
    server = jail_server("--js", f"r.host === '{UPSTREAM_HOST}'")
    with tls_tunnel(server, server.bundle, UPSTREAM_HOST, https_upstream.port, sni="evil.example") as sock:
        sock.sendall(
            f"GET /x HTTP/1.1\r\nHost: {UPSTREAM_HOST}:{https_upstream.port}\r\nConnection: close\r\n\r\n".encode()
        )
        status, _, body = read_response(sock)
    assert status == 200, body
    assert json.loads(body)["host"] == f"{UPSTREAM_HOST}:{https_upstream.port}"


def test_plain_http_host_header_is_overwritten(jail_server, http_upstream):
    server = jail_server("--js", f"r.host === '{UPSTREAM_HOST}'")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            f"GET {http_upstream.url('/y')} HTTP/1.1\r\nHost: 127.0.0.3:1\r\nConnection: close\r\n\r\n".encode()
        )
        status, _, body = read_response(sock)
    assert status == 200
    assert json.loads(body)["host"] == f"{UPSTREAM_HOST}:{http_upstream.port}"


def test_non_http_bytes_in_a_tunnel_never_reach_upstream(jail_server, http_upstream):
    # Such a tunnel is a TCP stream, judged as tcp://host:port (tests/test_git_ssh.py): a rule for HTTP only.
    server = jail_server("--js", "r.scheme !== 'tcp'")
    sock = connect_tunnel(server.port, UPSTREAM_HOST, http_upstream.port)
    sock.sendall(b"\x00\x01raw bytes that are neither TLS nor HTTP\r\n\r\n")
    sock.settimeout(5)
    with contextlib.suppress(TimeoutError, ConnectionError):
        sock.recv(100)
    sock.close()
    time.sleep(0.3)
    assert http_upstream.connections == []


def test_request_to_the_proxy_itself_is_refused(jail_server):
    server = jail_server("--js", "true")
    response = httpx.get(f"http://127.0.0.1:{server.port}/", proxy=server.proxy_url, timeout=10)
    assert response.status_code == 403
    assert "loop" in response.text


def test_max_tx_bytes_refuses_declared_and_cuts_streamed_uploads(jail_server, http_upstream):
    server = jail_server("--js", "({allow: {max_tx_bytes: 10}})")
    with httpx.Client(proxy=server.proxy_url, timeout=10) as client:
        declared = client.post(http_upstream.url("/up"), content=b"a" * 100)
        assert declared.status_code == 413
        assert http_upstream.connections == []

        def chunks():
            yield b"b" * 50
            yield b"c" * 50

        cut = client.post(http_upstream.url("/up"), content=chunks())
        assert cut.status_code == 200
        assert json.loads(cut.text)["body_len"] == 10
        small = client.post(http_upstream.url("/up"), content=b"d" * 10)
        assert json.loads(small.text)["body_len"] == 10


def test_runaway_js_rule_denies_in_time_and_others_are_served(jail_server, http_upstream):
    server = jail_server("--js", "if (r.path === '/loop') { while (true) {} } else { true }")
    with httpx.Client(proxy=server.proxy_url, timeout=10) as client:
        started = time.monotonic()
        looped = client.get(http_upstream.url("/loop"))
        elapsed = time.monotonic() - started
        assert looped.status_code == 403 and "timed out" in looped.text
        assert elapsed < 2
        assert client.get(http_upstream.url("/fine")).status_code == 200


def test_http2_to_the_client_is_judged(jail_server, https_upstream):
    server = jail_server("--js", "r.path === '/h2'")

    def fetch(path: str) -> list[str]:
        argv = ["curl", "-s", "--http2", "-x", server.proxy_url, "--cacert", str(server.bundle)]
        argv += ["-o", "/dev/null", "-w", "%{http_version} %{http_code}", https_upstream.url(path)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.split()

    assert fetch("/h2") == ["2", "200"]
    assert fetch("/other") == ["2", "403"]
    assert [r["path"] for r in https_upstream.requests] == ["/h2"]


def websocket_roundtrip(proxy_port: int, url_host: str, port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                f"GET http://{url_host}:{port}{path} HTTP/1.1\r\nHost: {url_host}:{port}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        status, _, _ = read_response(sock)
        if status != 101:
            return status, b""
        payload = b"hello"
        mask = os.urandom(4)
        sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        frame = sock.recv(100)
        return status, frame[2 : 2 + frame[1]]


def test_websocket_upgrade_is_judged_and_works(jail_server, http_upstream):
    server = jail_server("--js", "r.path === '/ws'")
    assert websocket_roundtrip(server.port, UPSTREAM_HOST, http_upstream.port, "/ws") == (101, b"hello")
    assert websocket_roundtrip(server.port, UPSTREAM_HOST, http_upstream.port, "/ws-denied")[0] == 403


def test_server_mode_writes_both_logs(jail_server, http_upstream, tmp_path):
    request_log, audit_log = tmp_path / "requests.log", tmp_path / "audit.jsonl"
    server = jail_server("--js", "r.path !== '/no'", "--request-log", str(request_log), "--audit-log", str(audit_log))
    with httpx.Client(proxy=server.proxy_url, timeout=10) as client:
        client.get(http_upstream.url("/yes?q=1"))
        client.get(http_upstream.url("/no"))
    assert wait_for(lambda: len(audit_log.read_text().splitlines()) == 2)
    lines = request_log.read_text().splitlines()
    assert lines[0].endswith(f" + GET {http_upstream.url('/yes?q=1')}")
    assert lines[1].endswith(f" - GET {http_upstream.url('/no')}")
    first, second = (json.loads(line) for line in audit_log.read_text().splitlines())
    assert first["decision"] == "allow" and first["status"] == 200 and first["bytes_down"] > 0
    assert first["query"] == "q=1" and first["engine"] == "js" and first["rule_us"] > 0
    assert second["decision"] == "deny" and second["status"] == 403
    assert "user-agent" in first["headers"] and isinstance(first["headers"], list)
    assert len(first["jail_id"]) == 8


@pytest.mark.parametrize("flag", ["--listen"])
def test_server_refuses_public_address_without_flag(run_jail, flag):
    result = run_jail("--server", flag, "0.0.0.0:18081", "--js", "true")
    assert result.returncode == 2
    assert "--listen-public" in result.stderr


# --- the addon's per-request helpers, against mitmproxy's own accessors --------------------


def _flow(fields: list[tuple[bytes, bytes]], http_version: str = "HTTP/1.1", authority: bytes = b""):
    from mitmproxy import http
    from mitmproxy.test import tflow

    flow = tflow.tflow()
    flow.request.http_version = http_version
    flow.request.data.authority = authority
    flow.request.headers = http.Headers(fields)
    return flow


@pytest.mark.parametrize(
    "fields",
    [
        [],
        [(b"Host", b"a.example"), (b"Accept", b"*/*")],
        [(b"X-A", b"1"), (b"x-a", b"2"), (b"Accept", b"*/*"), (b"X-A", b"3")],
        [(b"\xc3\x84", b"1"), (b"\xc3\xa4", b"2"), (b"\xff", b"\xfe\xc3\xa9")],
    ],
)
def test_folded_headers_are_what_mitmproxy_folds(fields):
    from jail.proxy.addon import folded_headers

    headers = _flow(fields).request.headers
    assert folded_headers(headers) == {name: ", ".join(headers.get_all(name)) for name in headers}


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ([(b"Content-Length", b"3")], None),
        ([(b"Transfer-Encoding", b"chunked")], None),
        ([(b"content-length", b"3"), (b"Content-Length", b"3")], "Content-Length"),
        ([(b"Content-Length", b"3"), (b"transfer-encoding", b"chunked")], "Content-Length"),
        ([(b"X-A", b"a\rb"), (b"Content-Length", b"3"), (b"Content-Length", b"3")], "CR, LF or NUL"),
        ([(b"Content-Length", b"3"), (b"Content-Length", b"3"), (b"X\x00", b"a")], "CR, LF or NUL"),
    ],
)
def test_ambiguous_requests_are_named(fields, problem):
    from jail.proxy.addon import ambiguity

    found = ambiguity(_flow(fields))
    assert found is None if problem is None else problem in found


@pytest.mark.parametrize("http_version", ["HTTP/1.1", "HTTP/2.0"])
@pytest.mark.parametrize("authority", [b"", b"name.example:8080"])
@pytest.mark.parametrize("host_header", [True, False])
def test_pinning_matches_mitmproxy_setters(http_version, authority, host_header):
    from jail.model import Request
    from jail.proxy.addon import Destinations, PolicyAddon

    fields = [(b"Host", b"name.example:8080")] if host_header else []
    expected = _flow([*fields, (b"X", b"y")], http_version, authority)
    pinned = expected.copy()
    request = Request.build("GET", "http", "name.example", 8080, "/a/../b", "q=1")
    expected.request.host = "10.0.0.7"
    expected.request.port = 8080
    expected.request.host_header = request.authority
    if http_version == "HTTP/1.1":
        expected.request.authority = ""  # origin form: the Host header is the only name sent
    expected.request.path = "/b?q=1"
    addon = PolicyAddon.__new__(PolicyAddon)
    addon.destinations = Destinations()
    addon._pin_destination(pinned, request, "10.0.0.7")
    for attribute in ("host", "port", "authority", "path", "host_header"):
        assert getattr(pinned.request, attribute) == getattr(expected.request, attribute), attribute
    assert pinned.request.headers.fields == expected.request.headers.fields
    assert addon.destinations.judged_name(pinned.client_conn.id, "10.0.0.7", 8080) == "name.example"


@pytest.mark.parametrize(
    "timestamp", [0.0, 1.0004995, 1.9994999, 1.9999995, 1.9999996, 1700000000.9999999, 1763935200.123456, 4102444800.5]
)
def test_log_times_are_datetimes_to_the_millisecond(timestamp):
    from datetime import UTC, datetime

    from jail.audit import rfc3339_ms

    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    assert rfc3339_ms(timestamp) == moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
