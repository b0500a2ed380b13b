"""The managed policy: a root-owned policy file asked before the user's rule. Its denials are final
(no flag, config file, --audit, --ask or --profile lifts them), in --test, a jailed run and --server;
a managed file the user could change is refused."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import subprocess
import time
from pathlib import Path

import pytest

from jail.model import Decision, JailError, Request
from jail.policies import Judge
from jail.policies.managed import DEFAULT_PATH, ManagedPolicy, find_managed_policy
from tests.conftest import UPSTREAM_HOST, free_port, jail_argv

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a managed policy is root's file: needs root to write one")

DENY_B = """default = "allow"
[[rule]]
name = "no-b"
action = "deny"
host = ["b.test", "api.openai.com"]
reason = "b.test is off limits"
"""
ONLY_UPSTREAM = f"""default = "deny"
[[rule]]
action = "allow"
host = "{UPSTREAM_HOST}"
max_tx_bytes = 10
"""
NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def managed(tmp_path: Path):
    """Write the managed policy: a root-owned 0644 file in a root-owned 0755 folder (below /tmp, root's
    sticky folder), never /etc/jail/policy.toml."""
    folder = tmp_path / "etc-jail"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)

    def write(text: str) -> Path:
        path = folder / "policy.toml"
        path.write_text(text)
        path.chmod(0o644)
        return path

    return write


@pytest.fixture
def project(tmp_path: Path, jail_env: dict[str, str]):
    """A folder to run in, with no config file of the user's around."""
    folder = tmp_path / "project"
    folder.mkdir()
    return folder, dict(jail_env, XDG_CONFIG_HOME=str(tmp_path / "xdg"))


def jail(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(jail_argv(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


# What a user may pass to widen the rule; none of it lifts a managed deny. (flags, project jail.toml)
WIDENING = {
    "js-true": (["--js", "true"], None),
    "audit": (["--js", "true", "--audit"], None),
    # A question nobody answers would hold the request for 30 s: a managed deny is never asked.
    "ask": (["--js", "true", "--ask", "--ask-timeout", "30"], None),
    "project-config": ([], 'js = "true"\naudit = true\n'),
}


@pytest.mark.parametrize("name", sorted(WIDENING))
def test_test_says_deny_whatever_the_user_passes(managed, project, name: str) -> None:
    folder, env = project
    flags, config = WIDENING[name]
    if config is not None:
        (folder / "jail.toml").write_text(config)
    path = managed(DENY_B)
    env = dict(env, JAIL_MANAGED_POLICY=str(path))
    result = jail(env, folder, *flags, "--test", "https://b.test/")
    assert result.returncode == 1, result.stderr
    assert result.stdout == f"DENY GET https://b.test/ (denied by the managed policy {path}: b.test is off limits)\n"
    # What the managed policy does not deny goes on to the user's rule.
    assert jail(env, folder, *flags, "--test", "https://a.test/").stdout == "ALLOW GET https://a.test/\n"


def test_a_named_profiles_hosts_do_not_lift_a_managed_deny(managed, project) -> None:
    folder, env = project
    env = dict(env, JAIL_MANAGED_POLICY=str(managed(DENY_B)))
    granted = jail(env, folder, "--no-config", "--js", "false", "--profile", "codex", "--test", "https://chatgpt.com/")
    assert granted.stdout == "ALLOW GET https://chatgpt.com/\n", granted.stderr  # the grant works...
    denied = jail(env, folder, "--js", "false", "--profile", "codex", "--test", "https://api.openai.com/")
    assert denied.returncode == 1 and denied.stdout.startswith(
        "DENY GET https://api.openai.com/ (denied by the managed"
    )


CURL_BOTH = 'curl -s -o /dev/null -w "%{http_code} " http://b.test/; curl -s -o /dev/null -w "%{http_code}" "$URL"'


@pytest.mark.parametrize("name", sorted(WIDENING))
def test_a_real_request_gets_403(run_jail, managed, project, http_upstream, tmp_path: Path, name: str) -> None:
    folder, env = project
    flags, config = WIDENING[name]
    if config is not None:
        (folder / "jail.toml").write_text(config)
    path = managed(DENY_B)
    env = dict(env, JAIL_MANAGED_POLICY=str(path), URL=http_upstream.url("/ok"))
    log = tmp_path / "audit.jsonl"
    started = time.monotonic()
    result = run_jail("--weak", "--audit-log", str(log), *flags, "--", "sh", "-c", CURL_BOTH, cwd=folder, env=env)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout == "403 200", result.stderr
    assert elapsed < 20, elapsed  # nobody was asked (--ask-timeout is 30 s)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    managed_records = [record for record in records if record.get("host") == "b.test"]
    assert managed_records and all(
        record["decision"] == "deny" and record["engine"] == "managed" and record["reason_code"] == "managed"
        for record in managed_records
    ), managed_records
    assert all(str(path) in record["reason"] and not record.get("asked") for record in managed_records)
    assert not any(request["host"] == "b.test" for request in http_upstream.requests)


def test_server_mode_applies_it(managed, project, http_upstream, test_ca_file) -> None:
    folder, env = project
    env = dict(env, JAIL_MANAGED_POLICY=str(managed(DENY_B)))
    port = free_port()
    argv = jail_argv(
        "--server", "--listen", f"127.0.0.1:{port}", "--allow-private", f"{UPSTREAM_HOST}/32", "--js", "true"
    )
    server = subprocess.Popen(argv, env=env, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening" in server.stdout.readline()
        proxy = f"http://127.0.0.1:{port}"
        codes = [
            subprocess.run(
                ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", proxy, url],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
            for url in ("http://b.test/", http_upstream.url("/ok"))
        ]
        assert codes == ["403", "200"]
    finally:
        server.terminate()
        server.wait(10)


def test_an_allow_list_lets_only_what_it_names_go_on_to_the_users_rule(managed, project) -> None:
    folder, env = project
    path = managed(ONLY_UPSTREAM)
    env = dict(env, JAIL_MANAGED_POLICY=str(path))
    upstream = f"http://{UPSTREAM_HOST}/"
    assert jail(env, folder, "--js", "true", "--test", upstream).stdout == f"ALLOW GET {upstream}\n"
    assert jail(env, folder, "--js", "false", "--test", upstream).stdout == f"DENY GET {upstream} (denied by rule)\n"
    other = jail(env, folder, "--js", "true", "--audit", "--test", "https://a.test/")
    assert other.returncode == 1 and other.stdout.startswith(
        f"DENY GET https://a.test/ (denied by the managed policy {path}"
    )


class Stub:
    """A user rule that answers the same for every request."""

    name = "stub"

    def __init__(self, allow: bool, max_tx_bytes: int | None = None) -> None:
        self.decision = Decision.allowed(max_tx_bytes=max_tx_bytes) if allow else Decision.denied("no")

    async def start(self) -> None:
        pass

    async def decide(self, request: Request) -> Decision:
        return self.decision

    async def close(self) -> None:
        pass


def test_the_judge_asks_it_first_and_keeps_the_lower_upload_cap(managed) -> None:
    async def decide(policy: str, engine: Stub, url: str, audit: bool = False) -> Decision:
        floor = ManagedPolicy(managed(policy))
        await floor.start()
        try:
            return await Judge(engine, audit_mode=audit, managed=floor).decide(Request.from_url(url))
        finally:
            await floor.close()

    upstream = f"http://{UPSTREAM_HOST}/"
    assert asyncio.run(decide(ONLY_UPSTREAM, Stub(True), upstream)).max_tx_bytes == 10
    assert asyncio.run(decide(ONLY_UPSTREAM, Stub(True, 4), upstream)).max_tx_bytes == 4
    denied = asyncio.run(decide(DENY_B, Stub(True), "https://b.test/x", audit=True))
    assert (denied.allow, denied.would_deny, denied.engine, denied.reason_code, denied.rule) == (
        False,
        False,
        "managed",
        "managed",
        "no-b",
    )
    # Audit mode still turns the user's own denials into would-deny: only the managed ones are final.
    assert asyncio.run(decide(DENY_B, Stub(False), "https://a.test/", audit=True)).would_deny


def test_explain_shows_it_first(managed, project) -> None:
    folder, env = project
    path = managed(DENY_B)
    lines = jail(dict(env, JAIL_MANAGED_POLICY=str(path)), folder, "--js", "true", "--explain").stdout.splitlines()
    assert lines[1].startswith(f"managed policy: {path} (root's), asked first: its denials are final")
    assert "default allow: what it does not deny goes on to the rule below" in lines[1]
    assert lines[3].startswith("  1. deny, host api.openai.com|b.test") and "name no-b" in lines[3]


# --- a managed policy the user could change is refused ----------------------------------------------


def _file_not_roots(path: Path) -> None:
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)


def _file_writable(path: Path) -> None:
    path.chmod(0o664)


def _folder_writable(path: Path) -> None:
    path.parent.chmod(0o777)


def _folder_not_roots(path: Path) -> None:
    os.chown(path.parent, NOBODY.pw_uid, NOBODY.pw_gid)


def _link_to_a_users_file(path: Path) -> None:
    users = path.parent.parent / "users"
    users.mkdir()
    os.chown(users, NOBODY.pw_uid, NOBODY.pw_gid)
    target = users / "policy.toml"
    path.rename(target)
    path.symlink_to(target)


UNSAFE = {
    "file-not-roots": (_file_not_roots, "is owned by uid"),
    "file-group-writable": (_file_writable, "policy.toml is writable by group or others (mode 664)"),
    "folder-world-writable": (_folder_writable, "etc-jail is writable by group or others (mode 777)"),
    "folder-not-roots": (_folder_not_roots, "etc-jail is owned by uid"),
    "link-to-users-file": (_link_to_a_users_file, "users is owned by uid"),
}


@pytest.mark.parametrize("name", sorted(UNSAFE))
def test_a_managed_file_the_user_could_change_is_refused(managed, project, name: str) -> None:
    folder, env = project
    path = managed(DENY_B)
    make_unsafe, message = UNSAFE[name]
    make_unsafe(path)
    result = jail(dict(env, JAIL_MANAGED_POLICY=str(path)), folder, "--js", "true", "--test", "https://a.test/")
    assert result.returncode == 125 and not result.stdout
    assert result.stderr.startswith(f"jail: error: managed policy {path}: ") and message in result.stderr
    assert result.stderr.endswith("; refusing to run\n") and result.stderr.count("\n") == 1


def test_a_missing_default_file_means_none_and_a_named_one_must_exist(tmp_path: Path) -> None:
    assert find_managed_policy({}, default=tmp_path / "policy.toml") is None
    if not DEFAULT_PATH.exists():
        assert find_managed_policy({}) is None
    with pytest.raises(JailError, match="no such file"):
        find_managed_policy({"JAIL_MANAGED_POLICY": str(tmp_path / "nope.toml")})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rule]]\naction = "deny"\nhost = "b.test"\n', 'a managed policy must set default = "allow"'),
        ('default = "ask"\n', ":1: a managed policy allows or denies; it cannot ask"),
        ('default = "allow"\n[[rule]]\naction = "ask"\n', ":2: a managed policy allows or denies; it cannot ask"),
    ],
)
def test_a_managed_policy_says_what_it_means(managed, text: str, message: str) -> None:
    with pytest.raises(JailError, match=message.replace("(", r"\(")):
        ManagedPolicy(managed(text))
