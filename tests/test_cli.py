"""The `jail` command line: `--test` verdicts for every engine, and one-line errors for bad input.

Nothing here reaches the network: `--test` only asks the rule, and every bad input fails before
a proxy or a child would start.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import jail_argv


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["JAIL_CA_DIR"] = str(tmp_path / "ca")
    return env


@pytest.fixture
def jail(cli_env: dict[str, str]):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(jail_argv(*args), env=cli_env, capture_output=True, text=True, timeout=30)

    return run


def assert_one_error_line(result: subprocess.CompletedProcess, *words: str) -> str:
    """A user mistake: non-zero exit, exactly one `jail: error:` line on stderr, no traceback."""
    assert result.returncode not in (0, 1), (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("jail: error:"), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert result.stdout == ""
    return lines[0]


def assert_verdict(result: subprocess.CompletedProcess, line: str, status: int) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == line + "\n", result.stdout
    assert result.returncode == status, (result.returncode, result.stderr)


# --- --test verdicts ----------------------------------------------------------------------


def test_test_allow_prints_exactly_one_line_and_exits_0(jail):
    result = jail("--js", "r.method === 'GET'", "--test", "https://example.com/")
    assert_verdict(result, "ALLOW GET https://example.com/", 0)


def test_test_deny_prints_the_reason_and_exits_1(jail):
    result = jail("--js", "r.method === 'GET'", "--test", "POST", "https://example.com/")
    assert_verdict(result, "DENY POST https://example.com/ (denied by rule)", 1)


def test_test_method_url_form(jail):
    result = jail("--js", "r.method === 'PUT' && r.path === '/x'", "--test", "PUT", "https://example.com/x")
    assert_verdict(result, "ALLOW PUT https://example.com/x", 0)


def test_test_url_form_defaults_to_get(jail):
    result = jail("--js", "r.method === 'GET'", "--test", "https://example.com/a?b=1")
    assert_verdict(result, "ALLOW GET https://example.com/a?b=1", 0)


def test_test_lower_case_method(jail):
    result = jail("--js", "r.method === 'DELETE'", "--test", "delete", "https://example.com/")
    assert_verdict(result, "ALLOW DELETE https://example.com/", 0)


@pytest.mark.parametrize("method", ["POST", "post", "Delete"])
def test_test_method_and_url_in_one_argument_as_httpjail_writes_it(jail, method):
    rule = "r.method === 'POST' || r.method === 'DELETE'"
    result = jail("--js", rule, "--test", f"{method} https://example.com/api")
    assert_verdict(result, f"ALLOW {method.upper()} https://example.com/api", 0)
    denied = jail("--js", "r.method === 'GET'", "--test", f"{method} https://example.com/api")
    assert_verdict(denied, f"DENY {method.upper()} https://example.com/api (denied by rule)", 1)


def test_test_one_argument_with_an_unknown_method_is_refused(jail):
    result = jail("--js", "true", "--test", "FETCH https://example.com/")
    assert result.returncode == 2
    assert "not an http(s) URL" in result.stderr


def test_allow_with_a_deny_message_answers_both_ways(jail):
    rule = "({allow: r.host === 'a.test', deny_message: 'only a'})"
    assert_verdict(jail("--js", rule, "--test", "https://a.test/"), "ALLOW GET https://a.test/", 0)
    assert_verdict(jail("--js", rule, "--test", "https://b.test/"), "DENY GET https://b.test/ (only a)", 1)


def test_test_before_the_rule_option(jail):
    result = jail("--test", "https://example.com/", "--js", "r.host === 'example.com'")
    assert_verdict(result, "ALLOW GET https://example.com/", 0)


def test_test_shows_the_normalised_url(jail):
    result = jail("--js", "r.host === 'example.com' && r.port === 8443", "--test", "https://EXAMPLE.com:8443")
    assert_verdict(result, "ALLOW GET https://example.com:8443/", 0)


def test_test_deny_message(jail):
    result = jail("--js", "({deny_message: 'no uploads to ' + r.host})", "--test", "POST", "http://example.com/up")
    assert_verdict(result, "DENY POST http://example.com/up (no uploads to example.com)", 1)


def test_test_without_a_rule_denies(jail):
    result = jail("--test", "https://example.com/")
    assert result.returncode == 1
    assert result.stdout.startswith("DENY GET https://example.com/ (")
    assert "no rule" in result.stdout


def test_test_with_a_rule_error_denies(jail):
    result = jail("--js", "throw new Error('broken rule')", "--test", "https://example.com/")
    assert result.returncode == 1
    assert result.stdout.startswith("DENY GET https://example.com/ (")
    assert "broken rule" in result.stdout
    assert "Traceback" not in result.stderr


def test_test_with_a_looping_rule_denies_quickly(jail):
    result = jail("--js", "while (true) {}", "--test", "https://example.com/")
    assert_verdict(result, "DENY GET https://example.com/ (rule timed out after 100 ms)", 1)


def test_test_with_rule_timeout(jail):
    result = jail("--rule-timeout", "0.25", "--js", "while (true) {}", "--test", "https://example.com/")
    assert_verdict(result, "DENY GET https://example.com/ (rule timed out after 250 ms)", 1)


def test_test_with_js_file(jail, tmp_path):
    rule = tmp_path / "rule.js"
    rule.write_text("const ok = r.host.endsWith('.example.com');\nok\n")
    assert_verdict(
        jail("--js-file", str(rule), "--test", "https://api.example.com/"), "ALLOW GET https://api.example.com/", 0
    )
    denied = jail("--js-file", str(rule), "--test", "https://example.org/")
    assert_verdict(denied, "DENY GET https://example.org/ (denied by rule)", 1)


def test_test_with_sh(jail):
    script = 'test "$JAIL_METHOD" = GET && test "$HTTPJAIL_HOST" = example.com || { echo "only GET"; exit 1; }'
    assert_verdict(jail("--sh", script, "--test", "https://example.com/"), "ALLOW GET https://example.com/", 0)
    assert_verdict(
        jail("--sh", script, "--test", "POST", "https://example.com/"), "DENY POST https://example.com/ (only GET)", 1
    )


def test_test_with_sh_and_no_output(jail):
    result = jail("--sh", "exit 4", "--test", "https://example.com/")
    assert_verdict(result, "DENY GET https://example.com/ (rule script exited with status 4)", 1)


def test_test_with_proc(jail, tmp_path):
    program = tmp_path / "rule.py"
    program.write_text(
        textwrap.dedent("""
        import json, sys
        for line in sys.stdin:
            r = json.loads(line)
            if r["method"] == "GET":
                print(json.dumps({"id": r["id"], "allow": True}), flush=True)
            else:
                print(json.dumps({"id": r["id"], "deny_message": "read-only: " + r["url"]}), flush=True)
        """)
    )
    command = shlex.join([sys.executable, "-u", str(program)])
    assert_verdict(jail("--proc", command, "--test", "https://example.com/"), "ALLOW GET https://example.com/", 0)
    assert_verdict(
        jail("--proc", command, "--test", "PATCH", "https://example.com/x"),
        "DENY PATCH https://example.com/x (read-only: https://example.com/x)",
        1,
    )


def test_test_with_proc_in_order_text_answer(jail, tmp_path):
    program = tmp_path / "rule.py"
    program.write_text("import sys\nfor line in sys.stdin:\n    print('go away', flush=True)\n")
    result = jail("--proc", shlex.join([sys.executable, "-u", str(program)]), "--test", "https://example.com/")
    assert_verdict(result, "DENY GET https://example.com/ (go away)", 1)


def test_test_leaves_no_proc_program_running(jail, tmp_path):
    import psutil

    program = tmp_path / "rule_marker_program.py"
    program.write_text("import sys\nfor line in sys.stdin:\n    print('true', flush=True)\n")
    result = jail("--proc", shlex.join([sys.executable, "-u", str(program)]), "--test", "https://example.com/")
    assert_verdict(result, "ALLOW GET https://example.com/", 0)
    left = [
        p for p in psutil.process_iter(["cmdline"]) if any(str(program) in part for part in p.info["cmdline"] or ())
    ]
    assert left == []


# --- one line for every bad input ---------------------------------------------------------


def test_unknown_flag(jail):
    assert_one_error_line(jail("--no-such-flag", "--", "true"), "--no-such-flag")


def test_js_file_missing(jail, tmp_path):
    missing = tmp_path / "absent.js"
    assert_one_error_line(jail("--js-file", str(missing), "--test", "https://example.com/"), "absent.js")


def test_js_file_that_is_a_directory(jail, tmp_path):
    assert_one_error_line(jail("--js-file", str(tmp_path), "--test", "https://example.com/"), "--js-file")


def test_bad_js_syntax(jail):
    line = assert_one_error_line(jail("--js", "r.method ===", "--test", "https://example.com/"), "SyntaxError")
    assert "does not compile" in line


def test_bad_js_syntax_in_js_file(jail, tmp_path):
    rule = tmp_path / "rule.js"
    rule.write_text("if (r.method === 'GET' {\n  true\n}\n")
    assert_one_error_line(jail("--js-file", str(rule), "--test", "https://example.com/"), "SyntaxError")


def test_bad_js_syntax_fails_before_running_the_command(jail, tmp_path):
    marker = tmp_path / "ran"
    result = jail("--js", "x = ", "--", "sh", "-c", f"touch {shlex.quote(str(marker))}")
    assert_one_error_line(result, "does not compile")
    assert not marker.exists()


@pytest.mark.parametrize("listen", ["127.0.0.1:99999", "127.0.0.1:http", "127.0.0.1"])
def test_listen_with_a_bad_port(jail, listen):
    assert_one_error_line(jail("--js", "true", "--server", "--listen", listen), "--listen")


@pytest.mark.parametrize("listen", ["0.0.0.0:18080", "[::]:18080"])
def test_listen_public_address_needs_listen_public(jail, listen):
    assert_one_error_line(jail("--js", "true", "--server", "--listen", listen), "--listen-public")


def test_listen_without_server(jail):
    assert_one_error_line(jail("--js", "true", "--listen", "127.0.0.1:18080", "--", "true"), "--server")


@pytest.mark.parametrize(
    "rules",
    [("--js", "true", "--sh", "exit 0"), ("--proc", "cat", "--js-file", __file__)],
)
def test_two_rules_at_once(jail, rules):
    line = assert_one_error_line(jail(*rules, "--test", "https://example.com/"), "one rule")
    assert line.count("--") >= 2


def test_no_command(jail):
    assert_one_error_line(jail("--js", "true"), "no command")


def test_no_command_after_double_dash(jail):
    assert_one_error_line(jail("--js", "true", "--"), "no command")


def test_proc_with_a_missing_program(jail, tmp_path):
    missing = tmp_path / "no-such-rule-program"
    assert_one_error_line(jail("--proc", str(missing), "--test", "https://example.com/"), "no-such-rule-program")


def test_proc_with_an_unbalanced_quote(jail):
    assert_one_error_line(jail("--proc", "prog 'oops", "--test", "https://example.com/"), "--proc")


@pytest.mark.parametrize("url", ["ftp://example.com/", "example.com", "https://"])
def test_test_with_a_non_http_url(jail, url):
    assert_one_error_line(jail("--js", "true", "--test", url), "--test")


def test_test_with_a_bad_port(jail):
    assert_one_error_line(jail("--js", "true", "--test", "https://example.com:99999/"), "port")


def test_test_without_a_url(jail):
    assert_one_error_line(jail("--js", "true", "--test"), "--test")


def test_test_with_a_method_but_no_url(jail):
    assert_one_error_line(jail("--js", "true", "--test", "POST"), "--test")


def test_test_with_a_command(jail):
    assert_one_error_line(jail("--js", "true", "--test", "https://example.com/", "--", "true"), "command")


@pytest.mark.parametrize("value", ["0", "abc"])
def test_bad_rule_timeout(jail, value):
    assert_one_error_line(
        jail("--js", "true", "--rule-timeout", value, "--test", "https://example.com/"), "--rule-timeout"
    )


@pytest.mark.parametrize("value", ["0", "soon"])
def test_bad_timeout(jail, value):
    assert_one_error_line(jail("--js", "true", "--timeout", value, "--", "true"), "--timeout")


def test_server_with_a_command(jail):
    assert_one_error_line(jail("--js", "true", "--server", "--", "true"), "--server")


# --- the usual ones -----------------------------------------------------------------------


def test_help(jail):
    result = jail("--help")
    assert result.returncode == 0
    for option in ("--js", "--js-file", "--sh", "--proc", "--rule-timeout", "--server", "--listen"):
        assert option in result.stdout
    assert result.stderr == ""


def test_version(jail):
    result = jail("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("jail")
