"""TCP streams judged by name: the `tcp` request every engine judges, its audit record, `jail log`."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from jail.audit import STREAM_END_CLIENT, STREAM_END_DENIED, AuditSink, Outcome
from jail.audit.report import load_audit_logs, render_markdown, render_text, summarize
from jail.model import Decision, Request
from jail.policies import HostGrant, Judge, RuleSpec, build_engine
from jail.policies.policy_file import PolicyEngine, load_policy
from tests.conftest import decide_all

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
