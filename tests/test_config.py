"""Config files: ./jail.toml (or --config FILE) and $XDG_CONFIG_HOME/jail/config.toml hold the flags'
settings; flags win over the project file, the project file over the user file; --explain says where
each setting came from; a broken file is one `FILE:LINE` error; the jailed command cannot rewrite them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from jail.cli import main
from jail.config import settings_of
from tests.conftest import jail_argv
from tests.test_confine import MODES, REWRITE_RULE, assert_rule_survived, pytestmark_linux, rootless_only
from tests.test_rootless import RootlessUser, user  # noqa: F401  (the rootless test user fixture)

DENY_X = "r.path !== '/x'"  # denies the test's request (/x): its 403 shows the file's rule is in force


@pytest.fixture
def folders(tmp_path: Path, jail_env: dict[str, str]):
    """A project folder to run in, and a user config folder ($XDG_CONFIG_HOME) of the test's own."""
    project, xdg = tmp_path / "project", tmp_path / "xdg"
    project.mkdir()
    (xdg / "jail").mkdir(parents=True)
    env = {k: v for k, v in jail_env.items() if k != "JAIL_MANAGED_POLICY"}
    env["XDG_CONFIG_HOME"] = str(xdg)
    return project, xdg / "jail" / "config.toml", env


def jail(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(jail_argv(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def explained(env: dict[str, str], cwd: Path, *args: str) -> list[str]:
    result = jail(env, cwd, *args, "--explain", "--", "true")
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_every_flag_but_the_actions_is_a_setting() -> None:
    settings = settings_of(main)
    assert {"js", "js-file", "policy", "allow-write", "secret", "audit-log", "weak", "timeout", "rule-timeout"} <= set(
        settings
    )
    assert {"profile", "no-profile", "upstream-proxy", "upstream-ca", "allow-private", "keep-caches"} <= set(settings)
    assert not {"explain", "cleanup", "server", "config", "no-config", "test-url", "help", "version"} & set(settings)


def test_flags_win_over_the_project_file_which_wins_over_the_user_file(folders) -> None:
    project, user_file, env = folders
    user_file.write_text('timeout = 30\naudit-log = "user.jsonl"\nallow-write = ["user-out"]\n')
    (project / "jail.toml").write_text('audit-log = "logs/audit.jsonl"\nallow-write = ["out"]\njs = "false"\n')
    lines = explained(env, project, "--allow-write", str(project / "flag-out"))
    project_file = project / "jail.toml"
    assert "  --timeout: from " + f"{user_file}:1" in lines
    assert f"  --audit-log: from {project_file}:1" in lines
    assert f"  --js: from {project_file}:3" in lines
    assert "  --allow-write: flag" in lines
    # Each value is the winner's; a relative path is relative to the file's folder.
    assert f"audit log: {project / 'logs' / 'audit.jsonl'} (one JSON object per request, header names only)" in lines
    assert "timeout: the command is killed after 30 s (exit 124)" in lines
    assert f"  writable: {project / 'flag-out'} and a private temp dir" in lines
    assert "engine: JavaScript (--js), the request is `r`" in lines and "  code: false" in lines
    assert (
        f"config files read (flags win over the project file, it over the user file): {user_file}, {project_file}"
        in lines
    )


def test_a_rule_flag_replaces_the_files_rule_instead_of_conflicting(folders, tmp_path: Path) -> None:
    project, user_file, env = folders
    (project / "team.toml").write_text('default = "allow"\n')
    user_file.write_text('sh = "exit 1"\n')
    (project / "jail.toml").write_text('policy = ["team.toml"]\n')
    lines = explained(env, project)
    assert f"engine: policy files (--policy) {project / 'team.toml'}" in lines
    assert any(line.startswith(f"  sh from {user_file}:1 is replaced by policy from") for line in lines), lines
    lines = explained(env, project, "--js", "true")
    assert "engine: JavaScript (--js), the request is `r`" in lines
    assert any(
        line.startswith(f"  policy from {project / 'jail.toml'}:1 is replaced by js from the command line")
        for line in lines
    )
    assert jail(env, project, "--js", "true", "--test", "https://example.com/").stdout.startswith("ALLOW")


def test_no_profile_flag_replaces_a_profile_from_the_file(folders) -> None:
    project, _, env = folders
    (project / "jail.toml").write_text('profile = "codex"\njs = "true"\n')
    assert any(line.startswith("agent profile: codex") for line in explained(env, project))
    assert "agent profile: none" in explained(env, project, "--no-profile")


def test_config_flag_names_the_project_file_and_no_config_reads_none(folders, tmp_path: Path) -> None:
    project, user_file, env = folders
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "rule.js").write_text("r.host === 'a.test'\n")
    (elsewhere / "ci.toml").write_text('js-file = "rule.js"\n')
    (project / "jail.toml").write_text('js = "false"\n')
    user_file.write_text("timeout = 5\n")
    lines = explained(env, project, "--config", str(elsewhere / "ci.toml"))
    assert f"engine: JavaScript file (--js-file) {elsewhere / 'rule.js'}, reloaded when it changes" in lines
    assert "timeout: the command is killed after 5 s (exit 124)" in lines
    lines = explained(env, project, "--no-config")
    assert "engine: none" in lines and not any(line.startswith("timeout:") for line in lines)
    assert "config files read (flags win over the project file, it over the user file): none" in lines
    missing = jail(env, project, "--config", "nope.toml", "--explain")
    assert missing.returncode == 125 and missing.stderr == "jail: error: --config: no file nope.toml\n"


def test_values_are_typed_like_the_flags(folders) -> None:
    project, user_file, env = folders
    env = dict(env, TEAM_TOKEN="s3cret")
    user_file.write_text(
        'js = "true"\nweak = true\nrule-timeout = 2\nsecret = ["TEAM_TOKEN=api.example.com"]\nallow-private = "10.9.0.0/16"\n'
    )
    lines = explained(env, project)
    assert "rule timeout: 2 s (--rule-timeout)" in lines
    assert any(line.startswith("mode: weak, because of --weak") for line in lines)
    assert "secret TEAM_TOKEN: placeholder in the child, real value only for https://api.example.com" in lines
    assert "private ranges the proxy may reach (--allow-private): 10.9.0.0/16" in lines
    assert "s3cret" not in "\n".join(lines)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('secret = ["GITHUB_TOKEN=evil.example"]\n', "secret"),
        ('upstream-proxy = "http://evil.example:3128"\n', "upstream-proxy"),
        ("no-fs-restrictions = true\n", "no-fs-restrictions"),
        ('allow-unix-socket = ["/var/run/docker.sock"]\n', "allow-unix-socket"),
        ('otlp-endpoint = "http://evil.example:4318"\n', "otlp-endpoint"),
        ("weak = true\n", "weak"),
        ("ssh-agent = true\n", "ssh-agent"),
    ],
)
def test_a_project_file_cannot_hand_out_secrets_or_weaken_the_jail(folders, text: str, key: str) -> None:
    """A cloned repository's jail.toml was written by the repository's author, not by the user."""
    project, _, env = folders
    (project / "jail.toml").write_text('js = "true"\n' + text)
    result = jail(dict(env, GITHUB_TOKEN="ghp_real"), project, "--explain", "--", "true")
    assert result.returncode == 125
    assert f"jail.toml:2: '{key}' is not taken from a project's jail.toml" in result.stderr
    assert "ghp_real" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("key", "outside", "inside"),
    [("allow-write", '["/"]', '["build"]'), ("audit-log", '"../../outside.jsonl"', '"logs/egress.jsonl"')],
)
def test_a_project_file_writes_only_inside_its_folder(folders, key: str, outside: str, inside: str) -> None:
    project, _, env = folders
    (project / "jail.toml").write_text(f'js = "true"\n{key} = {outside}\n')
    result = jail(env, project, "--explain", "--", "true")
    assert result.returncode == 125
    assert f"jail.toml:2: '{key}' = " in result.stderr and "lies outside the project's folder" in result.stderr
    (project / "jail.toml").write_text(f'js = "true"\n{key} = {inside}\n')
    allowed = jail(env, project, "--explain", "--", "true")
    assert allowed.returncode == 0, allowed.stderr


BROKEN = [
    ('js = "true"\n\njs_file = "x.js"\n', 3, "unknown setting 'js_file' (did you mean 'js-file'?"),
    ('js = "true"\nverbose = 1\nweeak = true\n', 3, "unknown setting 'weeak' (did you mean 'weak'?"),
    ('js = "true"\nweak = "yes"\n', 2, "'weak': must be true or false, not 'yes'"),
    ('timeout = "10"\n', 1, "'timeout': must be a number, not '10'"),
    ("timeout = -1\n", 1, "'timeout': -1.0 is not in the range x>0."),
    ('\njs = ["true"]\n', 2, "'js': must be a string, not a list"),
    ('js-file = "missing.js"\n', 1, "'js-file': File "),
    ('js = "true"\nsh = "exit 1"\n', 2, "'sh' and 'js' (at "),
    ('js = "true"\nweak = tru\n', 2, "invalid TOML: "),
    ("[profile]\nname = 1\n", 1, "'profile': must be a string, not a table"),
]


@pytest.mark.parametrize(("text", "line", "message"), BROKEN)
def test_a_broken_file_is_one_error_naming_file_and_line(folders, text: str, line: int, message: str) -> None:
    project, user_file, env = folders
    for path in (project / "jail.toml", user_file):  # the same check for both files
        path.write_text(text)
        result = jail(env, project, "--explain")
        assert result.returncode == 125, result.stderr
        assert result.stderr.startswith(f"jail: error: {path}:{line}: {message}"), result.stderr
        assert result.stderr.count("\n") == 1 and not result.stdout
        path.unlink()


# --- from inside the jail: the project file cannot be written, replaced, moved or deleted --------------


@pytestmark_linux
@pytest.mark.parametrize("mode", MODES)
def test_the_command_cannot_rewrite_the_project_file(run_jail, folders, http_upstream, mode) -> None:
    project, _, env = folders
    config = project / "jail.toml"
    text = f'js = "{DENY_X}"\n'
    config.write_text(text)
    env = dict(env, RULE_FILE="jail.toml", URL=http_upstream.url("/x"))
    result = run_jail(*mode, "--", "sh", "-c", REWRITE_RULE, cwd=project, env=env)
    assert_rule_survived(result, config, text)
    assert http_upstream.requests == []


@pytestmark_linux
@rootless_only
def test_the_command_cannot_rewrite_the_project_file_rootless(user: RootlessUser, http_upstream) -> None:  # noqa: F811
    config = user.workspace / "jail.toml"
    text = f'js = "{DENY_X}"\n'
    config.write_text(text)
    os.chown(config, user.uid, user.entry.pw_gid)
    script = f"RULE_FILE=jail.toml URL={http_upstream.url('/x')}\n{REWRITE_RULE}"
    try:
        assert_rule_survived(user.jail("--", "sh", "-c", script), config, text)
        assert http_upstream.requests == []
    finally:
        config.unlink(missing_ok=True)


def test_a_project_file_the_command_creates_is_warned_of(run_jail, folders) -> None:
    """A missing file cannot be held read-only (that would close the whole folder): jail says it appeared."""
    project, _, env = folders
    result = run_jail(
        "--weak", "--js", "true", "--", "sh", "-c", "echo 'js = \"true\"' > jail.toml", cwd=project, env=env
    )
    assert result.returncode == 0, result.stderr
    expected = (
        f"jail: warning: {project / 'jail.toml'} was created during the run; the next jail would read it: check it"
    )
    assert expected in result.stderr.splitlines()
    quiet = run_jail("--weak", "--", "true", cwd=project, env=env)  # it exists from the start: read, protected, quiet
    assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr


def test_help_and_version_read_no_config_file(folders) -> None:
    project, _, env = folders
    (project / "jail.toml").write_text("bogus = 1\n")
    assert jail(env, project, "--help").stdout.startswith("Usage: jail [OPTIONS]")
    assert jail(env, project, "--version").returncode == 0
    assert jail(env, project, "--no-config", "--explain").returncode == 0
