"""`jail log` and `jail policy suggest`: reading audit logs, filters, counts, the three renderings, the
suggested policy, and the commands as a user runs them."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import re
import subprocess
import sys
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from jail.audit.report import (
    HTML_JS,
    filter_entries,
    host_matches,
    load_audit_logs,
    parse_since,
    render_html,
    render_markdown,
    render_text,
    suggest_policy,
    summarize,
)
from jail.model import JailError, Request

T0 = datetime(2026, 1, 10, 10, 0, 0, tzinfo=UTC)
XSS = "<script>alert(1)</script>"


def record(
    seconds: float,
    method: str,
    host: str,
    path: str,
    decision: str = "allow",
    up: int = 0,
    down: int = 0,
    query: str = "",
    reason: str = "",
    scheme: str = "https",
    port: int = 443,
) -> dict:
    """One audit record as AuditSink writes it."""
    moment = T0 + timedelta(seconds=seconds)
    request = Request.build(method, scheme, host, port, path, query)
    return {
        "time": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
        "jail_id": "j-test",
        **request.to_dict(),
        "headers": ["accept", "user-agent"],
        "decision": decision,
        "reason": reason,
        "reason_code": {"allow": "rule_allow"}.get(decision, "rule_deny"),
        "engine": "js",
        "rule": "",
        "rule_us": 90,
        "max_tx_bytes": None,
        "status": 403 if decision == "deny" else 200,
        "bytes_up": up,
        "bytes_down": down,
        "duration_ms": 3.5,
    }


RECORDS = [
    record(0, "GET", "pypi.org", "/simple/requests/", up=100, down=1000),
    record(5, "GET", "pypi.org", "/simple/idna/", up=100, down=2000),
    record(10, "GET", "files.pythonhosted.org", "/packages/aa/bb/requests.whl", up=200, down=50000),
    record(60, "POST", "api.example.com", "/v1/chat", up=500, down=800),
    record(120, "GET", "api.example.com", "/v1/models", up=50, down=300),
    record(180, "GET", "api.example.com", "/health", "would_deny", up=10, down=20, reason="not listed"),
    record(300, "DELETE", "api.example.com", "/v1/files/1", "deny", reason="read-only"),
    record(600, "GET", "telemetry.example.net", "/collect", "would_deny", up=300, query="token=s3cret"),
    record(1200, "GET", "evil.test", "/" + XSS, "deny", reason="<img src=x onerror=alert(2)>"),
    record(1800, "GET", "cdn.example.com", "/a/1.js", down=100),
    record(1860, "GET", "cdn.example.com", "/b/2.js", down=100),
    record(1920, "HEAD", "cdn.example.com", "/c/3.js"),
    record(1980, "GET", "cdn.example.com", "/d/4.js", down=100),
]


def write_log(path: Path, records: list[dict], extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(line + "\n" for line in extra_lines))
    return path


@pytest.fixture
def audit_log(tmp_path: Path) -> Path:
    """The records above, then a blank line, a line cut short, and a record with an unknown decision."""
    bad_decision = json.dumps({**RECORDS[0], "decision": "maybe"})
    return write_log(tmp_path / "audit.jsonl", RECORDS, ("", '{"time": "2026-01-10T10:', bad_decision))


def entries_of(path: Path):
    return load_audit_logs([path]).entries


# --------------------------------------------------------------------------- reading and filtering


def test_malformed_lines_are_skipped_and_named_by_file_and_line(audit_log: Path) -> None:
    log = load_audit_logs([audit_log])
    assert len(log.entries) == len(RECORDS)
    assert [w.split(": ")[0] for w in log.warnings()] == [f"{audit_log}:15", f"{audit_log}:16"]
    assert "not JSON" in log.warnings()[0]
    assert "unknown decision" in log.warnings()[1]


def test_events_are_not_requests_and_not_malformed(tmp_path: Path) -> None:
    events = (
        '{"time": "2025-01-31T12:00:00.000Z", "jail_id": "ab", "kind": "dns", "name": "x.test", "qtype": "A"}',
        '{"time": "2025-01-31T12:00:01.000Z", "jail_id": "ab", "kind": "ssh-agent", "request": "sign"}',
        '{"time": "2025-01-31T12:00:02.000Z", "jail_id": "ab", "kind": "ask_refused", "channel": "cli"}',
    )
    log = load_audit_logs([write_log(tmp_path / "a.jsonl", RECORDS[:1], events)])
    assert len(log.entries) == 1
    assert log.warnings() == []


def test_many_malformed_lines_give_a_bounded_number_of_warnings(tmp_path: Path) -> None:
    log = load_audit_logs([write_log(tmp_path / "a.jsonl", RECORDS[:1], tuple(["{"] * 40))])
    assert len(log.entries) == 1
    assert len(log.malformed) == 40
    assert len(log.warnings()) == 11
    assert "30 more" in log.warnings()[-1]


def test_a_missing_log_is_one_jail_error(tmp_path: Path) -> None:
    with pytest.raises(JailError, match=r"cannot read audit log .*nope\.jsonl: No such file"):
        load_audit_logs([tmp_path / "nope.jsonl"])


def test_several_logs_are_merged_in_time_order(tmp_path: Path) -> None:
    first = write_log(tmp_path / "1.jsonl", RECORDS[6:])
    second = write_log(tmp_path / "2.jsonl", RECORDS[:6])
    entries = load_audit_logs([first, second]).entries
    assert [e.time for e in entries] == sorted(e.time for e in entries)
    assert len(entries) == len(RECORDS)


def test_aggregation_counts_and_bytes(audit_log: Path) -> None:
    summary = summarize(entries_of(audit_log))
    api_get = summary.rows["api.example.com", "GET"]
    assert (api_get.count, api_get.allowed, api_get.denied, api_get.would_deny) == (2, 1, 0, 1)
    assert api_get.bytes == 50 + 300 + 10 + 20
    assert summary.rows["api.example.com", "DELETE"].denied == 1
    api = summary.hosts["api.example.com"]
    assert (api.count, api.allowed, api.denied, api.would_deny, api.bytes) == (4, 2, 1, 1, 1680)
    assert summary.hosts["pypi.org"].bytes == 3200
    total = summary.total
    assert (total.count, total.allowed, total.denied, total.would_deny) == (13, 9, 2, 2)
    assert total.bytes == sum(r["bytes_up"] + r["bytes_down"] for r in RECORDS)
    assert list(summary.rows) == sorted(summary.rows)
    assert summary.first == T0 and summary.last == T0 + timedelta(seconds=1980)
    assert {r.decision for r in summary.refused} == {"deny", "would_deny"}
    assert len(summary.refused) == 4


def test_filter_denied_keeps_deny_and_would_deny(audit_log: Path) -> None:
    kept = filter_entries(entries_of(audit_log), denied=True)
    assert sorted(e.decision for e in kept) == ["deny", "deny", "would_deny", "would_deny"]


def test_filter_host_exact_and_wildcard(audit_log: Path) -> None:
    entries = entries_of(audit_log)
    assert {e.host for e in filter_entries(entries, hosts=["pypi.org"])} == {"pypi.org"}
    assert {e.host for e in filter_entries(entries, hosts=["*.example.com"])} == {"api.example.com", "cdn.example.com"}
    assert {e.host for e in filter_entries(entries, hosts=["PyPI.org", "evil.test"])} == {"pypi.org", "evil.test"}
    assert not host_matches("example.com", "*.example.com")
    assert not host_matches("evilexample.com", "*.example.com")


def test_filter_since_absolute_and_relative(audit_log: Path) -> None:
    entries = entries_of(audit_log)
    assert len(filter_entries(entries, since=parse_since("2026-01-10T10:30:00Z"))) == 4
    assert len(filter_entries(entries, since=parse_since("2026-01-10T11:30:00+01:00"))) == 4
    now = T0 + timedelta(seconds=1980)
    assert len(filter_entries(entries, since=parse_since("15m", now=now))) == 5  # from 10:18
    assert len(filter_entries(entries, since=parse_since("1h", now=now))) == 13
    assert parse_since("1d", now=now) == now - timedelta(days=1)
    assert len(filter_entries(entries, denied=True, since=parse_since("10m", now=now))) == 0
    with pytest.raises(ValueError, match="duration like 15m"):
        parse_since("yesterday")


# --------------------------------------------------------------------------- text and Markdown


def test_text_table(audit_log: Path) -> None:
    text = render_text(summarize(entries_of(audit_log)))
    lines = text.splitlines()
    assert lines[0].startswith("13 requests: 9 allowed, 2 denied, 2 would-deny")
    assert "(33m)" in lines[0]
    header = next(line for line in lines if line.startswith("HOST") and "METHOD" in line)
    assert header.split() == ["HOST", "METHOD", "REQUESTS", "ALLOWED", "DENIED", "WOULD-DENY", "BYTES"]
    row = next(line for line in lines if line.startswith("api.example.com") and " GET " in line)
    assert row.split() == ["api.example.com", "GET", "2", "1", "0", "1", "380", "B"]
    table = lines[2 : lines.index("", 2)]
    assert len({len(line) for line in table}) == 1  # right-aligned last column: every line equally long
    assert table[-1].startswith("TOTAL")
    assert "Denied and would-deny requests:" in text
    assert "https://telemetry.example.net/collect?token=s3cret" in text
    assert "read-only" in text


def test_text_neutralises_terminal_escapes(tmp_path: Path) -> None:
    log = write_log(
        tmp_path / "a.jsonl", [record(0, "GET", "x.test", "/a\x1b[2J\x07b", "deny", reason="r\x1b]0;owned\x07")]
    )
    text = render_text(summarize(entries_of(log)))
    assert "\x1b" not in text and "\x07" not in text
    assert "\\x1b[2J" in text


def test_text_of_nothing(tmp_path: Path) -> None:
    assert render_text(summarize([])) == "0 requests: 0 allowed, 0 denied, 0 would-deny, 0 B\n"


def test_markdown_summary_and_table(audit_log: Path) -> None:
    markdown = render_markdown(summarize(entries_of(audit_log)))
    first = markdown.splitlines()[0]
    assert first.startswith("**jail egress**: 13 requests: 9 allowed, 2 denied, 2 would-deny")
    assert "2026-01-10T10:00:00.000Z to 2026-01-10T10:33:00.000Z (33m)" in first
    assert "| Host | Method | Requests | Allowed | Denied | Would deny | Bytes |" in markdown
    assert "| --- | --- | --: | --: | --: | --: | --: |" in markdown
    assert "| `api.example.com` | GET | 2 | 1 | 0 | 1 | 380 B |" in markdown
    assert "| **Total** |  | **13** | **9** | **2** | **2** |" in markdown
    # the log's text cannot inject HTML or break the table
    assert "<img" not in markdown.replace("\\<img", "")
    assert "\\<img src=x onerror=alert(2)\\>" in markdown
    assert f"`https://evil.test/{XSS}`" in markdown  # inside a code span: shown literally


def test_markdown_cells_survive_pipes_and_backticks(tmp_path: Path) -> None:
    log = write_log(tmp_path / "a.jsonl", [record(0, "GET", "x.test", "/a|b`c", "deny", reason="x | y *z*")])
    markdown = render_markdown(summarize(entries_of(log)))
    row = next(line for line in markdown.splitlines() if "x.test/a" in line)
    assert "``https://x.test/a\\|b`c``" in row
    assert "x \\| y \\*z\\*" in row
    assert len(re.split(r"(?<!\\)\|", row)) == 7  # five cells between the outer pipes


# --------------------------------------------------------------------------- HTML


def html_of(path: Path) -> str:
    log = load_audit_logs([path])
    return render_html(log.entries, summarize(log.entries), log.files)


def test_html_is_one_self_contained_document(audit_log: Path) -> None:
    page = html_of(audit_log)
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<html") == 1 and page.rstrip().endswith("</html>")
    lowered = page.lower()
    for external in ("src=http", 'src="http', "src='http", "<link", "@import", "url(", "<iframe", "<img"):
        assert external not in lowered, external
    assert lowered.count("<script") == 1  # its own, and nothing from the log
    assert "<svg" in page and page.count('class="allow"') + page.count('class="deny"') >= 3
    for heading in ("Timeline", "Requests by host and method", "Per host", "Denied and would-deny requests"):
        assert f"<h2>{heading}</h2>" in page


def test_html_has_click_to_sort_and_allows_only_its_own_script(audit_log: Path) -> None:
    page = html_of(audit_log)
    assert page.count('<table class="sortable">') == 3
    assert 'addEventListener("click"' in page and "aria-sort" in page
    digest = base64.b64encode(hashlib.sha256(HTML_JS.encode()).digest()).decode()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert csp is not None
    assert "default-src &#x27;none&#x27;" in csp[1]
    assert f"script-src &#x27;sha256-{digest}&#x27;" in csp[1]
    assert f"<script>{HTML_JS}</script>" in page


def test_html_escapes_every_value_from_the_log(tmp_path: Path) -> None:
    evil_host = {**record(5, "GET", "x.test", "/p"), "host": f"{XSS}.test", "url": ""}
    log = write_log(tmp_path / "a.jsonl", [*RECORDS, evil_host])
    page = html_of(log)
    assert XSS not in page
    assert "<img src" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    assert page.count("<script") == 1
    assert "</script>" not in page.replace(f"<script>{HTML_JS}</script>", "")


def test_html_of_a_single_request_and_of_none(tmp_path: Path) -> None:
    one = html_of(write_log(tmp_path / "one.jsonl", RECORDS[:1]))
    svg = one[one.index("<svg") : one.index("</svg>")]
    assert "nan" not in svg.lower() and "inf" not in svg.lower()
    assert svg.count('<rect class="allow"') == 1
    none = render_html([], summarize([]))
    assert "no requests" in none and "<svg" not in none


def test_html_timeline_merges_hosts_beyond_the_lane_limit(tmp_path: Path) -> None:
    many = [record(i, "GET", f"h{i:02d}.example.org", "/") for i in range(40)]
    page = html_of(write_log(tmp_path / "many.jsonl", many))
    assert "(17 other hosts)" in page


# --------------------------------------------------------------------------- suggested policy


def rules_of(policy: dict) -> dict[str, dict]:
    return {rule["name"]: rule for rule in policy["rule"]}


def test_suggest_allows_what_was_seen(audit_log: Path) -> None:
    text = suggest_policy(entries_of(audit_log))
    policy = tomllib.loads(text)
    assert policy["default"] == "deny"
    rules = rules_of(policy)
    assert set(rules) == {
        "api.example.com /health",
        "api.example.com /v1/",
        "cdn.example.com",
        "files.pythonhosted.org /packages/",
        "pypi.org /simple/",
        "telemetry.example.net /collect",
    }
    # few first path segments: one rule per prefix, with the methods seen under it (not the denied DELETE)
    assert rules["api.example.com /v1/"] == {
        "name": "api.example.com /v1/",
        "action": "allow",
        "host": "api.example.com",
        "methods": ["GET", "POST"],
        "path": "/v1/",
    }
    assert rules["api.example.com /health"]["path"] == "/health"  # would_deny is allowed: audit-mode rollout
    assert rules["pypi.org /simple/"]["methods"] == ["GET"]
    # four first segments: one rule for the host, no path
    assert rules["cdn.example.com"]["methods"] == ["GET", "HEAD"]
    assert "path" not in rules["cdn.example.com"]
    assert "evil.test" not in text  # denied in enforce mode
    assert [rule["host"] for rule in policy["rule"]] == sorted(rule["host"] for rule in policy["rule"])


def test_suggest_has_one_real_expect_per_rule(audit_log: Path) -> None:
    policy = tomllib.loads(suggest_policy(entries_of(audit_log)))
    assert len(policy["expect"]) == len(policy["rule"])
    seen = {(r["method"], r["url"].split("?")[0]) for r in RECORDS}
    for rule, expect in zip(policy["rule"], policy["expect"], strict=True):
        assert expect["decision"] == "allow"
        method, url = expect["request"].split(" ")
        assert (method, url) in seen
        request = Request.from_url(url, method)
        assert request.host == rule["host"] and method in rule["methods"]
        assert request.path.startswith(rule.get("path", "/"))
    assert "s3cret" not in json.dumps(policy)  # queries are left out of examples


def test_suggest_include_denied(audit_log: Path) -> None:
    rules = rules_of(tomllib.loads(suggest_policy(entries_of(audit_log), include_denied=True)))
    assert rules["api.example.com /v1/"]["methods"] == ["DELETE", "GET", "POST"]
    assert rules["evil.test /<script>alert(1)</"]["path"] == "/<script>alert(1)</"  # its first segment


def test_suggest_is_deterministic(tmp_path: Path) -> None:
    shuffled = RECORDS[:]
    random.Random(7).shuffle(shuffled)
    first = suggest_policy(entries_of(write_log(tmp_path / "a.jsonl", RECORDS)))
    again = suggest_policy(entries_of(write_log(tmp_path / "b.jsonl", shuffled)))
    assert first == again


def test_suggest_escapes_strings_and_leaves_out_what_no_rule_can_name(tmp_path: Path) -> None:
    weird = [
        record(0, "GET", "q.test", '/a"b\\c/\x01d'),
        {**record(1, "GET", "x.test", "/"), "host": 'bad host"\n[[rule]]'},
        {**record(2, "GET", "y.test", "/"), "method": "GE T"},
    ]
    text = suggest_policy(entries_of(write_log(tmp_path / "w.jsonl", weird)))
    policy = tomllib.loads(text)
    assert [rule["path"] for rule in policy["rule"]] == ['/a"b\\c/']
    assert policy["expect"][0]["request"] == 'GET https://q.test/a"b\\c/\x01d'
    assert "2 requests with a host or method no rule can name were left out" in text


def test_suggest_uses_a_host_rule_for_paths_a_prefix_cannot_allow(tmp_path: Path) -> None:
    # A path with glob characters cannot be a prefix rule; an escaped unreserved character can,
    # since jail judges (and forwards) every path in canonical form.
    entries = entries_of(
        write_log(tmp_path / "a.jsonl", [record(0, "GET", "a.test", "/x/%7Euser"), record(1, "GET", "b.test", "/*/y")])
    )
    rules = rules_of(tomllib.loads(suggest_policy(entries)))
    assert rules["b.test"] == {"name": "b.test", "action": "allow", "host": "b.test", "methods": ["GET"]}
    assert rules["a.test /x/"]["path"] == "/x/"


def test_suggest_of_nothing_denies_everything() -> None:
    policy = tomllib.loads(suggest_policy([]))
    assert policy == {"default": "deny"}


def test_suggested_policy_allows_every_request_of_its_log(audit_log: Path, tmp_path: Path) -> None:
    policy_file = pytest.importorskip(
        "jail.policies.policy_file", reason="jail/policies/policy_file.py (PolicyEngine) is not there yet"
    )
    path = tmp_path / "suggested.toml"
    entries = entries_of(audit_log)
    path.write_text(suggest_policy(entries))

    async def decide_all() -> list[tuple[str, bool, bool]]:
        engine = policy_file.PolicyEngine([path], 5.0)
        await engine.start()
        try:
            results = []
            for e in entries:
                request = Request.build(e.method, e.scheme, e.host, e.port, e.path, e.query)
                results.append((f"{e.method} {e.url}", e.decision != "deny", (await engine.decide(request)).allow))
            for example in engine.policy.expectations:
                results.append(
                    (f"expect {example.request.url}", example.allow, (await engine.decide(example.request)).allow)
                )
            return results
        finally:
            await engine.close()

    results = asyncio.run(decide_all())
    assert [r for r in results if r[1] != r[2]] == []
    assert sum(1 for r in results if r[0].startswith("expect")) == 6


# --------------------------------------------------------------------------- the commands


def jail(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jail", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_cli_log_prints_the_table_and_warns_about_bad_lines(audit_log: Path) -> None:
    result = jail("log", str(audit_log))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("13 requests: 9 allowed, 2 denied, 2 would-deny")
    assert "pypi.org" in result.stdout and "cdn.example.com" in result.stdout
    assert result.stderr.splitlines() == [
        f"jail: warning: {audit_log}:15: not JSON (line skipped)",
        f"jail: warning: {audit_log}:16: unknown decision 'maybe' (line skipped)",
    ]


def test_cli_log_filters(audit_log: Path) -> None:
    denied = jail("log", str(audit_log), "--denied")
    assert denied.returncode == 0
    assert denied.stdout.startswith("4 requests: 0 allowed, 2 denied, 2 would-deny")
    assert "pypi.org" not in denied.stdout
    hosts = jail("log", str(audit_log), "--host", "*.example.com", "--since", "2026-01-10T10:02:00Z")
    assert hosts.returncode == 0
    assert hosts.stdout.startswith("7 requests:")
    assert "telemetry" not in hosts.stdout and "pypi" not in hosts.stdout


def test_cli_log_markdown_and_html(audit_log: Path, tmp_path: Path) -> None:
    markdown = jail("log", str(audit_log), "--markdown")
    assert markdown.returncode == 0
    assert markdown.stdout.startswith("**jail egress**: 13 requests")
    out = tmp_path / "report.html"
    html = jail("log", str(audit_log), "--html", "-o", str(out))
    assert html.returncode == 0 and html.stdout == ""
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "&lt;script&gt;" in page
    to_stdout = jail("log", str(audit_log), "--html", "-o", "-")
    assert to_stdout.stdout == page


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["log", "{dir}/missing.jsonl"], 125, "jail: error: cannot read audit log {dir}/missing.jsonl: No such file"),
        (["log", "{log}", "--html"], 2, "jail: error: --html writes a whole page: give -o report.html"),
        (["log", "{log}", "--since", "soon"], 2, "jail: error: Invalid value for --since: 'soon' is neither"),
        (["log", "{log}", "--html", "--markdown", "-o", "x"], 2, "jail: error: give --markdown or --html, not both"),
        (["policy", "suggest", "{dir}/missing.jsonl"], 125, "jail: error: cannot read audit log"),
    ],
)
def test_cli_errors_are_one_line(audit_log: Path, args: list[str], status: int, message: str) -> None:
    fill = {"dir": str(audit_log.parent), "log": str(audit_log)}
    result = jail(*(arg.format(**fill) for arg in args))
    assert result.returncode == status
    lines = [line for line in result.stderr.splitlines() if not line.startswith("jail: warning:")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(message.format(**fill))
    assert "Traceback" not in result.stderr


def test_cli_policy_suggest(audit_log: Path, tmp_path: Path) -> None:
    result = jail("policy", "suggest", str(audit_log))
    assert result.returncode == 0, result.stderr
    policy = tomllib.loads(result.stdout)
    assert policy["default"] == "deny" and len(policy["rule"]) == 6
    out = tmp_path / "policy.toml"
    written = jail("policy", "suggest", str(audit_log), "--include-denied", "-o", str(out))
    assert written.returncode == 0 and written.stdout == ""
    assert len(tomllib.loads(out.read_text())["rule"]) == 7
