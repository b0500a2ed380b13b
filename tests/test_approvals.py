"""Ask a person: questions held until `jail ask` (or --ask-fd) answers, in the weak and strong modes.

Every test runs the real jail and a real curl against the local upstreams; the person is this test,
running `jail ask` as the same user."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from jail.model import Request
from jail.policies.js import JsEngine
from jail.policies.policy_file import PolicyEngine
from jail.policies.shell import ShellEngine
from tests.conftest import PYTHON, TEST_NAME, UPSTREAM_HOST, jail_argv, wait_for, weak_and_strong

MODES = weak_and_strong()


def jail_tool(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(jail_argv(*args), env=env, capture_output=True, text=True, timeout=30)


def questions_for(url_prefix: str, env: dict[str, str]) -> list[dict]:
    listed = jail_tool("ask", "--list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    return [question for question in json.loads(listed.stdout) if question["url"].startswith(url_prefix)]


def wait_question(url_prefix: str, env: dict[str, str], timeout: float = 20) -> dict:
    found: list[dict] = []
    assert wait_for(lambda: bool(found.extend(questions_for(url_prefix, env)) or found), timeout), "no question"
    return found[0]


def audit_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Run:
    """A jail started in the background; the test answers its questions meanwhile."""

    def __init__(self, args: list[str], env: dict[str, str], **kwargs) -> None:
        self.process = subprocess.Popen(
            jail_argv(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
        )

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        try:
            out, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
        return self.process.returncode, out, err


@pytest.fixture
def start_jail(jail_env, test_ca_file, tmp_path):
    runs: list[Run] = []

    def start(*args: str, **kwargs) -> Run:
        # In a folder of the test's: --ask makes ./jail-approved.toml there, and a killed jail leaves it.
        kwargs.setdefault("cwd", tmp_path)
        base = ["--upstream-ca", str(test_ca_file), "--allow-private", f"{UPSTREAM_HOST}/32"]
        run = Run([*base, *args], kwargs.pop("env", jail_env), **kwargs)
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.process.poll() is None:
            run.process.kill()
            run.process.communicate()


@pytest.fixture
def origin(request, http_upstream):
    """(mode flags, base URL, the upstream that serves it)."""
    mode = request.param
    if mode:
        return mode, http_upstream.url(""), http_upstream
    http, _ = request.getfixturevalue("named_upstreams")
    http.reset()
    return mode, f"http://{TEST_NAME}", http


def curl(url: str) -> str:
    return f"curl -s -o /dev/null -w '%{{http_code}}\\n' {shlex.quote(url)}"


@pytest.mark.parametrize("origin", MODES, indirect=True)
def test_held_until_allowed_for_the_run_then_not_asked_again(start_jail, origin, jail_env, tmp_path):
    mode, base, upstream = origin
    audit = tmp_path / "audit.jsonl"
    run = start_jail(
        *mode, "--ask", "--audit-log", str(audit), "--", "sh", "-c", f"{curl(base + '/a')}; {curl(base + '/b')}"
    )
    question = wait_question(base, jail_env)
    assert question["method"] == "GET" and question["url"] == base + "/a"
    assert len(question["jail_id"]) == 8 and question["id"].startswith(question["jail_id"] + "-")
    assert upstream.requests == []  # held: nothing reached the origin
    answered = jail_tool("ask", question["id"], "allow", "--for", "run", env=jail_env)
    assert answered.returncode == 0, answered.stderr
    status, out, err = run.finish()
    assert (status, out.split()) == (0, ["200", "200"]), err
    records = [r for r in audit_records(audit) if r.get("path") in ("/a", "/b")]
    assert [(r["path"], r["decision"], r.get("asked"), r.get("answered_by")) for r in records] == [
        ("/a", "allow", True, "cli"),
        ("/b", "allow", False, "cli"),
    ]
    assert records[1]["reason_code"] == "approved"
    report = jail_tool("log", str(audit), env=jail_env)
    asked = report.stdout.split("Asked a person:")[1].splitlines()
    assert any(line.split()[1:5] == ["allow", "cli", "GET", f"{base}/a"] for line in asked), report.stdout


@pytest.mark.parametrize("origin", MODES, indirect=True)
def test_denied_by_the_person_is_a_403_with_the_reason(start_jail, origin, jail_env):
    mode, base, upstream = origin
    script = f"curl -s {shlex.quote(base + '/x')}"
    run = start_jail(*mode, "--ask", "--", "sh", "-c", script)
    question = wait_question(base, jail_env)
    assert jail_tool("ask", question["id"], "deny", env=jail_env).returncode == 0
    _status, out, err = run.finish()
    assert "denied by a person (cli, once)" in out, (out, err)
    assert upstream.requests == []


@pytest.mark.parametrize("origin", MODES, indirect=True)
def test_no_answer_denies_after_the_timeout(start_jail, origin, tmp_path):
    mode, base, _upstream = origin
    audit = tmp_path / "audit.jsonl"
    script = f"s=$(date +%s.%N); curl -s {shlex.quote(base + '/t')}; echo; echo $s $(date +%s.%N)"
    run = start_jail(*mode, "--ask", "--ask-timeout", "2", "--audit-log", str(audit), "--", "sh", "-c", script)
    _status, out, err = run.finish()
    assert "nobody answered within 2 s" in out, (out, err)
    started, ended = map(float, out.split()[-2:])
    assert 1.9 <= ended - started < 3.5
    record = next(r for r in audit_records(audit) if r.get("path") == "/t")
    assert (record["decision"], record["asked"], record["answered_by"]) == ("deny", True, "timeout")


def test_always_is_saved_as_a_rule_that_check_accepts_and_a_new_run_follows(
    start_jail, run_jail, http_upstream, jail_env, tmp_path
):
    saved = tmp_path / "approved.toml"
    base = http_upstream.url("")
    run = start_jail("--weak", "--ask", "--ask-save", str(saved), "--", "sh", "-c", curl(base + "/s"))
    question = wait_question(base, jail_env)
    answered = jail_tool("ask", question["id"], "allow", "--for", "always", env=jail_env)
    assert answered.returncode == 0 and str(saved) in answered.stdout, answered
    assert run.finish()[:2] == (0, "200\n")
    text = saved.read_text()
    assert f"asked by GET {base}/s" in text and 'action = "allow"' in text and 'host = "127.0.0.2"' in text
    checked = jail_tool("policy", "check", str(saved), env=jail_env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    again = run_jail("--weak", "--policy", str(saved), "--", "sh", "-c", curl(base + "/other"))
    assert again.stdout == "200\n", again.stderr
    assert "asks" not in again.stderr


def test_the_default_save_file_is_made_protected_and_removed_when_unused(start_jail, http_upstream, jail_env, tmp_path):
    """From inside: the saved-approvals file cannot be written, truncated or replaced."""
    code = (
        "import os, sys\n"
        "for attempt in (lambda: open('jail-approved.toml', 'a').write('x'), lambda: os.truncate('jail-approved.toml', 0),"
        " lambda: os.replace('other', 'jail-approved.toml'), lambda: os.unlink('jail-approved.toml')):\n"
        "    try:\n        attempt(); print('WROTE')\n    except OSError as exc:\n        print('refused', exc.errno)\n"
    )
    (tmp_path / "other").write_text("[[rule]]\naction = 'allow'\n")
    run = start_jail("--weak", "--ask", "--", PYTHON, "-c", code, cwd=tmp_path)
    status, out, err = run.finish()
    assert status == 0 and "WROTE" not in out and out.count("refused") == 4, (out, err)
    assert not (tmp_path / "jail-approved.toml").exists()  # made for the run, never written: removed


def test_ten_concurrent_requests_make_one_question(start_jail, http_upstream, jail_env, tmp_path):
    base = http_upstream.url("")
    audit = tmp_path / "audit.jsonl"
    script = " ".join(f"{curl(base + f'/c{i}')} &" for i in range(10)) + " wait"
    run = start_jail("--weak", "--ask", "--audit-log", str(audit), "--", "sh", "-c", script)
    question = wait_question(base, jail_env)
    assert wait_for(lambda: [q["waiting"] for q in questions_for(base, jail_env)] == [10], 15)
    assert jail_tool("ask", question["id"], "allow", env=jail_env).returncode == 0
    _status, out, err = run.finish()
    assert out.split() == ["200"] * 10, err
    records = [r for r in audit_records(audit) if r.get("path", "").startswith("/c")]
    assert len(records) == 10 and all(r["asked"] and r["answered_by"] == "cli" for r in records)
    assert len(http_upstream.requests) == 10


def test_ask_fd_channel(start_jail, http_upstream, tmp_path):
    base = http_upstream.url("")
    to_jail_r, to_jail_w = os.pipe()
    from_jail_r, from_jail_w = os.pipe()
    audit = tmp_path / "audit.jsonl"
    run = start_jail(
        "--weak",
        "--ask",
        "--ask-fd",
        f"{to_jail_r},{from_jail_w}",
        "--audit-log",
        str(audit),
        "--",
        "sh",
        "-c",
        curl(base + "/fd"),
        pass_fds=(to_jail_r, from_jail_w),
    )
    os.close(to_jail_r)
    os.close(from_jail_w)
    with os.fdopen(from_jail_r) as events, os.fdopen(to_jail_w, "w") as answers:
        event = json.loads(events.readline())
        assert event["op"] == "question" and event["question"]["url"] == base + "/fd"
        answers.write("not json\n")
        answers.write(json.dumps({"op": "answer", "id": event["question"]["id"], "verdict": "allow"}) + "\n")
        answers.flush()
        replies = [json.loads(events.readline()) for _ in range(3)]
        assert replies[0]["op"] == "error"
        assert {r["op"] for r in replies[1:]} == {"answered"} and replies[1]["answered_by"] == "fd"
        assert run.finish()[:2] == (0, "200\n")
    record = next(r for r in audit_records(audit) if r.get("path") == "/fd")
    assert (record["asked"], record["answered_by"]) == (True, "fd")


ATTACK = """
import glob, json, socket, sys
paths = glob.glob('/tmp/jail.ask.*/*.sock') + glob.glob('/run/user/*/jail.ask/*.sock') + sys.argv[1:]
for path in paths:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(path)
        s.settimeout(1)
        try:
            first = s.recv(4096)  # a refused peer is told at once
        except TimeoutError:
            s.settimeout(5)
            s.sendall(b'{"op": "list"}\\n')
            first = s.recv(4096)
        print('REPLY', first.decode().strip())
    except OSError as exc:
        print('refused', path, exc.errno)
print('tried', len(paths))
"""


@pytest.mark.parametrize("mode", MODES)
def test_the_child_cannot_reach_the_question_socket(start_jail, run_jail, jail_env, tmp_path, mode):
    """seccomp refuses the socket; with --allow-unix-socket, jail refuses the peer (and records it)."""
    audit = tmp_path / "audit.jsonl"
    plain = run_jail(*mode, "--ask", "--", PYTHON, "-c", ATTACK)
    assert "REPLY" not in plain.stdout and "tried" in plain.stdout, plain.stdout + plain.stderr
    sockets = glob.glob("/tmp/jail.ask.*/*.sock") + glob.glob("/run/user/*/jail.ask/*.sock")
    # Allowing every socket the attack names: the connection is made, and jail refuses the peer.
    own = tmp_path / "own.sock"
    allowed = [a for path in (*sockets, str(own)) for a in ("--allow-unix-socket", path)]
    opened = run_jail(*mode, "--ask", "--audit-log", str(audit), *allowed, "--", PYTHON, "-c", ATTACK)
    replies = [line for line in opened.stdout.splitlines() if line.startswith("REPLY")]
    assert all('"op":"error"' in line and "refused" in line for line in replies), opened.stdout
    assert replies and '"questions"' not in opened.stdout, opened.stdout + opened.stderr
    refused = [r for r in audit_records(audit) if r.get("kind") == "ask_refused"]
    assert refused and all("process of a jailed command" in r["reason"] for r in refused), refused


def test_engines_answer_ask():
    request = Request.from_url("https://example.com/")

    async def decide(engine):
        await engine.start()
        try:
            return await engine.decide(request)
        finally:
            await engine.close()

    assert asyncio.run(decide(JsEngine("({ask: true})", 1.0))).asks
    assert asyncio.run(decide(ShellEngine("echo please; exit 2", 5.0))).asks
    assert not asyncio.run(decide(ShellEngine("exit 1", 5.0))).asks


def test_policy_action_ask_holds_the_request(start_jail, http_upstream, jail_env, tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text(f'[[rule]]\naction = "ask"\nhost = "{UPSTREAM_HOST}"\nreason = "ask me"\n')
    assert asyncio.run(PolicyEngine((policy,), 5.0).decide(Request.from_url("http://127.0.0.2/"))).asks
    base = http_upstream.url("")
    run = start_jail("--weak", "--policy", str(policy), "--", "sh", "-c", curl(base + "/p"))
    question = wait_question(base, jail_env)
    assert question["reason"] == "ask me"
    assert jail_tool("ask", question["id"], "allow", env=jail_env).returncode == 0
    assert run.finish()[:2] == (0, "200\n")


def test_a_held_request_costs_no_cpu(start_jail, http_upstream, jail_env, capsys):
    base = http_upstream.url("")
    run = start_jail("--weak", "--ask", "--", "sh", "-c", curl(base + "/cpu"))
    question = wait_question(base, jail_env)
    jail = psutil.Process(run.process.pid)
    before = jail.cpu_times()
    time.sleep(5)
    after = jail.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    jail_tool("ask", question["id"], "deny", env=jail_env)
    run.finish()
    with capsys.disabled():
        print(f"\njail's CPU while a question waited 5 s: {used * 1000:.0f} ms")
    assert used < 0.25
