"""`--proc PROG`: one long-lived rule program, JSON lines in, answers out (in order or by id)."""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from jail.model import Decision, JailError, Request
from jail.policies import Judge, RuleSpec, build_engine
from tests.conftest import wait_for

# Every helper program appends its pid to the file named by its first argument when it starts,
# so a test can count (re)starts.
PRELUDE = """
import json, os, sys, threading, time
with open(sys.argv[1], "a") as f:
    f.write(f"{os.getpid()}\\n")
def requests():
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        yield json.loads(line)
def say(text):
    sys.stdout.write(text + "\\n")
    sys.stdout.flush()
"""

IN_ORDER = """
for r in requests():
    if r["host"] == "allowed.example":
        say("true")
    elif r["host"] == "denied.example":
        say("false")
    elif r["path"] == "/hang":
        time.sleep(30)
    else:
        say("not on the list: " + r["host"])
"""

# Answers by id, from threads: `/slow?S` waits S seconds; GET allows, others deny naming the path.
BY_ID = """
lock = threading.Lock()
def answer(r):
    if r["path"].startswith("/slow"):
        time.sleep(float(r["query"] or "1"))
    if r["path"] == "/hang":
        return
    if r["path"] == "/late":
        time.sleep(0.6)
    if r["path"] == "/bad":
        result = {"id": 987654, "allow": True}
    elif r["method"] == "GET":
        result = {"id": r["id"], "allow": True}
    else:
        result = {"id": r["id"], "deny_message": r["method"] + " " + r["path"]}
    with lock:
        if r["path"] == "/binary":
            sys.stdout.buffer.write(b"\\xff\\xfe\\xfd\\n")
            sys.stdout.flush()
        else:
            say(json.dumps(result))
for r in requests():
    threading.Thread(target=answer, args=(r,), daemon=True).start()
"""

ECHO_REQUEST = """
for r in requests():
    say(json.dumps({"id": r["id"], "deny_message": json.dumps(r)}))
"""

DIES_ON_THIRD = """
count = 0
for r in requests():
    count += 1
    if count == 3:
        sys.exit(3)
    say(json.dumps({"id": r["id"], "allow": True}))
"""

EXTRA_ANSWER = """
for r in requests():
    if r["host"] == "a.example":
        say("true\\ntrue")
    else:
        say("false")
"""

STDERR_CHATTER = """
for r in requests():
    sys.stderr.write("looking at " + r["host"] + "\\n")
    sys.stderr.flush()
    say("true")
"""

STOPS_READING = """
r = next(requests())
say(json.dumps({"id": r["id"], "allow": True}))
time.sleep(30)
"""

EXITS_AT_ONCE = """
sys.exit(0)
"""

WITH_GRANDCHILD = """
import subprocess
subprocess.Popen(["sleep", sys.argv[2]])
for r in requests():
    say("true")
"""


class Program:
    """A helper rule program written to tmp_path, and the file where it records its starts."""

    def __init__(self, tmp_path: Path, body: str, *extra: str) -> None:
        name = f"rule_{uuid.uuid4().hex[:8]}"
        self.script = tmp_path / f"{name}.py"
        self.script.write_text(textwrap.dedent(PRELUDE) + textwrap.dedent(body))
        self.pid_file = tmp_path / f"{name}.pids"
        argv = [sys.executable, "-u", str(self.script), str(self.pid_file), *extra]
        self.command = shlex.join(argv)

    @property
    def pids(self) -> list[int]:
        if not self.pid_file.exists():
            return []
        return [int(line) for line in self.pid_file.read_text().split()]

    def spec(self, timeout: float | None = None) -> RuleSpec:
        return RuleSpec("proc", self.command, timeout)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def started(program: Program, timeout: float | None = None):
    """Start the engine and wait until the program runs: interpreter start-up is no part of a
    request's deadline in these tests (it can take a few hundred ms on a busy machine)."""
    engine = build_engine(program.spec(timeout))
    await engine.start()
    begin = time.monotonic()
    while not program.pids:
        assert time.monotonic() - begin < 15, "rule program did not start"
        await asyncio.sleep(0.01)
    return engine


def run_requests(program: Program, *requests: Request, timeout: float | None = None) -> list[Decision]:
    async def scenario() -> list[Decision]:
        engine = await started(program, timeout)
        try:
            judge = Judge(engine)
            return [await judge.decide(request) for request in requests]
        finally:
            await engine.close()

    return asyncio.run(asyncio.wait_for(scenario(), 30))


def url(path: str, method: str = "GET", host: str = "e.example") -> Request:
    return Request.from_url(f"https://{host}{path}", method)


# --- in-order answers ---------------------------------------------------------------------


def test_in_order_answers(tmp_path):
    program = Program(tmp_path, IN_ORDER)
    decisions = run_requests(
        program,
        url("/", host="allowed.example"),
        url("/", host="denied.example"),
        url("/", host="other.example"),
        url("/again", host="allowed.example"),
    )
    assert [(d.allow, d.reason_code) for d in decisions] == [
        (True, "rule_allow"),
        (False, "rule_deny"),
        (False, "rule_deny"),
        (True, "rule_allow"),
    ]
    assert decisions[1].reason == "denied by rule"
    assert decisions[2].reason == "not on the list: other.example"
    assert len(program.pids) == 1  # one program for every request


def test_in_order_concurrent_requests_each_get_their_answer(tmp_path):
    program = Program(tmp_path, IN_ORDER)
    hosts = ["allowed.example", "denied.example", "x.example"] * 5

    async def scenario() -> list[Decision]:
        engine = await started(program)
        try:
            judge = Judge(engine)
            return await asyncio.gather(*(judge.decide(url("/", host=host)) for host in hosts))
        finally:
            await engine.close()

    decisions = asyncio.run(asyncio.wait_for(scenario(), 30))
    for host, decision in zip(hosts, decisions, strict=True):
        if host == "allowed.example":
            assert decision.allow is True
        elif host == "denied.example":
            assert decision.reason == "denied by rule"
        else:
            assert decision.reason == "not on the list: x.example"


def test_request_line_carries_every_field_and_an_id(tmp_path):
    program = Program(tmp_path, ECHO_REQUEST)
    request = Request.build("put", "https", "API.Example.com", 8443, "/a/b", "q=1", {"X-Token": "abc"}, "10.1.2.3")
    first, second = run_requests(program, request, request)
    seen = json.loads(first.reason)
    assert isinstance(seen.pop("id"), int)
    assert seen == {
        "url": "https://api.example.com:8443/a/b?q=1",
        "method": "PUT",
        "scheme": "https",
        "host": "api.example.com",
        "port": 8443,
        "path": "/a/b",
        "query": "q=1",
        "headers": {"x-token": "abc"},
        "requester_ip": "10.1.2.3",
        "client": "",
    }
    assert json.loads(second.reason)["id"] != json.loads(first.reason)["id"]


def test_structured_answers_by_id(tmp_path):
    program = Program(
        tmp_path,
        """
        for r in requests():
            if r["path"] == "/cap":
                say(json.dumps({"id": r["id"], "allow": {"max_tx_bytes": 64}}))
            elif r["path"] == "/empty":
                say(json.dumps({"id": r["id"]}))
            else:
                say(json.dumps({"id": r["id"], "allow": True, "typo": 1}))
        """,
    )
    cap, empty, typo = run_requests(program, url("/cap"), url("/empty"), url("/typo"))
    assert (cap.allow, cap.max_tx_bytes) == (True, 64)
    assert (empty.allow, empty.reason_code) == (False, "bad_answer")
    assert (typo.allow, typo.reason_code) == (False, "bad_answer")
    assert "'typo'" in typo.reason


# --- out-of-order answers -----------------------------------------------------------------


def test_out_of_order_answers_reach_the_right_requests(tmp_path):
    program = Program(tmp_path, BY_ID)
    requests = []
    for i in range(20):
        path = f"/slow/{i}" if i % 5 == 0 else f"/fast/{i}"
        query = "1.0" if i % 5 == 0 else ""
        method = "GET" if i % 2 else "POST"
        requests.append(Request.build(method, "https", "e.example", None, path, query))

    async def scenario() -> list[tuple[Decision, float]]:
        engine = await started(program)
        judge = Judge(engine)
        begin = time.monotonic()

        async def timed(request: Request) -> tuple[Decision, float]:
            decision = await judge.decide(request)
            return decision, time.monotonic() - begin

        try:
            return await asyncio.gather(*(timed(request) for request in requests))
        finally:
            await engine.close()

    results = asyncio.run(asyncio.wait_for(scenario(), 30))
    for request, (decision, _) in zip(requests, results, strict=True):
        if request.method == "GET":
            assert decision.allow is True, (request.path, decision)
        else:
            assert decision.allow is False
            assert decision.reason == f"POST {request.path}"
    fast = [elapsed for request, (_, elapsed) in zip(requests, results, strict=True) if "/fast/" in request.path]
    slow = [elapsed for request, (_, elapsed) in zip(requests, results, strict=True) if "/slow/" in request.path]
    assert len(fast) == 16 and len(slow) == 4
    assert max(fast) < 0.7, "a slow answer held back the fast ones"
    assert min(slow) >= 0.95
    assert len(program.pids) == 1


def test_late_answer_after_timeout_is_ignored_without_restart(tmp_path):
    program = Program(tmp_path, BY_ID)

    async def scenario() -> tuple[Decision, float, Decision, Decision]:
        engine = await started(program, 0.2)
        judge = Judge(engine)
        try:
            # The first answer shows the program echoes ids; until then a timeout means a restart.
            assert (await judge.decide(url("/first"))).allow is True
            begin = time.monotonic()
            late = await judge.decide(url("/late"))
            elapsed = time.monotonic() - begin
            soon = await judge.decide(url("/ok"))
            await asyncio.sleep(0.6)  # the late answer arrives now
            after = await judge.decide(url("/ok", "POST"))
            return late, elapsed, soon, after
        finally:
            await engine.close()

    late, elapsed, soon, after = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert (late.allow, late.reason_code) == (False, "rule_timeout")
    assert "0.2 s" in late.reason
    assert elapsed < 1
    assert soon.allow is True
    assert (after.allow, after.reason) == (False, "POST /ok")
    assert len(program.pids) == 1  # a program that answers by id is not restarted for being slow


# --- timeouts -----------------------------------------------------------------------------


def test_timeout_denies_quickly_when_answering_by_id(tmp_path):
    program = Program(tmp_path, BY_ID)
    begin = time.monotonic()
    first, hang, ok = run_requests(program, url("/first"), url("/hang"), url("/ok"), timeout=0.2)
    assert first.allow is True
    assert (hang.allow, hang.reason_code) == (False, "rule_timeout")
    assert ok.allow is True
    assert time.monotonic() - begin < 3
    assert len(program.pids) == 1


def test_timeout_before_any_answer_restarts_the_program(tmp_path):
    # Until a program has echoed an id, it may be answering in order: a timeout replaces it.
    program = Program(tmp_path, BY_ID)
    # 1 s, not 0.2: the restarted interpreter must answer within the deadline on a busy machine.
    hang, ok = run_requests(program, url("/hang"), url("/ok"), timeout=1.0)
    assert (hang.allow, hang.reason_code) == (False, "rule_timeout")
    assert ok.allow is True
    assert len(program.pids) == 2


def test_in_order_timeout_restarts_the_program(tmp_path):
    program = Program(tmp_path, IN_ORDER)
    begin = time.monotonic()
    hang, after = run_requests(program, url("/hang"), url("/", host="allowed.example"), timeout=1.0)
    assert (hang.allow, hang.reason_code) == (False, "rule_timeout")
    assert time.monotonic() - begin < 8
    # A late in-order answer would be taken for the next request's, so the program is replaced.
    assert after.allow is True
    assert len(program.pids) == 2


def test_program_that_stops_reading_its_input_cannot_hang_requests(tmp_path):
    """A stuck program fills the pipe; every request must still be answered by its deadline."""
    program = Program(tmp_path, STOPS_READING)
    padded = Request.build("GET", "https", "e.example", None, "/", headers={"x-pad": "p" * 20000})

    async def scenario() -> tuple[Decision, list[Decision], float]:
        engine = await started(program, 0.3)
        judge = Judge(engine)
        try:
            first = await judge.decide(url("/"))
            begin = time.monotonic()
            rest = await asyncio.wait_for(asyncio.gather(*(judge.decide(padded) for _ in range(30))), 10)
            return first, rest, time.monotonic() - begin
        finally:
            await engine.close()

    first, rest, elapsed = asyncio.run(scenario())
    assert first.allow is True
    assert all(d.allow is False for d in rest)
    assert {d.reason_code for d in rest} <= {"rule_timeout", "rule_error"}
    assert elapsed < 2


# --- program failures ---------------------------------------------------------------------


def test_program_that_dies_is_restarted(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="jail.rule")
    program = Program(tmp_path, DIES_ON_THIRD)
    decisions = run_requests(program, *(url(f"/{i}") for i in range(1, 6)))
    assert [d.allow for d in decisions] == [True, True, False, True, True]
    assert decisions[2].reason_code == "rule_error"
    assert "exited" in decisions[2].reason
    first, second = program.pids
    assert first != second
    assert not alive(first)
    assert any("restarting" in record.getMessage() for record in caplog.records)


def test_concurrent_requests_while_the_program_dies(tmp_path):
    program = Program(tmp_path, DIES_ON_THIRD)

    async def scenario() -> tuple[list[Decision], Decision]:
        engine = await started(program)
        judge = Judge(engine)
        try:
            batch = await asyncio.gather(*(judge.decide(url(f"/{i}")) for i in range(6)))
            later = await judge.decide(url("/later"))
            return batch, later
        finally:
            await engine.close()

    batch, later = asyncio.run(asyncio.wait_for(scenario(), 30))
    # Two answered, the rest were in flight when it died: denied, never allowed by accident.
    assert sum(d.allow for d in batch) == 2
    assert all(d.reason_code == "rule_error" for d in batch if not d.allow)
    assert later.allow is True


def test_answer_for_an_unknown_id_restarts_the_program(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="jail.rule")
    program = Program(tmp_path, BY_ID)
    ok, bad, after = run_requests(program, url("/ok"), url("/bad"), url("/after"))
    assert ok.allow is True
    # The garbage answer claimed `allow`, but for an id nobody asked about: it must not leak.
    assert (bad.allow, bad.reason_code) == (False, "rule_error")
    assert "unknown id" in bad.reason
    assert after.allow is True
    assert len(program.pids) == 2
    assert any("garbage" in record.getMessage() for record in caplog.records)


def test_binary_garbage_restarts_the_program(tmp_path):
    program = Program(tmp_path, BY_ID)
    ok, garbage, after = run_requests(program, url("/ok"), url("/binary"), url("/after"))
    assert ok.allow is True
    assert (garbage.allow, garbage.reason_code) == (False, "rule_error")
    assert after.allow is True
    assert len(program.pids) == 2


def test_extra_in_order_answer_is_never_taken_for_the_next_request(tmp_path):
    program = Program(tmp_path, EXTRA_ANSWER)
    first, second, third = run_requests(
        program, url("/", host="a.example"), url("/", host="b.example"), url("/", host="b.example")
    )
    assert first.allow is True
    assert second.allow is False  # not the stray `true`
    assert third.allow is False
    assert len(program.pids) == 2


def test_program_that_exits_at_once_denies_and_is_not_restarted_in_a_tight_loop(tmp_path):
    program = Program(tmp_path, EXITS_AT_ONCE)
    begin = time.monotonic()
    decisions = run_requests(program, url("/1"), url("/2"), url("/3"))
    elapsed = time.monotonic() - begin
    assert all(d.allow is False and d.reason_code == "rule_error" for d in decisions)
    assert len(program.pids) <= 4
    assert elapsed >= 0.9  # restarts are spaced out
    assert elapsed < 10


def test_stderr_goes_to_the_log_not_the_answer(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="jail.rule")
    program = Program(tmp_path, STDERR_CHATTER)
    (decision,) = run_requests(program, url("/", host="chatty.example"))
    assert decision.allow is True
    assert "rule program: looking at chatty.example" in [r.getMessage() for r in caplog.records]


def test_answers_split_across_writes_and_batched_in_one_write(tmp_path):
    # Half an answer, a pause, the rest; then three answers (out of order) in a single write.
    program = Program(
        tmp_path,
        """
        r = next(requests())
        text = json.dumps({"id": r["id"], "allow": True})
        sys.stdout.write(text[:5]); sys.stdout.flush(); time.sleep(0.2)
        say(text[5:])
        batch = [next(requests()) for _ in range(3)]
        sys.stdout.write("".join(json.dumps({"id": b["id"], "deny_message": b["path"]}) + "\\n" for b in batch[::-1]))
        sys.stdout.flush()
        for r in requests():
            say("true")
        """,
    )

    async def scenario() -> tuple[Decision, list[Decision]]:
        engine = await started(program)
        judge = Judge(engine)
        try:
            first = await judge.decide(url("/first"))
            batch = await asyncio.gather(*(judge.decide(url(f"/{i}")) for i in range(3)))
            return first, batch
        finally:
            await engine.close()

    first, batch = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert first.allow is True
    assert [d.reason for d in batch] == ["/0", "/1", "/2"]
    assert len(program.pids) == 1


def test_answer_longer_than_the_line_limit_restarts_the_program(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="jail.rule")
    program = Program(
        tmp_path,
        """
        for r in requests():
            say("true" if r["path"] == "/ok" else "x" * (1024 * 1024 + 10))
        """,
    )
    ok, long, after = run_requests(program, url("/ok"), url("/long"), url("/ok"))
    assert ok.allow is True
    assert (long.allow, long.reason_code) == (False, "rule_error")
    assert "longer than" in long.reason
    assert after.allow is True
    assert len(program.pids) == 2


def test_last_answer_without_a_newline_still_counts(tmp_path):
    program = Program(
        tmp_path,
        """
        next(requests())
        sys.stdout.write("true")
        """,
    )
    first, second = run_requests(program, url("/1"), url("/2"))
    assert first.allow is True
    assert second.allow is True  # from the restarted program
    assert len(program.pids) == 2


def test_program_that_closes_its_input_is_replaced_without_waiting_for_a_deadline(tmp_path):
    program = Program(
        tmp_path,
        """
        for r in requests():
            say(json.dumps({"id": r["id"], "allow": True}))
            if r["path"] == "/close":
                os.close(0)
                time.sleep(30)
        """,
    )

    async def scenario() -> tuple[list[Decision], float]:
        engine = await started(program, 5.0)
        judge = Judge(engine)
        try:
            decisions = [await judge.decide(url("/close"))]
            await asyncio.sleep(0.3)
            begin = time.monotonic()
            decisions += [await judge.decide(url(f"/{i}")) for i in range(3)]
            return decisions, time.monotonic() - begin
        finally:
            await engine.close()

    decisions, elapsed = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert decisions[0].allow is True
    for decision in decisions[1:]:
        assert decision.allow or (decision.reason_code, decision.reason) == (
            "rule_error",
            "rule program closed its input",
        )
    assert decisions[-1].allow is True
    assert elapsed < 4
    assert len(program.pids) == 2


# --- start and stop -----------------------------------------------------------------------


def test_missing_program_makes_start_raise(tmp_path):
    engine = build_engine(RuleSpec("proc", str(tmp_path / "no-such-program") + " --flag"))
    with pytest.raises(JailError, match="cannot start") as caught:
        asyncio.run(engine.start())
    assert "no-such-program" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_non_executable_program_makes_start_raise(tmp_path):
    script = tmp_path / "rule.sh"
    script.write_text("#!/bin/sh\necho true\n")
    script.chmod(0o644)
    with pytest.raises(JailError, match="cannot start"):
        asyncio.run(build_engine(RuleSpec("proc", str(script))).start())


@pytest.mark.parametrize("command", ["", "   ", "prog 'unbalanced"])
def test_bad_command_line_is_refused(command):
    with pytest.raises(JailError):
        build_engine(RuleSpec("proc", command))


def test_close_leaves_no_process_behind(tmp_path):
    marker = f"{40 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 1000:03d}3"
    program = Program(tmp_path, WITH_GRANDCHILD, marker)

    def grandchildren() -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter(["cmdline", "status"]):
            if marker in (process.info["cmdline"] or ()) and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(process)
        return found

    async def scenario() -> tuple[Decision, bool]:
        engine = await started(program)
        try:
            decision = await Judge(engine).decide(url("/"))
            return decision, wait_for(lambda: bool(grandchildren()), timeout=5)
        finally:
            await engine.close()

    decision, saw_grandchild = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert decision.allow is True
    assert saw_grandchild
    (pid,) = program.pids
    assert wait_for(lambda: not alive(pid), timeout=3)
    assert wait_for(lambda: not grandchildren(), timeout=3), grandchildren()


def test_close_denies_requests_still_waiting(tmp_path):
    program = Program(tmp_path, BY_ID)

    async def scenario() -> Decision:
        engine = await started(program)
        waiting = asyncio.create_task(Judge(engine).decide(url("/hang")))
        await asyncio.sleep(0.3)
        await engine.close()
        return await asyncio.wait_for(waiting, 5)

    decision = asyncio.run(scenario())
    assert decision.allow is False
    assert decision.reason_code == "rule_error"


def test_judge_stamps_engine_name_and_time(tmp_path):
    program = Program(tmp_path, IN_ORDER)
    for decision in run_requests(program, url("/", host="allowed.example"), url("/", host="nope.example")):
        assert decision.engine == "proc"
        assert decision.rule_us > 0
