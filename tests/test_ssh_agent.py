"""--ssh-agent: the command uses the user's agent through jail, cannot read the key, and reaches no other socket.

A real ssh-agent holds a test key; a listening socket stands in for the Docker socket, and every attempt
from inside the jail to reach it (by path, relative path, abstract name, a short address length, racing
threads that rewrite the address or swap the file descriptor) must leave it without a connection.
A real `git clone` and `git push` over SSH (tests/test_git_ssh.py's sshd) work with the key only in the
agent and the key file unreadable; in rootless mode the agent of the jail-rootless-test user serves the jail.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from jail.platform.rootless import rootless_unavailable
from tests import test_git_ssh
from tests.conftest import wait_for, weak_and_strong
from tests.test_git_ssh import ALLOW_SSH, CLONE_AND_PUSH, GIT_NAME, SshServer, git_environment, sshd  # noqa: F401
from tests.test_rootless import user  # noqa: F401 (the rootless test user, a fixture)

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="seccomp user notification is Linux's"),
    pytest.mark.skipif(shutil.which("ssh-agent") is None, reason="needs openssh-client"),
]

MODES = weak_and_strong()
ABSTRACT_NAME = "jail-test-docker-stand-in"
RACES = 300

# Run inside the jail: every way to the stand-in, and whether the agent path connects; prints JSON.
PROBE = r"""
import ctypes, errno, json, os, socket, sys, threading

stand_in, real_agent, agent = sys.argv[1], sys.argv[2], os.environ["SSH_AUTH_SOCK"]
libc = ctypes.CDLL(None, use_errno=True)
seen = {}

def outcome(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def connect(address):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(address)

def sockaddr(path):
    raw = path.encode()
    return ctypes.create_string_buffer(socket.AF_UNIX.to_bytes(2, "little") + raw + b"\0" * (108 - len(raw)), 110)

def raw_connect(fd, buffer, length):
    if libc.connect(fd, buffer, length) != 0:
        raise OSError(ctypes.get_errno(), "connect")

os.symlink(stand_in, "stand-in-link")
seen["agent"] = outcome(lambda: connect(agent))
seen["path"] = outcome(lambda: connect(stand_in))
seen["relative"] = outcome(lambda: connect("./stand-in-link"))
seen["abstract"] = outcome(lambda: connect("\0" + sys.argv[3] + "-1"))
# Addresses as long as an IP one (16 and 28 bytes) are not sent to jail: the kernel finds the socket
# connected to jail already.
seen["relative_16"] = outcome(lambda: connect("stand-in-link"))
seen["abstract_28"] = outcome(lambda: connect("\0" + sys.argv[3]))
seen["real_agent"] = outcome(lambda: connect(real_agent))
seen["dgram"] = outcome(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close())
seen["seqpacket"] = outcome(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).close())
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # addrlen 16: not sent to jail
    seen["short_length"] = outcome(lambda: raw_connect(sock.fileno(), sockaddr("stand-in-link"), 16))
pair = socket.socketpair()
pair[1].close()
seen["socketpair"] = outcome(lambda: pair[0].connect(stand_in))

# The address is rewritten while jail reads it.
buffer, stop = sockaddr(agent), threading.Event()
def rewrite():
    paths = [sockaddr(agent).raw, sockaddr(stand_in).raw]
    while not stop.is_set():
        for raw in paths:
            ctypes.memmove(buffer, raw, 110)
flipper = threading.Thread(target=rewrite)
flipper.start()
for _ in range(int(sys.argv[4])):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        outcome(lambda: raw_connect(sock.fileno(), buffer, 110))
stop.set()
flipper.join()

# The file descriptor is swapped while jail looks at it: an IP socket (passed on to the kernel) and a
# Unix one take turns under one number.
target, ip, unix = os.dup(0), socket.socket(), socket.socket(socket.AF_UNIX)
stop.clear()
def swap():
    while not stop.is_set():
        os.dup2(ip.fileno(), target)
        os.dup2(unix.fileno(), target)
swapper = threading.Thread(target=swap)
swapper.start()
address = sockaddr(stand_in)
for _ in range(int(sys.argv[4])):
    outcome(lambda: raw_connect(target, address, 110))
stop.set()
swapper.join()
print(json.dumps(seen))
"""


@pytest.fixture
def key(tmp_path: Path) -> Path:
    secret = tmp_path / "secret"
    secret.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(secret / "id")], check=True)
    return secret / "id"


@contextmanager
def running_agent(path: Path, key: Path, **as_user) -> Iterator[dict[str, str]]:
    """A real ssh-agent listening on PATH and holding KEY, outside the jail (AS_USER: Popen's user and group)."""
    env = {**os.environ, "SSH_AUTH_SOCK": str(path)}
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(path)], stdout=subprocess.DEVNULL, **as_user)
    try:
        assert wait_for(path.exists, 10)
        subprocess.run(["ssh-add", "-q", str(key)], env=env, check=True, capture_output=True, **as_user)
        yield {"SSH_AUTH_SOCK": str(path)}
    finally:
        agent.terminate()
        agent.wait(10)


@pytest.fixture
def ssh_agent(tmp_path: Path, key: Path) -> Iterator[dict[str, str]]:
    with running_agent(tmp_path / "agent.sock", key) as env:
        yield env


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[tuple[Path, list[socket.socket]]]:
    """A listening path socket and an abstract one, standing in for the Docker socket."""
    path = tmp_path / "docker.sock"
    listeners = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)]
    listeners[0].bind(str(path))
    listeners[1].bind("\0" + ABSTRACT_NAME)
    listeners.append(socket.socket(socket.AF_UNIX))
    listeners[2].bind("\0" + ABSTRACT_NAME + "-1")
    for listener in listeners:
        listener.listen(1000)
        listener.setblocking(False)
    yield path, listeners
    for listener in listeners:
        listener.close()


def connections(listeners: list[socket.socket]) -> int:
    count = 0
    for listener in listeners:
        while True:
            try:
                listener.accept()[0].close()
            except BlockingIOError:
                break
            count += 1
    return count


def agent_records(audit: Path) -> list[dict]:
    lines = audit.read_text().splitlines() if audit.exists() else []
    return [r for r in map(json.loads, lines) if r.get("kind") == "ssh-agent"]


def fingerprint(public_key: Path) -> str:
    return subprocess.run(["ssh-keygen", "-lf", str(public_key)], capture_output=True, text=True).stdout.split()[1]


@pytest.mark.parametrize("mode", MODES)
def test_the_agent_is_usable_and_nothing_else_is_reachable(
    run_jail, jail_env, ssh_agent, key, stand_in, tmp_path, mode
):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(key.with_suffix(".pub"), work / "id.pub")
    (work / "probe.py").write_text(PROBE)
    (work / "askpass").write_text("#!/bin/sh\necho the-lock-password\n")
    (work / "askpass").chmod(0o755)
    path, listeners = stand_in
    audit = tmp_path / "audit.jsonl"
    script = (
        "ssh-add -l; echo list=$?; ssh-add -d id.pub; echo remove=$?; ssh-add -D; echo remove_all=$?;"
        " SSH_ASKPASS_REQUIRE=force SSH_ASKPASS=./askpass ssh-add -x </dev/null; echo lock=$?;"
        f" cat {key} >/dev/null; echo read_key=$?;"
        " echo data > signed; ssh-keygen -q -Y sign -f id.pub -n test signed; echo sign=$?;"
        f' python3 probe.py {path} "$REAL_AGENT" {ABSTRACT_NAME} {RACES}'
    )
    env = {**jail_env, **ssh_agent, "REAL_AGENT": ssh_agent["SSH_AUTH_SOCK"]}
    result = run_jail(
        *mode, "--ssh-agent", "--deny-read", str(key.parent), "--audit-log", str(audit), "--js", "true",
        "--", "sh", "-c", script, env=env, cwd=work, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    statuses = dict(line.split("=") for line in lines if "=" in line and not line.startswith("{"))
    assert statuses == {"list": "0", "remove": "1", "remove_all": "1", "lock": "1", "read_key": "1", "sign": "0"}
    assert fingerprint(key.with_suffix(".pub")) in result.stdout  # ssh-add -l listed the key
    assert (work / "signed.sig").exists()
    seen = json.loads(lines[-1])
    assert seen.pop("agent") == "ok"
    assert seen == {
        "path": "EACCES",
        "relative": "EACCES",
        "abstract": "EACCES",
        "real_agent": "EACCES",
        "dgram": "EACCES",
        "seqpacket": "EACCES",
        "relative_16": "EISCONN",
        "abstract_28": "EISCONN",
        "short_length": "EISCONN",
        "socketpair": "EISCONN",
    }
    assert connections(listeners) == 0
    # The agent still holds the key, unlocked.
    outside = subprocess.run(["ssh-add", "-l"], env={**os.environ, **ssh_agent}, capture_output=True, text=True)
    assert outside.returncode == 0 and fingerprint(key.with_suffix(".pub")) in outside.stdout
    records = agent_records(audit)
    signs = [r for r in records if r["request"] == "sign"]
    assert [(r["decision"], r["key"]) for r in signs] == [("allow", fingerprint(key.with_suffix(".pub")))]
    refused = {r["request"] for r in records if r["decision"] == "deny"}
    assert {"remove-key", "remove-all-keys", "lock"} <= refused
    assert any(r["request"] == "list-keys" and r["decision"] == "allow" for r in records)


@pytest.mark.parametrize("mode", MODES)
def test_without_the_flag_unix_sockets_stay_refused(run_jail, jail_env, ssh_agent, tmp_path, mode):
    env = {**jail_env, **ssh_agent}
    result = run_jail(*mode, "--js", "true", "--", "ssh-add", "-l", env=env, cwd=tmp_path)
    assert result.returncode == 2 and "Error connecting to agent" in result.stderr, result.stderr


def test_the_flag_needs_an_agent(run_jail, jail_env, tmp_path):
    env = {name: value for name, value in jail_env.items() if name != "SSH_AUTH_SOCK"}
    result = run_jail("--weak", "--ssh-agent", "--js", "true", "--", "true", env=env, cwd=tmp_path)
    assert result.returncode != 0 and "SSH_AUTH_SOCK is not set" in result.stderr


def test_the_flag_needs_the_filesystem_restrictions(run_jail, jail_env, ssh_agent, tmp_path):
    env = {**jail_env, **ssh_agent}
    result = run_jail("--weak", "--ssh-agent", "--no-fs-restrictions", "--js", "true", "--", "true", env=env)
    assert result.returncode != 0 and "--ssh-agent needs the filesystem restrictions" in result.stderr


# --- a real git clone and push over SSH with the key only in the agent -----------------------------------

# No -i: ssh offers the agent's keys (and the default ~/.ssh files, which jail keeps unreadable).
AGENT_SSH = (
    'export GIT_SSH_COMMAND="${GIT_SSH_COMMAND:-ssh} -o BatchMode=yes -o StrictHostKeyChecking=no'
    ' -o UserKnownHostsFile=$PWD/known_hosts -o ConnectTimeout=10"; '
)


def needs_sshd(test):
    """tests/test_git_ssh.py's conditions (root, openssh-server, git) for a test that uses its sshd."""
    for mark in test_git_ssh.pytestmark:
        test = mark(test)
    return test


@pytest.fixture
def git_agent(tmp_path: Path, sshd: SshServer) -> Iterator[dict[str, str]]:  # noqa: F811
    """A real ssh-agent outside the jail holding the key sshd accepts."""
    with running_agent(tmp_path / "agent.sock", sshd.client_key) as env:
        yield env


@needs_sshd
@pytest.mark.parametrize("mode", MODES)
def test_git_clone_and_push_with_the_key_only_in_the_agent(
    run_jail,
    jail_env,
    git_agent,
    sshd,  # noqa: F811 (tests/test_git_ssh.py's fixture)
    tmp_path,
    mode,
):
    project = tmp_path / "project"
    project.mkdir()
    audit = tmp_path / "audit.jsonl"
    message = f"agent-{mode[0][2:] if mode else 'strong'}"
    script = (
        f"cat {sshd.client_key} >/dev/null && exit 9; "
        + AGENT_SSH
        + CLONE_AND_PUSH.format(url=sshd.url(), message=message)
    )
    result = run_jail(
        *mode, "--ssh-agent", "--deny-read", str(sshd.directory), "--allow-private", f"{sshd.address}/32",
        "--audit-log", str(audit), "--js", ALLOW_SSH, "--", "sh", "-c", script,
        env={**git_environment(jail_env), **git_agent}, cwd=project, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr  # 9: the key file was readable inside
    assert "Permission denied" in result.stderr  # what `cat` said about the key
    assert sshd.commits()[0] == message
    key = fingerprint(sshd.client_key.with_suffix(".pub"))
    assert f"ssh2: ED25519 {key}" in sshd.log.read_text()  # sshd accepted the agent's key
    signs = [r for r in agent_records(audit) if r["request"] == "sign"]
    assert [(r["decision"], r["key"]) for r in signs] == [("allow", key)] * 2  # clone, push


@needs_sshd
@pytest.mark.parametrize("mode", MODES)
def test_a_denied_host_gets_no_connection_and_no_signature(
    run_jail,
    jail_env,
    git_agent,
    sshd,  # noqa: F811 (tests/test_git_ssh.py's fixture)
    tmp_path,
    mode,
):
    audit = tmp_path / "audit.jsonl"
    before = sshd.connections()
    result = run_jail(
        *mode, "--ssh-agent", "--allow-private", f"{sshd.address}/32", "--audit-log", str(audit),
        "--js", f"r.scheme === 'tcp' && r.host !== '{GIT_NAME}'", "--", "sh", "-c",
        AGENT_SSH + f"git clone -q {sshd.url()} clone",
        env={**git_environment(jail_env), **git_agent}, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert not (tmp_path / "clone").exists()
    time.sleep(0.2)
    assert sshd.connections() == before, "a denied stream reached sshd"
    assert [r for r in agent_records(audit) if r["request"] == "sign"] == []
    records = [r for r in map(json.loads, audit.read_text().splitlines()) if r.get("scheme") == "tcp"]
    assert [(r["url"], r["decision"]) for r in records] == [(f"tcp://{GIT_NAME}:22", "deny")]


# --- rootless: an agent of the jail-rootless-test user --------------------------------------------------

# Run inside the jail: connect to each path given; prints one outcome a line.
CONNECT_EACH = r"""
import errno, socket, sys
for path in sys.argv[1:]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
            print("connected")
        except OSError as exc:
            print(errno.errorcode.get(exc.errno, str(exc.errno)))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="making the rootless test user and running as it needs root")
def test_rootless_the_users_agent_is_usable_and_another_socket_is_not(request):
    if (unavailable := rootless_unavailable()) is not None:
        pytest.skip(f"rootless jail unavailable: {unavailable}")
    jailed = request.getfixturevalue("user")
    as_user = {"user": jailed.uid, "group": jailed.entry.pw_gid, "extra_groups": []}
    folder = jailed.workspace / "ssh-agent"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    os.chown(folder, jailed.uid, jailed.entry.pw_gid)
    key = folder / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, **as_user)
    (folder / "probe.py").write_text(CONNECT_EACH)
    stand_in = folder / "docker.sock"
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(stand_in))
        os.chown(stand_in, jailed.uid, jailed.entry.pw_gid)
        listener.listen(16)
        listener.setblocking(False)
        # The user reaches the stand-in outside the jail: only the jail keeps it out of reach.
        outside = subprocess.run(["python3", str(folder / "probe.py"), str(stand_in)], **as_user, capture_output=True)
        assert outside.stdout.split() == [b"connected"] and connections([listener]) == 1
        with running_agent(folder / "agent.sock", key, **as_user) as agent:
            script = (
                "ssh-add -l; echo list=$?; ssh-add -D; echo remove_all=$?;"
                f' cat {key} >/dev/null; echo read_key=$?; python3 probe.py {stand_in} "$SSH_AUTH_SOCK_OUTSIDE"'
            )
            argv = jailed.jail_argv(
                "--ssh-agent", "--deny-read", str(key), "--js", "true", "--", "sh", "-c", f"cd ssh-agent && {script}"
            )
            names = [f"SSH_AUTH_SOCK={agent['SSH_AUTH_SOCK']}", f"SSH_AUTH_SOCK_OUTSIDE={agent['SSH_AUTH_SOCK']}"]
            result = jailed.run(["env", *names, *argv])
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        statuses = dict(line.split("=") for line in lines if "=" in line)
        assert statuses == {"list": "0", "remove_all": "1", "read_key": "1"}, result.stdout + result.stderr
        assert fingerprint(key.with_suffix(".pub")) in result.stdout  # ssh-add -l listed the key
        assert lines[-2:] == ["EACCES", "EACCES"]  # the stand-in, and the agent's own socket
        assert connections([listener]) == 0
    finally:
        listener.close()
        shutil.rmtree(folder, ignore_errors=True)
