"""Policy files: matching, composition, hooks and strict validation (no network, no proxy)."""

from __future__ import annotations

import asyncio
import re
import textwrap
from pathlib import Path

import pytest

from jail.model import Decision, JailError, Request
from jail.policies import Judge, RuleSpec, build_engine
from jail.policies.policy_file import PolicyEngine, canonical_path, load_policy, parse_example

POLICIES = Path(__file__).resolve().parent.parent / "policies"


def write(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def decide_all(engine: PolicyEngine, *examples: str) -> list[Decision]:
    async def run() -> list[Decision]:
        await engine.start()
        try:
            return [await engine.decide(parse_example(example)) for example in examples]
        finally:
            await engine.close()

    return asyncio.run(run())


def verdicts(engine: PolicyEngine, *examples: str) -> dict[str, str]:
    return {
        example: "allow" if decision.allow else "deny"
        for example, decision in zip(examples, decide_all(engine, *examples), strict=True)
    }


def policy(tmp_path: Path, text: str) -> PolicyEngine:
    return PolicyEngine([write(tmp_path, text)])


def allowed(engine: PolicyEngine, *examples: str) -> list[str]:
    return [example for example, verdict in verdicts(engine, *examples).items() if verdict == "allow"]


# --- hosts ---


def test_exact_host_is_exact_about_dots_and_case(tmp_path):
    engine = policy(tmp_path, '[[rule]]\naction = "allow"\nhost = "api.github.com"\n')
    assert allowed(
        engine,
        "https://api.github.com/x",
        "https://API.GitHub.COM/x",
        "https://api.github.com./x",
        "https://api.github.com.evil.example/x",
        "https://apiXgithubYcom/x",
        "https://api-github.com/x",
        "https://xapi.github.com/x",
        "https://a.api.github.com/x",
        "https://github.com/x",
        "https://api.github.co/x",
    ) == ["https://api.github.com/x", "https://API.GitHub.COM/x", "https://api.github.com./x"]


def test_host_pattern_is_normalised_like_the_request(tmp_path):
    engine = policy(tmp_path, '[[rule]]\naction = "allow"\nhost = ["API.GitHub.COM.", "bücher.example"]\n')
    assert allowed(engine, "https://api.github.com/", "https://xn--bcher-kva.example/", "https://bucher.example/") == [
        "https://api.github.com/",
        "https://xn--bcher-kva.example/",
    ]


def test_wildcard_host_matches_subdomains_only(tmp_path):
    engine = policy(tmp_path, '[[rule]]\naction = "allow"\nhost = "*.github.com"\n')
    assert allowed(
        engine,
        "https://api.github.com/",
        "https://a.b.github.com/",
        "https://github.com/",
        "https://evilgithub.com/",
        "https://github.com.evil.example/",
        "https://api.github.com.evil.example/",
        "https://apiXgithub.com/",
    ) == ["https://api.github.com/", "https://a.b.github.com/"]


def test_host_list_and_ip_address(tmp_path):
    engine = policy(tmp_path, '[[rule]]\naction = "allow"\nhost = ["pypi.org", "*.pythonhosted.org", "127.0.0.2"]\n')
    assert allowed(
        engine,
        "https://pypi.org/",
        "https://files.pythonhosted.org/",
        "https://pythonhosted.org/",
        "http://127.0.0.2:8000/",
        "http://127.0.0.20/",
        "https://test.pypi.org/",
    ) == ["https://pypi.org/", "https://files.pythonhosted.org/", "http://127.0.0.2:8000/"]


def test_no_host_matches_any_host(tmp_path):
    engine = policy(tmp_path, '[[rule]]\naction = "allow"\nmethods = ["GET"]\n')
    assert allowed(engine, "https://a.example/", "http://b.example:81/", "POST https://a.example/") == [
        "https://a.example/",
        "http://b.example:81/",
    ]


# --- ports, schemes, methods ---


def test_ports(tmp_path):
    engine = policy(
        tmp_path, '[[rule]]\naction = "allow"\nport = 8443\n[[rule]]\naction = "allow"\nport = [80, 8080]\n'
    )
    assert allowed(
        engine,
        "https://x.example:8443/",
        "https://x.example/",
        "http://x.example/",
        "http://x.example:8080/",
        "https://x.example:80/",
        "http://x.example:8081/",
    ) == ["https://x.example:8443/", "http://x.example/", "http://x.example:8080/", "https://x.example:80/"]


def test_schemes(tmp_path):
    engine = policy(tmp_path, '[[rule]]\naction = "allow"\nscheme = "https"\n')
    assert allowed(engine, "https://x.example/", "http://x.example/", "http://x.example:443/") == ["https://x.example/"]
    engine = policy(tmp_path, '[[rule]]\naction = "allow"\nscheme = ["http", "https"]\n')
    assert len(allowed(engine, "https://x.example/", "http://x.example/")) == 2


def test_methods_are_case_insensitive_in_the_file(tmp_path):
    engine = policy(tmp_path, '[[rule]]\naction = "allow"\nmethods = ["get", "HEAD"]\n')
    assert allowed(
        engine, "GET https://x.example/", "HEAD https://x.example/", "POST https://x.example/", "get https://x.example/"
    ) == ["GET https://x.example/", "HEAD https://x.example/", "get https://x.example/"]
    engine = policy(tmp_path, '[[rule]]\naction = "allow"\nmethods = "PUT"\n')
    assert allowed(engine, "PUT https://x.example/", "GET https://x.example/") == ["PUT https://x.example/"]


# --- paths ---


def test_path_prefix(tmp_path):
    engine = policy(tmp_path, '[[rule]]\naction = "allow"\npath = "/repos/"\n')
    assert allowed(
        engine,
        "https://x.example/repos/",
        "https://x.example/repos/a/b",
        "https://x.example/repos",
        "https://x.example/reposx/a",
        "https://x.example/other/repos/a",
        "https://x.example/?/repos/",
    ) == ["https://x.example/repos/", "https://x.example/repos/a/b"]


def test_path_glob_star_stays_in_a_segment_double_star_crosses(tmp_path):
    engine = policy(tmp_path, '[[rule]]\naction = "allow"\npath = "/repos/*/issues"\n')
    assert allowed(
        engine,
        "https://x.example/repos/a/issues",
        "https://x.example/repos/a/b/issues",
        "https://x.example/repos/a/issues/1",
        "https://x.example/repos//issues",
    ) == ["https://x.example/repos/a/issues", "https://x.example/repos//issues"]
    engine = policy(tmp_path, '[[rule]]\naction = "allow"\npath = "/repos/**/issues"\n')
    assert allowed(
        engine,
        "https://x.example/repos/a/issues",
        "https://x.example/repos/a/b/issues",
        "https://x.example/repos/a/issues/1",
    ) == ["https://x.example/repos/a/issues", "https://x.example/repos/a/b/issues"]


def test_path_glob_question_mark_and_literal_characters(tmp_path):
    engine = policy(tmp_path, '[[rule]]\naction = "allow"\npath = ["/v?/models", "/a.b/[x]*"]\n')
    assert allowed(
        engine,
        "https://x.example/v1/models",
        "https://x.example/v12/models",
        "https://x.example/v//models",
        "https://x.example/a.b/[x]1",
        "https://x.example/aXb/[x]1",
        "https://x.example/a.b/x1",
    ) == ["https://x.example/v1/models", "https://x.example/a.b/[x]1"]  # '.' and '[x]' are literal


def test_query_is_not_part_of_the_path(tmp_path):
    engine = policy(tmp_path, '[[rule]]\naction = "allow"\npath = "**/info/refs"\n')
    assert allowed(
        engine,
        "https://x.example/o/r.git/info/refs?service=git-upload-pack",
        "https://x.example/o/r.git/info/refs/x?service=git-upload-pack",
    ) == ["https://x.example/o/r.git/info/refs?service=git-upload-pack"]


def test_paths_are_judged_in_canonical_form(tmp_path):
    """Every request's path is canonical before a rule sees it (and is forwarded so): dot segments
    and escaped unreserved characters cannot smuggle a path past a prefix or around a deny."""
    engine = policy(
        tmp_path,
        """
        [[rule]]
        action = "deny"
        path = "**/git-receive-pack"
        [[rule]]
        action = "allow"
        path = "/ok/"
        [[rule]]
        action = "allow"
        host = "open.example"
        """,
    )
    assert verdicts(
        engine,
        "https://x.example/ok/a",
        "https://x.example/ok/../secret",
        "https://x.example/ok/./a",
        "https://x.example/%6Fk/a",
        "https://x.example/ok/%2e%2e/secret",
        "https://x.example/ok/.well-known",
        "https://open.example/ok/../anything",
        "POST https://open.example/o/r/git-receive-pack",
        "POST https://open.example/o/r/x/../git-receive-pack",
        "POST https://open.example/o/r/git-receive-p%61ck",
        "POST https://open.example/o/r/git-receive-pack/..",
    ) == {
        "https://x.example/ok/a": "allow",
        "https://x.example/ok/../secret": "deny",
        "https://x.example/ok/./a": "allow",  # is /ok/a
        "https://x.example/%6Fk/a": "allow",  # is /ok/a
        "https://x.example/ok/%2e%2e/secret": "deny",
        "https://x.example/ok/.well-known": "allow",
        "https://open.example/ok/../anything": "allow",  # no path condition on that rule
        "POST https://open.example/o/r/git-receive-pack": "deny",
        "POST https://open.example/o/r/x/../git-receive-pack": "deny",
        "POST https://open.example/o/r/git-receive-p%61ck": "deny",
        "POST https://open.example/o/r/git-receive-pack/..": "allow",  # resolves to /o/r/
    }


def test_canonical_path():
    assert canonical_path("/a/b") is None
    assert canonical_path("/a/.well-known/x") is None
    assert canonical_path("/@types%2fnode") is None  # an encoded '/' is not decoded
    assert canonical_path("/a/./b") == "/a/b"
    assert canonical_path("/a/b/../c") == "/a/c"
    assert canonical_path("/a/b/..") == "/a/"
    assert canonical_path("/../../x") == "/x"
    assert canonical_path("/%41%7e/%2E%2e/x") == "/x"  # "%41%7e" decodes to "A~", then ".." removes it
    assert canonical_path("/a%2E%2e/x") == "/a../x"
    assert canonical_path("/%41%7e/x") == "/A~/x"


# --- order, defaults, decisions ---


def test_first_matching_rule_wins(tmp_path):
    engine = policy(
        tmp_path,
        """
        [[rule]]
        name = "no-posts"
        action = "deny"
        methods = ["POST"]
        reason = "read only"
        [[rule]]
        name = "all"
        action = "allow"
        [[rule]]
        name = "never-reached"
        action = "deny"
        """,
    )
    post, get = decide_all(engine, "POST https://x.example/", "GET https://x.example/")
    assert (post.allow, post.rule, post.reason) == (False, "no-posts", "read only")
    assert (get.allow, get.rule) == (True, "all")


def test_rule_is_named_or_file_and_line(tmp_path):
    path = write(
        tmp_path,
        """
        # comment
        default = "deny"

        [[rule]]
        action = "deny"
        host = "a.example"

        [[rule]]
        name = "b-rule"
        action = "allow"
        host = "b.example"
        """,
    )
    a, b = decide_all(PolicyEngine([path]), "https://a.example/", "https://b.example/")
    assert a.rule == f"{path}:4"
    assert a.reason == f"denied by policy rule {path}:4"
    assert a.reason_code == "rule_deny"
    assert b.rule == "b-rule"
    assert b.allow


def test_default_deny_names_the_files(tmp_path):
    first = write(tmp_path, '[[rule]]\naction = "allow"\nhost = "a.example"\n', "first.toml")
    second = write(tmp_path, "", "second.toml")
    (decision,) = decide_all(PolicyEngine([first, second]), "https://z.example/")
    assert not decision.allow
    assert decision.rule == "default"
    assert "no policy rule matched" in decision.reason
    assert f"{first}, {second}" in decision.reason


def test_default_allow(tmp_path):
    path = write(tmp_path, 'default = "allow"\n[[rule]]\naction = "deny"\nhost = "a.example"\n')
    a, z = decide_all(PolicyEngine([path]), "https://a.example/", "https://z.example/")
    assert not a.allow
    assert z.allow and z.rule == "default" and f"{path}:1" in z.reason


def test_an_empty_policy_denies(tmp_path):
    (decision,) = decide_all(policy(tmp_path, ""), "https://x.example/")
    assert not decision.allow


def test_max_tx_bytes_reaches_the_decision(tmp_path):
    engine = policy(
        tmp_path,
        '[[rule]]\naction = "allow"\nhost = "up.example"\nmax_tx_bytes = 1024\n[[rule]]\naction = "allow"\n',
    )
    capped, free = decide_all(engine, "POST https://up.example/", "POST https://other.example/")
    assert capped.allow and capped.max_tx_bytes == 1024
    assert free.allow and free.max_tx_bytes is None
    engine = policy(tmp_path, '[[rule]]\naction = "allow"\nmax_tx_bytes = 0\n')
    assert decide_all(engine, "POST https://x.example/")[0].max_tx_bytes == 0


def test_judge_stamps_the_policy_engine(tmp_path):
    engine = build_engine(RuleSpec("policy", files=(write(tmp_path, '[[rule]]\nname = "r"\naction = "allow"\n'),)))
    assert isinstance(engine, PolicyEngine) and engine.name == "policy"

    async def run() -> Decision:
        await engine.start()
        try:
            return await Judge(engine, audit_mode=True).decide(Request.from_url("https://x.example/"))
        finally:
            await engine.close()

    decision = asyncio.run(run())
    assert (decision.allow, decision.engine, decision.rule) == (True, "policy", "r")


def test_decide_compiles_nothing(tmp_path, monkeypatch):
    engine = policy(
        tmp_path,
        '[[rule]]\naction = "deny"\npath = ["/a/*/b", "**/c"]\nhost = "*.x.example"\n[[rule]]\naction = "allow"\n',
    )

    def no_compile(*args, **kwargs):
        raise AssertionError("re.compile called while deciding")

    monkeypatch.setattr(re, "compile", no_compile)
    monkeypatch.setattr(re, "fullmatch", no_compile)
    monkeypatch.setattr(re, "match", no_compile)
    results = decide_all(engine, "https://a.x.example/a/1/b", "https://a.x.example/z/c", "https://a.x.example/a/../c")
    assert [d.allow for d in results] == [False, False, False]


# --- composition ---


def test_files_compose_in_order(tmp_path):
    first = write(
        tmp_path,
        """
        default = "allow"
        [[rule]]
        name = "first-deny"
        action = "deny"
        host = "a.example"
        """,
        "first.toml",
    )
    second = write(
        tmp_path,
        """
        [[rule]]
        name = "second-allow"
        action = "allow"
        host = ["a.example", "b.example"]
        [[rule]]
        name = "second-deny"
        action = "deny"
        host = "c.example"
        """,
        "second.toml",
    )
    third = write(tmp_path, 'default = "deny"\n', "third.toml")
    a, b, c, z = decide_all(
        PolicyEngine([first, second]), "https://a.example/", "https://b.example/", "https://c.example/", "https://z/"
    )
    assert (a.allow, a.rule) == (False, "first-deny")  # earlier file's rule comes first
    assert (b.allow, b.rule) == (True, "second-allow")
    assert (c.allow, c.rule) == (False, "second-deny")
    assert z.allow  # default from first.toml, second.toml sets none
    (z,) = decide_all(PolicyEngine([first, second, third]), "https://z/")
    assert not z.allow  # the last file that sets default wins
    (a,) = decide_all(PolicyEngine([second, first]), "https://a.example/")
    assert a.rule == "second-allow"


def test_same_rule_name_in_two_files_is_allowed(tmp_path):
    first = write(tmp_path, '[[rule]]\nname = "x"\naction = "deny"\nhost = "a.example"\n', "first.toml")
    second = write(tmp_path, '[[rule]]\nname = "x"\naction = "allow"\n', "second.toml")
    assert [d.allow for d in decide_all(PolicyEngine([first, second]), "https://a.example/", "https://b/")] == [
        False,
        True,
    ]


def test_expectations_of_all_files_are_kept_in_order(tmp_path):
    first = write(tmp_path, '[[expect]]\nrequest = "https://a/"\ndecision = "deny"\n', "first.toml")
    second = write(
        tmp_path,
        '[[expect]]\nrequest = "POST http://b:8080/x?y"\ndecision = "allow"\n[[expect]]\nrequest = "https://c/"\ndecision = "deny"\n',
        "second.toml",
    )
    examples = load_policy([first, second]).expectations
    assert [(e.where, e.request.method, e.request.url, e.allow) for e in examples] == [
        (f"{first}:1", "GET", "https://a/", False),
        (f"{second}:1", "POST", "http://b:8080/x?y", True),
        (f"{second}:4", "GET", "https://c/", False),
    ]


# --- hooks ---


def test_hooks_only_for_requests_no_rule_matched(tmp_path):
    path = write(
        tmp_path,
        """
        default = "deny"
        [[rule]]
        name = "deny-secret"
        action = "deny"
        path = "/secret"
        [[rule]]
        name = "allow-public"
        action = "allow"
        path = "/public"

        [hooks]
        js = "r.host.endsWith('.internal') || r.path === '/secret'"
        """,
    )
    secret, public, internal, other = decide_all(
        PolicyEngine([path]),
        "https://a.internal/secret",
        "https://x.example/public",
        "https://a.internal/anything",
        "https://x.example/anything",
    )
    assert (secret.allow, secret.rule) == (False, "deny-secret")
    assert (public.allow, public.rule) == (True, "allow-public")
    assert (internal.allow, internal.rule) == (True, f"{path}:12")
    assert (other.allow, other.rule) == (False, f"{path}:12")
    assert "no policy rule matched" not in other.reason  # the hook decided, not the default


def test_hooks_sh_and_js_file_and_last_file_wins(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rule.js").write_text("r.method === 'GET' ? true : {deny_message: 'js_file says no'}")
    js_file = write(tmp_path, '[hooks]\njs_file = "rule.js"\n', "sub/js.toml")
    shell = write(
        tmp_path, '[hooks]\nsh = \'test "$JAIL_HOST" = ok.example || { echo "sh says no"; exit 1; }\'\n', "sh.toml"
    )
    get, post = decide_all(PolicyEngine([js_file]), "https://x.example/", "POST https://x.example/")
    assert get.allow and not post.allow and post.reason == "js_file says no"
    ok, no = decide_all(PolicyEngine([js_file, shell]), "POST https://ok.example/", "https://x.example/")
    assert ok.allow and (no.allow, no.reason, no.rule) == (False, "sh says no", f"{shell}:2")


def test_hook_that_does_not_compile_names_the_file(tmp_path):
    path = write(tmp_path, '# x\n[hooks]\njs = "r.host ==="\n')
    engine = PolicyEngine([path])
    with pytest.raises(JailError, match=rf"^{re.escape(str(path))}:3: hooks: JavaScript rule does not compile"):
        decide_all(engine, "https://x/")


# --- validation: every error names FILE:LINE and the key ---

VALIDATION_ERRORS = [
    # (file text, line, message after "FILE:LINE: ")
    (
        'default = "deny"\n\n[[rule]]\naction = "allow"\nhost = "a"\n\n[[rule]]\naction = "allow"\n# hostt\nhostt = "b"\n',
        10,
        "rule 2: unknown key 'hostt' (known: name, action, host, port, scheme, methods, client, path, reason, max_tx_bytes)",
    ),
    ('[[rule]]\naction = "allow"\nport = "443"\n', 3, "rule 1: 'port' must be a port number (1-65535) or a list"),
    ('[[rule]]\naction = "allow"\nport = [443, 70000]\n', 3, "rule 1: 'port' must be a port number"),
    ('[[rule]]\naction = "allow"\nport = true\n', 3, "rule 1: 'port' must be a port number"),
    (
        '[[rule]]\nname = "x"\n\n    action = "alow"\n',
        4,
        'rule 1: \'action\' must be "allow", "deny" or "ask", not "alow"',
    ),
    ("[[rule]]\naction = true\n", 2, "rule 1: 'action' must be"),
    ('\n[[rule]]\nhost = "x.example"\n', 2, "rule 1: missing required key 'action'"),
    ('[[rule]]\naction = "allow"\nhost = 3\n', 3, "rule 1: 'host' must be a host name"),
    ('[[rule]]\naction = "allow"\nhost = []\n', 3, "rule 1: 'host' must be a host name"),
    (
        '[[rule]]\naction = "allow"\nhost = "example.com:443"\n',
        3,
        "rule 1: 'host' \"example.com:443\": a host name only",
    ),
    ('[[rule]]\naction = "allow"\nhost = "https://example.com"\n', 3, "rule 1: 'host' \"https://example.com\""),
    ('[[rule]]\naction = "allow"\nhost = ["ok.example", "api.*.com"]\n', 3, "rule 1: 'host' \"api.*.com\": a wildcard"),
    ('[[rule]]\naction = "allow"\nhost = "*"\n', 3, "rule 1: 'host' \"*\": leave 'host' out"),
    ('[[rule]]\naction = "allow"\nhost = "bad_host!"\n', 3, "rule 1: 'host' \"bad_host!\": not a valid host name"),
    ('[[rule]]\naction = "allow"\nscheme = "ftp"\n', 3, 'rule 1: \'scheme\' must be "http", "https"'),
    ('[[rule]]\naction = "allow"\nmethods = ["GET", "NOT A METHOD"]\n', 3, "rule 1: 'methods' must be a list"),
    ('[[rule]]\naction = "allow"\npath = "repos/"\n', 3, "rule 1: 'path' must be a path starting with \"/\""),
    ('[[rule]]\naction = "allow"\nreason = 1\n', 3, "rule 1: 'reason' must be a string, not 1"),
    ('[[rule]]\naction = "allow"\nname = ""\n', 3, "rule 1: 'name' must be a non-empty string"),
    (
        '[[rule]]\nname = "a"\naction = "allow"\n[[rule]]\nname = "a"\naction = "deny"\n',
        5,
        "rule 2: 'name' \"a\" is already used by the rule at line 1",
    ),
    ('[[rule]]\naction = "deny"\nmax_tx_bytes = 10\n', 3, "rule 1: 'max_tx_bytes' only applies to allow rules"),
    ('[[rule]]\naction = "allow"\nmax_tx_bytes = -1\n', 3, "rule 1: 'max_tx_bytes' must be a non-negative integer"),
    ('[[rule]]\naction = "allow"\nmax_tx_bytes = 1.5\n', 3, "rule 1: 'max_tx_bytes' must be a non-negative integer"),
    (
        '# top\ndefualt = "deny"\n',
        2,
        "unknown top-level key 'defualt' (known: default, rule, hooks, expect, filesystem)",
    ),
    ('[[rules]]\naction = "allow"\n', 1, "unknown top-level key 'rules'"),
    ('default = "maybe"\n', 1, '\'default\' must be "allow", "deny" or "ask", not "maybe"'),
    ('[rule]\naction = "allow"\n', 1, "'rule' must be an array of tables: write [[rule]], not [rule]"),
    ('rule = [{action = "allow"}, {action = "nope"}]\n', 1, "rule 2: 'action' must be"),
    ('[[rule]]\naction = "allow"\n[rule.extra]\nx = 1\n', 3, "rule 1: unknown key 'extra'"),
    # multi-line values do not confuse the line numbers
    (
        '[[rule]]\naction = "allow"\nreason = """\nhostt = 1\n[[rule]]\n"""\nmethods = [\n  "GET",\n]\nhostt = 3\n',
        10,
        "rule 1: unknown key 'hostt'",
    ),
    ('[hooks]\njs = "true"\nsh = "true"\n', 3, "hooks: give exactly one of js, js_file, sh, proc"),
    ("[hooks]\n", 1, "hooks: give exactly one of js, js_file, sh, proc"),
    ('[hooks]\npython = "x"\n', 2, "hooks: unknown key 'python' (known: js, js_file, sh, proc)"),
    ('[hooks]\nsh = ""\n', 2, "hooks: 'sh' must be a non-empty string"),
    ('[hooks]\n\njs_file = "missing.js"\n', 3, "hooks: 'js_file' \"missing.js\" not found"),
    ('hooks = "js"\n', 1, "'hooks' must be a table: write [hooks]"),
    ('[[expect]]\nrequest = "https://x/"\ndecision = "yes"\n', 3, 'expect 1: \'decision\' must be "allow" or "deny"'),
    ('[[expect]]\nrequest = "https://x/"\n', 1, "expect 1: missing required key 'decision'"),
    ('[[expect]]\nrequest = "ftp://x/"\ndecision = "deny"\n', 2, "expect 1: 'request': not an http(s) URL"),
    ('[[expect]]\nrequest = "GET x y"\ndecision = "deny"\n', 2, "expect 1: 'request': expected \"METHOD URL\""),
    ('[[expect]]\nrequest = "https://x/"\ndecision = "deny"\nrule = "x"\n', 4, "expect 1: unknown key 'rule'"),
    ("[[filesystem]]\n", 1, "'filesystem' must be a table: write [filesystem]"),
]


@pytest.mark.parametrize(("text", "line", "message"), VALIDATION_ERRORS)
def test_validation_errors_name_file_line_and_key(tmp_path, text, line, message):
    path = tmp_path / "policies" / "ci.toml"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(JailError) as error:
        PolicyEngine([path])
    assert str(error.value).startswith(f"{path}:{line}: {message}")
    assert "\n" not in str(error.value)


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, '[[rule]]\naction = "allow"\nhost = api.github.com\n')
    with pytest.raises(JailError, match=rf"^{re.escape(str(path))}:3: invalid TOML: Invalid value \(column 8\)$"):
        PolicyEngine([path])
    path = write(tmp_path, '[[rule]]\naction = "allow"\nhost = [\n\n\n')
    with pytest.raises(JailError, match=rf"^{re.escape(str(path))}:3: invalid TOML: .* at the end of the file$"):
        PolicyEngine([path])


def test_unreadable_file(tmp_path):
    with pytest.raises(JailError, match=r"missing\.toml: cannot read policy file"):
        PolicyEngine([tmp_path / "missing.toml"])
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(JailError, match=r"bin\.toml: not UTF-8"):
        PolicyEngine([tmp_path / "bin.toml"])


def test_filesystem_table_is_reserved_and_ignored(tmp_path):
    engine = policy(tmp_path, '[filesystem]\nread = ["/etc"]\n[filesystem.anything]\nx = 1\n')
    assert not decide_all(engine, "https://x/")[0].allow


# --- the shipped policies ---

SHIPPED = sorted(POLICIES.glob("*.toml"))


def test_the_four_policies_ship():
    assert {path.name for path in SHIPPED} >= {"model-apis.toml", "github-readonly.toml", "registries.toml", "ci.toml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_shipped_policy_has_allow_and_deny_examples(path):
    loaded = load_policy([path])
    assert loaded.default == "deny"
    assert sum(e.allow for e in loaded.expectations) >= 3
    assert sum(not e.allow for e in loaded.expectations) >= 3


def test_ci_is_registries_plus_github_readonly():
    def signatures(*names: str) -> list[tuple]:
        return [(rule.name, rule.signature()) for rule in load_policy([POLICIES / n for n in names]).rules]

    assert signatures("ci.toml") == signatures("registries.toml", "github-readonly.toml")
    ci = load_policy([POLICIES / "ci.toml"]).expectations
    parts = load_policy([POLICIES / "registries.toml", POLICIES / "github-readonly.toml"]).expectations
    assert [(e.request, e.allow) for e in ci] == [(e.request, e.allow) for e in parts]


def test_github_readonly_stops_pushes(tmp_path):
    engine = PolicyEngine([POLICIES / "github-readonly.toml"])
    push, fetch = decide_all(
        engine,
        "POST https://github.com/o/r.git/git-receive-pack",
        "POST https://github.com/o/r.git/git-upload-pack",
    )
    assert (push.allow, push.rule) == (False, "git-push") and "git push" in push.reason
    assert (fetch.allow, fetch.rule) == (True, "git-fetch")
