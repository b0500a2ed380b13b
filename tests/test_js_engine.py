"""`--js` / `--js-file`: the JavaScript engine through build_engine and Judge."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jail.model import Decision, JailError, Request
from jail.policies import Judge, RuleSpec, build_engine
from jail.policies.js import RELOAD_POLL_SECONDS
from tests.conftest import decide_all

GET = Request.from_url("https://api.example.com/v1/items?x=1")
POST = Request.from_url("https://api.example.com/v1/items", "POST")
FULL = Request.build(
    "put",
    "https",
    "API.Example.com",
    8443,
    "/a/b",
    "q=1&r=2",
    {"X-Token": "abc", "User-Agent": "curl/8"},
    "10.1.2.3",
)


async def judge_all(spec: RuleSpec, *requests: Request) -> list[Decision]:
    return await decide_all(build_engine(spec), requests)


def judge_js(code: str, *requests: Request, timeout: float | None = None) -> list[Decision]:
    return asyncio.run(judge_all(RuleSpec("js", code, timeout), *requests))


def one(code: str, request: Request = GET, timeout: float | None = None) -> Decision:
    return judge_js(code, request, timeout=timeout)[0]


# --- expressions and statements -----------------------------------------------------------


def test_expression_rule_allows_and_denies():
    allowed, denied = judge_js("r.method === 'GET'", GET, POST)
    assert allowed.allow is True
    assert allowed.reason_code == "rule_allow"
    assert denied.allow is False
    assert denied.reason_code == "rule_deny"
    assert denied.reason == "denied by rule"


def test_constant_rules():
    assert one("true").allow is True
    assert one("false").allow is False


def test_if_else_statement_rule_completion_value_is_the_answer():
    allowed, denied = judge_js("if (r.method === 'GET') true; else false", GET, POST)
    assert allowed.allow is True
    assert denied.allow is False


def test_const_declaration_then_value_statement_rule():
    code = "const ok = r.host.endsWith('.example.com'); ok"
    inside, outside = judge_js(code, GET, Request.from_url("https://example.org/"))
    assert inside.allow is True
    assert outside.allow is False


def test_multi_line_statement_rule_with_function():
    code = """
    function allowed(host) {
      return ['api.example.com', 'cdn.example.com'].includes(host);
    }
    allowed(r.host) && r.method !== 'DELETE'
    """
    decisions = judge_js(
        code,
        GET,
        Request.from_url("https://api.example.com/", "DELETE"),
        Request.from_url("https://evil.example.net/"),
    )
    assert [d.allow for d in decisions] == [True, False, False]


def test_statement_rules_keep_no_state_between_requests():
    # `const` in a statement rule must not clash on the second request.
    decisions = judge_js("const n = 1; n === 1", GET, GET, GET)
    assert [d.allow for d in decisions] == [True, True, True]


def test_statement_rule_without_a_value_denies():
    decision = one("let a = 1;")
    assert decision.allow is False
    assert decision.reason_code == "bad_answer"
    assert "nothing" in decision.reason


def test_undefined_answer_denies():
    decision = one("undefined")
    assert decision.allow is False
    assert decision.reason_code == "bad_answer"


def test_truthy_non_boolean_does_not_allow():
    # 1 is truthy in JS but not an answer: fail closed.
    decision = one("1")
    assert decision.allow is False
    assert decision.reason_code == "bad_answer"


# --- the request object -------------------------------------------------------------------


def fields_seen(request: Request) -> dict:
    """Ask the rule to report every field back through deny_message."""
    code = (
        "({deny_message: JSON.stringify({url: r.url, method: r.method, scheme: r.scheme, host: r.host,"
        " port: r.port, port_type: typeof r.port, path: r.path, query: r.query, headers: r.headers,"
        " requester_ip: r.requester_ip})})"
    )
    decision = one(code, request)
    assert decision.allow is False
    return json.loads(decision.reason)


def test_rule_sees_every_request_field():
    seen = fields_seen(FULL)
    assert seen == {
        "url": "https://api.example.com:8443/a/b?q=1&r=2",
        "method": "PUT",
        "scheme": "https",
        "host": "api.example.com",
        "port": 8443,
        "port_type": "number",
        "path": "/a/b",
        "query": "q=1&r=2",
        "headers": {"x-token": "abc", "user-agent": "curl/8"},
        "requester_ip": "10.1.2.3",
    }


def test_default_port_is_a_number_and_url_leaves_it_out():
    seen = fields_seen(Request.from_url("http://example.com/"))
    assert seen["port"] == 80
    assert seen["port_type"] == "number"
    assert seen["url"] == "http://example.com/"
    assert seen["query"] == ""


def test_port_comparison_as_number():
    allowed, denied = judge_js(
        "r.port === 443", Request.from_url("https://example.com/"), Request.from_url("https://example.com:444/")
    )
    assert allowed.allow is True
    assert denied.allow is False


def test_header_names_are_lower_case():
    allowed, denied = judge_js(
        "r.headers['x-token'] === 'abc' && r.headers['X-Token'] === undefined",
        FULL,
        Request.build("GET", "https", "example.com", None, "/", headers={"X-Token": "wrong"}),
    )
    assert allowed.allow is True
    assert denied.allow is False


def test_path_query_and_requester_ip_in_rules():
    code = "r.path.startsWith('/a/') && r.query.includes('q=1') && r.requester_ip === '10.1.2.3'"
    assert one(code, FULL).allow is True
    other = Request.build("GET", "https", "example.com", None, "/a/b", "q=1", {}, "10.9.9.9")
    assert one(code, other).allow is False


# --- object answers -----------------------------------------------------------------------


def test_deny_message_answer():
    decision = one("({deny_message: 'blocked host ' + r.host})")
    assert decision.allow is False
    assert decision.reason == "blocked host api.example.com"
    assert decision.reason_code == "rule_deny"


def test_allow_with_max_tx_bytes_answer():
    decision = one("r.method === 'GET' ? {allow: {max_tx_bytes: 1024}} : false")
    assert decision.allow is True
    assert decision.max_tx_bytes == 1024


def test_allow_object_answers():
    assert one("({allow: true})").allow is True
    assert one("({allow: false})").allow is False


def test_string_answer_is_a_deny_reason():
    decision = one("'only GET, not ' + r.method", POST)
    assert decision.allow is False
    assert decision.reason == "only GET, not POST"


def test_bad_object_answers_deny_with_the_mistake():
    empty = one("({})")
    assert (empty.allow, empty.reason_code) == (False, "bad_answer")
    assert "empty object" in empty.reason
    unknown = one("({alow: true})")
    assert (unknown.allow, unknown.reason_code) == (False, "bad_answer")
    assert "'alow'" in unknown.reason
    negative = one("({allow: {max_tx_bytes: -1}})")
    assert negative.allow is False
    fractional = one("({allow: {max_tx_bytes: 1.5}})")
    assert fractional.allow is False


def test_promise_answer_does_not_allow():
    assert one("Promise.resolve(true)").allow is False


# --- timeouts -----------------------------------------------------------------------------

LOOP_ON_SLASH_LOOP = "if (r.path === '/loop') { while (true) {} } else r.method === 'GET'"


def test_endless_loop_denies_within_the_default_timeout():
    started = time.monotonic()
    decision = one("while (true) {}")
    elapsed = time.monotonic() - started
    assert decision.allow is False
    assert decision.reason_code == "rule_timeout"
    assert "100 ms" in decision.reason
    assert elapsed < 1.0


def test_engine_keeps_answering_after_a_timeout():
    async def scenario() -> list[tuple[Decision, float]]:
        engine = build_engine(RuleSpec("js", LOOP_ON_SLASH_LOOP))
        await engine.start()
        judge = Judge(engine)
        out = []
        try:
            for request in (
                Request.from_url("https://example.com/loop"),
                Request.from_url("https://example.com/ok"),
                Request.from_url("https://example.com/ok", "POST"),
                Request.from_url("https://example.com/loop"),
                Request.from_url("https://example.com/ok"),
            ):
                started = time.monotonic()
                out.append((await judge.decide(request), time.monotonic() - started))
        finally:
            await engine.close()
        return out

    results = asyncio.run(scenario())
    assert [(d.allow, d.reason_code) for d, _ in results] == [
        (False, "rule_timeout"),
        (True, "rule_allow"),
        (False, "rule_deny"),
        (False, "rule_timeout"),
        (True, "rule_allow"),
    ]
    assert all(elapsed < 1.0 for _, elapsed in results)


# A request queued behind a looping one used to block the event loop inside mini-racer for good
# (so the loop's own timeout never fired). Such a hang cannot be interrupted in-process, so these
# scenarios run in a child Python: a regression fails after a few seconds instead of hanging.
CONCURRENT_SCENARIO = """
import asyncio, json, sys, time
from jail.model import Request
from jail.policies import Judge, RuleSpec, build_engine

LOOP = "if (r.path === '/loop') { while (true) {} } else r.method === 'GET'"

async def same_engine():
    engine = build_engine(RuleSpec("js", LOOP))
    await engine.start()
    judge = Judge(engine)
    started = time.monotonic()
    requests = [
        Request.from_url("https://example.com/loop"),
        Request.from_url("https://example.com/ok"),
        Request.from_url("https://example.com/loop"),
        Request.from_url("https://example.com/ok", "POST"),
        Request.from_url("https://example.com/ok"),
    ]
    decisions = await asyncio.gather(*(judge.decide(r) for r in requests))
    elapsed = time.monotonic() - started
    after = await judge.decide(Request.from_url("https://example.com/after"))
    await engine.close()
    return {"decisions": [[d.allow, d.reason_code] for d in decisions + [after]], "elapsed": elapsed}

async def two_engines():
    looping = build_engine(RuleSpec("js", "while (true) {}", 0.5))
    quick = build_engine(RuleSpec("js", "r.host === 'example.com'"))
    await looping.start()
    await quick.start()
    started = time.monotonic()

    async def timed(engine):
        decision = await Judge(engine).decide(Request.from_url("https://example.com/"))
        return [decision.allow, decision.reason_code, time.monotonic() - started]

    result = await asyncio.gather(timed(looping), timed(quick))
    await looping.close()
    await quick.close()
    return result

print(json.dumps(asyncio.run({"same": same_engine, "two": two_engines}[sys.argv[1]]())))
"""


def run_scenario(name: str):
    try:
        result = subprocess.run(
            [sys.executable, "-c", CONCURRENT_SCENARIO, name], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"scenario {name!r} hung: a looping rule blocked the event loop")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_concurrent_decisions_survive_a_looping_request():
    """A request that loops must not freeze the others (nor the event loop) for good."""
    result = run_scenario("same")
    assert result["decisions"] == [
        [False, "rule_timeout"],
        [True, "rule_allow"],
        [False, "rule_timeout"],
        [False, "rule_deny"],
        [True, "rule_allow"],
        [True, "rule_allow"],  # the same engine, after all that
    ]
    assert result["elapsed"] < 1.5


def test_other_engine_answers_while_one_loops():
    (slow_allow, slow_code, slow_t), (fast_allow, fast_code, fast_t) = run_scenario("two")
    assert (slow_allow, slow_code) == (False, "rule_timeout")
    assert 0.4 < slow_t < 1.5
    assert (fast_allow, fast_code) == (True, "rule_allow")
    assert fast_t < 0.3


def test_custom_timeout_is_honoured_and_reported():
    started = time.monotonic()
    decision = one("const t = Date.now(); while (Date.now() - t < 5000) {} true", timeout=0.3)
    elapsed = time.monotonic() - started
    assert decision.reason_code == "rule_timeout"
    assert "300 ms" in decision.reason
    assert 0.25 < elapsed < 1.5


def test_slow_rule_within_its_timeout_allows():
    decision = one("const t = Date.now(); while (Date.now() - t < 50) {} true", timeout=1.0)
    assert decision.allow is True


def test_non_positive_timeout_is_refused():
    with pytest.raises(JailError, match="positive"):
        build_engine(RuleSpec("js", "true", 0))


# --- errors -------------------------------------------------------------------------------


def test_thrown_exception_denies_with_rule_error():
    decision = one("throw new Error('boom')")
    assert decision.allow is False
    assert decision.reason_code == "rule_error"
    assert "boom" in decision.reason
    assert "\n" not in decision.reason


def test_type_error_denies_and_engine_goes_on():
    code = "r.path === '/bad' ? null.x : true"
    bad, good = judge_js(code, Request.from_url("https://e.com/bad"), Request.from_url("https://e.com/good"))
    assert (bad.allow, bad.reason_code) == (False, "rule_error")
    assert "TypeError" in bad.reason
    assert good.allow is True


def test_statement_rule_throwing_denies():
    decision = one("if (r.method === 'GET') { throw new RangeError('nope') } true")
    assert (decision.allow, decision.reason_code) == (False, "rule_error")
    assert "nope" in decision.reason


@pytest.mark.parametrize("code", ["x = ", "r.host ===", "if (", "}{", "const = 1", "r.method === 'GET' )"])
def test_syntax_error_at_start_raises_a_one_line_jail_error(code):
    engine = build_engine(RuleSpec("js", code))

    async def start() -> None:
        try:
            await engine.start()
        finally:
            await engine.close()

    with pytest.raises(JailError) as caught:
        asyncio.run(start())
    message = str(caught.value)
    assert message.startswith("JavaScript rule does not compile:")
    assert "\n" not in message
    assert "SyntaxError" in message


def test_reference_error_is_not_a_compile_error_but_denies():
    decision = one("undefinedVariable === 1")
    assert (decision.allow, decision.reason_code) == (False, "rule_error")
    assert "undefinedVariable" in decision.reason


# --- console ------------------------------------------------------------------------------


def test_console_log_does_not_break_the_answer(caplog):
    caplog.set_level(logging.INFO, logger="jail.rule")
    allowed, denied = judge_js("console.log('checking', r.host, {m: r.method}); r.method === 'GET'", GET, POST)
    assert allowed.allow is True
    assert denied.allow is False
    logged = [record.getMessage() for record in caplog.records if record.name == "jail.rule.js"]
    assert 'console: checking api.example.com {"m":"GET"}' in logged
    assert 'console: checking api.example.com {"m":"POST"}' in logged


def test_console_methods_in_statement_rules():
    decision = one("console.warn('w'); console.error('e'); console.info('i'); console.debug('d'); true")
    assert decision.allow is True


# --- Judge stamping -----------------------------------------------------------------------


def test_judge_stamps_engine_name_and_time():
    for decision in judge_js("true", GET) + judge_js("false", GET) + judge_js("while(true){}", GET):
        assert decision.engine == "js"
        assert decision.rule_us > 0


def test_timeout_rule_us_reflects_the_wait():
    decision = one("while(true){}")
    assert decision.rule_us >= 90_000


# --- --js-file ----------------------------------------------------------------------------


def write_rule(path: Path, code: str) -> None:
    # A fresh file (new inode) as an editor would save it, so the change is always seen.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(code)
    tmp.replace(path)


async def decide_until(judge: Judge, request: Request, want: bool, limit: float = 4.0) -> tuple[Decision, float]:
    started = time.monotonic()
    while True:
        decision = await judge.decide(request)
        if decision.allow is want or time.monotonic() - started > limit:
            return decision, time.monotonic() - started
        await asyncio.sleep(0.05)


def test_js_file_rule_is_used(tmp_path):
    rule = tmp_path / "rule.js"
    rule.write_text("// only GET\nr.method === 'GET'\n")
    allowed, denied = asyncio.run(judge_all(RuleSpec("js_file", str(rule)), GET, POST))
    assert allowed.allow is True
    assert denied.allow is False
    assert allowed.engine == "js"


def test_js_file_statement_rule(tmp_path):
    rule = tmp_path / "rule.js"
    rule.write_text("const hosts = new Set(['api.example.com']);\nif (hosts.has(r.host)) true; else false;\n")
    allowed, denied = asyncio.run(judge_all(RuleSpec("js_file", str(rule)), GET, Request.from_url("https://x.org/")))
    assert allowed.allow is True
    assert denied.allow is False


def test_js_file_missing_at_start_raises(tmp_path):
    engine = build_engine(RuleSpec("js_file", str(tmp_path / "absent.js")))
    with pytest.raises(JailError, match="cannot read --js-file"):
        asyncio.run(engine.start())


def test_js_file_with_bad_syntax_at_start_raises(tmp_path):
    rule = tmp_path / "rule.js"
    rule.write_text("r.method === \n")
    engine = build_engine(RuleSpec("js_file", str(rule)))

    async def start() -> None:
        try:
            await engine.start()
        finally:
            await engine.close()

    with pytest.raises(JailError, match="does not compile"):
        asyncio.run(start())


def test_js_file_reload_and_broken_version_keeps_previous_rule(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="jail.rule")
    rule = tmp_path / "rule.js"
    rule.write_text("r.method === 'GET'")

    async def scenario() -> None:
        engine = build_engine(RuleSpec("js_file", str(rule)))
        await engine.start()
        judge = Judge(engine)
        try:
            assert (await judge.decide(GET)).allow is True
            assert (await judge.decide(POST)).allow is False

            # A new version: now only POST is allowed.
            write_rule(rule, "// v2\nr.method === 'POST'\n")
            decision, waited = await decide_until(judge, POST, want=True)
            assert decision.allow is True, "the new version of the file was not picked up"
            assert waited < 4 * RELOAD_POLL_SECONDS + 1
            assert (await judge.decide(GET)).allow is False

            # A broken version: the previous rule (v2) stays in effect and a warning is logged.
            write_rule(rule, "r.method === 'GET' &&& (\n")
            started = time.monotonic()
            while not any(r.levelno == logging.WARNING for r in caplog.records):
                assert time.monotonic() - started < 4, "no warning about the broken --js-file"
                await asyncio.sleep(0.05)
            assert (await judge.decide(POST)).allow is True
            assert (await judge.decide(GET)).allow is False

            # Removing the file keeps the rule; a fixed version is taken again.
            rule.unlink()
            await asyncio.sleep(RELOAD_POLL_SECONDS * 1.5)
            assert (await judge.decide(POST)).allow is True
            write_rule(rule, "r.method === 'GET' || r.method === 'POST'")
            decision, _ = await decide_until(judge, GET, want=True)
            assert decision.allow is True
        finally:
            await engine.close()

    asyncio.run(scenario())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "jail.rule.js"]
    assert warnings
    text = warnings[0].getMessage()
    assert str(rule) in text
    assert "keeping the previous rule" in text
    assert "SyntaxError" in text
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.name == "jail.rule.js"]
    assert any("reloaded" in message for message in infos)


def test_js_file_reload_in_place_edit(tmp_path):
    """An in-place rewrite (same inode, different size) is picked up too."""
    rule = tmp_path / "rule.js"
    rule.write_text("false")

    async def scenario() -> tuple[Decision, Decision, float]:
        engine = build_engine(RuleSpec("js_file", str(rule)))
        await engine.start()
        judge = Judge(engine)
        try:
            before = await judge.decide(GET)
            rule.write_text("r.host === 'api.example.com'")
            after, waited = await decide_until(judge, GET, want=True)
        finally:
            await engine.close()
        return before, after, waited

    before, after, waited = asyncio.run(scenario())
    assert before.allow is False
    assert after.allow is True
    assert waited < 3


def test_close_stops_the_file_watcher(tmp_path):
    rule = tmp_path / "rule.js"
    rule.write_text("true")

    async def scenario() -> set[asyncio.Task]:
        engine = build_engine(RuleSpec("js_file", str(rule)))
        await engine.start()
        await engine.close()
        await asyncio.sleep(0)
        return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}

    assert asyncio.run(scenario()) == set()
