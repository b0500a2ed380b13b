"""A server that speaks first (MySQL, SMTP, a banner), reached through jail's proxy with `CONNECT`.

mitmproxy picks what a tunnel carries from the client's first bytes, and such a client sends none
until the server has spoken: after jail.proxy.streams.SNIFF_SECONDS of silence the tunnel is a TCP
stream, judged once as `CONNECT tcp://host:port` like any other (tests/test_git_ssh.py covers clients
that speak first, and TLS or HTTP inside a tunnel staying judged per request).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jail.proxy.streams import SNIFF_SECONDS
from tests.conftest import TEST_NAME, UPSTREAM_HOST, wait_for
from tests.test_tcp_streams import BANNER, BannerServer

# The silence jail waits for, the proxy's own round trip and a loaded 2-core machine's scheduling.
BANNER_WITHIN = SNIFF_SECONDS + 0.2


class BannerOnlyServer(BannerServer):
    """Speaks first, then closes: a client that never sends (curl telnet:// with an empty stdin) ends."""

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            conn.sendall(BANNER)


@pytest.fixture(scope="module")
def banner_server() -> Iterator[BannerServer]:
    server = BannerServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def banner_only_server() -> Iterator[BannerServer]:
    server = BannerOnlyServer()
    yield server
    server.close()


def stream_records(audit: Path) -> list[dict]:
    if not audit.exists():
        return []
    return [r for r in map(json.loads, audit.read_text().splitlines()) if r.get("scheme") == "tcp"]


def one_stream_record(audit: Path) -> dict:
    """The stream's record, written when it ends; then no second one."""
    assert wait_for(lambda: stream_records(audit)), "no audit record for the stream"
    time.sleep(0.2)
    [record] = stream_records(audit)
    return record


def open_tunnel(port: int, target: str, header: str = "") -> socket.socket:
    """`CONNECT target` through jail's proxy; the socket once the answer's head is read (nothing else)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{header}\r\n".encode())
    answer = b""
    while not answer.endswith(b"\r\n\r\n"):
        data = sock.recv(1)  # byte by byte: what follows the head is the stream's, read by the test
        assert data, f"the proxy closed before answering: {answer!r}"
        answer += data
    assert answer.startswith(b"HTTP/1.1 200"), answer
    return sock


def read_banner(sock: socket.socket) -> bytes:
    got = b""
    while len(got) < len(BANNER) and (data := sock.recv(len(BANNER) - len(got))):
        got += data
    return got


@pytest.mark.parametrize("header", ["", "Jail-Tunnel: tcp\r\n"], ids=["any-client", "jail-tunnel-header"])
def test_a_client_that_only_reads_gets_the_banner(jail_server, banner_server, tmp_path, header):
    audit = tmp_path / "audit.jsonl"
    target = f"{UPSTREAM_HOST}:{banner_server.port}"
    server = jail_server("--audit-log", str(audit), "--js", f"r.url === 'tcp://{target}'")
    with open_tunnel(server.port, target, header) as sock:
        opened = time.monotonic()
        assert read_banner(sock) == BANNER
        waited = time.monotonic() - opened
        sock.sendall(b"ping")
        assert sock.recv(4) == b"PING"  # then relayed both ways
    assert waited < BANNER_WITHIN, f"the banner came after {waited:.2f} s"
    record = one_stream_record(audit)
    assert (record["url"], record["decision"], record["address"]) == (f"tcp://{target}", "allow", UPSTREAM_HOST)
    assert (record["bytes_up"], record["bytes_down"]) == (4, len(BANNER) + 4)
    assert record["end"] and not record.get("error")


def test_a_denied_silent_tunnel_dials_nothing_and_is_recorded(jail_server, banner_server, tmp_path):
    audit = tmp_path / "audit.jsonl"
    target = f"{UPSTREAM_HOST}:{banner_server.port}"
    server = jail_server("--audit-log", str(audit), "--js", "r.scheme !== 'tcp'")
    before = len(banner_server.connections)
    with open_tunnel(server.port, target) as sock:
        opened = time.monotonic()
        assert sock.recv(4096) == b""  # closed, with nothing from the server
        closed = time.monotonic() - opened
    assert closed < BANNER_WITHIN, f"the tunnel was closed after {closed:.2f} s"
    record = one_stream_record(audit)
    assert (record["url"], record["decision"], record["end"]) == (f"tcp://{target}", "deny", "denied")
    assert (record["bytes_up"], record["bytes_down"], record["address"]) == (0, 0, "")
    assert "error" not in record  # the refused dial is the denial itself, not a failure
    assert len(banner_server.connections) == before, "the server saw a connection"


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (.ci/run installs it)")
@pytest.mark.parametrize("allowed", [True, False], ids=["allowed", "denied"])
def test_curl_telnet_in_weak_mode_through_all_proxy(weak_jail, banner_only_server, tmp_path, allowed):
    """curl tunnels telnet:// with CONNECT through the proxy ALL_PROXY names, and sends nothing first
    (stdin is empty); the server closes after its banner, and so does curl."""
    audit = tmp_path / "audit.jsonl"
    target = f"{UPSTREAM_HOST}:{banner_only_server.port}"
    rule = f"r.url === 'tcp://{target}'" if allowed else "r.scheme !== 'tcp'"
    before = len(banner_only_server.connections)
    started = time.monotonic()
    curl = ("curl", "-sS", "--max-time", "10", f"telnet://{target}")
    result = weak_jail("--audit-log", str(audit), "--js", rule, "--", *curl, stdin=subprocess.DEVNULL)
    took = time.monotonic() - started
    record = one_stream_record(audit)
    assert record["url"] == f"tcp://{target}"
    if allowed:
        assert (result.returncode, result.stdout) == (0, BANNER.decode().replace("\r\n", "\n")), result.stderr
        assert (record["decision"], record["bytes_up"], record["bytes_down"]) == ("allow", 0, len(BANNER))
        assert record["end"] and not record.get("error")
    else:
        assert result.stdout == "", result.stderr  # the tunnel was open (200): curl sees a plain close
        assert (record["decision"], record["end"], record["bytes_down"]) == ("deny", "denied", 0)
        assert len(banner_only_server.connections) == before, "the server saw a connection"
    assert took < 5, f"jail and curl took {took:.1f} s"  # not curl's --max-time: the stream ended


@pytest.mark.skipif(os.geteuid() != 0, reason="the named origins listen on ports 80/443 and edit /etc/hosts")
def test_a_slow_tls_client_on_a_web_port_is_still_judged_as_https(jail_server, named_upstreams, ca_dir):
    """Clients speak first on 443: a ClientHello that comes late (a loaded machine) is not a TCP stream."""
    server = jail_server("--js", f"r.scheme === 'https' && r.host === '{TEST_NAME}'")
    sock = open_tunnel(server.port, f"{TEST_NAME}:443")
    time.sleep(SNIFF_SECONDS + 0.7)  # well past the silence that ends a tunnel on other ports
    context = ssl.create_default_context(cafile=str(ca_dir / "trust" / "ca-bundle.pem"))
    with context.wrap_socket(sock, server_hostname=TEST_NAME) as tls:
        tls.sendall(f"GET /late HTTP/1.1\r\nHost: {TEST_NAME}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert [r["path"] for r in named_upstreams[1].requests] == ["/late"]
