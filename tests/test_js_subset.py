"""js_subset: the Python fast path of `--js` rules must give exactly what V8 gives, or step aside."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import pytest
from py_mini_racer import JSEvalException, MiniRacer

from jail.model import Decision, Request
from jail.policies import Judge, RuleSpec, build_engine, js_subset
from jail.policies.js import CALL_TEMPLATE, PRELUDE, RELOAD_POLL_SECONDS, JsEngine
from jail.policies.js_subset import UNDEFINED, Fallback, compile_rule
from tests.conftest import decide_all

# --- the parser ---------------------------------------------------------------------------

ACCEPTED = [
    "true",
    "r.method === 'GET'",
    "r.host === 'a' || r.path.startsWith('/x') && r.method !== 'POST'",
    "r.host.endsWith('.github.com') && !r.host.startsWith('evil')",
    "['GET','HEAD'].includes(r.method)",
    "[] .includes(r.method)",
    "r.port > 1000",
    "''.length",
    "!!r.query",
    "r.query || 'none'",
    "r.headers['x-a'] === undefined",
    "r.headers.host == null",
    "r['host'] === \"a\"",
    "typeof r.headers['x-a'] === 'string'",
    "(r.headers['user-agent'] || '').toLowerCase().startsWith('curl/')",
    "r.method === 'GET' ? true : 'only GET, not ' + r.method",
    "r.port + 1 >= 444",
    "0 || 1.5 || 1e3 || 0.25e-2",
    "'a\\'b\\\\c\\n\\t\\r\"'",
    "/* a */ r.host // b\n === 'x' /* c */ ; // d",
    "r.method === 'GET';",
    "\n\tr.method\r\n===\n'GET'\n",
]

REJECTED = [
    # not JavaScript at all
    "",
    "// only a comment",
    "/* unterminated",
    "'unterminated",
    "'line\nbreak'",
    "'continued \\\n line'",
    "r.host ===",
    "(r.host",
    "r.host)",
    "r.host === 'a' r.port",
    "true false",
    "r.host === 'a' ;;",
    "01",
    "5.",
    "1n",
    "1_000",
    "0x10",
    ".5",
    "1.5.length",
    "[1,].includes(1)",
    "r.host.includes('a',)",
    # JavaScript, but outside the subset
    "console.log(1); true",
    "if (true) true",
    "const a = 1; a",
    "({allow: true})",
    "{}",
    "r.host.match(/x/)",
    "/x/.test(r.host)",
    "`template ${r.host}`",
    "'\\u0041'",
    "'\\x41'",
    "'\\0'",
    "r.ho\\u0073t",
    "x",
    "Math.max(1, 2)",
    "new String('a')",
    "void 0",
    "this",
    "r",
    "!r",
    "typeof r",
    "r.headers",
    "r.foo",
    "r.headers.constructor",
    "r.headers['__proto__']",
    "r.headers.toString",
    "r.headers['ü']",
    "r.host = 'a'",
    "a => 1",
    "r.host, true",
    "r?.host",
    "r.host?.length",
    "r.host ?? 'x'",
    "r.method in ['GET']",
    "r.host == r.port",
    "r.headers['x'] == 'a'",
    "r.port == '443'",
    "r.host < 'b'",
    "'a' + 1",
    "r.port + r.host",
    "-1",
    "+r.port",
    "r.port - 1",
    "r.port * 2",
    "r.port++",
    "r.port.toString()",
    "r.port.length",
    "r.host.length.length",
    "r.host.startsWith(r.headers['x'])",
    "r.host.startsWith(r.port)",
    "r.host.startsWith()",
    "r.host.startsWith('a', 1)",
    "r.host.toLowerCase('a')",
    "r.host.startsWith",
    "(r.host.startsWith)('a')",
    "r.host['startsWith']('a')",
    "r.host.trim()",
    "r.host[0]",
    "r['hea' + 'ders']",
    "[r.host].includes('a')",
    "[[1]].includes(1)",
    "['a'].length",
    "r.headers.x-a",
    "r.host === 'a' <!-- an HTML comment in V8",
    "\n--> 1",
    "r.host\u2028=== 'a'",
    "'\u2029'",
    "'\ud835'",
    "\ufeffr.host",
    "r.host\u00a0=== 'a'",
    "r.host\v=== 'a'",
    "r.host === 'é' && ré",
    "#!/usr/bin/env node\ntrue",
]


@pytest.mark.parametrize("code", ACCEPTED)
def test_accepted(code):
    assert compile_rule(code) is not None


@pytest.mark.parametrize("code", REJECTED)
def test_rejected(code):
    assert compile_rule(code) is None


def test_very_deep_nesting_is_left_to_v8():
    assert compile_rule("(" * 5000 + "true" + ")" * 5000) is None


def test_object_prototype_names_are_v8s():
    """A header named like an inherited property is not undefined in V8: the subset must know them all."""
    racer = MiniRacer()
    try:
        names = set(json.loads(racer.eval("JSON.stringify(Object.getOwnPropertyNames(Object.prototype))")))
    finally:
        racer.close()
    assert names == js_subset.OBJECT_PROTOTYPE_NAMES


def test_values_are_given_as_the_v8_path_decodes_them():
    request = Request.from_url("https://example.com/a").to_dict()
    answers = {
        "undefined": None,
        "null": None,
        "1": 1,
        "1.5": 1.5,
        "1e20": 100000000000000000000,
        "1e21": 1e21,
        "1e400": None,
        "r.port": 443,
        "'x'": "x",
        "r.host === 'example.com'": True,
    }
    for code, expected in answers.items():
        got = compile_rule(code)(request)
        assert (type(got), got) == (type(expected), expected), code


def test_method_on_undefined_and_surrogates_fall_back():
    request = Request.from_url("https://example.com/a").to_dict()
    with pytest.raises(Fallback):
        compile_rule("r.headers.x.startsWith('a')")(request)
    with pytest.raises(Fallback):
        compile_rule("r.headers.x.length")(request)
    assert compile_rule("r.headers.x")(request) is None  # undefined, decoded as the V8 path does
    assert compile_rule("false && r.headers.x.length")(request) is False  # never evaluated, as in V8
    surrogate = dict(request, path="/\udc80")
    with pytest.raises(Fallback):
        compile_rule("r.path === '/'")(surrogate)
    with pytest.raises(Fallback):
        compile_rule("r.path.toLowerCase()")(dict(request, path="/É"))
    assert compile_rule("r.path.toLowerCase()")(dict(request, path="/ABC")) == "/abc"


def test_undefined_is_not_null():
    assert UNDEFINED is not None
    assert not UNDEFINED
    request = Request.from_url("https://example.com/a").to_dict()
    assert compile_rule("r.headers.x === null")(request) is False
    assert compile_rule("r.headers.x === undefined")(request) is True
    assert compile_rule("r.headers.x == null")(request) is True


# --- differential: the subset against V8 ----------------------------------------------------

X = "\U0001d4b3"  # MATHEMATICAL SCRIPT CAPITAL X: outside the BMP, two UTF-16 code units in JS

CORPUS = [
    "true",
    "false",
    "null",
    "undefined",
    "0",
    "r.host === 'github.com'",
    "r.host === 'a' || r.path.startsWith('/x') && r.method !== 'POST'",
    "(r.host === 'a' || r.path.startsWith('/x')) && r.method !== 'POST'",
    "r.host.endsWith('.github.com') && !r.host.startsWith('evil')",
    "['GET','HEAD'].includes(r.method)",
    "[1, 443, 'x', true, null].includes(r.port)",
    "['443'].includes(r.port) || [true].includes(r.host === 'a')",
    "[undefined, null].includes(r.headers['x-a'])",
    "r.port > 1000",
    "r.port >= 1000 && r.port <= 8080",
    "r.port < 443 || r.port === 65535",
    "r.port === '443' || r.port === 443.0",
    "''.length",
    "r.path.length",
    "r.path.length > 2 && r.url.length",
    "!!r.query",
    "r.query || 'none'",
    "r.query && r.host",
    "!r.host === false",
    "r.headers['x-a'] === undefined",
    "r.headers['x-a'] !== undefined && r.headers['x-a'] === 'yes'",
    "r.headers['x-a']",
    "r.headers['X-A'] === undefined && r.headers.host === undefined",
    "r.headers['x-a'] === null",
    "r.headers['x-a'] == null || r.headers['x-a'] != undefined",
    "r.headers['x-a'] != null ? r.headers['x-a'] : 'missing'",
    "r.headers['x-a'] === r.headers['user-agent']",
    "r.headers['user-agent'] || 'no agent'",
    "(r.headers['user-agent'] || '').startsWith('curl/')",
    "r.headers['user-agent'].startsWith('curl/')",
    "r.headers['x-a'].length",
    "typeof r.headers['x-a']",
    "typeof r.port === 'number' && typeof null",
    "typeof undefined + typeof true + typeof r.host",
    "r.method === 'GET' ? true : 'only GET, not ' + r.method",
    "r.host.toLowerCase() === 'example.com'",
    "r.method.toUpperCase() === 'GET' ? r.method : r.method.toLowerCase()",
    f"r.url.includes('{X}')",
    f"r.path.includes('{X}') ? r.path.length : r.port",
    f"r.path.endsWith('{X}') || r.path.startsWith('/{X}')",
    "r.host.startsWith('ÄÖ') || r.host.includes('рф')",
    "r.port + 1",
    "r.port + 0.5",
    "0.1 + 0.2",
    "1e21 + r.port",
    "1e400",
    "r.host + r.path",
    "(r.host + r.path).length === r.host.length + r.path.length",
    "r.host === '' ? 'empty host' : r.host.length < 5",
    "r.host == 'github.com' && r.port == 443 && r.host != 'a' && true == !r.query",
    "r.scheme === 'https' && r.requester_ip.startsWith('10.')",
    "r['host'] === 'a' || r['headers']['x-a'] === 'A'",
    "/* leading comment */ r.method === 'GET' // trailing",
    "r.method === 'GET';",
    "r.method\n  === 'HEAD'\n  ;  // done",
    "'use strict';",
    "'a\\'b\\\\c\\n\\t\"'",
    "\"double\" === 'double'",
    "true ? false ? 1 : 2 : 3",
    "r.port > 80 ? r.port > 443 ? 'high' : 'mid' : 'low'",
    "r.path.startsWith(r.host) || r.query.includes(r.method)",
    "r.query.includes('') && r.path.endsWith('')",
    "null == undefined && !(null === undefined)",
    "r.path.toLowerCase()",
    "r.headers['content-type'] === undefined ? 1 : 2",
]

METHODS = ["GET", "HEAD", "POST", "get", "", "PÖST"]
SCHEMES = ["https", "http", ""]
HOSTS = [
    "",
    "a",
    "github.com",
    "api.github.com",
    "evil.github.com",
    "evilgithub.com",
    "x.github.com.evil",
    "ÄÖ.example",
    "пример.рф",
    f"{X}.com",
    "EXAMPLE.com",
    "example.com",
]
PORTS = [0, 80, 443, 999, 1000, 1001, 8080, 65535]
PATHS = [
    "",
    "/",
    "/x",
    "/x/y",
    "/xy",
    f"/{X}",
    f"/a{X}b",
    "/é",
    "/ABC",
    "/v1/",
    "github.com/x",
    "/\udc80",
    "/\ud835\udcb3",
]
QUERIES = ["", "a=1", "none", f"q={X}", "GET"]
HEADER_VALUES = {
    "x-a": ["", "a", "A", "yes", X, "curl/8", "line\u2028separator"],
    "user-agent": ["curl/8", "Mozilla/5.0", "", "yes"],
    "host": ["example.com"],
    "__proto__": ["p"],
    "constructor": ["c"],
}


def varied_requests(count: int, seed: int = 1) -> list[Request]:
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        headers = {name: rng.choice(values) for name, values in HEADER_VALUES.items() if rng.random() < 0.5}
        # The constructor, not Request.build: hosts and paths that normalisation would never produce.
        requests.append(
            Request(
                rng.choice(METHODS),
                rng.choice(SCHEMES),
                rng.choice(HOSTS),
                rng.choice(PORTS),
                rng.choice(PATHS),
                rng.choice(QUERIES),
                headers,
                rng.choice(["127.0.0.1", "10.0.0.1", ""]),
            )
        )
    return requests


def v8_values(racer: MiniRacer, code: str, requests: list[Request]) -> list[dict]:
    """Per request, {"value": ...} as the engine's V8 path decodes it ("value" absent for undefined),
    or {"error": ...}: the engine's own wrapper, run over every request in one call."""
    body = f"return (\n{code}\n);"
    try:
        racer.eval(CALL_TEMPLATE % json.dumps(body))
    except JSEvalException:
        body = f"return eval({json.dumps(code)});"  # the statement form, as JsEngine._compile does
    batch = f"""(() => {{
      const rule = {CALL_TEMPLATE % json.dumps(body)};
      return JSON.stringify({json.dumps([request.to_json() for request in requests])}.map((json) => {{
        try {{ return JSON.parse(rule(json)); }} catch (e) {{ return {{error: String(e)}}; }}
      }}));
    }})()"""
    return json.loads(racer.eval(batch))


def typed(value: object) -> tuple[type, object]:
    return type(value), value


def test_subset_gives_v8s_values():
    requests = varied_requests(300)
    assert len(CORPUS) >= 40
    racer = MiniRacer()
    racer.eval(PRELUDE)
    compared = fallbacks = errors = 0
    try:
        for code in CORPUS:
            rule = compile_rule(code)
            assert rule is not None, f"not in the subset: {code!r}"
            for request, v8 in zip(requests, v8_values(racer, code, requests), strict=True):
                try:
                    ours = rule(request.to_dict())
                except Fallback:
                    # Allowed where V8 throws, or for text the subset does not model exactly.
                    exact_text = request.path.isascii() or js_subset._clean(request.path)
                    assert "error" in v8 or not exact_text or "Case()" in code, (code, request)
                    fallbacks += 1
                    errors += "error" in v8
                    continue
                assert "error" not in v8, (code, request, v8)
                assert typed(ours) == typed(v8.get("value")), (code, request)
                compared += 1
    finally:
        racer.close()
    assert compared > 10_000
    assert errors > 100 and fallbacks >= errors


# --- the engine ---------------------------------------------------------------------------


def run(coro):
    return asyncio.run(coro)


async def decisions(engine: JsEngine, requests: list[Request]) -> list[Decision]:
    return await decide_all(engine, requests)


def essence(decision: Decision) -> tuple:
    return (decision.allow, decision.reason, decision.reason_code, decision.max_tx_bytes)


@pytest.mark.parametrize(
    "code",
    [
        "r.host === 'github.com' && r.port === 443",
        "r.method === 'GET' ? true : 'only GET, not ' + r.method",
        "r.headers['x-a'] || r.port",
        "r.headers['user-agent'].startsWith('curl/')",
        "r.port > 1000 ? 1.5 : r.query || null",
        "r.path.toLowerCase() === '/abc' || undefined",
    ],
)
def test_engine_decisions_match_the_v8_path(code, monkeypatch):
    requests = varied_requests(60, seed=2)
    fast = run(decisions(JsEngine(code, 1.0), requests))
    monkeypatch.setattr(js_subset, "compile_rule", lambda code: None)
    slow = run(decisions(JsEngine(code, 1.0), requests))
    assert [essence(d) for d in fast] == [essence(d) for d in slow]


def test_subset_rule_does_not_start_v8():
    async def scenario() -> tuple[list[Decision], object]:
        engine = JsEngine("r.method === 'GET' && r.host.endsWith('.example.com')", 0.1)
        await engine.start()
        try:
            requests = [Request.from_url("https://api.example.com/"), Request.from_url("https://x.org/")]
            requests.append(Request.from_url("https://api.example.com/", "POST"))
            judge = Judge(engine)
            return [await judge.decide(request) for request in requests], engine._racer
        finally:
            await engine.close()

    (allowed, other, post), racer = run(scenario())
    assert racer is None
    assert (allowed.allow, allowed.reason_code, allowed.engine) == (True, "rule_allow", "js")
    assert (other.allow, other.reason) == (False, "denied by rule")
    assert post.allow is False


def test_rule_outside_the_subset_starts_v8_at_start():
    async def scenario() -> tuple[object, bool]:
        engine = JsEngine("console.log(r.host); true", 0.1)
        await engine.start()
        try:
            return engine._racer, (await engine.decide(Request.from_url("https://x.org/"))).allow
        finally:
            await engine.close()

    racer, allowed = run(scenario())
    assert racer is not None
    assert allowed is True


def test_a_request_the_subset_hands_back_is_decided_by_v8():
    code = "r.headers['x-a'].startsWith('a')"
    with_header = Request.build("GET", "https", "example.com", None, "/", headers={"X-A": "abc"})
    without = Request.from_url("https://example.com/")

    async def scenario() -> tuple[list[Decision], list[bool]]:
        engine = JsEngine(code, 0.5)
        await engine.start()
        started = []
        try:
            out = []
            for request in (with_header, without, with_header):
                out.append(await engine.decide(request))
                started.append(engine._racer is not None)
            return out, started
        finally:
            await engine.close()

    (first, error, again), started = run(scenario())
    assert first.allow is True
    assert (error.allow, error.reason_code) == (False, "rule_error")
    assert "TypeError" in error.reason
    assert again.allow is True
    assert started == [False, True, True]


def test_syntax_error_outside_the_subset_is_still_reported_at_start():
    from jail.model import JailError

    with pytest.raises(JailError, match="does not compile"):
        run(decisions(JsEngine("r.host === 'a' &&& r", 0.1), []))


def write_rule(path: Path, code: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(code)
    tmp.replace(path)


def test_js_file_reload_moves_in_and_out_of_the_subset(tmp_path):
    rule = tmp_path / "rule.js"
    rule.write_text("r.method === 'GET'")
    get, post = Request.from_url("https://example.com/"), Request.from_url("https://example.com/", "POST")

    async def wait_for(judge: Judge, request: Request, want: bool) -> Decision:
        started = time.monotonic()
        while True:
            decision = await judge.decide(request)
            if decision.allow is want or time.monotonic() - started > 4 * RELOAD_POLL_SECONDS + 2:
                return decision
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        engine = build_engine(RuleSpec("js_file", str(rule)))
        await engine.start()
        judge = Judge(engine)
        try:
            assert engine._fast is not None and engine._racer is None
            assert (await judge.decide(get)).allow is True

            # Out of the subset: V8 runs it.
            write_rule(rule, "const m = 'POST'; r.method === m")
            assert (await wait_for(judge, post, True)).allow is True
            assert engine._fast is None and engine._racer is not None
            assert (await judge.decide(get)).allow is False

            # Back in: Python decides again, with the new rule.
            write_rule(rule, "// v3\nr.method === 'GET' || r.method === 'POST'\n")
            assert (await wait_for(judge, get, True)).allow is True
            assert engine._fast is not None and engine._rule is None
            assert (await judge.decide(post)).allow is True

            # A broken version keeps the subset rule.
            write_rule(rule, "r.method === 'GET' &&& (")
            await asyncio.sleep(RELOAD_POLL_SECONDS * 2.5)
            assert engine._fast is not None
            assert (await judge.decide(post)).allow is True
        finally:
            await engine.close()

    run(scenario())
