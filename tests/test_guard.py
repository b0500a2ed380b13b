"""The address guard: allowed names must not lead into loopback, metadata, private or jail ranges."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from jail.model import Decision, Request, normalize_host
from jail.proxy.guard import AddressGuard, networks
from tests.conftest import UPSTREAM_HOST
from tests.test_proxy import read_response


@pytest.mark.parametrize(
    ("literal", "canonical"),
    [
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("[::ffff:127.0.0.1]", "127.0.0.1"),
        ("::127.0.0.1", "127.0.0.1"),
        ("169.254.169.254.", "169.254.169.254"),
        ("[FD00:EC2::254]", "fd00:ec2::254"),
        ("Example.COM.", "example.com"),
    ],
)
def test_ip_literals_in_any_notation_are_normalised(literal, canonical):
    assert normalize_host(literal) == canonical
    authority = f"[{literal}]" if literal.count(":") > 1 and not literal.startswith("[") else literal
    assert Request.from_url(f"http://{authority}/x").host == canonical


@pytest.mark.parametrize(
    ("address", "code"),
    [
        ("127.0.0.1", "loopback_address"),
        ("::1", "loopback_address"),
        ("0.0.0.0", "unspecified_address"),
        ("169.254.169.254", "metadata_address"),
        ("fd00:ec2::254", "metadata_address"),
        ("100.100.100.200", "metadata_address"),
        ("168.63.129.16", "metadata_address"),
        ("224.0.0.1", "multicast_address"),
        ("255.255.255.255", "broadcast_address"),
        ("10.233.4.1", "jail_address"),
        ("::ffff:127.0.0.1", "loopback_address"),
    ],
)
def test_always_refused_classes(address, code):
    for isolated in (False, True):
        refusal = AddressGuard(isolated).check(address)
        assert refusal is not None and refusal.reason_code == code


def test_private_ranges_are_refused_only_in_isolated_modes_and_open_with_allow_private():
    for address in ("10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "fc00::1"):
        assert AddressGuard(isolated=False).check(address) is None
        refusal = AddressGuard(isolated=True).check(address)
        assert refusal is not None and refusal.reason_code == "private_address"
        assert f"--allow-private {address}/" in refusal.reason
    opened = AddressGuard(isolated=True, allowed=networks("10.1.2.0/24"))
    assert opened.check("10.1.2.3") is None
    assert opened.check("10.1.3.1") is not None
    assert AddressGuard(True, networks("10.0.0.0/8")).check("10.233.0.1").reason_code == "jail_address"
    assert AddressGuard(False, networks("127.0.0.0/8")).check("127.0.0.1") is None


def test_choose_skips_refused_addresses_and_never_resolves_twice():
    guard = AddressGuard(isolated=False, allowed=networks("127.0.0.2/32"))
    calls = []

    async def fake_resolve(host, port):
        calls.append(host)
        return ["127.0.0.1", "127.0.0.2"]

    guard.resolve = fake_resolve  # type: ignore[method-assign]
    address, refusal = asyncio.run(guard.choose("rebind.test", 80))
    assert (address, refusal, calls) == ("127.0.0.2", None, ["rebind.test"])


class Recorder:
    """A listener that records every connection it accepts."""

    def __init__(self, host: str, port: int = 0) -> None:
        self.sock = socket.create_server((host, port))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[tuple] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            self.accepted.append(addr)
            conn.close()

    def close(self) -> None:
        # Wake the blocked accept() before closing: a thread left in accept() on a closed descriptor
        # takes connections from whatever socket gets that number next (it stole the test origin's).
        self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join()
        self.sock.close()


@pytest.fixture
def loopback_listener():
    recorder = Recorder("127.0.0.1")
    yield recorder
    recorder.close()


def test_loopback_in_every_notation_is_refused_through_the_proxy(jail_server, loopback_listener, tmp_path):
    audit = tmp_path / "audit.jsonl"
    server = jail_server("--js", "true", "--audit-log", str(audit))
    port = loopback_listener.port
    urls = [
        f"http://127.0.0.1:{port}/",
        f"http://2130706433:{port}/",
        f"http://0177.0.0.1:{port}/",
        f"http://127.1:{port}/",
        f"http://[::ffff:127.0.0.1]:{port}/",
        f"http://localhost:{port}/",
    ]
    for url in urls:
        # Raw request lines: HTTP client libraries refuse some of these notations themselves.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            status, _, body = read_response(sock)
        assert status == 403, url
        assert b"--allow-private" in body
    assert loopback_listener.accepted == []
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert {r["reason_code"] for r in records} == {"loopback_address"}
    assert {r["address"] for r in records} <= {"127.0.0.1", "::1"}


def test_allowed_request_records_the_dialled_address(jail_server, http_upstream, tmp_path):
    audit = tmp_path / "audit.jsonl"
    server = jail_server("--js", "true", "--audit-log", str(audit))
    response = httpx.get(http_upstream.url("/a"), proxy=server.proxy_url, timeout=10)
    assert response.status_code == 200, response.text
    (record,) = [json.loads(line) for line in audit.read_text().splitlines()]
    assert record["address"] == UPSTREAM_HOST and record["decision"] == "allow"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to map a test name in /etc/hosts")
def test_a_name_resolving_to_loopback_first_never_gets_loopback_dialled(jail_server, http_upstream):
    trap = Recorder("127.0.0.1", http_upstream.port)
    hosts = Path("/etc/hosts")
    original = hosts.read_text()
    hosts.write_text(original + f"\n127.0.0.1 rebind.test\n{UPSTREAM_HOST} rebind.test\n")
    try:
        server = jail_server("--js", "true")
        response = httpx.get(f"http://rebind.test:{http_upstream.port}/r", proxy=server.proxy_url, timeout=10)
    finally:
        hosts.write_text(original)
        trap.close()
    assert response.status_code == 200, response.text
    assert trap.accepted == []
    assert [r["host"] for r in http_upstream.requests] == [f"rebind.test:{http_upstream.port}"]


def raw_exchange(port: int, payload: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        status, _, body = read_response(sock)
    return status, body


def test_path_is_judged_and_forwarded_in_canonical_form(jail_server, http_upstream):
    server = jail_server("--js", "r.path.startsWith('/ok/')")
    base = f"http://{UPSTREAM_HOST}:{http_upstream.port}"
    for path in ("/ok/../admin", "/ok/%2e%2e/admin", "/ok/%2E%2E/admin", "/ok/./../admin"):
        request = f"GET {base}{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        status, body = raw_exchange(server.port, request)
        assert status == 403, path
        assert f"{base}/admin".encode() in body
    status, body = raw_exchange(server.port, f"GET {base}/x/../ok/a%2Fb?q=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 200, body
    assert [r["path"] for r in http_upstream.requests] == ["/ok/a%2Fb?q=1"]


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"X-Folded: a\r\n b\r\nContent-Length: 5\r\n",
        b"X-Bare: a\rb\r\nContent-Length: 5\r\n",
        b"X-Nul: a\x00b\r\nContent-Length: 5\r\n",
    ],
    ids=["cl-te", "double-cl", "obs-fold", "bare-cr", "nul"],
)
def test_ambiguous_requests_are_refused_and_audited(jail_server, http_upstream, tmp_path, headers):
    audit = tmp_path / "audit.jsonl"
    server = jail_server("--js", "true", "--audit-log", str(audit))
    smuggled = b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n"
    request = f"POST http://{UPSTREAM_HOST}:{http_upstream.port}/ok HTTP/1.1\r\nHost: x\r\n".encode()
    status, _ = raw_exchange(server.port, request + headers + b"\r\n" + smuggled)
    assert status == 400
    assert http_upstream.connections == []
    records = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
    if b"Content-Length: 6" in headers:
        return  # mitmproxy's HTTP/1 reader refuses this before a flow exists: nothing to audit
    assert records and all(r["status"] == 400 and r["decision"] == "deny" for r in records)


def test_each_request_on_a_keep_alive_connection_is_judged(jail_server, http_upstream):
    server = jail_server("--js", "r.path === '/first'")
    with httpx.Client(proxy=server.proxy_url, timeout=10) as client:
        assert client.get(http_upstream.url("/first")).status_code == 200
        assert client.get(http_upstream.url("/second")).status_code == 403
        assert client.get(http_upstream.url("/first")).status_code == 200
    assert [r["path"] for r in http_upstream.requests] == ["/first", "/first"]


@pytest.fixture
def dummy_targets():
    """Listeners on a cloud-metadata address and a private address, on an interface the test adds
    (a veth pair: this kernel may lack the dummy driver)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to add an interface")
    link = f"jtd{os.getpid() % 100000}"
    subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", "name", f"{link}p"], check=True)
    try:
        subprocess.run(["ip", "link", "set", f"{link}p", "up"], check=True)
        for address in ("169.254.169.254/32", "10.77.0.1/32"):
            subprocess.run(["ip", "addr", "add", address, "dev", link], check=True)
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
        recorders = {
            name: Recorder(address) for name, address in (("metadata", "169.254.169.254"), ("private", "10.77.0.1"))
        }
        yield recorders
        for recorder in recorders.values():
            recorder.close()
    finally:
        subprocess.run(["ip", "link", "delete", link], check=False)


CURL_ALL = 'for u in "$@"; do curl -s -o /dev/null -w \'%{http_code} \' --max-time 10 "$u"; done'


def test_metadata_and_private_listeners_are_never_dialled(run_jail, dummy_targets):
    metadata, private = dummy_targets["metadata"], dummy_targets["private"]
    urls = [
        f"http://169.254.169.254:{metadata.port}/latest/meta-data/",
        f"http://2852039166:{metadata.port}/",
        f"http://[::ffff:169.254.169.254]:{metadata.port}/",
        f"http://10.77.0.1:{private.port}/",
        f"http://0x0a.77.0.1:{private.port}/",
    ]
    weak = run_jail("--weak", "--js", "true", "--", "sh", "-c", CURL_ALL, "sh", *urls).stdout.split()
    # Weak mode refuses metadata; private ranges stay open there (the child could reach them anyway):
    # the recorder accepts and hangs up, so the proxy answers 502.
    assert weak == ["403", "403", "403", "502", "502"], weak
    assert len(private.accepted) == 2
    if shutil.which("nft") is not None:
        strong = run_jail("--js", "true", "--", "sh", "-c", CURL_ALL, "sh", *urls).stdout.split()
        assert strong == ["403"] * 5, strong
        assert len(private.accepted) == 2, "strong mode must not dial a private address"
    assert metadata.accepted == []


def test_the_rule_object_carries_every_request_field():
    from dataclasses import fields

    request = Request.build("POST", "https", "A.example.", 8443, "/p", "q=1", {"X-A": "b"}, "10.0.0.2")
    assert set(request.to_dict()) == {f.name for f in fields(Request)} | {"url"}
    assert request.to_dict()["url"] == "https://a.example:8443/p?q=1"


@pytest.mark.parametrize(
    "request_",
    [
        Request.build("POST", "https", "A.example.", 8443, "/p", "q=1", {"X-A": "b"}, "10.0.0.2"),
        Request.build("GET", "http", "bücher.example", None, '/"quoted"\\', "é=ü&\x01", {"x": "\u2028\t\n"}),
        Request("GET", "https", "e.example", 443, "/", headers={"x": 1}),  # type: ignore[dict-item]
        Request("GET", "https", "e.example", True, "/"),  # type: ignore[arg-type]
    ],
)
def test_the_rule_json_is_exactly_json_dumps_of_the_rule_object(request_):
    assert request_.to_json() == json.dumps(request_.to_dict(), separators=(",", ":"))


def test_stamping_a_decision_keeps_every_other_field():
    from dataclasses import MISSING, fields, replace

    decision = Decision(False, "why", "code", "js", 5, 7, "ci.toml:3", True, True, "cli")
    # Every field differs from its default: a field added to Decision must be added here (and to stamped).
    assert all(getattr(decision, f.name) != f.default for f in fields(Decision) if f.default is not MISSING)
    assert len(fields(Decision)) == 10
    assert decision.stamped("proc", 42) == replace(decision, engine="proc", rule_us=42)


def test_remembered_verdicts_stay_per_guard_and_bounded(monkeypatch):
    from jail.proxy import guard as guard_module

    open_guard = AddressGuard(isolated=False, allowed=networks("127.0.0.2/32"))
    closed_guard = AddressGuard(isolated=True)

    async def choices() -> list:
        return [
            await open_guard.choose("127.0.0.2", 80),
            await closed_guard.choose("127.0.0.2", 80),
            await open_guard.choose("127.0.0.2", 80),
            await open_guard.choose("::ffff:10.1.2.3", 80),
            await closed_guard.choose("::ffff:10.1.2.3", 80),
        ]

    first, closed, again, private_open, private_closed = asyncio.run(choices())
    assert first == again == ("127.0.0.2", None)
    assert closed[0] is None and closed[1].reason_code == "loopback_address"
    assert private_open == ("10.1.2.3", None)
    assert private_closed[0] is None and private_closed[1].reason_code == "private_address"
    monkeypatch.setattr(guard_module, "MEMORY_ENTRIES", 3)
    for last in range(10):
        assert open_guard.check(f"93.184.216.{last}") is None
    assert len(open_guard._verdicts) <= 3
    open_guard.allowed = ()  # new settings, new verdicts
    assert open_guard.check("127.0.0.2").reason_code == "loopback_address"
