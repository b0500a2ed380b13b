"""`jail --explain`: what a jail would allow and restrict, said without starting anything."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

POLICY = """\
default = "allow"

[[rule]]
name = "pypi-read"
action = "allow"
host = ["pypi.org", "*.pythonhosted.org"]
port = 443
scheme = "https"
methods = ["GET", "HEAD"]
path = "/simple/"
max_tx_bytes = 0

[[rule]]
action = "deny"
host = "github.com"
methods = "POST"
path = "**/git-receive-pack"
reason = "no pushes"

[hooks]
sh = "test \\"$JAIL_METHOD\\" = GET"
"""


def netns_list() -> str | None:
    if shutil.which("ip") is None:
        return None
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return result.stdout if result.returncode == 0 else None


def explain(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `jail --explain ARGS`, checking it is fast and leaves no network namespace behind."""
    before = netns_list()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "jail", "--explain", *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert time.monotonic() - started < 5, "--explain must not start anything"
    after = netns_list()
    if before is not None and after is not None:
        # Jails of other processes may come and go meanwhile; none may be left by this one.
        from jail.platform.netns import _jail_alive

        new = {line.split()[0] for line in after.splitlines()} - {line.split()[0] for line in before.splitlines()}
        assert all(_jail_alive(name.removeprefix("jail-")) for name in new), new
    return result


def ok(*args: str) -> str:
    result = explain(*args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "filesystem (Landlock)" in result.stdout and "unix sockets: none may be opened" in result.stdout
    return result.stdout


def test_js_rule_with_a_command() -> None:
    out = ok("--js", "r.host === 'pypi.org'", "--rule-timeout", "0.5", "--", "curl", "-s", "https://pypi.org/")
    assert "engine: JavaScript (--js)" in out
    assert "code: r.host === 'pypi.org'" in out
    assert "rule timeout: 0.5 s (--rule-timeout)" in out
    assert "command: would run curl -s https://pypi.org/" in out
    assert "no rule" not in out
    assert "mode: " in out


def test_policy_file_lists_rules_in_order_default_and_hooks(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(POLICY)
    log = tmp_path / "a.jsonl"
    out = ok("--policy", str(policy), "--audit", "--fail-on-deny", "--audit-log", str(log), "--", "make", "test")
    lines = out.splitlines()
    first = next(index for index, line in enumerate(lines) if "1. allow" in line)
    assert "2. deny" in lines[first + 1]
    rule1, rule2 = lines[first], lines[first + 1]
    for part in (
        "host pypi.org|*.pythonhosted.org",
        "port 443",
        "scheme https",
        "methods GET|HEAD",
        "path /simple/",
        "max_tx_bytes 0",
        "name pypi-read",
    ):
        assert part in rule1, part
    for part in ("host github.com", "any port", "any scheme", "methods POST", "path **/git-receive-pack"):
        assert part in rule2, part
    assert f"name {policy}:" in rule2 and "reason 'no pushes'" in rule2
    assert f"default: allow (set at {policy}:1)" in out
    assert "hooks: sh" in out
    assert f"engine: policy files (--policy) {policy}" in out
    assert "audit mode (--audit)" in out and "would-deny" in out
    assert "fail on deny (--fail-on-deny)" in out
    assert f"audit log: {log}" in out
    assert not log.exists()


def test_no_rule_denies_everything() -> None:
    out = ok("--", "true")
    assert "no rule: everything is denied" in out
    assert "command: would run true" in out


def test_weak_flag_says_weak() -> None:
    out = ok("--weak", "--sh", "exit 0")
    assert "mode: weak, because of --weak" in out
    assert "engine: shell script (--sh)" in out
    assert "script: exit 0" in out
    assert "command: none given" in out


def test_mode_without_weak_is_the_one_a_run_would_choose() -> None:
    from jail.platform import choose_mode

    out = ok("--proc", "python3 examples/allow_hosts.py pypi.org")
    mode, _ = choose_mode(weak=False)
    expected = {"strong": "mode: strong: own network namespace", "rootless": "mode: rootless:"}.get(mode)
    assert f"mode: {mode}" in out and (expected is None or expected in out)
    assert "program: python3 examples/allow_hosts.py pypi.org" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rule]]\naction = "allow"\nhostt = "x"\n', "rule 1: unknown key 'hostt'"),
        ("default = \n", "invalid TOML"),
    ],
)
def test_a_broken_policy_file_is_one_line_on_stderr(tmp_path: Path, text: str, message: str) -> None:
    policy = tmp_path / "bad.toml"
    policy.write_text(text)
    result = explain("--policy", str(policy), "--", "true")
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"jail: error: {policy}:") and message in lines[0]


def test_mode_names_the_rootless_jail_for_a_user_without_root(monkeypatch) -> None:
    from jail.explain import _mode
    from jail.platform import rootless
    from jail.session import JailConfig

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setattr(rootless, "rootless_unavailable", lambda: None)
    assert _mode(JailConfig()).startswith("rootless: own user and network namespace")
    monkeypatch.setattr(rootless, "rootless_unavailable", lambda: "unprivileged user namespaces are disabled")
    assert _mode(JailConfig()).startswith("none, so a real run would fail: cannot isolate the command")
    assert _mode(JailConfig(allow_weak=True)).startswith("weak (unprivileged user namespaces are disabled)")


def test_a_server_says_its_address_and_workers_and_that_it_confines_nothing() -> None:
    result = explain("--server", "--listen", "127.0.0.1:9099", "--workers", "2", "--js", "true")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "would run only the proxy (--server) on 127.0.0.1:9099, in 2 processes sharing it (--workers)" in out
    assert "mode: none (--server): nothing is confined" in out
    assert "private ranges too" not in out  # a server's guard refuses what a weak jail's refuses
    assert "filesystem (Landlock)" not in out


def test_a_server_flag_without_server_is_refused_before_explaining() -> None:
    result = explain("--workers", "2", "--js", "true", "--", "true")
    assert result.returncode != 0 and "--workers only goes with --server" in result.stderr
