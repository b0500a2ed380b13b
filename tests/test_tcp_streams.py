"""TCP streams judged by name: the `tcp` request every engine judges, its audit record, `jail log`."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jail.audit import STREAM_END_CLIENT, STREAM_END_DENIED, AuditSink, Outcome
from jail.audit.report import load_audit_logs, render_markdown, render_text, summarize
from jail.model import Decision, Request
from jail.platform.netns import strong_mode_unavailable
from jail.platform.rootless import nftables_unavailable, rootless_unavailable
from jail.policies import HostGrant, Judge, RuleSpec, build_engine
from jail.policies.policy_file import PolicyEngine, load_policy
from jail.proxy.dns import SYNTHETIC_NETWORK, SyntheticNames, start_resolver
from jail.proxy.streams import for_the_proxy
from tests.conftest import (
    PYTHON,
    UPSTREAM_HOST,
    Upstream,
    decide_all,
    host_addresses,
    map_names,
    start_upstream,
    unmap_names,
    wait_for,
)
from tests.test_rootless import user  # noqa: F401 (the rootless test user, a fixture)

REPO = Path(__file__).resolve().parent.parent
READY_MADE = sorted((REPO / "policies").glob("*.toml"))

GIT_SSH_TOML = """\
[[rule]]
action = "allow"
host = "github.com"
scheme = "tcp"
port = 22
"""

# --- the request --------------------------------------------------------------------------


def test_a_stream_is_a_connect_request_with_the_port_always_shown() -> None:
    stream = Request.stream("GitHub.com.", 22, requester_ip="10.0.0.2")
    assert (stream.method, stream.scheme, stream.host, stream.port) == ("CONNECT", "tcp", "github.com", 22)
    assert (stream.path, stream.query, stream.headers) == ("", "", {})
    assert stream.url == "tcp://github.com:22"
    assert Request.stream("::ffff:10.1.2.3", 5432).url == "tcp://10.1.2.3:5432"
    assert Request.stream("fd00::1", 443).url == "tcp://[fd00::1]:443"  # no default port, even 443
    assert json.loads(stream.to_json()) == stream.to_dict()


def test_tcp_urls_parse_for_test_and_expect() -> None:
    assert Request.from_url("tcp://github.com:22") == Request.stream("github.com", 22)
    assert Request.from_url("tcp://github.com:22/", "GET").method == "CONNECT"
    for bad in ("tcp://github.com", "tcp://github.com:22/repo", "tcp://github.com:22?x", "ssh://github.com:22"):
        with pytest.raises(ValueError):
            Request.from_url(bad)


# --- every engine -------------------------------------------------------------------------


def judge_one(spec: RuleSpec, request: Request) -> Decision:
    return asyncio.run(decide_all(build_engine(spec), [request]))[0]


SSH = Request.stream("github.com", 22)
OTHER_PORT = Request.stream("github.com", 2222)
HTTPS = Request.from_url("https://github.com/")


@pytest.mark.parametrize(
    "spec",
    [
        RuleSpec("js", "r.scheme === 'tcp' && r.method === 'CONNECT' && r.url === 'tcp://github.com:22'"),
        # Outside the fast path's subset: V8 judges it.
        RuleSpec("js", "(function () { return r.scheme === 'tcp' && r.port === 22 && r.path === '' })()"),
        RuleSpec("sh", '[ "$JAIL_SCHEME" = tcp ] && [ "$JAIL_PORT" = 22 ] && [ "$JAIL_URL" = tcp://github.com:22 ]'),
        RuleSpec(
            "proc",
            f'{sys.executable} -u -c "import sys, json\n'
            "for line in sys.stdin:\n"
            "    r = json.loads(line)\n"
            "    print('true' if r['scheme'] == 'tcp' and r['port'] == 22 else 'false', flush=True)\"",
        ),
    ],
    ids=["js-fast", "js-v8", "sh", "proc"],
)
def test_every_engine_judges_a_stream(spec: RuleSpec) -> None:
    assert judge_one(spec, SSH).allow
    assert not judge_one(spec, OTHER_PORT).allow
    assert not judge_one(spec, HTTPS).allow


def test_a_policy_file_allows_a_stream_with_scheme_tcp(tmp_path: Path) -> None:
    policy = tmp_path / "git-ssh.toml"
    policy.write_text(GIT_SSH_TOML)
    spec = RuleSpec("policy", files=(policy,))
    assert judge_one(spec, SSH).allow
    for denied in (OTHER_PORT, HTTPS, Request.stream("gitlab.com", 22), Request.from_url("http://github.com:22/")):
        assert not judge_one(spec, denied).allow, denied.url


def test_a_stream_never_matches_a_path_or_an_http_method(tmp_path: Path) -> None:
    """A stream has no path: `path = "/"` (every HTTP path) is about HTTP, for allow and deny rules."""
    policy = tmp_path / "p.toml"
    policy.write_text(
        '[[rule]]\naction = "deny"\npath = "/"\nreason = "no"\n'
        '[[rule]]\naction = "deny"\nmethods = ["GET"]\n'
        '[[rule]]\naction = "allow"\nhost = "db.internal"\npath = "/"\n'
        '[[rule]]\naction = "allow"\nhost = "github.com"\nmethods = ["CONNECT"]\n'
    )
    spec = RuleSpec("policy", files=(policy,))
    assert not judge_one(spec, Request.stream("db.internal", 5432)).allow  # the default, not the path rule
    assert judge_one(spec, SSH).rule.endswith(":12")  # the CONNECT rule


def test_expectations_can_name_streams(tmp_path: Path) -> None:
    policy = tmp_path / "git-ssh.toml"
    policy.write_text(
        GIT_SSH_TOML + '[[expect]]\nrequest = "tcp://github.com:22"\ndecision = "allow"\n'
        '[[expect]]\nrequest = "CONNECT tcp://github.com:23"\ndecision = "deny"\n'
    )
    expectations = load_policy([policy]).expectations
    assert [(e.request.url, e.allow) for e in expectations] == [
        ("tcp://github.com:22", True),
        ("tcp://github.com:23", False),
    ]


@pytest.mark.parametrize("policy", READY_MADE, ids=[path.name for path in READY_MADE])
def test_the_ready_made_policies_allow_no_stream(policy: Path) -> None:
    """They are HTTP-only: no host of theirs, on any port, is reachable as a plain TCP stream."""
    loaded = load_policy([policy])
    hosts = {host for rule in loaded.rules for host in rule.hosts} | {"example.com"}
    streams = [Request.stream(host, port) for host in sorted(hosts) for port in (22, 80, 443, 5432)]
    decisions = asyncio.run(decide_all(PolicyEngine([policy], 5.0), streams))
    assert [s.url for s, d in zip(streams, decisions, strict=True) if d.allow] == []


def test_a_profile_grant_never_covers_a_stream() -> None:
    grant = HostGrant("profile:test", "profile host", frozenset({"api.openai.com"}))
    judge = Judge(build_engine(RuleSpec()), grant=grant)
    assert asyncio.run(judge.decide(Request.from_url("https://api.openai.com/v1"))).allow
    assert not asyncio.run(judge.decide(Request.stream("api.openai.com", 443))).allow


def test_audit_mode_lets_a_denied_stream_through_as_would_deny() -> None:
    judge = Judge(build_engine(RuleSpec()), audit_mode=True)
    decision = asyncio.run(judge.decide(SSH))
    assert decision.allow and decision.verdict == "would_deny"


# --- the audit record and jail log ---------------------------------------------------------


def test_one_record_per_stream_in_both_logs_and_jail_log_shows_it(tmp_path: Path) -> None:
    requests, audit = tmp_path / "requests.log", tmp_path / "audit.jsonl"
    sink = AuditSink("j1", request_log=requests, audit_log=audit)
    allowed = Decision.allowed(rule="git-ssh").stamped("policy", 12)
    sink.record(
        1_700_000_000.0,
        SSH,
        allowed,
        Outcome(bytes_up=1234, bytes_down=56789, duration_ms=2500.0, address="140.82.121.4", end=STREAM_END_CLIENT),
    )
    denied = Decision.denied("no tcp to example.com").stamped("policy", 3)
    sink.record(1_700_000_001.0, Request.stream("example.com", 5432), denied, Outcome(end=STREAM_END_DENIED))
    sink.close()
    assert [line.split(" ", 1)[1] for line in requests.read_text().splitlines()] == [
        "+ CONNECT tcp://github.com:22",
        "- CONNECT tcp://example.com:5432",
    ]
    first, second = (json.loads(line) for line in audit.read_text().splitlines())
    assert {k: first[k] for k in ("method", "scheme", "host", "port", "path", "url", "decision", "end")} == {
        "method": "CONNECT",
        "scheme": "tcp",
        "host": "github.com",
        "port": 22,
        "path": "",
        "url": "tcp://github.com:22",
        "decision": "allow",
        "end": "client_closed",
    }
    assert (first["bytes_up"], first["bytes_down"], first["duration_ms"], first["address"]) == (
        1234,
        56789,
        2500.0,
        "140.82.121.4",
    )
    assert (second["decision"], second["reason"], second["end"]) == ("deny", "no tcp to example.com", "denied")

    log = load_audit_logs([audit])
    assert log.malformed == []
    assert [entry.url for entry in log.entries] == ["tcp://github.com:22", "tcp://example.com:5432"]
    text = render_text(summarize(log.entries))
    assert "TCP streams:" in text
    assert "tcp://github.com:22" in text and "client_closed" in text and "55.5 KiB" in text
    assert "denied: no tcp to example.com" in text
    assert "**TCP streams**" in render_markdown(summarize(log.entries))


# --- the pieces of the transparent path ----------------------------------------------------


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (b"", False),  # nothing said in time: a server-speaks-first protocol
        (b"\x16\x03\x01\x02\x00\x01", True),  # a TLS ClientHello
        (b"\x16", None),
        (b"\x16\x01", False),
        (b"GET / HTTP/1.1\r\n", True),
        (b"OPTIONS * HTTP/1.1\r\n", True),
        (b"GET http://example.com/ HTTP/1.1\r\n", True),
        (b"PRI * HTTP/2.0\r\n", True),
        (b"PROPFIND /dav HTTP/1.1\r\n", True),
        (b"GE", None),
        (b"GET ", None),
        (b"GET htt", None),
        (b"SSH-2.0-OpenSSH_9.2p1\r\n", False),
        (b"*1\r\n$4\r\nPING\r\n", False),  # Redis
        (b"PING\r\n", False),  # Redis inline
        (b"SET a b\r\n", False),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", False),  # Postgres SSLRequest
        (b"get / HTTP/1.1", False),
    ],
)
def test_first_bytes_tell_http_and_tls_from_other_streams(data: bytes, verdict: bool | None) -> None:
    assert for_the_proxy(data) is verdict


def test_synthetic_names_give_one_address_per_name_for_the_run() -> None:
    names = SyntheticNames()
    first, second = names.address_for("GitHub.com."), names.address_for("db.internal")
    assert first == "198.18.0.2" and second == "198.18.0.3"
    assert names.address_for("github.com") == first
    assert (names.name_for(first), names.name_for(second), names.name_for("198.18.0.9")) == (
        "github.com",
        "db.internal",
        None,
    )
    assert names.covers("198.19.255.255") and names.covers("198.18.0.1") and not names.covers("198.20.0.1")
    tiny = SyntheticNames(ipaddress.ip_network("198.18.0.0/30"))
    assert tiny.address_for("a") == "198.18.0.2" and tiny.address_for("b") is None


def test_the_resolver_answers_a_synthetic_address_and_no_ipv6() -> None:
    from dnslib import QTYPE, RCODE, DNSRecord

    seen: list[tuple[str, str, str, str]] = []

    async def ask() -> list[DNSRecord]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        transport = await start_resolver(sock, lambda *query: seen.append(query), SyntheticNames())
        loop = asyncio.get_running_loop()
        replies = []
        try:
            for name, qtype in (("db.internal", "A"), ("db.internal", "AAAA"), ("other.example", "A")):
                client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                client.setblocking(False)
                await loop.sock_sendto(client, DNSRecord.question(name, qtype).pack(), sock.getsockname())
                replies.append(DNSRecord.parse(await asyncio.wait_for(loop.sock_recv(client, 512), 5)))
                client.close()
        finally:
            transport.close()
        return replies

    a, aaaa, other = asyncio.run(ask())
    assert [str(rr.rdata) for rr in a.rr] == ["198.18.0.2"]
    assert aaaa.rr == [] and aaaa.header.rcode == RCODE.NOERROR
    assert [str(rr.rdata) for rr in other.rr] == ["198.18.0.3"] and other.rr[0].rtype == QTYPE.A
    assert [(name, qtype, answer) for name, qtype, _, answer in seen] == [
        ("db.internal", "A", "198.18.0.2"),
        ("db.internal", "AAAA", ""),
        ("other.example", "A", "198.18.0.3"),
    ]


# --- through a real jail: strong (root) and rootless (a created user) -----------------------

ECHO_NAME = "jail-tcp-echo.test"
GUARDED_NAME = "jail-tcp-loopback.test"
ECHO_LOOPBACK = "127.0.0.3"  # ECHO_NAME's address, let through with --allow-private
GUARDED_LOOPBACK = "127.0.0.4"  # GUARDED_NAME's, which the address guard refuses
WEB_NAME, OTHER_WEB_NAME = "jail-tcp-web.test", "jail-tcp-other-web.test"  # the test upstreams' address
HOSTS_LINES = (
    f"{ECHO_LOOPBACK} {ECHO_NAME}\n{GUARDED_LOOPBACK} {GUARDED_NAME}\n{UPSTREAM_HOST} {WEB_NAME} {OTHER_WEB_NAME}\n"
)
BANNER = b"220 jail test banner, the server speaks first\r\n"


class BannerServer:
    """A server that speaks first, then sends back what it gets in upper case; on every address."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("0.0.0.0", 0))
        self.port = self.sock.getsockname()[1]
        self.connections: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.connections.append(peer[0])
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            conn.sendall(BANNER)
            while data := conn.recv(65536):
                conn.sendall(data.upper())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def banner_server() -> Iterator[BannerServer]:
    server = BannerServer()
    yield server
    server.close()


def ensure_test_names() -> None:
    """This module's names, again before each run (a test run beside this one may edit /etc/hosts)."""
    map_names(HOSTS_LINES.splitlines())


@pytest.fixture(scope="module")
def test_names() -> Iterator[None]:
    ensure_test_names()
    yield
    unmap_names(HOSTS_LINES.splitlines())


@dataclass
class Jailed:
    mode: str
    run: Callable[..., subprocess.CompletedProcess]
    folder: Path  # where the jail may write its logs

    def python(self, code: str, *flags: str) -> subprocess.CompletedProcess:
        ensure_test_names()
        return self.run(*flags, "--", PYTHON, "-c", textwrap.dedent(code))

    def logs(self) -> tuple[Path, Path, list[str]]:
        audit, requests = self.folder / f"audit-{uuid.uuid4().hex}.jsonl", self.folder / f"req-{uuid.uuid4().hex}.log"
        return audit, requests, ["--audit-log", str(audit), "--request-log", str(requests)]


@pytest.fixture(params=["strong", "rootless"])
def jailed(request: pytest.FixtureRequest, tmp_path: Path, test_names: None) -> Jailed:
    if os.geteuid() != 0:
        pytest.skip("the strong mode, and making the rootless test user, need root (CI has it)")
    if request.param == "strong":
        if (reason := strong_mode_unavailable()) is not None:
            pytest.skip(f"strong mode unavailable: {reason}")
        return Jailed("strong", request.getfixturevalue("run_jail"), tmp_path)
    if (reason := rootless_unavailable() or nftables_unavailable()) is not None:
        pytest.skip(f"rootless mode unavailable: {reason}")
    rootless_user = request.getfixturevalue("user")
    return Jailed("rootless", rootless_user.jail, rootless_user.workspace)


def stream_records(audit: Path) -> list[dict]:
    return [r for r in map(json.loads, audit.read_text().splitlines()) if r.get("scheme") == "tcp"]


def outside_address() -> str:
    """An address of this machine the jail reaches only through jail (not loopback, which is its own)."""
    addresses = host_addresses()
    if not addresses:
        pytest.skip("this machine has no address but loopback")
    return addresses[0]


CLIENT = f"""
import json, socket, sys
def talk(host, port, send=b"ping", size=0):
    got = b""
    try:
        s = socket.create_connection((host, port), timeout=10)
        s.settimeout(10)
        got = s.recv(len({BANNER!r}))
        while len(got) < len({BANNER!r}):
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        payload = send * max(1, size // len(send)) if size else send
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        while chunk := s.recv(65536):
            got += chunk
        s.close()
        return {{"got": len(got), "head": got[:60].decode(errors="replace"), "sent": len(payload)}}
    except OSError as e:
        return {{"got": len(got), "head": got[:60].decode(errors="replace"), "error": type(e).__name__}}
"""


def test_a_stream_by_name_and_by_ip_literal_is_judged_relayed_and_recorded(jailed, banner_server):
    literal = outside_address()
    port = banner_server.port
    audit, requests, log_flags = jailed.logs()
    rule = f"r.scheme === 'tcp' && r.port === {port} && ['{ECHO_NAME}', '{literal}'].includes(r.host)"
    code = (
        CLIENT
        + f"""
print(json.dumps([talk({ECHO_NAME!r}, {port}, size=200000), talk({literal!r}, {port}),
                  talk("198.18.255.200", {port})]))
"""
    )
    result = jailed.python(
        code, "--js", rule, "--allow-private", f"{literal}/32", "--allow-private", f"{ECHO_LOOPBACK}/32", *log_flags
    )
    assert result.stdout, result.stderr
    by_name, by_literal, unknown = json.loads(result.stdout)
    assert by_name["head"].startswith(BANNER.decode()), result.stderr
    assert by_name["got"] == len(BANNER) + 200000 and by_literal["got"] == len(BANNER) + 4
    assert by_literal["head"] == BANNER.decode() + "PING"
    assert unknown["got"] == 0, "a synthetic address that stands for no name reaches nothing"
    assert banner_server.connections[-2:] and len(banner_server.connections) >= 2
    named, literal_record, refused = stream_records(audit)
    assert (named["host"], named["url"], named["decision"], named["end"]) == (
        ECHO_NAME,
        f"tcp://{ECHO_NAME}:{port}",
        "allow",
        "client_closed",
    )
    assert (named["bytes_up"], named["bytes_down"], named["address"]) == (200000, len(BANNER) + 200000, ECHO_LOOPBACK)
    assert named["duration_ms"] > 0
    assert (literal_record["host"], literal_record["bytes_up"], literal_record["address"]) == (literal, 4, literal)
    assert (refused["host"], refused["decision"], refused["reason_code"], refused["end"]) == (
        "198.18.255.200",
        "deny",
        "unknown_synthetic",
        "denied",
    )
    lines = [line.split(" ", 1)[1] for line in requests.read_text().splitlines()]
    assert f"+ CONNECT tcp://{ECHO_NAME}:{port}" in lines and f"- CONNECT tcp://198.18.255.200:{port}" in lines


def test_a_denied_stream_reaches_nothing_and_the_audit_log_says_why(jailed, banner_server):
    literal = outside_address()
    port = banner_server.port
    before = len(banner_server.connections)
    audit, _, log_flags = jailed.logs()
    code = (
        CLIENT
        + f"""
synthetic = socket.gethostbyname({ECHO_NAME!r})
talks = [talk({ECHO_NAME!r}, {port}), talk(synthetic, {port}), talk({literal!r}, {port})]
ssh = socket.create_connection(({ECHO_NAME!r}, {port}), timeout=10)
ssh.sendall(b"SSH-2.0-OpenSSH_9.2p1 test\\r\\n")  # an SSH client speaks first
said = ssh.makefile("rb").read().decode()
print(json.dumps([synthetic, said, *talks]))
"""
    )
    flags = ("--allow-private", f"{literal}/32", "--allow-private", f"{ECHO_LOOPBACK}/32", *log_flags)
    result = jailed.python(code, "--js", "r.scheme === 'tcp' ? 'no streams in this test' : true", *flags)
    assert result.stdout, result.stderr
    synthetic, said_to_ssh, *talks = json.loads(result.stdout)
    # What OpenSSH shows with -v ("banner line 0: ..."), before "Connection closed by remote host".
    assert said_to_ssh == f"jail: denied tcp://{ECHO_NAME}:{port}: no streams in this test\r\n"
    assert ipaddress.ip_address(synthetic) in SYNTHETIC_NETWORK, "names resolve to synthetic addresses"
    assert [t["got"] for t in talks] == [0, 0, 0], (talks, result.stderr)
    time.sleep(0.3)
    assert len(banner_server.connections) == before, "the server sees no connection"
    records = stream_records(audit)
    assert [(r["host"], r["decision"], r["reason"], r["end"]) for r in records] == [
        (ECHO_NAME, "deny", "no streams in this test", "denied"),
        (ECHO_NAME, "deny", "no streams in this test", "denied"),
        (literal, "deny", "no streams in this test", "denied"),
        (ECHO_NAME, "deny", "no streams in this test", "denied"),
    ]


def test_the_address_guard_refuses_loopback_behind_an_allowed_name(jailed, banner_server):
    port = banner_server.port
    before = len(banner_server.connections)
    audit, _, log_flags = jailed.logs()
    code = CLIENT + f"print(json.dumps(talk({GUARDED_NAME!r}, {port})))"
    refused = jailed.python(code, "--js", "true", *log_flags)
    assert json.loads(refused.stdout)["got"] == 0, refused.stderr
    time.sleep(0.3)
    assert len(banner_server.connections) == before
    (record,) = stream_records(audit)
    assert (record["decision"], record["reason_code"], record["end"], record["address"]) == (
        "allow",
        "loopback_address",
        "refused",
        GUARDED_LOOPBACK,
    )
    allowed = jailed.python(code, "--js", "true", "--allow-private", f"{GUARDED_LOOPBACK}/32")
    assert json.loads(allowed.stdout)["head"] == BANNER.decode() + "PING", allowed.stderr


@pytest.fixture(scope="module")
def other_port_upstreams(test_ca) -> Iterator[tuple[Upstream, Upstream]]:
    """HTTP on 8080 and HTTPS on 8443 of the test upstreams' address."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    test_ca.issue_cert(WEB_NAME, OTHER_WEB_NAME).configure_cert(context)
    try:
        http, https = start_upstream("http", None, port=8080), start_upstream("https", context, port=8443)
    except OSError as exc:
        pytest.skip(f"ports 8080/8443 of {UPSTREAM_HOST} are taken: {exc}")
    yield http, https
    http.stop()
    https.stop()


def test_http_and_https_on_other_ports_are_judged_per_request(jailed, other_port_upstreams):
    http, https = other_port_upstreams
    http.reset()
    https.reset()
    policy = jailed.folder / "paths.toml"
    policy.write_text(f'[[rule]]\naction = "allow"\nhost = "{WEB_NAME}"\npath = "/allowed"\n')
    policy.chmod(0o644)
    audit, _, log_flags = jailed.logs()
    curl = "curl -s -m 10 --noproxy '*' -o /dev/null -w '%{http_code} '"
    synthetic = f"$({PYTHON} -c 'import socket; print(socket.gethostbyname(\"{{}}\"))')"
    calls = [
        f"{curl} {scheme}://{WEB_NAME}:{port}/{path}"
        for scheme, port in (("http", 8080), ("https", 8443))
        for path in ("allowed", "denied")
    ]
    # A name's synthetic address used with another name: judged by what the request carries (the Host),
    # dialled to what was judged.
    calls += [
        f"{curl} --resolve {OTHER_WEB_NAME}:8080:{synthetic.format(WEB_NAME)} http://{OTHER_WEB_NAME}:8080/allowed",
        f"{curl} --resolve {WEB_NAME}:8443:{synthetic.format(OTHER_WEB_NAME)} https://{WEB_NAME}:8443/allowed",
    ]
    ensure_test_names()
    result = jailed.run("--policy", str(policy), *log_flags, "--", "sh", "-c", "; ".join(calls))
    assert result.stdout.split() == ["200", "403", "200", "403", "403", "200"], result.stdout + result.stderr
    assert [r["path"] for r in http.requests] == ["/allowed"]
    assert [r["path"] for r in https.requests] == ["/allowed", "/allowed"]
    judged = [
        (r["scheme"], r["host"], r["port"], r["decision"])
        for r in map(json.loads, audit.read_text().splitlines())
        if "decision" in r
    ]
    assert judged == [
        ("http", WEB_NAME, 8080, "allow"),
        ("http", WEB_NAME, 8080, "deny"),
        ("https", WEB_NAME, 8443, "allow"),
        ("https", WEB_NAME, 8443, "deny"),
        ("http", OTHER_WEB_NAME, 8080, "deny"),
        ("https", WEB_NAME, 8443, "allow"),
    ]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Debian's redis-server on ECHO_NAME's address, its port."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as probe:
        probe.bind((ECHO_LOOPBACK, 0))
        port = probe.getsockname()[1]
    folder = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        ["redis-server", "--bind", ECHO_LOOPBACK, "--port", str(port), "--save", "", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(
            lambda: (
                subprocess.run(
                    ["redis-cli", "-h", ECHO_LOOPBACK, "-p", str(port), "ping"], capture_output=True, text=True
                ).stdout.strip()
                == "PONG"
            )
        )
        yield port
    finally:
        server.terminate()
        server.wait(10)


def test_redis_by_name_allowed_and_denied(jailed, redis_server):
    port = redis_server
    ensure_test_names()
    cli = f"redis-cli -h {ECHO_NAME} -p {port}"
    rule = f"r.scheme === 'tcp' && r.host === '{ECHO_NAME}' && r.port === {port}"
    allowed = jailed.run(
        "--js", rule, "--allow-private", f"{ECHO_LOOPBACK}/32", "--", "sh", "-c", f"{cli} set k jailed && {cli} get k"
    )
    assert allowed.stdout.split() == ["OK", "jailed"], allowed.stderr
    audit, _, log_flags = jailed.logs()
    denied = jailed.run(
        "--js", f"!({rule})", "--allow-private", f"{ECHO_LOOPBACK}/32", *log_flags, "--", "sh", "-c", f"{cli} get k"
    )
    assert "jailed" not in denied.stdout
    (record,) = stream_records(audit)
    assert (record["url"], record["decision"], record["end"]) == (f"tcp://{ECHO_NAME}:{port}", "deny", "denied")
