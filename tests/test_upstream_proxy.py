"""Behind a corporate proxy: a real tinyproxy (as user nobody) is the only way to an origin on 127.0.0.3
(the direct route from root, jail's user, is closed by an nft rule of the test's own); allowed requests
leave through it, denied ones never reach it, NO_PROXY hosts go direct, credentials go in
Proxy-Authorization."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import (
    PYTHON,
    UPSTREAM_HOST,
    Upstream,
    free_port,
    jail_argv,
    map_names,
    start_upstream,
    unmap_names,
    wait_for,
)
from tests.test_tcp_streams import BANNER, BannerServer

BEHIND_PROXY = "127.0.0.3"
HIDDEN_NAME = "jail-behind-proxy.test"


def start_upstream_on(address: str, scheme: str, context: ssl.SSLContext | None) -> Upstream:
    import tests.conftest as conftest

    # start_upstream binds conftest.UPSTREAM_HOST: point it at the address behind the proxy meanwhile.
    saved = conftest.UPSTREAM_HOST
    conftest.UPSTREAM_HOST = address
    try:
        return start_upstream(scheme, context)
    finally:
        conftest.UPSTREAM_HOST = saved


@pytest.fixture(scope="module")
def hidden_origins(test_ca) -> Iterator[tuple[Upstream, Upstream]]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    test_ca.issue_cert(BEHIND_PROXY).configure_cert(context)
    plain, tls = start_upstream_on(BEHIND_PROXY, "http", None), start_upstream_on(BEHIND_PROXY, "https", context)
    yield plain, tls
    plain.stop()
    tls.stop()


def origin_url(origin: Upstream, path: str = "/") -> str:
    return f"{origin.scheme}://{BEHIND_PROXY}:{origin.port}{path}"


@pytest.fixture(scope="module")
def hidden_banner() -> Iterator[BannerServer]:
    """A server-first TCP service (SSH's shape) behind the proxy, reached by name."""
    server = BannerServer()
    lines = [f"{BEHIND_PROXY} {HIDDEN_NAME}"]
    map_names(lines)
    yield server
    unmap_names(lines)
    server.close()


@pytest.fixture(scope="module")
def direct_route_closed(hidden_origins: tuple[Upstream, Upstream], hidden_banner: BannerServer) -> Iterator[None]:
    """Root (jail) cannot reach the hidden origins; nobody (tinyproxy) can."""
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("closing the direct route needs root and nft")
    table = f"jailtest_proxy_{os.getpid()}"
    ports = ", ".join(str(port) for port in (*(origin.port for origin in hidden_origins), hidden_banner.port))
    rules = (
        f"table inet {table} {{\n chain out {{\n type filter hook output priority 0; policy accept;\n"
        f" meta skuid 0 ip daddr {BEHIND_PROXY} tcp dport {{ {ports} }} reject with tcp reset\n }}\n}}\n"
    )
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=False)


@dataclass
class Tinyproxy:
    process: subprocess.Popen
    port: int
    log: Path

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials}127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """The request lines tinyproxy received (`GET http://...`, `CONNECT host:port`)."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [line.split("): ", 1)[1] for line in lines if "Request (file descriptor" in line]

    def connections(self) -> int:
        text = self.log.read_text() if self.log.exists() else ""
        return text.count("Connect (file descriptor")


def start_tinyproxy(directory: Path, basic_auth: str | None = None) -> Tinyproxy:
    if shutil.which("tinyproxy") is None:
        pytest.skip("tinyproxy is not installed (apt-get install tinyproxy)")
    if os.geteuid() != 0:
        pytest.skip("tinyproxy runs as user nobody, which needs root")
    port = free_port()
    directory.chmod(0o777)  # tinyproxy writes its log as nobody
    log = directory / "tinyproxy.log"
    config = directory / "tinyproxy.conf"
    config.write_text(
        "User nobody\nGroup nogroup\n"
        f"Port {port}\nListen 127.0.0.1\nTimeout 10\nMaxClients 50\nAllow 127.0.0.1\n"
        f'LogFile "{log}"\nLogLevel Info\n' + (f"BasicAuth {basic_auth}\n" if basic_auth else "")
    )
    process = subprocess.Popen(["tinyproxy", "-d", "-c", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proxy = Tinyproxy(process, port, log)
    if not wait_for(lambda: "Starting main loop" in (log.read_text() if log.exists() else ""), 5):
        process.kill()
        raise AssertionError(f"tinyproxy did not start: {process.communicate()[0]!r}")
    return proxy


@pytest.fixture
def tinyproxy() -> Iterator[callable]:
    started: list[Tinyproxy] = []
    directories: list[str] = []

    def start(basic_auth: str | None = None) -> Tinyproxy:
        directory = tempfile.mkdtemp(prefix="jail-tinyproxy-")
        directories.append(directory)
        proxy = start_tinyproxy(Path(directory), basic_auth)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.process.kill()
        proxy.process.wait()
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class JailProxy:
    process: subprocess.Popen
    port: int
    bundle: Path
    audit_log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()] if self.audit_log.exists() else []


@pytest.fixture
def jail_proxy(jail_env: dict[str, str], test_ca_file: Path, ca_dir: Path, tmp_path: Path) -> Iterator[callable]:
    """`jail --server` with its own environment (the corporate proxy settings are jail's own)."""
    started: list[subprocess.Popen] = []

    def start(rule: str, *args: str, env: dict[str, str] | None = None) -> JailProxy:
        port = free_port()
        audit_log = tmp_path / f"audit-{port}.jsonl"
        argv = jail_argv(
            "--server",
            "--listen",
            f"127.0.0.1:{port}",
            "--js",
            rule,
            "--upstream-ca",
            str(test_ca_file),
            "--allow-private",
            f"{BEHIND_PROXY}/32",
            "--allow-private",
            f"{UPSTREAM_HOST}/32",
            "--audit-log",
            str(audit_log),
            *args,
        )
        process = subprocess.Popen(argv, env={**jail_env, **(env or {})}, stdout=subprocess.PIPE, text=True)
        started.append(process)
        line = process.stdout.readline()
        assert "listening" in line, line
        return JailProxy(process, port, ca_dir / "trust" / "ca-bundle.pem", audit_log)

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


def curl(proxy: JailProxy, url: str, *args: str) -> tuple[int, str]:
    """curl through jail: the status and the body."""
    result = subprocess.run(
        ["curl", "-sS", "-x", proxy.url, "--cacert", str(proxy.bundle), "-w", "\n%{http_code}", *args, url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    body, _, status = result.stdout.rpartition("\n")
    return int(status or 0), body


def test_allowed_requests_go_through_the_corporate_proxy(
    hidden_origins, direct_route_closed, tinyproxy, jail_proxy
) -> None:
    plain, tls = hidden_origins
    corporate = tinyproxy()
    jail = jail_proxy("r.path !== '/denied'", env={"HTTPS_PROXY": corporate.url(), "http_proxy": corporate.url()})

    assert curl(jail, origin_url(tls, "/secure"))[0] == 200
    assert curl(jail, origin_url(plain, "/plain"))[0] == 200
    assert [r["path"] for r in tls.requests] == ["/secure"]
    assert [r["path"] for r in plain.requests] == ["/plain"]
    assert f"CONNECT {BEHIND_PROXY}:{tls.port} HTTP/1.1" in corporate.requests()
    assert f"GET http://{BEHIND_PROXY}:{plain.port}/plain HTTP/1.1" in corporate.requests()
    via = {record["path"]: record.get("via") for record in jail.records()}
    assert via == {"/secure": f"127.0.0.1:{corporate.port}", "/plain": f"127.0.0.1:{corporate.port}"}

    # Denied: the corporate proxy never hears of it, over either scheme.
    connections = corporate.connections()
    for origin in (tls, plain):
        status, body = curl(jail, origin_url(origin, "/denied"))
        assert status == 403 and "jail: blocked" in body
    assert corporate.connections() == connections
    assert not any("/denied" in r["path"] for origin in (tls, plain) for r in origin.requests)


def test_the_direct_route_is_really_closed(hidden_origins, direct_route_closed, jail_proxy) -> None:
    """The control: without the corporate proxy, jail cannot reach the hidden origin."""
    _, tls = hidden_origins
    jail = jail_proxy("true")
    status, body = curl(jail, origin_url(tls))
    assert status == 502 and "connection refused" in body, body
    assert [record["reason_code"] for record in jail.records()] == ["upstream_refused"]


def test_no_proxy_hosts_go_direct(hidden_origins, direct_route_closed, tinyproxy, jail_proxy, https_upstream) -> None:
    _, tls = hidden_origins
    corporate = tinyproxy()
    env = {"HTTPS_PROXY": corporate.url(), "NO_PROXY": f"example.com,{UPSTREAM_HOST}"}
    jail = jail_proxy("true", env=env)

    assert curl(jail, https_upstream.url("/direct"))[0] == 200
    assert curl(jail, origin_url(tls, "/proxied"))[0] == 200
    assert https_upstream.requests[0]["path"] == "/direct"
    assert [line for line in corporate.requests() if UPSTREAM_HOST in line] == []
    records = {record["path"]: record for record in jail.records()}
    assert "via" not in records["/direct"] and records["/direct"]["address"] == UPSTREAM_HOST
    assert records["/proxied"]["via"] == f"127.0.0.1:{corporate.port}"


def test_upstream_proxy_flag_sends_credentials(hidden_origins, direct_route_closed, tinyproxy, jail_proxy) -> None:
    plain, tls = hidden_origins
    corporate = tinyproxy(basic_auth="agent s3cret")
    with_credentials = jail_proxy("true", "--upstream-proxy", corporate.url("agent:s3cret@"))
    childs_own = ("-H", "Proxy-Authorization: Basic Y2hpbGQ6b3du")
    assert curl(with_credentials, origin_url(tls, "/auth-tls"), *childs_own)[0] == 200
    assert curl(with_credentials, origin_url(plain, "/auth-plain"), *childs_own)[0] == 200
    # Neither the client's own Proxy-Authorization nor jail's reaches the origin.
    assert all("proxy-authorization" not in r["headers"] for origin in (plain, tls) for r in origin.requests)

    # The control: tinyproxy refuses the same requests without credentials.
    without = jail_proxy("true", "--upstream-proxy", corporate.url())
    status, body = curl(without, origin_url(tls, "/no-auth"))
    assert status == 502 and "407" in body, body
    assert curl(without, origin_url(plain, "/no-auth"))[0] == 407
    assert [r["reason_code"] for r in without.records()] == ["upstream_proxy", "rule_allow"]


def test_bad_upstream_proxy_is_one_line(jail_env: dict[str, str]) -> None:
    result = subprocess.run(
        jail_argv("--upstream-proxy", "socks5://127.0.0.1:1080", "--weak", "--", "true"),
        env=jail_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "jail: error: --upstream-proxy: 'socks5://127.0.0.1:1080': only http:// proxies are supported"
    )


def test_child_does_not_inherit_the_corporate_proxy(jail_env: dict[str, str]) -> None:
    """jail's own proxy variables are jail's: the child is pointed at jail, in every mode."""
    corporate = "http://corporate.invalid:3128"
    env = {
        **jail_env,
        "HTTPS_PROXY": corporate,
        "http_proxy": corporate,
        "npm_config_https_proxy": corporate,
        "YARN_HTTP_PROXY": corporate,
    }
    modes = [["--weak"]] + ([[]] if os.geteuid() == 0 and shutil.which("nft") else [])
    for mode in modes:
        result = subprocess.run(
            jail_argv(*mode, "--js", "true", "--", "env"), env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        child = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        assert "corporate.invalid" not in result.stdout, mode
        assert child["HTTPS_PROXY"].startswith("http://") and "corporate" not in child["HTTPS_PROXY"]
        assert "npm_config_https_proxy" not in child


def test_no_proxy_entries() -> None:
    from jail.proxy.upstream import NoProxy, UpstreamProxies

    bypass = NoProxy.parse(" .corp.example, example.org:8080,10.0.0.0/8, [::1]:99, 192.0.2.7 ")
    direct = [("corp.example", 443), ("a.b.corp.example", 80), ("example.org", 8080), ("10.9.8.7", 1)]
    direct += [("::1", 99), ("192.0.2.7", 443)]
    proxied = [("xcorp.example", 443), ("example.org", 443), ("11.0.0.1", 1), ("::1", 98), ("example.com", 443)]
    assert all(bypass.matches(host, port) for host, port in direct)
    assert not any(bypass.matches(host, port) for host, port in proxied)
    assert NoProxy.parse("*").matches("anything", 1)

    proxies = UpstreamProxies.configure(
        None, {"https_proxy": "http://a:b%40c@proxy.corp:3128", "HTTP_PROXY": "proxy.corp:8080", "no_proxy": "local"}
    )
    https = proxies.route("https", "api.example.com", 443)
    assert https is not None and (https.address, https.authorization) == (("proxy.corp", 3128), "Basic YTpiQGM=")
    assert proxies.route("http", "example.com", 80).address == ("proxy.corp", 8080)
    assert proxies.route("https", "host.local", 443) is None
    assert not UpstreamProxies.configure(None, {"HTTPS_PROXY": "socks5://proxy:1080"})  # skipped, not fatal


def tunnel_and_talk(jail: JailProxy, host: str, port: int) -> tuple[bytes, bytes]:
    """A client that CONNECTs through jail and waits for the server to speak: (jail's answer, what the
    server said and then answered to `hello`)."""
    with socket.create_connection(("127.0.0.1", jail.port), timeout=10) as sock:
        sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
        head, _, said = answer.partition(b"\r\n\r\n")
        try:
            while len(said) < len(BANNER) and (chunk := sock.recv(4096)):
                said += chunk
            sock.sendall(b"hello")
            said += sock.recv(5)
        except OSError:
            pass
        return head.split(b"\r\n", 1)[0], said


def test_tcp_streams_in_a_tunnel_go_through_the_corporate_proxy(
    hidden_banner, direct_route_closed, tinyproxy, jail_proxy
) -> None:
    corporate = tinyproxy()
    jail = jail_proxy(f"r.scheme !== 'tcp' || r.host === '{HIDDEN_NAME}'", env={"HTTPS_PROXY": corporate.url()})
    status, said = tunnel_and_talk(jail, HIDDEN_NAME, hidden_banner.port)
    assert b" 200" in status and said == BANNER + b"HELLO", (status, said)
    assert f"CONNECT {HIDDEN_NAME}:{hidden_banner.port} HTTP/1.1" in corporate.requests()
    # A stream the rule denies reaches neither the proxy nor the server.
    before = len(corporate.requests())
    status, said = tunnel_and_talk(jail, BEHIND_PROXY, hidden_banner.port)
    assert BANNER not in said
    assert wait_for(lambda: len([r for r in jail.records() if r["scheme"] == "tcp"]) == 2)
    assert len(corporate.requests()) == before
    allowed, denied = [r for r in jail.records() if r["scheme"] == "tcp"]
    assert (allowed["decision"], allowed["via"], allowed["bytes_down"]) == (
        "allow",
        f"127.0.0.1:{corporate.port}",
        len(BANNER) + 5,
    )
    assert denied["decision"] == "deny" and denied.get("via", "") == ""


def test_a_proxy_that_refuses_the_stream_is_one_line_in_the_log(
    hidden_banner, direct_route_closed, tinyproxy, jail_proxy
) -> None:
    corporate = tinyproxy(basic_auth="corp secret")  # jail has no credentials for it: 407
    jail = jail_proxy("true", env={"HTTPS_PROXY": corporate.url()})
    _, said = tunnel_and_talk(jail, HIDDEN_NAME, hidden_banner.port)
    assert BANNER not in said
    assert wait_for(lambda: any(r["scheme"] == "tcp" for r in jail.records()))
    (record,) = [r for r in jail.records() if r["scheme"] == "tcp"]
    outcome = (record["decision"], record["reason_code"], record["end"], record["bytes_down"])
    assert outcome == ("allow", "upstream_proxy", "refused", 0), record
    assert "407" in record["error"] and HIDDEN_NAME in record["error"], record


STRONG_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
said = b""
while len(said) < int(sys.argv[3]) and (chunk := s.recv(4096)):
    said += chunk
s.sendall(b"hello")
said += s.recv(5)
print(said.decode())
"""


def test_redirected_streams_of_the_strong_mode_go_through_the_corporate_proxy(
    hidden_banner, direct_route_closed, tinyproxy, run_jail, tmp_path
) -> None:
    from jail.platform.netns import strong_mode_unavailable

    if (reason := strong_mode_unavailable()) is not None:
        pytest.skip(f"strong mode unavailable: {reason}")
    corporate = tinyproxy()
    audit = tmp_path / "audit.jsonl"
    result = run_jail(
        "--audit-log", str(audit), "--allow-private", f"{BEHIND_PROXY}/32", "--upstream-proxy", corporate.url(),
        "--js", "true", "--", PYTHON, "-c", STRONG_CLIENT, HIDDEN_NAME, str(hidden_banner.port), str(len(BANNER)),
    )  # fmt: skip
    assert result.stdout == BANNER.decode().replace("\r\n", "\n") + "HELLO\n", result.stdout + result.stderr
    assert f"CONNECT {HIDDEN_NAME}:{hidden_banner.port} HTTP/1.1" in corporate.requests()
    (record,) = [r for r in map(json.loads, audit.read_text().splitlines()) if r.get("scheme") == "tcp"]
    assert (record["host"], record["via"], record["bytes_up"]) == (HIDDEN_NAME, f"127.0.0.1:{corporate.port}", 5)


def test_a_strong_mode_stream_the_proxy_refuses_is_closed_and_logged(
    hidden_banner, direct_route_closed, tinyproxy, run_jail, tmp_path
) -> None:
    from jail.platform.netns import strong_mode_unavailable

    if (reason := strong_mode_unavailable()) is not None:
        pytest.skip(f"strong mode unavailable: {reason}")
    corporate = tinyproxy(basic_auth="corp secret")  # jail has no credentials for it: 407
    audit = tmp_path / "audit.jsonl"
    result = run_jail(
        "--audit-log", str(audit), "--allow-private", f"{BEHIND_PROXY}/32", "--upstream-proxy", corporate.url(),
        "--js", "true", "--", PYTHON, "-c", STRONG_CLIENT, HIDDEN_NAME, str(hidden_banner.port), str(len(BANNER)),
    )  # fmt: skip
    assert "jail test banner" not in result.stdout
    (record,) = [r for r in map(json.loads, audit.read_text().splitlines()) if r.get("scheme") == "tcp"]
    outcome = (record["decision"], record["reason_code"], record["end"], record["via"])
    assert outcome == ("allow", "upstream_proxy", "refused", f"127.0.0.1:{corporate.port}"), record
    assert "407" in record["error"], record
