"""The real `jail` command in weak mode, with curl and Python as the jailed programs."""

from __future__ import annotations

import json
import shutil
import ssl
import sys

import pytest

from tests.conftest import UPSTREAM_HOST, start_upstream

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


# Upstreams of this module's own: the session-wide ones have served hundreds of connections by now,
# and a fresh server keeps these end-to-end checks independent of what ran before.
@pytest.fixture(scope="module")
def http_upstream():
    upstream = start_upstream("http", None)
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def https_upstream(test_ca):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    test_ca.issue_cert(UPSTREAM_HOST, "localhost").configure_cert(context)
    upstream = start_upstream("https", context)
    yield upstream
    upstream.stop()


CURL = ["curl", "-sS", "--max-time", "20", "--suppress-connect-headers"]
ENGINES = {
    "js": ("--js", "r.host === '127.0.0.2' && r.path.startsWith('/ok')"),
    "sh": ("--sh", 'case "$JAIL_PATH" in /ok*) exit 0;; *) echo "path not allowed"; exit 1;; esac'),
    "proc": (
        "--proc",
        f"{sys.executable} -u -c \"import sys,json\nfor l in sys.stdin:\n r=json.loads(l); print('true' if r['path'].startswith('/ok') else 'path not allowed', flush=True)\"",
    ),
}


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_each_engine_allows_and_denies(engine, scheme, weak_jail, http_upstream, https_upstream):
    upstream = http_upstream if scheme == "http" else https_upstream
    flag, rule = ENGINES[engine]
    allowed = weak_jail(flag, rule, "--", *CURL, upstream.url("/ok/1"))
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["path"] == "/ok/1"
    connections_after_allow = len(upstream.connections)

    denied = weak_jail(flag, rule, "--", *CURL, "-i", upstream.url("/secret"))
    assert denied.returncode == 0, denied.stderr
    assert " 403 " in denied.stdout.splitlines()[0]
    assert "x-jail-decision: denied" in denied.stdout.lower()
    assert f"blocked GET {upstream.url('/secret')}" in denied.stdout
    assert len(upstream.connections) == connections_after_allow, "a denied request reached upstream"


def test_method_and_path_rules_over_https(weak_jail, https_upstream):
    rule = f"r.method === 'GET' && r.path === '/read' && r.port === {https_upstream.port} && r.scheme === 'https'"
    ok = weak_jail("--js", rule, "--", *CURL, https_upstream.url("/read"))
    assert ok.returncode == 0 and json.loads(ok.stdout)["method"] == "GET"
    post = weak_jail(
        "--js", rule, "--", *CURL, "-o", "/dev/null", "-w", "%{http_code}", "-d", "x", https_upstream.url("/read")
    )
    assert post.stdout == "403"
    other = weak_jail("--js", rule, "--", *CURL, "-o", "/dev/null", "-w", "%{http_code}", https_upstream.url("/write"))
    assert other.stdout == "403"
    assert [r["path"] for r in https_upstream.requests] == ["/read"]


def test_no_rule_denies_everything_and_never_dials(weak_jail, https_upstream):
    result = weak_jail("--", *CURL, "-i", https_upstream.url("/"))
    assert " 403 " in result.stdout.splitlines()[0]
    assert "no rule given" in result.stdout
    assert https_upstream.connections == []


def test_empty_object_answer_denies_with_reason(weak_jail, http_upstream):
    result = weak_jail("--js", "({})", "--", *CURL, http_upstream.url("/"))
    assert "empty object" in result.stdout
    assert http_upstream.connections == []


def test_child_exit_code_is_jails(weak_jail):
    assert weak_jail("--js", "true", "--", "sh", "-c", "exit 7").returncode == 7
    assert weak_jail("--js", "true", "--", "sh", "-c", "kill -TERM $$").returncode == 128 + 15


def test_missing_command_is_127(weak_jail):
    result = weak_jail("--js", "true", "--", "no-such-command-xyz")
    assert result.returncode == 127
    assert result.stderr.strip() == "jail: command not found: no-such-command-xyz"


def test_jail_prints_nothing_of_its_own(weak_jail, http_upstream):
    result = weak_jail("--js", "true", "--", *CURL, "-o", "/dev/null", http_upstream.url("/"))
    assert result.returncode == 0
    assert result.stderr == ""


def test_child_environment_points_at_proxy_and_bundle(weak_jail, ca_dir, jail_env):
    script = "import os,json;print(json.dumps({k: os.environ.get(k) for k in ['HTTPS_PROXY','https_proxy','ALL_PROXY','NO_PROXY','SSL_CERT_FILE','NODE_EXTRA_CA_CERTS','PIP_CERT','JAIL_ID']}))"
    result = weak_jail(
        "--js", "true", "--", sys.executable, "-c", script, env={**jail_env, "NO_PROXY": "internal.example"}
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["HTTPS_PROXY"] == seen["https_proxy"] == seen["ALL_PROXY"]
    assert seen["HTTPS_PROXY"].startswith("http://127.0.0.1:")
    # The caller's NO_PROXY would let its hosts go around jail: the child gets loopback only.
    assert seen["NO_PROXY"] == "localhost,127.0.0.1,::1"
    bundle = ca_dir / "trust" / "ca-bundle.pem"
    assert seen["SSL_CERT_FILE"] == seen["PIP_CERT"] == str(bundle)
    text = bundle.read_text()
    assert text.count("BEGIN CERTIFICATE") > 1, "the bundle must hold the system CAs as well as jail's"
    assert (ca_dir / "mitmproxy-ca-cert.pem").read_text().strip() in text
    assert oct((ca_dir / "mitmproxy-ca.pem").stat().st_mode & 0o777) == "0o600"


def test_example_line_processor(weak_jail, http_upstream):
    program = f"{sys.executable} examples/allow_hosts.py 127.0.0.2"
    ok = weak_jail("--proc", program, "--", *CURL, http_upstream.url("/a"))
    assert json.loads(ok.stdout)["path"] == "/a"
    denied = weak_jail(
        "--proc", f"{sys.executable} examples/allow_hosts.py other.example", "--", *CURL, http_upstream.url("/a")
    )
    assert "127.0.0.2 is not on the allow list" in denied.stdout
