"""Filesystem confinement: the ruleset planning (pure), and the real CLI in weak and strong mode."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from jail.platform import confine, remove_dirs_of
from jail.platform.confine import (
    READ,
    READ_DIR,
    WRITE,
    FsPolicy,
    confine_argv,
    confine_command,
    git_protected_paths,
    launcher_prefix,
    plan_around,
    plan_mounts,
    plan_rules,
    unix_socket_filter,
)
from tests.conftest import PYTHON
from tests.test_rootless import RootlessUser, user  # noqa: F401  (the rootless test user fixture)
from tests.test_rootless import unavailable as rootless_unavailable

TREE = {
    "/": ["etc", "home", "usr", "bin"],
    "/home": ["u", "v"],
    "/home/u": [".ssh", "proj", ".bashrc"],
    "/home/u/proj": [".git", "src", "README"],
    "/home/u/proj/.git": ["hooks", "config", "objects", "HEAD"],
}
SYMLINKS = {"/bin"}


def fake_listdir(path: str) -> list[tuple[str, bool]]:
    return [(name, os.path.join(path, name) not in SYMLINKS) for name in TREE.get(path, [])]


def rights_of(rules: list[tuple[str, int]], path: str) -> int:
    """What the rules give PATH: the union over every rule on it or an ancestor, as Landlock does."""
    total = 0
    for rule_path, rights in rules:
        if confine.is_within(path, rule_path):
            total |= rights
    return total


# --- planning --------------------------------------------------------------------------------------


def test_plan_around_descends_only_on_the_way_to_avoided_paths() -> None:
    rules, on_path = plan_around("/", ["/home/u/.ssh"], READ, fake_listdir)
    assert sorted(on_path) == ["/", "/home", "/home/u"]
    granted = dict(rules)
    assert granted["/etc"] == granted["/usr"] == granted["/home/v"] == granted["/home/u/proj"] == READ
    assert "/home/u/.ssh" not in granted and "/" not in granted and "/home/u" not in granted
    assert "/bin" not in granted  # a symlink: its target is covered where it lives
    assert rights_of(rules, "/home/u/.ssh/id_rsa") == 0


def test_plan_around_without_avoided_paths_is_one_rule() -> None:
    assert plan_around("/home/u/proj", ["/etc/shadow"], WRITE, fake_listdir) == ([("/home/u/proj", WRITE)], [])


def test_plan_rules_reads_everything_but_denied_and_writes_only_roots() -> None:
    policy = FsPolicy(allow_write=("/home/u/proj",), deny_read=("/home/u/.ssh",))
    rules = plan_rules(policy, set(), fake_listdir, exists=lambda p: p in TREE or p.startswith("/home/u/proj"))
    assert rights_of(rules, "/home/u/.ssh/id_rsa") == READ_DIR  # listing only: names, never contents
    assert rights_of(rules, "/home/u") == READ_DIR  # names can be listed there, nothing more
    assert rights_of(rules, "/etc/passwd") == READ
    assert rights_of(rules, "/home/u/.bashrc") == READ
    assert rights_of(rules, "/home/u/proj/src/a.py") == READ | WRITE
    assert rights_of(rules, "/home/u/proj/.git/hooks/pre-commit") == READ | WRITE  # left to the read-only mount


def test_missing_protected_path_without_a_mount_takes_write_rights_from_its_parent() -> None:
    policy = FsPolicy(allow_write=("/home/u/proj",), protect=("/home/u/proj/.git/hooks",))
    rules = plan_rules(policy, set(), fake_listdir, exists=lambda p: p in TREE or p.startswith("/home/u/proj"))
    assert not rights_of(rules, "/home/u/proj/.git/hooks/pre-commit") & WRITE
    assert not rights_of(rules, "/home/u/proj/.git/new-file") & WRITE  # the accepted limitation
    assert rights_of(rules, "/home/u/proj/.git/objects/ab") & WRITE
    assert rights_of(rules, "/home/u/proj/src/x") & WRITE
    assert not rights_of(rules, "/home/u/proj/new-top-level-file") & WRITE


def test_plan_mounts_outer_first_protected_read_only(tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    (proj / ".git" / "hooks").mkdir(parents=True)
    (proj / ".git" / "config").write_text("")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    policy = FsPolicy(
        allow_write=(str(proj),),
        protect=(str(proj / ".git" / "hooks"), str(proj / ".git" / "config"), str(outside), str(proj / "missing")),
    )
    assert plan_mounts(policy) == [
        (str(proj), False),
        (str(proj / ".git"), False),
        (str(proj / ".git" / "config"), True),
        (str(proj / ".git" / "hooks"), True),
    ]


def test_git_pointer_file_protects_the_real_git_dir(tmp_path: Path) -> None:
    common = tmp_path / "main" / ".git"
    worktree_git = common / "worktrees" / "wt"
    worktree_git.mkdir(parents=True)
    (worktree_git / "commondir").write_text("../..\n")
    wt = tmp_path / "wt"
    wt.mkdir()
    (wt / ".git").write_text(f"gitdir: {worktree_git}\n")
    paths = git_protected_paths(str(wt))
    assert str(wt / ".git") in paths
    for directory in (worktree_git, common):
        assert str(directory / "hooks") in paths
        assert str(directory / "config") in paths


def test_policy_arguments_round_trip_even_for_odd_paths() -> None:
    policy = FsPolicy(("/a", "--"), True, ("/b c",), ("/c\nd",), ("--tmp",), False, "/tmp/x")
    assert FsPolicy.from_args([*policy.to_args(), "--", "cmd", "--write"]) == (policy, ["cmd", "--write"])
    assert FsPolicy.from_args([*FsPolicy().to_args(), "--", "c"]) == (FsPolicy(), ["c"])
    with pytest.raises(ValueError):
        FsPolicy.from_args(["--bogus", "x", "--", "c"])


def test_seccomp_program_jumps_stay_inside() -> None:
    program = unix_socket_filter("x86_64")
    for index, (code, jt, jf, _) in enumerate(program):
        if code == 0x15 or code == 0x35:
            assert index + 1 + max(jt, jf) < len(program)
    assert program[-1][0] == 0x06


class FakeBackend:
    jail_id = "0badf00d"

    def __init__(self, name: str, prefix: list[str]) -> None:
        self.name = name
        self.prefix = prefix

    def child_command(self, argv: list[str]) -> list[str]:
        return [*self.prefix, *argv]


def test_confine_command_places_the_launcher() -> None:
    policy = FsPolicy(allow_write=("/w",))
    weak = confine_command(policy, FakeBackend("weak", []), ["cmd"])
    assert weak[:4] == [sys.executable, "-I", "-S", "-c"] and weak[-2:] == ["--", "cmd"]
    policy_in_argv, command = FsPolicy.from_args(weak[5:])
    assert policy_in_argv.allow_write == ("/w",) and policy_in_argv.tmp_dir and command == ["cmd"]
    strong = confine_command(policy, FakeBackend("strong", ["ip", "netns", "exec", "n", "setpriv", "--reuid=0"]), ["c"])
    assert strong[:4] == ["ip", "netns", "exec", "n"] and strong[4] == sys.executable
    assert strong[strong.index("--") + 1 :] == ["setpriv", "--reuid=0", "c"]
    assert confine_command(policy, FakeBackend("docker", ["docker"]), ["c"]) == ["docker", "c"]
    assert confine_command(None, FakeBackend("weak", []), ["c"]) == ["c"]
    assert confine_argv(FsPolicy(enabled=False), ["c"]) == ["c"]
    remove_dirs_of(FakeBackend.jail_id)  # the private temp dirs made above


def test_launcher_starts_fast_without_heavy_imports() -> None:
    argv = confine_argv(FsPolicy(enabled=False), [sys.executable, "-c", "import sys; print(sorted(sys.modules))"])
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert "mitmproxy" not in out
    launcher = [*launcher_prefix(FsPolicy(enabled=False)), "true"]
    loaded = subprocess.run([launcher[0], "-X", "importtime", *launcher[1:]], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in loaded.stderr.splitlines() if "import time:" in line}
    assert "confine" in imported
    assert not {"site", "mitmproxy", "jail.platform", "json", "dataclasses"} & imported


# --- end to end ------------------------------------------------------------------------------------

pytestmark_linux = pytest.mark.skipif(confine.landlock_abi() < 1, reason="the kernel has no Landlock")

CHECKS = r"""
check() { name=$1; shift; if ( "$@" ) >/dev/null 2>&1; then echo "$name=yes"; else echo "$name=no"; fi; }
check write_cwd sh -c 'echo hi > new.txt && test "$(cat new.txt)" = hi'
check write_subdir sh -c 'echo hi > src/new.py'
check write_tmp sh -c 'echo hi > "$TMPDIR/t"'
check write_etc sh -c 'echo x > /etc/jail-confine-test'
check write_home sh -c 'echo x > "$HOME/planted"'
check read_ssh cat "$HOME/.ssh/id_test"
check read_other cat "$HOME/notes.txt"
check read_ca_key cat "$JAIL_CA_DIR/mitmproxy-ca.pem"
check hook_create sh -c 'echo "#!/bin/sh" > .git/hooks/pre-commit'
check hook_modify sh -c 'echo evil >> .git/hooks/pre-push'
check git_config sh -c 'echo "[core]" >> .git/config'
check git_objects sh -c 'echo x > .git/objects/x'
check git_add sh -c 'git add new.txt && git status --short | grep -q "A  new.txt"'
check hook_symlink ln -s "$PWD/new.txt" .git/hooks/pre-commit
check hook_hardlink ln new.txt .git/hooks/pre-commit
check hook_rename_in sh -c 'cp new.txt src/evil && mv src/evil .git/hooks/pre-commit'
check hooks_rename mv .git/hooks .git/hooks-old
check git_rename mv .git .git-old
check ssh_symlink sh -c 'ln -s "$HOME/.ssh" sshlink && cat sshlink/id_test'
check ssh_hardlink ln "$HOME/.ssh/id_test" stolen
check unix_socket python3 -c 'import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$SOCK"
check dev_null sh -c 'echo x > /dev/null'
check stream_pair python3 -c 'import socket; a, b = socket.socketpair(); a.send(b"x"); assert b.recv(1) == b"x"'
check seqpacket_pair python3 -c 'import socket; a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET); a.send(b"x"); assert b.recv(1) == b"x"'
check dgram_pair python3 -c 'import socket,sys; a, _ = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM); a.sendto(b"x", sys.argv[1])' "$DGRAM"
check dgram_socket python3 -c 'import socket,sys; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"x", sys.argv[1])' "$DGRAM"
"""


@pytest.fixture
def workspace(tmp_path: Path, jail_env: dict[str, str]):
    """A git repository to work in, a fake HOME with a secret, and a Unix socket server outside."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_test").write_text("SECRET\n")
    (home / "notes.txt").write_text("notes\n")
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(proj)], check=True)
    (proj / ".git" / "hooks" / "pre-push").write_text("#!/bin/sh\n")
    server = socket.socket(socket.AF_UNIX)
    sock = tmp_path / "daemon.sock"
    server.bind(str(sock))
    server.listen(8)
    acceptor = threading.Thread(target=accept_until_closed, args=(server,), daemon=True)
    acceptor.start()
    # A datagram socket of the host (as /dev/log or systemd's notify socket are), open to everyone.
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(str(tmp_path / "dgram.sock"))
    os.chmod(tmp_path / "dgram.sock", 0o666)
    dgram.setblocking(False)
    HOST_DATAGRAM_SOCKETS[:] = [dgram]
    env = dict(jail_env, HOME=str(home), SOCK=str(sock), DGRAM=str(tmp_path / "dgram.sock"))
    env.pop("SUDO_UID", None)
    yield proj, home, sock, env
    dgram.close()
    # Wake accept() first: a thread left in it would take connections from the next socket given this number.
    server.shutdown(socket.SHUT_RDWR)
    acceptor.join()
    server.close()


# The workspace's host datagram socket, for the test to ask what reached it.
HOST_DATAGRAM_SOCKETS: list[socket.socket] = []


def datagrams_received() -> list[bytes]:
    received = []
    with contextlib.suppress(BlockingIOError):
        while True:
            received.append(HOST_DATAGRAM_SOCKETS[0].recv(16))
    return received


def accept_until_closed(server: socket.socket) -> None:
    with contextlib.suppress(OSError):  # the fixture shuts it down
        while True:
            server.accept()[0].close()


def run_checks(run_jail, mode: list[str], workspace, *flags: str) -> dict[str, bool]:
    proj, _, _, env = workspace
    result = run_jail(*mode, *flags, "--js", "true", "--", "sh", "-c", CHECKS, cwd=proj, env=env)
    assert result.returncode == 0, result.stderr
    found = dict(line.split("=") for line in result.stdout.split())
    return {name: value == "yes" for name, value in found.items()}


MODES = [
    pytest.param(["--weak"], id="weak"),
    pytest.param([], id="strong", marks=pytest.mark.skipif(os.geteuid() != 0, reason="strong mode needs root")),
]


@pytestmark_linux
@pytest.mark.parametrize("mode", MODES)
def test_confined(run_jail, workspace, mode: list[str]) -> None:
    proj, home, _, _ = workspace
    seen = run_checks(run_jail, mode, workspace)
    allowed = {"write_cwd", "write_subdir", "write_tmp", "read_other", "git_objects", "git_add", "dev_null"}
    allowed |= {"stream_pair", "seqpacket_pair"}  # pairs that reach nothing but themselves
    assert {name for name, ok in seen.items() if ok} == allowed, seen
    assert datagrams_received() == []
    assert not (proj / ".git" / "hooks" / "pre-commit").exists()
    assert (proj / ".git" / "hooks" / "pre-push").read_text() == "#!/bin/sh\n"
    assert "[core]\n[core]" not in (proj / ".git" / "config").read_text()
    assert not (home / "planted").exists() and not Path("/etc/jail-confine-test").exists()


@pytestmark_linux
@pytest.mark.parametrize("mode", MODES)
def test_flags_lift_or_tighten(run_jail, workspace, mode: list[str]) -> None:
    _, _, sock, _ = workspace
    off = run_checks(run_jail, mode, workspace, "--no-fs-restrictions")
    assert off["read_ssh"] and off["write_home"] and off["hook_create"] and off["unix_socket"], off
    assert off["dgram_pair"] and off["dgram_socket"], off  # the checks can succeed: the filter is what stops them
    assert datagrams_received() == [b"x", b"x"]
    Path(workspace[1] / "planted").unlink()
    Path("/etc/jail-confine-test").unlink(missing_ok=True)
    sockets = run_checks(run_jail, mode, workspace, "--allow-unix-socket", str(sock))
    assert sockets["unix_socket"] and not sockets["read_ssh"], sockets
    read_only = run_checks(run_jail, mode, workspace, "--read-only")
    assert read_only["write_tmp"] and read_only["read_other"], read_only
    assert not read_only["write_cwd"] and not read_only["write_subdir"] and not read_only["git_objects"], read_only


@pytestmark_linux
def test_missing_hooks_dir_cannot_be_created(run_jail, workspace) -> None:
    proj, _, _, env = workspace
    subprocess.run(["rm", "-rf", str(proj / ".git" / "hooks")], check=True)
    script = "mkdir -p .git/hooks; echo x > .git/hooks/pre-commit; echo x > .git/objects/y && echo objects-ok"
    result = run_jail("--weak", "--js", "true", "--", "sh", "-c", script, cwd=proj, env=env)
    assert "objects-ok" in result.stdout
    assert not (proj / ".git" / "hooks" / "pre-commit").exists()


@pytestmark_linux
def test_protect_flag_and_deny_read_flag(run_jail, workspace) -> None:
    proj, _, _, env = workspace
    (proj / "Makefile").write_text("all:\n")
    (proj / "src" / "private.txt").write_text("private\n")
    (proj / "notes.md").write_text("")
    # A denied path inside a write root: its directories keep no create rights of their own (the Landlock
    # limitation), existing entries elsewhere stay writable.
    script = (
        "echo x >> Makefile; cat src/private.txt; echo ok >> notes.md && echo other-ok; echo x > src/new || echo no-new"
    )
    result = run_jail(
        "--weak",
        "--protect",
        "Makefile",
        "--deny-read",
        "src/private.txt",
        "--js",
        "true",
        "--",
        "sh",
        "-c",
        script,
        cwd=proj,
        env=env,
    )
    assert "other-ok" in result.stdout and "no-new" in result.stdout and "private" not in result.stdout
    assert (proj / "Makefile").read_text() == "all:\n"


# --- defect: a write root of `/` (the launcher walked up from a protected path forever) -------------


def test_plan_mounts_ends_at_the_root_as_write_root(tmp_path: Path) -> None:
    (tmp_path / ".bashrc").write_text("")
    policy = FsPolicy(allow_write=("/",), protect=(str(tmp_path / ".bashrc"),))
    mounts = plan_mounts(policy)
    assert (str(tmp_path / ".bashrc"), True) in mounts and (str(tmp_path), False) in mounts
    assert ("/", False) not in mounts  # a mount over / is neither needed nor seen


@pytestmark_linux
@pytest.mark.parametrize("mode", MODES)
def test_jail_started_from_the_root_folder_starts_and_ends(run_jail, workspace, mode: list[str]) -> None:
    _, home, _, env = workspace
    for name in (".bashrc", ".profile", ".zshrc"):
        (home / name).write_text("# rc\n")
    from_root = run_jail(*mode, "--js", "true", "--", "true", cwd="/", env=env, timeout=30)
    assert from_root.returncode == 0, from_root.stderr
    root_writable = run_jail(*mode, "--allow-write", "/", "--js", "true", "--", "sh", "-c", "true", env=env, timeout=30)
    assert root_writable.returncode == 0, root_writable.stderr


# --- jail's CA: no file that holds (or could hold) its private key is readable inside -----------------

READ_CA_FILES = r"""
cd "$JAIL_CA_DIR" && find . -type f | sort | while read -r f; do
  if cat "$f" >/dev/null 2>&1; then echo "$f=yes"; else echo "$f=no"; fi
done
"""


def ca_readable(result: subprocess.CompletedProcess) -> dict[str, bool]:
    assert result.returncode == 0, result.stderr
    return {name[2:]: value == "yes" for name, value in (line.split("=") for line in result.stdout.split())}


def assert_only_public_ca_files_readable(seen: dict[str, bool]) -> None:
    public = {name for name in seen if name.startswith(("trust/", "mitmproxy-ca-cert."))}
    assert {"mitmproxy-ca.pem", "mitmproxy-ca.p12", "mitmproxy-ca.der"} <= set(seen) - public, seen
    assert {name for name, readable in seen.items() if readable} == public, seen
    assert "trust/ca-bundle.pem" in public and "mitmproxy-ca-cert.pem" in public


@pytestmark_linux
@pytest.mark.parametrize("mode", MODES)
def test_no_private_key_file_of_the_ca_is_readable(run_jail, workspace, tmp_path: Path, mode: list[str]) -> None:
    from jail.proxy.ca import CertificateAuthority

    proj, _, _, env = workspace
    ca = CertificateAuthority.ensure(tmp_path / "ca")
    # Any form of the key mitmproxy may write (DER here), not only the ones it writes today.
    (ca.directory / "mitmproxy-ca.der").write_bytes(b"0\x82 DER KEY")
    env = dict(env, JAIL_CA_DIR=str(ca.directory))
    assert_only_public_ca_files_readable(
        ca_readable(run_jail(*mode, "--js", "true", "--", "sh", "-c", READ_CA_FILES, cwd=proj, env=env))
    )


# --- the rule's own files: read-only inside the jail wherever they lie ---------------------------------

RULE_FILES = {
    "js_file": ("rules.js", "r.path === '/never'", ["--js-file", "rules.js"]),
    "policy": ("rules.toml", 'default = "deny"\n', ["--policy", "rules.toml"]),
    "sh": ("rule.sh", "exit 1\n", ["--sh", "sh ./rule.sh"]),
    "proc": ("rule.py", "import sys\nfor line in sys.stdin:\n    print('false', flush=True)\n", []),
}
REWRITE_RULE = r"""
try() { if sh -c "$1" >/dev/null 2>&1; then echo "$2=yes"; else echo "$2=no"; fi; }
f=$RULE_FILE
try "echo true > $f" write
try "echo '||true' >> $f" append
try "echo true > new.tmp && mv -f new.tmp $f" rename_over
try ": > $f" truncate
try "rm -f $f" delete
try "chmod 666 $f" chmod
try "ln -sf /dev/null $f" relink
try "mv $f moved" move_away
sleep 1.2
curl -s -m 10 -o /dev/null -w 'status=%{http_code}\n' "$URL"
"""


def rule_flags(kind: str, python: str) -> tuple[str, str, list[str]]:
    name, text, flags = RULE_FILES[kind]
    return name, text, flags or ["--proc", f"{python} {name}"]


def assert_rule_survived(result: subprocess.CompletedProcess, path: Path, text: str) -> None:
    assert result.returncode == 0, result.stderr
    seen = dict(line.split("=") for line in result.stdout.split())
    assert seen.pop("status") == "403", result.stdout + result.stderr
    assert set(seen.values()) == {"no"}, seen
    assert path.read_text() == text and not path.with_name("moved").exists()


@pytestmark_linux
@pytest.mark.parametrize("kind", sorted(RULE_FILES))
@pytest.mark.parametrize("mode", MODES)
def test_the_command_cannot_rewrite_its_rule(run_jail, workspace, http_upstream, mode, kind) -> None:
    proj, _, _, env = workspace
    name, text, flags = rule_flags(kind, PYTHON)
    (proj / name).write_text(text)
    env = dict(env, RULE_FILE=name, URL=http_upstream.url("/x"))
    result = run_jail(*mode, *flags, "--", "sh", "-c", REWRITE_RULE, cwd=proj, env=env)
    assert_rule_survived(result, proj / name, text)
    assert http_upstream.requests == []


# --- the same two, in the rootless jail (as the test user of tests/test_rootless.py) -------------------

rootless_only = pytest.mark.skipif(
    os.geteuid() != 0 or rootless_unavailable is not None,
    reason=f"needs root to make the test user (CI has it) and a rootless jail ({rootless_unavailable or 'available'})",
)


@pytestmark_linux
@rootless_only
def test_no_private_key_file_of_the_ca_is_readable_rootless(user: RootlessUser) -> None:  # noqa: F811
    assert user.jail("--js", "true", "--", "true").returncode == 0  # the user's CA exists from here on
    ca_dir = Path(user.environment()["JAIL_CA_DIR"])
    planted = ca_dir / "mitmproxy-ca.der"
    planted.write_bytes(b"0\x82 DER KEY")
    os.chown(planted, user.uid, user.entry.pw_gid)
    try:
        assert_only_public_ca_files_readable(ca_readable(user.jail("--js", "true", "--", "sh", "-c", READ_CA_FILES)))
    finally:
        planted.unlink()


@pytestmark_linux
@rootless_only
@pytest.mark.parametrize("kind", sorted(RULE_FILES))
def test_the_command_cannot_rewrite_its_rule_rootless(user: RootlessUser, http_upstream, kind: str) -> None:  # noqa: F811
    name, text, flags = rule_flags(kind, PYTHON)
    path = user.workspace / name
    path.write_text(text)
    os.chown(path, user.uid, user.entry.pw_gid)
    script = f"RULE_FILE={name} URL={http_upstream.url('/x')}\n{REWRITE_RULE}"
    try:
        assert_rule_survived(user.jail(*flags, "--", "sh", "-c", script), path, text)
        assert http_upstream.requests == []
    finally:
        path.unlink(missing_ok=True)
