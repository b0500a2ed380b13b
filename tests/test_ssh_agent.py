"""--ssh-agent: the command uses the user's agent through jail, cannot read the key, and reaches no other socket.

A real ssh-agent holds a test key; a listening socket stands in for the Docker socket, and every attempt
from inside the jail to reach it (by path, relative path, abstract name, a short address length, racing
threads that rewrite the address or swap the file descriptor) must leave it without a connection.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="seccomp user notification is Linux's"),
    pytest.mark.skipif(shutil.which("ssh-agent") is None, reason="needs openssh-client"),
]

MODES = [
    pytest.param(["--weak"], id="weak"),
    pytest.param([], id="strong", marks=pytest.mark.skipif(os.geteuid() != 0, reason="strong mode needs root")),
]
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


@pytest.fixture
def ssh_agent(tmp_path: Path, key: Path) -> Iterator[dict[str, str]]:
    """A real ssh-agent holding KEY, outside the jail."""
    path = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(path)], stdout=subprocess.DEVNULL)
    try:
        assert wait_for(path.exists, 10)
        env = {**os.environ, "SSH_AUTH_SOCK": str(path)}
        subprocess.run(["ssh-add", "-q", str(key)], env=env, check=True, capture_output=True)
        yield {"SSH_AUTH_SOCK": str(path)}
    finally:
        agent.terminate()
        agent.wait(10)


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
