"""Named clients of `jail --server` (--clients FILE, --require-client): a client names itself with proxy
authentication, rules see the name (r.client, JAIL_CLIENT, policy `client`), every audit record carries
it, and the token reaches neither the log nor any upstream server."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
from pathlib import Path

import pytest

from jail.model import JailError, Request
from jail.policies import RuleSpec, build_engine
from jail.policies.js_subset import compile_rule
from jail.policies.shell import request_environment
from jail.proxy.clients import ClientAuthError, ClientTokens
from tests.conftest import UPSTREAM_HOST, wait_for
from tests.test_proxy import read_response

TOKEN_A = "tok-a-5f2c9e"
TOKEN_B = "tok-b-81d07a"


def basic(name: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{token}".encode()).decode()


@pytest.fixture
def clients_file(tmp_path: Path) -> Path:
    path = tmp_path / "clients"
    path.write_text(f"# name token\nagent-a {TOKEN_A}\n\nagent-b   {TOKEN_B}\n")
    return path


# --- the tokens file and the check ---------------------------------------------------------------


def test_tokens_identify_a_client_and_refuse_wrong_credentials(clients_file):
    tokens = ClientTokens.load(clients_file)
    assert tokens.identify(basic("agent-a", TOKEN_A)) == "agent-a"
    assert tokens.identify(basic("agent-b", TOKEN_B)) == "agent-b"
    assert tokens.identify(None) == ""  # unnamed, allowed unless required
    for wrong in (
        basic("agent-a", TOKEN_B),  # another client's token
        basic("agent-c", TOKEN_A),  # unknown name
        basic("agent-a", TOKEN_A + "x"),
        basic("agent-a", ""),
        "Basic " + base64.b64encode(b"agent-a").decode(),  # no colon
        "Basic !!notbase64",
        f"Bearer {TOKEN_A}",
    ):
        with pytest.raises(ClientAuthError):
            tokens.identify(wrong)
    with pytest.raises(ClientAuthError, match="requires a client name"):
        ClientTokens.load(clients_file, required=True).identify(None)


def test_wrong_credentials_message_never_holds_the_token(clients_file):
    with pytest.raises(ClientAuthError) as caught:
        ClientTokens.load(clients_file).identify(basic(TOKEN_A, TOKEN_B))
    assert TOKEN_A not in str(caught.value) and TOKEN_B not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("agent-a\n", r"clients:1: expected `NAME TOKEN`"),
        ("ok t1\nagent:x tok\n", r"clients:2: client name 'agent:x'"),
        ("agent-a t1\nagent-a t2\n", r"clients:2: client agent-a is named twice"),
        ("# only a comment\n", r"names no client"),
    ],
)
def test_a_broken_tokens_file_is_one_error_with_file_and_line(tmp_path, text, message):
    path = tmp_path / "clients"
    path.write_text(text)
    with pytest.raises(JailError, match=message):
        ClientTokens.load(path)


def test_client_flags_go_with_server_only(run_jail, clients_file, tmp_path):
    result = run_jail("--js", "true", "--clients", str(clients_file), "--", "true")
    assert result.returncode == 2 and "--clients only goes with --server" in result.stderr
    result = run_jail("--server", "--js", "true", "--require-client")
    assert result.returncode == 2 and "--require-client needs --clients" in result.stderr
    broken = tmp_path / "broken"
    broken.write_text("agent-a\n")
    result = run_jail("--server", "--js", "true", "--clients", str(broken))
    assert result.returncode == 125
    assert result.stderr.strip() == f"jail: error: {broken}:1: expected `NAME TOKEN` (two words), found 1"


# --- what rules see -------------------------------------------------------------------------------


def named_request(client: str) -> Request:
    return Request.build("GET", "https", "example.com", None, "/", client=client)


def test_every_rule_engine_sees_the_client(tmp_path):
    request, unnamed = named_request("agent-a"), named_request("")
    assert json.loads(request.to_json()) == request.to_dict()
    assert request.to_dict()["client"] == "agent-a"
    assert request_environment(request)["JAIL_CLIENT"] == "agent-a"
    assert request_environment(request)["HTTPJAIL_CLIENT"] == "agent-a"
    fast = compile_rule("r.client === 'agent-a'")
    assert fast is not None and fast(request.to_dict()) is True and fast(unnamed.to_dict()) is False

    policy = tmp_path / "p.toml"
    policy.write_text('default = "deny"\n[[rule]]\naction = "allow"\nclient = ["agent-a", ""]\nhost = "example.com"\n')
    rules = {
        "js (V8)": RuleSpec("js", "[r.client].join('') === 'agent-a'"),
        "sh": RuleSpec("sh", 'test "$JAIL_CLIENT" = agent-a'),
        "policy": RuleSpec("policy", "policy", files=(policy,)),
    }

    async def judge(spec: RuleSpec) -> list[bool]:
        engine = build_engine(spec)
        await engine.start()
        try:
            return [(await engine.decide(r)).allow for r in (request, named_request("agent-b"))]
        finally:
            await engine.close()

    for name, spec in rules.items():
        assert asyncio.run(judge(spec)) == [True, False], name


def test_a_policy_client_that_is_not_a_string_is_refused(tmp_path):
    from jail.policies.policy_file import load_policy

    policy = tmp_path / "p.toml"
    policy.write_text('[[rule]]\naction = "allow"\nclient = 7\n')
    with pytest.raises(JailError, match=r"p.toml:3: .*'client' must be a client name"):
        load_policy([policy])


# --- through one jail --server --------------------------------------------------------------------


def curl(server, url: str, user: str | None = None) -> tuple[int, int, str]:
    """(status, the CONNECT's status or 0, body) of a GET through the server as `user` (NAME:TOKEN)."""
    proxy = f"http://{user}@127.0.0.1:{server.port}" if user else server.proxy_url
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            str(server.bundle),
            "-x",
            proxy,
            "-w",
            "\n%{http_code} %{http_connect}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    body, _, codes = result.stdout.rpartition("\n")
    status, connect = codes.split()
    return int(status), int(connect), body


def audit_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def never_leaked(log: Path, *upstreams) -> None:
    """No token in the audit log; no proxy credentials at any upstream server."""
    text = log.read_text()
    assert TOKEN_A not in text and TOKEN_B not in text
    assert base64.b64encode(f"agent-a:{TOKEN_A}".encode()).decode() not in text
    for upstream in upstreams:
        for seen in upstream.requests:
            assert "proxy-authorization" not in seen["headers"], seen
            assert TOKEN_A not in json.dumps(seen) and TOKEN_B not in json.dumps(seen)


def test_two_named_clients_through_one_server(jail_server, clients_file, http_upstream, https_upstream, tmp_path):
    log = tmp_path / "audit.jsonl"
    server = jail_server(
        "--js", "r.client === 'agent-a'", "--clients", str(clients_file), "--audit-log", str(log), "--log-header-values"
    )
    a, b = f"agent-a:{TOKEN_A}", f"agent-b:{TOKEN_B}"
    assert curl(server, http_upstream.url("/a"), a)[0] == 200
    assert curl(server, https_upstream.url("/a"), a)[:2] == (200, 200)
    status, _, body = curl(server, http_upstream.url("/b"), b)
    assert status == 403 and "jail: blocked" in body
    assert curl(server, https_upstream.url("/b"), b)[0] == 403
    assert curl(server, http_upstream.url("/none"))[0] == 403  # unnamed: client "", not agent-a
    assert [r["path"] for r in http_upstream.requests + https_upstream.requests] == ["/a", "/a"]

    assert wait_for(lambda: len(audit_records(log)) == 5)
    seen = {(r["scheme"], r["path"], r["client"], r["decision"]) for r in audit_records(log)}
    assert seen == {
        ("http", "/a", "agent-a", "allow"),
        ("https", "/a", "agent-a", "allow"),
        ("http", "/b", "agent-b", "deny"),
        ("https", "/b", "agent-b", "deny"),
        ("http", "/none", "", "deny"),
    }
    for record in audit_records(log):
        assert "proxy-authorization" not in record["headers"]
    never_leaked(log, http_upstream, https_upstream)


def test_require_client_answers_407_to_unnamed_and_wrong_tokens(
    jail_server, clients_file, http_upstream, https_upstream, tmp_path
):
    log = tmp_path / "audit.jsonl"
    server = jail_server("--js", "true", "--clients", str(clients_file), "--require-client", "--audit-log", str(log))
    for user in (None, f"agent-a:{TOKEN_B}", f"nobody:{TOKEN_A}"):
        assert curl(server, http_upstream.url("/x"), user)[0] == 407, user
        assert curl(server, https_upstream.url("/x"), user)[1] == 407, user  # refused at CONNECT
    assert curl(server, https_upstream.url("/ok"), f"agent-b:{TOKEN_B}")[0] == 200
    assert [r["path"] for r in http_upstream.requests + https_upstream.requests] == ["/ok"]

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET {http_upstream.url('/raw')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status, headers, _ = read_response(sock)
    assert status == 407 and headers["proxy-authenticate"] == 'Basic realm="jail"'

    assert wait_for(lambda: len(audit_records(log)) == 8)
    refused = [r for r in audit_records(log) if r["decision"] == "deny"]
    assert len(refused) == 7
    assert {(r["reason_code"], r["status"], r["client"]) for r in refused} == {("client_auth", 407, "")}
    assert {r["method"] for r in refused} == {"GET", "CONNECT"}
    never_leaked(log, http_upstream, https_upstream)


def test_without_require_client_unnamed_passes_and_a_wrong_token_does_not(
    jail_server, clients_file, http_upstream, https_upstream, tmp_path
):
    log = tmp_path / "audit.jsonl"
    server = jail_server("--js", "true", "--clients", str(clients_file), "--audit-log", str(log))
    assert curl(server, https_upstream.url("/anon"))[0] == 200
    assert curl(server, http_upstream.url("/wrong"), f"agent-a:{TOKEN_B}")[0] == 407
    assert curl(server, https_upstream.url("/wrong"), f"agent-a:{TOKEN_B}")[1] == 407
    assert wait_for(lambda: len(audit_records(log)) == 3)
    seen = sorted((r["scheme"], r["path"], r["client"], r["status"], r["reason_code"]) for r in audit_records(log))
    assert seen == [
        ("http", "/wrong", "", 407, "client_auth"),
        ("https", "/", "", 407, "client_auth"),  # the CONNECT: its tunnel never opened
        ("https", "/anon", "", 200, "rule_allow"),
    ]
    never_leaked(log, http_upstream, https_upstream)


def test_a_request_inside_a_tunnel_cannot_rename_it(jail_server, clients_file, https_upstream, tmp_path):
    """The tunnel is agent-b's (its CONNECT said so): credentials sent inside it name nobody, and are
    not forwarded."""
    import ssl

    log = tmp_path / "audit.jsonl"
    server = jail_server("--js", "r.client === 'agent-a'", "--clients", str(clients_file), "--audit-log", str(log))
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    target = f"{UPSTREAM_HOST}:{https_upstream.port}"
    raw.sendall(
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {basic('agent-b', TOKEN_B)}\r\n\r\n".encode()
    )
    assert raw.recv(4096).startswith(b"HTTP/1.1 200")
    context = ssl.create_default_context(cafile=str(server.bundle))
    context.check_hostname = False
    with context.wrap_socket(raw, server_hostname=UPSTREAM_HOST) as sock:
        sock.sendall(
            f"GET /inner HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {basic('agent-a', TOKEN_A)}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        status, _, _ = read_response(sock)
    assert status == 403
    assert https_upstream.requests == []
    assert wait_for(lambda: len(audit_records(log)) == 1)
    assert audit_records(log)[0]["client"] == "agent-b"
    never_leaked(log)


def test_proxy_credentials_never_reach_upstream_without_clients(jail_server, http_upstream, tmp_path):
    """Without --clients nobody is named, and credentials a client sends anyway are dropped, not forwarded."""
    log = tmp_path / "audit.jsonl"
    server = jail_server("--js", "true", "--audit-log", str(log), "--log-header-values")
    assert curl(server, http_upstream.url("/x"), f"agent-a:{TOKEN_A}")[0] == 200
    assert wait_for(lambda: len(audit_records(log)) == 1)
    assert audit_records(log)[0]["client"] == ""
    never_leaked(log, http_upstream)


def test_explain_names_the_clients_and_never_a_token(run_jail, clients_file):
    result = run_jail("--server", "--js", "true", "--clients", str(clients_file), "--require-client", "--explain")
    assert result.returncode == 0, result.stderr
    assert "named clients (--clients): agent-a, agent-b" in result.stdout
    assert "get 407 (--require-client)" in result.stdout
    assert TOKEN_A not in result.stdout and TOKEN_B not in result.stdout
