"""Agent profiles: loading and choosing them, the hosts a named profile allows, and what a profile opens
and keeps closed from inside the real jail (weak, strong as root and as the sudo user, rootless)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from jail import profiles
from jail.model import Decision, JailError, Request
from jail.platform import confine
from jail.platform.confine import create_missing
from jail.policies import Judge
from jail.session import JailConfig
from tests.conftest import jail_argv
from tests.test_rootless import RootlessUser, unavailable, user  # noqa: F401  (the rootless test user fixture)

landlock = pytest.mark.skipif(confine.landlock_abi() < 1, reason="the kernel has no Landlock")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="strong mode and the test user need root (CI has it)")
needs_rootless = pytest.mark.skipif(unavailable is not None, reason=f"rootless jail unavailable: {unavailable}")


# --- loading and choosing ---------------------------------------------------------------------------


def test_every_shipped_profile_loads() -> None:
    assert profiles.names() == ["aider", "claude", "codex", "gemini", "opencode"]
    for name in profiles.names():
        profile = profiles.load(name)
        assert profile.name == name and profile.commands == (name,) and profile.state


def test_unknown_or_broken_profile_is_one_line_naming_the_known_ones(tmp_path, monkeypatch) -> None:
    with pytest.raises(JailError, match=r"no agent profile 'nope'; known profiles: aider, claude, codex"):
        profiles.load("nope")
    (tmp_path / "bad.toml").write_text("commands = [\n")
    (tmp_path / "odd.toml").write_text('commands = ["odd"]\nsecret = 1\n')
    monkeypatch.setattr(profiles, "_folder", lambda: tmp_path)
    for name, problem in (("bad", "broken"), ("odd", "unknown keys secret")):
        with pytest.raises(JailError, match=problem) as raised:
            profiles.load(name)
        assert "\n" not in str(raised.value) and "known profiles: bad, odd" in str(raised.value)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["codex", "exec", "hi"], "codex"),
        (["/usr/local/bin/claude", "-p", "hi"], "claude"),
        (["npx", "@openai/codex"], "codex"),
        (["npx", "-y", "@anthropic-ai/claude-code@latest", "-p", "hi"], "claude"),
        (["npx", "--yes", "--package=@google/gemini-cli", "gemini"], "gemini"),
        (["npm", "exec", "--", "@google/gemini-cli@0.61.0"], "gemini"),
        (["pnpm", "dlx", "opencode-ai"], "opencode"),
        (["node", "/opt/lib/node_modules/@openai/codex/bin/codex.js", "exec"], "codex"),
        (["node", "--no-warnings", "/x/node_modules/@google/gemini-cli/bundle/gemini.js"], "gemini"),
        (["env", "A=1", "aider", "--model", "x"], "aider"),
        (["npx", "cowsay"], None),
        (["node", "-e", "require('@openai/codex')"], None),
        (["bash", "-c", "codex"], None),
        ([], None),
    ],
)
def test_detect_from_the_command(argv: list[str], expected: str | None) -> None:
    found = profiles.detect(argv, which=lambda name: None)
    assert (found.name if found else None) == expected


def test_detect_a_link_that_resolves_into_the_package(tmp_path: Path) -> None:
    script = tmp_path / "node_modules" / "@openai" / "codex" / "bin" / "codex.js"
    script.parent.mkdir(parents=True)
    script.write_text("#!/usr/bin/env node\n")
    link = tmp_path / "bin" / "my-agent"
    link.parent.mkdir()
    link.symlink_to(script)
    assert profiles.detect([str(link)]).name == "codex"
    assert profiles.detect(["my-agent"], which=lambda name: str(link)).name == "codex"


def test_state_folders_follow_their_variables() -> None:
    home = "/home/u"
    claude, codex, gemini = (profiles.load(name) for name in ("claude", "codex", "gemini"))
    assert claude.folders(home, {}) == ["/home/u/.claude"]
    assert claude.home_files(home, {}) == {"/home/u/.claude.json": "{}\n"}
    # With CLAUDE_CONFIG_DIR, Claude Code keeps .claude.json in that folder: nothing is opened in HOME.
    assert claude.folders(home, {"CLAUDE_CONFIG_DIR": "/c"}) == ["/c"]
    assert claude.home_files(home, {"CLAUDE_CONFIG_DIR": "/c"}) == {}
    assert codex.folders(home, {"CODEX_HOME": "/data/codex"}) == ["/data/codex"]
    assert gemini.folders(home, {"GEMINI_CLI_HOME": "/g"}) == ["/g/.gemini"]
    assert profiles.load("opencode").folders(home, {"XDG_DATA_HOME": "/d"})[0] == "/d/opencode"


# --- hosts: only a named profile widens the rule, through the Judge ---------------------------------


class DenyAll:
    name = "js"

    async def start(self) -> None:
        pass

    async def decide(self, request: Request) -> Decision:
        return Decision.denied("denied by rule")

    async def close(self) -> None:
        pass


def judge(config: JailConfig, url: str) -> Decision:
    return asyncio.run(Judge(DenyAll(), grant=config.host_grant()).decide(Request.from_url(url, "POST")))


def test_a_named_profile_allows_its_hosts_over_https_only() -> None:
    named = JailConfig(profile=profiles.load("codex"), profile_named=True)
    allowed = judge(named, "https://api.openai.com/v1/responses")
    assert allowed.allow and allowed.engine == "profile:codex" and "--profile codex" in allowed.reason
    for url in ("http://api.openai.com/v1/responses", "https://api.openai.com:8443/", "https://evil.example/"):
        denied = judge(named, url)
        assert not denied.allow and denied.engine == "js", url


def test_a_detected_profile_never_widens_the_rule() -> None:
    detected = JailConfig(profile=profiles.detect(["codex"]), profile_named=False)
    assert detected.host_grant() is None
    assert not judge(detected, "https://api.openai.com/v1/responses").allow


def test_cli_test_request_goes_through_the_same_judge(jail_env) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(jail_argv(*args), env=jail_env, capture_output=True, text=True, timeout=60)

    rule = "r.host === 'registry.npmjs.org'"
    assert run("--profile", "codex", "--js", rule, "--test", "POST", "https://api.openai.com/v1").returncode == 0
    assert run("--js", rule, "--test", "POST", "https://api.openai.com/v1").returncode == 1
    assert run("--profile", "claude", "--js", rule, "--test", "https://api.openai.com/v1").returncode == 1


def test_explain_names_the_profile_how_it_was_chosen_its_paths_and_hosts(jail_env, tmp_path: Path) -> None:
    env = dict(jail_env, HOME=str(tmp_path))
    env.pop("CLAUDE_CONFIG_DIR", None)

    def explain(*args: str) -> str:
        done = subprocess.run(jail_argv("--explain", *args), env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    detected = explain("--js", "true", "--", "npx", "-y", "@anthropic-ai/claude-code@latest")
    assert "agent profile: claude (Claude Code), told from the command" in detected
    assert f"{tmp_path}/.claude" in detected and f"{tmp_path}/.claude.json" in detected
    assert "hosts it needs, not allowed" in detected and "api.anthropic.com" in detected
    named = explain("--profile", "codex", "--js", "true", "--", "sh")
    assert "agent profile: codex (Codex CLI), --profile codex" in named
    assert "engine profile:codex): api.openai.com" in named
    assert "agent profile: none (--no-profile; the command runs gemini)" in explain("--no-profile", "--", "gemini")
    assert not (tmp_path / ".claude").exists() and not (tmp_path / ".codex").exists()  # explain makes nothing


# --- what a profile opens, from inside the jail --------------------------------------------------------

# Claude Code's ways of writing its state, and what must stay closed around them.
PROBE = r"""
check() { name=$1; shift; if ( "$@" ) >/dev/null 2>&1; then echo "$name=yes"; else echo "$name=no"; fi; }
check state_new sh -c 'mkdir -p "$HOME/.claude/projects/p" && echo x > "$HOME/.claude/projects/p/s.jsonl"'
check state_rename sh -c 'echo y > "$HOME/.claude/s.tmp" && mv "$HOME/.claude/s.tmp" "$HOME/.claude/sessions.json"'
check home_file_in_place sh -c 'printf "{\"k\": 1}" > "$HOME/.claude.json"'
check home_file_read cat "$HOME/.claude.json"
check home_tmp_in_home sh -c 'echo x > "$HOME/.claude.json.tmp.1.ab"'
check home_lock_dir mkdir "$HOME/.claude.json.lock"
check home_file_remove rm "$HOME/.claude.json"
check home_other sh -c 'echo x > "$HOME/planted"'
check other_agent sh -c 'mkdir -p "$HOME/.codex"'
check bashrc sh -c 'echo evil >> "$HOME/.bashrc"'
check ssh_read cat "$HOME/.ssh/id_test"
check ssh_write sh -c 'echo x > "$HOME/.ssh/authorized_keys"'
check project sh -c 'echo x > made.txt'
check git_hook sh -c 'echo x > .git/hooks/pre-commit'
"""
OPENED = {"state_new", "state_rename", "home_file_in_place", "home_file_read", "project"}
CLAUDE = ["--profile", "claude", "--js", "true", "--", "sh", "-c", PROBE]


def make_home(home: Path) -> None:
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_test").write_text("SECRET\n")
    (home / ".bashrc").write_text("# rc\n")
    (home / ".profile").write_text("# profile\n")


def outcomes(result: subprocess.CompletedProcess) -> dict[str, bool]:
    assert result.returncode == 0, result.stderr
    return {name: value == "yes" for name, value in (line.split("=") for line in result.stdout.split())}


def assert_claude_state(home: Path, uid: int, bashrc: str = "# rc\n") -> None:
    folder, settings = home / ".claude", home / ".claude.json"
    assert (folder.stat().st_uid, stat.S_IMODE(folder.stat().st_mode)) == (uid, 0o700)
    assert (settings.stat().st_uid, stat.S_IMODE(settings.stat().st_mode)) == (uid, 0o600)
    assert json.loads(settings.read_text()) == {"k": 1}  # rewritten in place from inside
    assert (home / ".bashrc").read_text() == bashrc
    assert not (home / "planted").exists() and not (home / ".codex").exists()


def user_bashrc(user: RootlessUser) -> str:  # noqa: F811
    """The test user's ~/.bashrc (made if /etc/skel gave none): what must come out of the jail unchanged."""
    bashrc = Path(user.entry.pw_dir) / ".bashrc"
    if not bashrc.exists():
        bashrc.write_text("# rc\n")
        os.chown(bashrc, user.uid, user.entry.pw_gid)
    return bashrc.read_text()


def profile_env(jail_env: dict[str, str], home: Path) -> dict[str, str]:
    env = dict(jail_env, HOME=str(home))
    for name in ("SUDO_UID", "SUDO_GID", "CLAUDE_CONFIG_DIR", "CODEX_HOME"):
        env.pop(name, None)
    return env


@landlock
@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(["--weak"], id="weak"),
        pytest.param([], id="strong", marks=needs_root),
    ],
)
def test_profile_opens_its_state_and_nothing_else(run_jail, jail_env, tmp_path: Path, mode: list[str]) -> None:
    home, project = tmp_path / "home", tmp_path / "project"
    make_home(home)
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    seen = outcomes(run_jail(*mode, *CLAUDE, cwd=project, env=profile_env(jail_env, home)))
    assert {name for name, ok in seen.items() if ok} == OPENED, seen
    assert_claude_state(home, os.geteuid())


@landlock
def test_a_profile_told_from_the_command_opens_its_folder_and_no_profile_does_not(run_jail, jail_env, tmp_path) -> None:
    home, project, bin_dir = tmp_path / "home", tmp_path / "project", tmp_path / "bin"
    make_home(home)
    project.mkdir()
    bin_dir.mkdir()
    agent = bin_dir / "codex"  # stands in for Codex CLI: it writes its state and tries HOME
    agent.write_text(
        '#!/bin/sh\nmkdir -p "$HOME/.codex/sessions" && echo s > "$HOME/.codex/sessions/a.jsonl" && echo state-ok\n'
        'echo x > "$HOME/planted" 2>/dev/null && echo home-open\nexit 0\n'
    )
    agent.chmod(0o755)
    env = dict(profile_env(jail_env, home), PATH=f"{bin_dir}:{jail_env['PATH']}")
    without = run_jail("--weak", "--no-profile", "--js", "true", "--", "codex", cwd=project, env=env)
    assert without.returncode == 0 and without.stdout == "", without.stdout + without.stderr
    detected = run_jail("--weak", "--js", "true", "--", "codex", cwd=project, env=env)
    assert detected.stdout.split() == ["state-ok"], detected.stderr
    assert stat.S_IMODE((home / ".codex").stat().st_mode) == 0o700
    assert (home / ".codex" / "sessions" / "a.jsonl").read_text() == "s\n" and not (home / "planted").exists()


@landlock
@needs_root
@needs_rootless
def test_strong_mode_makes_the_state_as_the_sudo_user(jail_env, user: RootlessUser) -> None:  # noqa: F811
    home = Path(user.entry.pw_dir)
    made = [home / ".claude", home / ".claude.json"]
    bashrc = user_bashrc(user)
    assert user.run(["git", "init", "-q", "."]).returncode == 0
    env = dict(profile_env(jail_env, home), SUDO_UID=str(user.uid), SUDO_GID=str(user.entry.pw_gid))
    try:
        result = subprocess.run(
            jail_argv(*CLAUDE), cwd=user.workspace, env=env, capture_output=True, text=True, timeout=60
        )
        seen = outcomes(result)
        assert {name for name, ok in seen.items() if ok} == OPENED, seen
        assert_claude_state(home, user.uid, bashrc)
    finally:
        subprocess.run(["rm", "-rf", *map(str, made), str(user.workspace / ".git")], check=False)


@landlock
@needs_root
@needs_rootless
def test_rootless_profile_opens_its_state_and_nothing_else(user: RootlessUser) -> None:  # noqa: F811
    home = Path(user.entry.pw_dir)
    made = [home / ".claude", home / ".claude.json"]
    bashrc = user_bashrc(user)
    assert user.run(["git", "init", "-q", "."]).returncode == 0
    try:
        seen = outcomes(user.jail(*CLAUDE))
        assert {name for name, ok in seen.items() if ok} == OPENED, seen
        assert_claude_state(home, user.uid, bashrc)
    finally:
        subprocess.run(["rm", "-rf", *map(str, made), str(user.workspace / ".git")], check=False)


@needs_root
@needs_rootless
def test_missing_state_is_made_by_the_user_so_a_planted_link_cannot_steer_root(user: RootlessUser) -> None:  # noqa: F811
    home = Path(user.entry.pw_dir)
    owner = (user.uid, user.entry.pw_gid)
    link = home / "planted-link"
    link.symlink_to("/etc")
    os.lchown(link, *owner)
    try:
        create_missing([str(link / "jail-profile-test" / "state")], {}, owner)
        assert not Path("/etc/jail-profile-test").exists()
        create_missing([str(home / ".gemini")], {str(home / ".claude.json"): "{}\n"}, owner)
        assert (home / ".gemini").stat().st_uid == user.uid
        assert (home / ".claude.json").stat().st_uid == user.uid and (home / ".claude.json").read_text() == "{}\n"
        create_missing([], {str(home / ".claude.json"): "new\n"}, None)
        assert (home / ".claude.json").read_text() == "{}\n"  # an existing file is never replaced
    finally:
        subprocess.run(["rm", "-rf", str(link), str(home / ".gemini"), str(home / ".claude.json")], check=False)


def test_explain_lists_the_rule_files_and_whether_they_are_protected(jail_env, tmp_path: Path) -> None:
    (tmp_path / "rules.js").write_text("true")

    def explain(*args: str) -> str:
        done = subprocess.run(
            jail_argv("--explain", "--js-file", "rules.js", *args, "--", "true"),
            cwd=tmp_path,
            env=jail_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return done.stdout

    assert (
        f"rule files, read-only inside the jail (the command cannot rewrite its rule): {tmp_path}/rules.js" in explain()
    )
    assert "always read-only: " in explain() and f"{tmp_path}/rules.js" in explain().split("always read-only: ")[1]
    assert "rule files (writable by the command" in explain("--no-fs-restrictions")
