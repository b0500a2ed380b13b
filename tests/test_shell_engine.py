"""`--sh SCRIPT`: one shell per request; exit 0 allows, anything else denies with stdout as reason."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid

import psutil

from jail.model import Decision, Request
from jail.policies import Judge, RuleSpec, build_engine
from jail.policies.shell import MAX_OUTPUT_BYTES
from tests.conftest import decide_all, wait_for

GET = Request.from_url("https://api.example.com/v1/items?x=1")
POST = Request.from_url("https://api.example.com/v1/items", "POST")
FULL = Request.build("put", "https", "API.Example.com", 8443, "/a/b", "q=1&r=2", {"X-Token": "abc"}, "10.1.2.3")
FIELDS = ("URL", "METHOD", "SCHEME", "HOST", "PORT", "PATH", "QUERY", "REQUESTER_IP")


async def judge_all(script: str, *requests: Request, timeout: float | None = None) -> list[Decision]:
    try:
        return await decide_all(build_engine(RuleSpec("sh", script, timeout)), requests)
    finally:
        # Let the loop see the pipes of a killed script close before asyncio.run() ends.
        await asyncio.sleep(0.05)


def judge_sh(script: str, *requests: Request, timeout: float | None = None) -> list[Decision]:
    return asyncio.run(judge_all(script, *requests, timeout=timeout))


def one(script: str, request: Request = GET, timeout: float | None = None) -> Decision:
    return judge_sh(script, request, timeout=timeout)[0]


def sleepers(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = process.info["cmdline"] or ()
            if any(marker in part for part in cmdline) and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:
            continue
    return found


def unique_seconds() -> str:
    """A sleep duration no other process uses, to find leftovers by command line."""
    return f"{40 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 1000:03d}7"


# --- exit status --------------------------------------------------------------------------


def test_exit_zero_allows():
    decision = one("exit 0")
    assert decision.allow is True
    assert decision.reason_code == "rule_allow"
    assert decision.max_tx_bytes is None


def test_true_allows_and_false_denies():
    allowed, denied = judge_sh('test "$JAIL_METHOD" = GET', GET, POST)
    assert allowed.allow is True
    assert denied.allow is False


def test_non_zero_exit_denies_with_stdout_as_reason():
    decision = one("echo 'not on the allow list'; exit 1")
    assert decision.allow is False
    assert decision.reason == "not on the allow list"
    assert decision.reason_code == "rule_deny"


def test_reason_is_stripped_and_may_span_lines():
    decision = one("printf '\\n  first\\nsecond  \\n\\n'; exit 3")
    assert decision.reason == "first\nsecond"


def test_non_zero_exit_without_output_names_the_status():
    decision = one("exit 1")
    assert decision.allow is False
    assert decision.reason == "rule script exited with status 1"
    assert one("exit 7").reason == "rule script exited with status 7"


def test_stderr_is_not_the_reason():
    decision = one("echo 'diagnostic' >&2; exit 3")
    assert decision.allow is False
    assert decision.reason == "rule script exited with status 3"


def test_plain_text_on_stdout_with_exit_zero_still_allows():
    decision = one("echo checking the request; exit 0")
    assert decision.allow is True
    assert decision.max_tx_bytes is None


def test_huge_output_is_cut():
    decision = one("head -c 300000 /dev/zero | tr '\\0' x; exit 1")
    assert decision.allow is False
    assert set(decision.reason) == {"x"}
    assert len(decision.reason) == MAX_OUTPUT_BYTES


def test_script_killed_by_a_signal_denies():
    decision = one("kill -9 $$")
    assert decision.allow is False
    assert "status" in decision.reason


def test_missing_command_in_script_denies():
    decision = one("no-such-command-for-jail-tests")
    assert decision.allow is False
    assert decision.reason == "rule script exited with status 127"


# --- structured answers -------------------------------------------------------------------


def test_structured_allow_with_cap_is_honoured():
    decision = one('echo \'{"allow": {"max_tx_bytes": 10}}\'')
    assert decision.allow is True
    assert decision.max_tx_bytes == 10


def test_structured_deny_message_with_exit_zero_denies():
    decision = one('echo \'{"deny_message": "uploads are off"}\'; exit 0')
    assert decision.allow is False
    assert decision.reason == "uploads are off"


def test_structured_mistake_with_exit_zero_denies():
    decision = one("echo '{}'")
    assert decision.allow is False
    assert decision.reason_code == "bad_answer"
    assert "empty object" in decision.reason


def test_structured_answer_with_non_zero_exit_is_only_a_reason():
    # Exit status comes first: a non-zero exit never allows, whatever it printed.
    decision = one("echo '{\"allow\": true}'; exit 1")
    assert decision.allow is False


# --- environment --------------------------------------------------------------------------


def env_seen(prefix: str, request: Request) -> dict[str, str]:
    script = "; ".join(f'printf "%s=%s\\n" {name} "${prefix}{name}"' for name in FIELDS) + "; exit 1"
    decision = one(script, request)
    assert decision.allow is False
    return dict(line.split("=", 1) for line in decision.reason.splitlines())


def test_jail_variables_are_set():
    assert env_seen("JAIL_", FULL) == {
        "URL": "https://api.example.com:8443/a/b?q=1&r=2",
        "METHOD": "PUT",
        "SCHEME": "https",
        "HOST": "api.example.com",
        "PORT": "8443",
        "PATH": "/a/b",
        "QUERY": "q=1&r=2",
        "REQUESTER_IP": "10.1.2.3",
    }


def test_httpjail_variables_are_set_identically():
    assert env_seen("HTTPJAIL_", FULL) == env_seen("JAIL_", FULL)


def test_default_port_and_empty_query():
    seen = env_seen("JAIL_", Request.from_url("http://example.com/"))
    assert seen["PORT"] == "80"
    assert seen["QUERY"] == ""
    assert seen["URL"] == "http://example.com/"


def test_variables_are_set_even_when_empty():
    decision = one('[ "${JAIL_QUERY+set}" = set ] && [ "${HTTPJAIL_REQUESTER_IP+set}" = set ]')
    assert decision.allow is True


def test_request_values_are_not_interpreted_by_the_shell():
    request = Request.build("GET", "https", "example.com", None, "/$(echo pwned)", "a=`id`")
    seen = env_seen("JAIL_", request)
    assert seen["PATH"] == "/$(echo pwned)"
    assert seen["QUERY"] == "a=`id`"


def test_parent_environment_is_inherited(monkeypatch):
    monkeypatch.setenv("JAIL_TEST_SECRET_MARKER", "xyz")
    assert one('test "$JAIL_TEST_SECRET_MARKER" = xyz').allow is True


def test_rule_on_host_suffix():
    script = 'case "$JAIL_HOST" in *.example.com) exit 0;; *) echo "host $JAIL_HOST"; exit 1;; esac'
    allowed, denied = judge_sh(script, GET, Request.from_url("https://example.org/"))
    assert allowed.allow is True
    assert denied.reason == "host example.org"


# --- timeouts -----------------------------------------------------------------------------


def test_leftover_finder_sees_a_sleeper():
    seconds = unique_seconds()
    process = subprocess.Popen(["sleep", seconds])
    try:
        assert [p.pid for p in sleepers(seconds)] == [process.pid]
    finally:
        process.kill()
        process.wait()
    assert sleepers(seconds) == []


def test_slow_script_is_killed_and_leaves_nothing_behind():
    seconds = unique_seconds()
    started = time.monotonic()
    decision = one(f"sleep {seconds}; exit 0", timeout=0.3)
    elapsed = time.monotonic() - started
    assert decision.allow is False
    assert decision.reason_code == "rule_timeout"
    assert "0.3 s" in decision.reason
    assert elapsed < 2
    assert wait_for(lambda: not sleepers(seconds), timeout=3), sleepers(seconds)


def test_background_children_of_a_slow_script_are_killed_too():
    seconds = unique_seconds()
    decision = one(f"sleep {seconds} & sleep {seconds} & wait", timeout=0.3)
    assert decision.reason_code == "rule_timeout"
    assert wait_for(lambda: not sleepers(seconds), timeout=3), sleepers(seconds)


def test_script_that_keeps_stdout_open_in_a_background_child_times_out():
    # The script itself exits, but a child holds the pipe: still bounded by the timeout.
    seconds = unique_seconds()
    started = time.monotonic()
    decision = one(f"sleep {seconds} & exit 0", timeout=0.3)
    assert decision.reason_code == "rule_timeout"
    assert time.monotonic() - started < 2
    assert wait_for(lambda: not sleepers(seconds), timeout=3), sleepers(seconds)


def test_fast_script_within_the_timeout_allows():
    assert one("sleep 0.05; exit 0", timeout=2).allow is True


def test_requests_are_judged_concurrently():
    async def scenario() -> tuple[list[Decision], float]:
        engine = build_engine(RuleSpec("sh", 'sleep 0.4; test "$JAIL_METHOD" = GET'))
        await engine.start()
        judge = Judge(engine)
        started = time.monotonic()
        try:
            decisions = await asyncio.gather(*(judge.decide(GET if i % 2 else POST) for i in range(6)))
        finally:
            await engine.close()
        return decisions, time.monotonic() - started

    decisions, elapsed = asyncio.run(scenario())
    assert [d.allow for d in decisions] == [False, True] * 3
    assert elapsed < 2.0  # six 0.4 s scripts, not one after the other


def test_one_slow_request_does_not_delay_another():
    async def scenario() -> list[tuple[Decision, float]]:
        script = '[ "$JAIL_PATH" = /slow ] && sleep 1; exit 0'
        engine = build_engine(RuleSpec("sh", script))
        await engine.start()
        started = time.monotonic()

        async def timed(request: Request) -> tuple[Decision, float]:
            decision = await Judge(engine).decide(request)
            return decision, time.monotonic() - started

        try:
            return await asyncio.gather(
                timed(Request.from_url("https://e.com/slow")), timed(Request.from_url("https://e.com/fast"))
            )
        finally:
            await engine.close()

    (slow, slow_t), (fast, fast_t) = asyncio.run(scenario())
    assert slow.allow is True and fast.allow is True
    assert fast_t < 0.7 < slow_t


# --- Judge stamping -----------------------------------------------------------------------


def test_judge_stamps_engine_name_and_time():
    for decision in judge_sh("exit 0", GET) + judge_sh("exit 1", GET):
        assert decision.engine == "sh"
        assert decision.rule_us > 0


def test_default_timeout_is_five_seconds():
    engine = build_engine(RuleSpec("sh", "true"))
    assert engine.timeout == 5.0
