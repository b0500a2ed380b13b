"""Policy files through the real command: `jail policy check`, `--test`, and a run through the proxy."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.conftest import UPSTREAM_HOST, jail_argv

POLICIES = Path(__file__).resolve().parent.parent / "policies"
SHIPPED = sorted(POLICIES.glob("*.toml"))
CURL = ["curl", "-sS", "--max-time", "20"]

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def jail(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(jail_argv(*args), env=env, capture_output=True, text=True, timeout=60)


def write(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def test_policies_ship():
    assert {p.name for p in SHIPPED} >= {"model-apis.toml", "github-readonly.toml", "registries.toml", "ci.toml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_shipped_policy_passes_its_own_check(path, jail_env):
    result = jail(jail_env, "policy", "check", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == path.read_text().count("[[expect]]") >= 6
    assert all(line.startswith("ok   ") for line in lines), result.stdout
    assert any(line.endswith(")") and " -> allow (rule " in line for line in lines)
    assert any(" -> deny (rule " in line for line in lines)
    assert result.stderr == ""


def test_all_shipped_policies_compose(jail_env):
    result = jail(jail_env, "policy", "check", *map(str, SHIPPED))
    assert result.returncode == 0, result.stdout + result.stderr


def test_wrong_expectation_fails_with_exit_1(tmp_path, jail_env):
    path = write(
        tmp_path,
        """
        [[rule]]
        name = "reads"
        action = "allow"
        host = "api.example"
        methods = ["GET"]

        [[expect]]
        request = "https://api.example/x"
        decision = "allow"

        [[expect]]
        request = "POST https://api.example/x"
        decision = "allow"
        """,
    )
    result = jail(jail_env, "policy", "check", str(path))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "ok   GET https://api.example/x -> allow (rule reads)",
        f"FAIL {path}:11: POST https://api.example/x: expected allow, got deny "
        f"(rule default: no policy rule matched (policy files: {path}))",
    ]


def test_check_composes_files_in_order(tmp_path, jail_env):
    base = write(tmp_path, '[[expect]]\nrequest = "https://a.example/"\ndecision = "allow"\n', "base.toml")
    extra = write(tmp_path, '[[rule]]\nname = "a"\naction = "allow"\nhost = "a.example"\n', "extra.toml")
    assert jail(jail_env, "policy", "check", str(base)).returncode == 1
    result = jail(jail_env, "policy", "check", str(base), str(extra))
    assert result.returncode == 0, result.stdout
    assert result.stdout == "ok   GET https://a.example/ -> allow (rule a)\n"


def test_check_runs_hooks(tmp_path, jail_env):
    path = write(
        tmp_path,
        """
        [hooks]
        js = "r.host === 'hook.example'"
        [[expect]]
        request = "https://hook.example/"
        decision = "allow"
        [[expect]]
        request = "https://other.example/"
        decision = "deny"
        """,
    )
    result = jail(jail_env, "policy", "check", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == f"ok   GET https://hook.example/ -> allow (rule {path}:2)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rule]]\naction = "allow"\n\nhostt = "x"\n', "{path}:4: rule 1: unknown key 'hostt' (known: "),
        ('[[rule]]\naction = "allow"\nhost = \n', "{path}:3: invalid TOML: "),
        ('[hooks]\njs = "(("\n', "{path}:2: hooks: JavaScript rule does not compile"),
    ],
)
def test_broken_file_exits_2_with_one_line(tmp_path, jail_env, text, message):
    path = write(tmp_path, text)
    good = POLICIES / "registries.toml"
    result = jail(jail_env, "policy", "check", str(good), str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("jail: error: " + message.format(path=path))


def test_missing_file_exits_2(tmp_path, jail_env):
    result = jail(jail_env, "policy", "check", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert (
        result.stderr == f"jail: error: {tmp_path / 'nope.toml'}: cannot read policy file: No such file or directory\n"
    )


def test_test_flag_with_a_policy(jail_env):
    policy = str(POLICIES / "github-readonly.toml")
    allow = jail(jail_env, "--policy", policy, "--test", "GET", "https://api.github.com/repos/o/r")
    assert (allow.returncode, allow.stdout) == (0, "ALLOW GET https://api.github.com/repos/o/r\n")
    deny = jail(jail_env, "--policy", policy, "--test", "POST", "https://github.com/o/r.git/git-receive-pack")
    assert deny.returncode == 1
    assert deny.stdout == (
        "DENY POST https://github.com/o/r.git/git-receive-pack "
        "(git push is not allowed: GitHub is read-only in this jail)\n"
    )
    default = jail(jail_env, "--policy", policy, "--test", "https://example.com/")
    assert default.returncode == 1 and "no policy rule matched" in default.stdout and policy in default.stdout


def test_repeated_policy_flags_compose(tmp_path, jail_env):
    extra = write(tmp_path, '[[rule]]\naction = "allow"\nhost = "example.com"\n')
    policy = str(POLICIES / "registries.toml")
    assert jail(jail_env, "--policy", policy, "--test", "https://example.com/").returncode == 1
    result = jail(jail_env, "--policy", policy, "--policy", str(extra), "--test", "https://example.com/")
    assert (result.returncode, result.stdout) == (0, "ALLOW GET https://example.com/\n")


def test_broken_policy_stops_the_jail(tmp_path, jail_env):
    path = write(tmp_path, '[[rule]]\naction = "allow"\nport = "80"\n')
    result = jail(jail_env, "--policy", str(path), "--", "true")
    assert result.returncode == 125
    assert (
        result.stderr
        == f"jail: error: {path}:3: rule 1: 'port' must be a port number (1-65535) or a list of them, not \"80\"\n"
    )


# --- through the real proxy ---


def audit_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_curl
def test_policy_allows_and_denies_through_the_proxy(tmp_path, run_jail, http_upstream):
    policy = write(
        tmp_path,
        f"""
        [[rule]]
        name = "local-ok"
        action = "allow"
        host = "{UPSTREAM_HOST}"
        path = "/ok"

        [[rule]]
        action = "deny"
        host = "{UPSTREAM_HOST}"
        path = "/no"
        reason = "not this one, agent"
        """,
    )
    log = tmp_path / "audit.jsonl"
    ok = run_jail("--policy", str(policy), "--audit-log", str(log), "--", *CURL, http_upstream.url("/ok"))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["path"] == "/ok"
    no = run_jail("--policy", str(policy), "--audit-log", str(log), "--", *CURL, "-i", http_upstream.url("/no"))
    assert no.returncode == 0, no.stderr
    assert " 403 " in no.stdout.splitlines()[0]
    assert "reason: not this one, agent" in no.stdout
    assert [r["path"] for r in http_upstream.requests] == ["/ok"]
    allowed, denied = audit_records(log)
    assert (allowed["decision"], allowed["rule"], allowed["engine"], allowed["status"]) == (
        "allow",
        "local-ok",
        "policy",
        200,
    )
    assert (denied["decision"], denied["rule"], denied["reason"], denied["status"]) == (
        "deny",
        f"{policy}:7",
        "not this one, agent",
        403,
    )


@needs_curl
def test_audit_mode_lets_denied_requests_through(tmp_path, run_jail, http_upstream):
    policy = write(tmp_path, 'default = "deny"\n[[rule]]\naction = "allow"\nhost = "elsewhere.example"\n')
    log = tmp_path / "audit.jsonl"
    curl = [*CURL, "-o", "/dev/null", "-w", "%{http_code}", http_upstream.url("/x")]
    audited = run_jail("--policy", str(policy), "--audit", "--audit-log", str(log), "--", *curl)
    assert (audited.returncode, audited.stdout) == (0, "200"), audited.stderr
    (record,) = audit_records(log)
    assert (record["decision"], record["rule"], record["status"]) == ("would_deny", "default", 200)
    assert "no policy rule matched" in record["reason"]

    failing = run_jail("--policy", str(policy), "--audit", "--fail-on-deny", "--", *curl)
    assert (failing.returncode, failing.stdout) == (1, "200"), failing.stderr
    assert len(http_upstream.requests) == 2
