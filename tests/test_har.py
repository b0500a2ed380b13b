"""--har FILE: the run as a HAR 1.2 file that HAR readers load, with jail's verdict in `_jail` and no
secret's real value anywhere in it."""

from __future__ import annotations

import base64
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.io.har import request_to_flow

from jail.audit import AuditSink, Exchange, Outcome
from jail.audit.har import HIDDEN_VALUE, HarSink
from jail.model import Decision, Request
from jail.proxy.secrets import ResponseMasker, Secret
from tests.test_secrets import CLIENT, REAL

# HAR 1.2 (http://www.softwareishard.com/blog/har-12-spec/): each object's required members and their
# types, then the optional ones. A member that is neither must be a custom one (a leading underscore).
NUMBER = (int, float)
SCHEMA: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "log": ({"version": str, "creator": dict, "entries": list}, {"browser": dict, "pages": list, "comment": str}),
    "creator": ({"name": str, "version": str}, {"comment": str}),
    "entry": (
        {"startedDateTime": str, "time": NUMBER, "request": dict, "response": dict, "cache": dict, "timings": dict},
        {"pageref": str, "serverIPAddress": str, "connection": str, "comment": str},
    ),
    "request": (
        {
            "method": str,
            "url": str,
            "httpVersion": str,
            "cookies": list,
            "headers": list,
            "queryString": list,
            "headersSize": int,
            "bodySize": int,
        },
        {"postData": dict, "comment": str},
    ),
    "response": (
        {
            "status": int,
            "statusText": str,
            "httpVersion": str,
            "cookies": list,
            "headers": list,
            "content": dict,
            "redirectURL": str,
            "headersSize": int,
            "bodySize": int,
        },
        {"comment": str},
    ),
    "pair": ({"name": str, "value": str}, {"comment": str}),
    "postData": ({"mimeType": str}, {"params": list, "text": str, "comment": str}),
    "content": ({"size": int, "mimeType": str}, {"compression": int, "text": str, "encoding": str, "comment": str}),
    "timings": (
        {"send": NUMBER, "wait": NUMBER, "receive": NUMBER},
        {"blocked": NUMBER, "dns": NUMBER, "connect": NUMBER, "ssl": NUMBER, "comment": str},
    ),
}


def object_problems(kind: str, value: Any, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: not an object"]
    required, optional = SCHEMA[kind]
    problems = [f"{where}: no {name}" for name in required if name not in value]
    for name, item in value.items():
        expected = required.get(name) or optional.get(name)
        if expected is None and not name.startswith("_"):
            problems.append(f"{where}.{name}: not a HAR 1.2 member (custom ones start with _)")
        elif expected is not None and (not isinstance(item, expected) or isinstance(item, bool)):
            problems.append(f"{where}.{name}: {type(item).__name__}, not {expected}")
    return problems


def har_problems(document: Any) -> list[str]:
    """Everything in `document` that is not HAR 1.2."""
    if not isinstance(document, dict) or set(document) != {"log"}:
        return ["the document is not {log: ...}"]
    log = document["log"]
    problems = object_problems("log", log, "log")
    if problems:
        return problems
    problems += object_problems("creator", log["creator"], "log.creator")
    for index, entry in enumerate(log["entries"]):
        where = f"entries[{index}]"
        problems += object_problems("entry", entry, where)
        if problems:
            return problems
        try:
            datetime.fromisoformat(entry["startedDateTime"].replace("Z", "+00:00"))
        except ValueError:
            problems.append(f"{where}.startedDateTime: not ISO 8601")
        timings = entry["timings"]
        problems += object_problems("timings", timings, f"{where}.timings")
        spent = sum(value for name, value in timings.items() if name != "comment" and value != -1)
        if abs(spent - entry["time"]) > 0.01:
            problems.append(f"{where}.time: {entry['time']} is not the sum of its timings ({spent})")
        request, response = entry["request"], entry["response"]
        problems += object_problems("request", request, f"{where}.request")
        problems += object_problems("response", response, f"{where}.response")
        for part, lists in ((request, ("headers", "queryString", "cookies")), (response, ("headers", "cookies"))):
            for name in lists:
                for pair in part.get(name, []):
                    problems += object_problems("pair", pair, f"{where}.{name}[]")
        if "postData" in request:
            problems += object_problems("postData", request["postData"], f"{where}.request.postData")
        problems += object_problems("content", response.get("content"), f"{where}.response.content")
    return problems


def mask_secrets(*secrets: Secret):
    """What the session hands the HAR writer: every secret's real value back to its placeholder."""
    return ResponseMasker(list(secrets)).mask


def read_har(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text())
    assert har_problems(document) == []
    # mitmproxy's own HAR reader (what `mitmproxy -r file.har` uses) takes every entry.
    flows = [request_to_flow(entry) for entry in document["log"]["entries"]]
    for flow, entry in zip(flows, document["log"]["entries"], strict=True):
        assert flow.request.method == entry["request"]["method"]
        assert flow.response is not None and flow.response.status_code == entry["response"]["status"]
    return document


def test_a_secret_run_with_bodies_never_holds_the_real_value(
    weak_jail, jail_env, https_upstream, http_upstream, tmp_path: Path
) -> None:
    har = tmp_path / "run.har"
    result = weak_jail(
        "--secret",
        "API_TOKEN=127.0.0.2",
        "--js",
        "true",
        "--har",
        str(har),
        "--har-bodies",
        "--log-header-values",
        "--",
        sys.executable,
        "-c",
        CLIENT,
        https_upstream.url(""),
        http_upstream.url(""),
        env={**jail_env, "API_TOKEN": REAL},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    placeholder = json.loads(result.stdout)["env"]
    # The upstream did get the real value, and echoed it back in every body.
    assert f"Bearer {REAL}" in https_upstream.requests[0]["headers"]["authorization"]
    text = har.read_text()
    assert REAL not in text
    entries = read_har(har)["log"]["entries"]
    assert len(entries) == 7  # "other_host" is refused before its name resolves: 4 echoes, 3 denials
    echoes = [entry for entry in entries if entry["_jail"]["verdict"] == "allow"]
    assert len(echoes) == 4
    assert all(entry["response"]["status"] == 200 for entry in echoes)
    # Bearer, query and chunked echoes hold the placeholder (the Basic one echoes base64, as the child saw it).
    assert sum(placeholder in entry["response"]["content"]["text"] for entry in echoes) == 3
    bearer = next(e for e in echoes if e["request"]["url"].endswith("/echo") and "Bearer" in json.dumps(e))
    assert {"name": "authorization", "value": f"Bearer {placeholder}"} in bearer["request"]["headers"]
    denied = [entry for entry in entries if entry["_jail"]["verdict"] == "deny"]
    assert {entry["_jail"]["reason_code"] for entry in denied} == {"secret_leak"}
    for entry in denied:
        assert entry["response"]["status"] == 403
        assert entry["response"]["content"]["text"].startswith("jail: blocked")
        assert "API_TOKEN" in entry["_jail"]["reason"]
    posted = next(entry for entry in denied if "postData" in entry["request"])
    assert posted["request"]["postData"]["text"] == f"key={placeholder}"


def test_without_options_header_values_and_bodies_stay_out(weak_jail, http_upstream, tmp_path: Path) -> None:
    har = tmp_path / "run.har"
    script = (
        f"curl -s -o /dev/null -H 'X-Api-Key: k-123' '{http_upstream.url('/ok?page=2&q=a%20b')}'"
        f" && curl -s -o /dev/null '{http_upstream.url('/denied')}'"
    )
    result = weak_jail("--js", "r.path !== '/denied'", "--har", str(har), "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "k-123" not in har.read_text()
    allowed, denied = read_har(har)["log"]["entries"]
    assert allowed["request"]["url"] == http_upstream.url("/ok?page=2&q=a%20b")
    assert allowed["request"]["queryString"] == [{"name": "page", "value": "2"}, {"name": "q", "value": "a b"}]
    assert {"name": "x-api-key", "value": HIDDEN_VALUE} in allowed["request"]["headers"]
    assert (allowed["response"]["status"], allowed["response"]["statusText"]) == (200, "OK")
    assert allowed["response"]["content"]["mimeType"] == "application/json"
    assert allowed["response"]["content"]["size"] > 0 and "text" not in allowed["response"]["content"]
    assert allowed["serverIPAddress"] == "127.0.0.2"
    assert allowed["_jail"]["verdict"] == "allow" and allowed["_jail"]["engine"] == "js"
    assert (denied["response"]["status"], denied["_jail"]["verdict"]) == (403, "deny")
    assert denied["_jail"]["reason_code"] == "rule_deny"
    assert datetime.fromisoformat(allowed["startedDateTime"]) <= datetime.fromisoformat(denied["startedDateTime"])
    assert not list(tmp_path.glob(".run.har.*"))  # the temporary file was renamed over the HAR


def test_a_tcp_stream_is_an_entry(tmp_path: Path) -> None:
    har = tmp_path / "streams.har"
    sink = AuditSink("0123abcd", sinks=[HarSink(har)])
    stream = Request.stream("github.com", 22)
    sink.record(1700000000.25, stream, Decision.allowed("git over ssh"), Outcome(0, 900, 4000, 1500.0, end="closed"))
    denied = Outcome(403, exchange=Exchange("HTTP/1.1", "Forbidden", [("content-type", "text/plain")]))
    sink.record(1700000001.0, Request.stream("10.0.0.9", 5432), Decision.denied("no databases"), denied)
    sink.close()
    ssh, database = read_har(har)["log"]["entries"]
    assert ssh["startedDateTime"] == "2023-11-14T22:13:20.250Z"
    assert (ssh["request"]["method"], ssh["request"]["url"]) == ("CONNECT", "tcp://github.com:22")
    assert (ssh["request"]["bodySize"], ssh["response"]["bodySize"], ssh["time"]) == (900, 4000, 1500.0)
    wanted = {"verdict": "allow", "jail_id": "0123abcd", "reason": "git over ssh", "end": "closed"}
    assert wanted.items() <= ssh["_jail"].items()
    assert (database["response"]["status"], database["_jail"]["verdict"]) == (403, "deny")


def test_har_mistakes_are_one_line(run_jail, tmp_path: Path) -> None:
    result = run_jail("--js", "true", "--har", str(tmp_path / "missing" / "x.har"), "--", "true")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"jail: error: --har: cannot write {tmp_path / 'missing' / 'x.har'}: not a writable file location"
    ]
    result = run_jail("--js", "true", "--har-bodies", "--", "true")
    assert result.returncode != 0 and "--har-bodies needs --har FILE" in result.stderr


@pytest.mark.parametrize("bodies", [False, True])
def test_explain_names_the_har(run_jail, tmp_path: Path, bodies: bool) -> None:
    extra = ("--har-bodies",) if bodies else ()
    result = run_jail("--explain", "--js", "true", "--har", str(tmp_path / "x.har"), *extra, "--", "true")
    assert result.returncode == 0, result.stderr
    wanted = "with bodies, secrets masked" if bodies else "no bodies"
    assert f"HAR: {tmp_path / 'x.har'} (HAR 1.2, written at the end of the run; {wanted})" in result.stdout


def test_the_file_is_masked_whatever_the_proxy_missed(tmp_path: Path) -> None:
    """A real value that reached a record anyway (a server with no masker echoing it, an error message, a
    binary body) is a placeholder in the file."""
    secret = Secret.create("API_TOKEN", REAL, ["api.example.com"])
    har = tmp_path / "masked.har"
    sink = AuditSink("0123abcd", include_header_values=True, sinks=[HarSink(har, True, True, mask_secrets(secret))])
    request = Request.from_url(f"https://elsewhere.test/p/{REAL}?k={REAL}")
    exchange = Exchange(
        "HTTP/2.0", "OK", [("set-cookie", f"s={REAL}")], f"body {REAL}".encode(), b"\xff\x00" + REAL.encode()
    )
    outcome = Outcome(200, error=f"upstream said {REAL}", exchange=exchange)
    sink.record(1700000000.0, request, Decision.allowed(f"reason {REAL}"), outcome)
    sink.close()
    text = har.read_text()
    assert REAL not in text and base64.b64encode(b"\xff\x00" + REAL.encode()).decode() not in text
    [entry] = read_har(har)["log"]["entries"]
    assert entry["request"]["url"] == f"https://elsewhere.test/p/{secret.placeholder}?k={secret.placeholder}"
    assert entry["_jail"]["error"] == f"upstream said {secret.placeholder}"
    content = entry["response"]["content"]
    assert content["encoding"] == "base64"
    assert base64.b64decode(content["text"]) == b"\xff\x00" + secret.placeholder.encode()


def test_entries_are_set_aside_on_disk_and_written_in_the_order_requests_started(tmp_path: Path) -> None:
    """A long run with bodies does not hold them in memory: each entry goes to a spool file as it comes;
    the HAR lists them by start time, whatever order they ended in."""
    har = tmp_path / "long.har"
    har_sink = HarSink(har, bodies=True)
    sink = AuditSink("0123abcd", sinks=[har_sink])
    body = bytes(range(256)) * 4096  # 1 MiB, the most a body keeps
    starts = [1700000000.0 + n for n in (5, 1, 4, 2, 3)]
    for start in starts:
        exchange = Exchange("HTTP/1.1", "OK", [("content-type", "application/octet-stream")], None, body)
        request = Request.from_url(f"https://example.com/{start}")
        sink.record(start, request, Decision.allowed(), Outcome(200, exchange=exchange))
    spooled = os.fstat(har_sink._spool.fileno()).st_size
    assert spooled > 5 * len(body)  # the bodies (base64) are on disk, not in the sink's memory
    sink.close()
    entries = read_har(har)["log"]["entries"]
    assert [entry["request"]["url"] for entry in entries] == [
        f"https://example.com/{start}" for start in sorted(starts)
    ]
    assert all(base64.b64decode(entry["response"]["content"]["text"]) == body for entry in entries)
    assert not list(tmp_path.glob(".long.har.*"))
