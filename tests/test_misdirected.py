"""One connection, one authority: a request that names another server than the one its tunnel (CONNECT
target) or redirected connection (TLS SNI) was opened for is answered 421 and never reaches upstream;
every forwarded request reaches the origin in origin form (`GET /x`) with the judged Host.

The test upstreams record the request target exactly as it stood in the request line (`path`)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from jail.platform.netns import strong_mode_unavailable
from tests.conftest import DENIED_NAME, PYTHON, TEST_NAME, UPSTREAM_HOST, wait_for
from tests.test_proxy import connect_tunnel, read_response, tls_tunnel
from tests.test_upstream_proxy import start_tinyproxy

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def audit_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# A jailed client that opens one CONNECT tunnel per request, speaks TLS inside, and sends the request
# as written: the misdirection is in the bytes, so no HTTP library may tidy it up.
RAW_TUNNEL_CLIENT = """
import json, os, socket, ssl, sys
from urllib.parse import urlsplit

proxy = urlsplit(os.environ["HTTPS_PROXY"])
host, port, requests = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])

def read_all(sock):
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data.decode(errors="replace")

answers = []
for request in requests:
    sock = socket.create_connection((proxy.hostname, proxy.port), timeout=10)
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\\r\\nHost: {host}:{port}\\r\\n\\r\\n".encode())
    reply = b""
    while b"\\r\\n\\r\\n" not in reply:
        reply += sock.recv(4096)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with context.wrap_socket(sock, server_hostname=host) as tls:
        tls.sendall(request.encode())
        answers.append(read_all(tls))
print(json.dumps(answers))
"""


def test_weak_mode_refuses_another_authority_inside_a_tunnel(weak_jail, https_upstream, tmp_path):
    port = https_upstream.port
    ours = f"{UPSTREAM_HOST}:{port}"
    requests = {
        "absolute URI, other host": f"GET https://other.example/x HTTP/1.1\r\nHost: {ours}\r\n",
        "absolute URI, other port": f"GET https://{UPSTREAM_HOST}:{port + 1}/x HTTP/1.1\r\nHost: {ours}\r\n",
        "Host header, other host": "GET /x HTTP/1.1\r\nHost: other.example\r\n",
        "Host header, default port": f"GET /x HTTP/1.1\r\nHost: {UPSTREAM_HOST}\r\n",
        "absolute URI, same authority": f"GET https://{ours}/abs?q=1 HTTP/1.1\r\nHost: {ours}\r\n",
        "origin form": f"GET /plain HTTP/1.1\r\nHost: {ours}\r\n",
    }
    wire = [request + "Connection: close\r\n\r\n" for request in requests.values()]
    audit = tmp_path / "audit.jsonl"
    result = weak_jail(
        "--js", "true", "--audit-log", str(audit), "--", sys.executable, "-c", RAW_TUNNEL_CLIENT,
        UPSTREAM_HOST, str(port), json.dumps(wire),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answers = dict(zip(requests, json.loads(result.stdout), strict=True))

    for name in list(requests)[:4]:
        head, _, body = answers[name].partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 421 "), (name, answers[name])
        assert "content-type: text/plain" in head.lower()
        assert body.startswith(f"jail: blocked GET https://{ours}/x\nreason: misdirected: the "), body
        assert f"but this connection was opened for {ours} (CONNECT)" in body
    assert "the request URI names other.example," in answers["absolute URI, other host"]
    assert f"the request URI names {UPSTREAM_HOST}:{port + 1}," in answers["absolute URI, other port"]
    assert "the Host header names other.example," in answers["Host header, other host"]
    assert f"the Host header names {UPSTREAM_HOST}," in answers["Host header, default port"]

    # The allowed ones arrive in origin form with the judged Host; the refused ones never arrived at all.
    assert answers["absolute URI, same authority"].startswith("HTTP/1.1 200 ")
    assert [(r["path"], r["host"]) for r in https_upstream.requests] == [("/abs?q=1", ours), ("/plain", ours)]
    assert len(https_upstream.connections) == 2

    records = audit_records(audit)
    refused = [r for r in records if r["reason_code"] == "misdirected"]
    assert len(refused) == 4 and all(r["status"] == 421 and r["decision"] == "deny" for r in refused)
    assert all(r["host"] == UPSTREAM_HOST and r["port"] == port for r in refused)
    assert "other.example" in refused[0]["reason"]


def test_plain_http_inside_a_connect_tunnel_is_held_to_its_target(jail_server, http_upstream):
    server = jail_server("--js", "true")
    with connect_tunnel(server.port, UPSTREAM_HOST, http_upstream.port) as sock:
        sock.sendall(b"GET http://other.example/x HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n")
        status, _, body = read_response(sock)
    assert status == 421, body
    assert b"the request URI names other.example, but this connection was opened for" in body
    assert http_upstream.connections == []


def test_malformed_host_inside_a_tunnel_is_a_400(jail_server, https_upstream):
    server = jail_server("--js", "true")
    with tls_tunnel(server, server.bundle, UPSTREAM_HOST, https_upstream.port) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: a:b:c\r\nConnection: close\r\n\r\n")
        status, _, body = read_response(sock)
    assert status == 400 and b"is not a host[:port]" in body, body
    assert https_upstream.connections == []


def test_a_plain_proxy_request_is_named_by_its_absolute_uri_and_sent_in_origin_form(jail_server, http_upstream):
    """No tunnel: the absolute URI is the authority (a differing Host header is overwritten, as before)."""
    server = jail_server("--js", f"r.host === '{UPSTREAM_HOST}'")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            f"GET {http_upstream.url('/y?q=1')} HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n".encode()
        )
        status, _, body = read_response(sock)
    assert status == 200, body
    assert [(r["path"], r["host"]) for r in http_upstream.requests] == [
        ("/y?q=1", f"{UPSTREAM_HOST}:{http_upstream.port}")
    ]


def curl_through(server, *args: str) -> tuple[str, str]:
    """curl through `jail --server`: the HTTP version and status, and the body."""
    argv = [
        "curl",
        "-sS",
        "-x",
        server.proxy_url,
        "--cacert",
        str(server.bundle),
        "-w",
        "\n%{http_version} %{http_code}",
    ]
    result = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=30)
    body, _, status = result.stdout.rpartition("\n")
    return status, body


@needs_curl
def test_http2_requests_reach_an_http1_origin_in_origin_form(jail_server, https_upstream):
    """The judged `:authority` becomes the origin's Host header, the target its origin form."""
    server = jail_server("--js", "true")
    status, body = curl_through(server, "--http2", https_upstream.url("/h?x=1"))
    assert status == "2 200", body
    assert [(r["path"], r["host"]) for r in https_upstream.requests] == [
        ("/h?x=1", f"{UPSTREAM_HOST}:{https_upstream.port}")
    ]


@needs_curl
def test_http2_authority_naming_another_host_gets_421(jail_server, https_upstream, tmp_path):
    """curl makes a Host header given with -H its HTTP/2 `:authority`."""
    audit = tmp_path / "audit.jsonl"
    server = jail_server("--js", "true", "--audit-log", str(audit))
    status, body = curl_through(server, "--http2", "-H", "Host: other.example", https_upstream.url("/h2"))
    assert status == "2 421", body
    assert "the :authority names other.example, but this connection was opened for" in body
    assert https_upstream.connections == []
    assert wait_for(lambda: [r["reason_code"] for r in audit_records(audit)] == ["misdirected"])


@pytest.fixture
def corporate_proxy():
    directory = Path(tempfile.mkdtemp(prefix="jail-tinyproxy-"))
    proxy = start_tinyproxy(directory)
    yield proxy
    proxy.process.kill()
    proxy.process.wait()
    shutil.rmtree(directory, ignore_errors=True)


def test_through_an_upstream_proxy_origins_get_origin_form_and_the_proxy_absolute_form(
    jail_server, corporate_proxy, http_upstream, https_upstream
):
    server = jail_server("--js", "true", "--upstream-proxy", corporate_proxy.url())
    ours = f"{UPSTREAM_HOST}:{https_upstream.port}"
    with tls_tunnel(server, server.bundle, UPSTREAM_HOST, https_upstream.port) as sock:
        sock.sendall(f"GET https://{ours}/tls HTTP/1.1\r\nHost: {ours}\r\nConnection: close\r\n\r\n".encode())
        assert read_response(sock)[0] == 200
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET {http_upstream.url('/plain')} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
        assert read_response(sock)[0] == 200
    assert [r["path"] for r in https_upstream.requests] == ["/tls"]
    assert [r["path"] for r in http_upstream.requests] == ["/plain"]
    assert f"GET {http_upstream.url('/plain')} HTTP/1.1" in corporate_proxy.requests()

    # A misdirected request never reaches the upstream proxy either.
    connections = corporate_proxy.connections()
    with tls_tunnel(server, server.bundle, UPSTREAM_HOST, https_upstream.port) as sock:
        sock.sendall(b"GET https://other.example/x HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n")
        assert read_response(sock)[0] == 421
    assert corporate_proxy.connections() == connections


# --- strong mode: the name is the TLS SNI the redirected connection carries ------------------------

strong_unavailable = strong_mode_unavailable()
needs_strong = pytest.mark.skipif(
    strong_unavailable is not None, reason=f"strong mode unavailable: {strong_unavailable}"
)

# A jailed client that connects straight to the name (the firewall redirects it to jail) and sends
# each request as written, over TLS with SNI jail-upstream.test (443) or plain HTTP (80).
RAW_DIRECT_CLIENT = f"""
import json, socket, ssl, sys
answers = []
for port, request in json.loads(sys.argv[1]):
    sock = socket.create_connection(("{TEST_NAME}", port), timeout=10)
    if port == 443:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        sock = context.wrap_socket(sock, server_hostname="{TEST_NAME}")
    sock.sendall(request.encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    answers.append(data.decode(errors="replace"))
print(json.dumps(answers))
"""


@needs_strong
def test_strong_mode_refuses_a_request_naming_another_host_than_its_sni(run_jail, named_upstreams, tmp_path):
    http, https = named_upstreams
    requests = {
        "absolute URI over TLS": (443, f"GET https://{DENIED_NAME}/x HTTP/1.1\r\nHost: {TEST_NAME}\r\n"),
        "Host header over TLS": (443, f"GET /x HTTP/1.1\r\nHost: {DENIED_NAME}\r\n"),
        "absolute URI over plain HTTP": (80, f"GET http://{DENIED_NAME}/x HTTP/1.1\r\nHost: {TEST_NAME}\r\n"),
        "Host in another spelling": (443, f"GET /case HTTP/1.1\r\nHost: {TEST_NAME.upper()}.:443\r\n"),
        "absolute URI, same authority": (443, f"GET https://{TEST_NAME}/abs HTTP/1.1\r\nHost: {TEST_NAME}\r\n"),
    }
    wire = [(port, request + "Connection: close\r\n\r\n") for port, request in requests.values()]
    audit = tmp_path / "audit.jsonl"
    result = run_jail(
        "--js", "true", "--audit-log", str(audit), "--", PYTHON, "-c", textwrap.dedent(RAW_DIRECT_CLIENT),
        json.dumps(wire),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answers = dict(zip(requests, json.loads(result.stdout), strict=True))

    for name, opened_by in (
        ("absolute URI over TLS", "TLS SNI"),
        ("Host header over TLS", "TLS SNI"),
        ("absolute URI over plain HTTP", "redirected destination"),
    ):
        assert answers[name].startswith("HTTP/1.1 421 "), (name, answers[name])
        assert f"names {DENIED_NAME}, but this connection was opened for {TEST_NAME} ({opened_by})" in answers[name]
    assert http.connections == []
    assert answers["Host in another spelling"].startswith("HTTP/1.1 200 ")
    assert [(r["path"], r["host"]) for r in https.requests] == [("/case", TEST_NAME), ("/abs", TEST_NAME)]
    codes = [r["reason_code"] for r in audit_records(audit) if r.get("kind") != "dns"]
    assert codes.count("misdirected") == 3
