"""git over SSH through jail: a real Debian `sshd` on a loopback address and a real `git` client.

Weak mode: `GIT_SSH_COMMAND` carries jail's ProxyCommand (jail/platform/connect_helper.py), whose
CONNECT is judged once as `CONNECT tcp://NAME:22`; an allowed stream is relayed, a denied one never
reaches the server. A CONNECT tunnel that carries neither TLS nor HTTP from any client is judged the
same way. The client key lives in the project (~/.ssh is unreadable inside the jail by design).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jail.model import ProxyEndpoint
from jail.platform.weak import WeakBackend, ssh_command
from tests.conftest import HOSTS_FILE, UPSTREAM_HOST, map_names, unmap_names, wait_for
from tests.test_rootless import rootless_unavailable, user  # noqa: F401  (the rootless test user)

SSHD = Path("/usr/sbin/sshd")
GIT_NAME = "git-ssh.jail.test"
ALLOW_SSH = f"r.scheme === 'tcp' && r.host === '{GIT_NAME}' && r.port === 22"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="sshd on port 22 and the hosts-file name need root"),
    pytest.mark.skipif(
        not SSHD.exists() or shutil.which("ssh") is None or shutil.which("git") is None,
        reason="needs openssh-server, openssh-client and git (.ci/run installs them)",
    ),
]


@dataclass
class SshServer:
    """A test `sshd` (as root, logging to a file) serving the bare repository `repo.git`."""

    address: str
    directory: Path
    process: subprocess.Popen

    @property
    def log(self) -> Path:
        return self.directory / "sshd.log"

    @property
    def repository(self) -> Path:
        return self.directory / "repo.git"

    @property
    def client_key(self) -> Path:
        return self.directory / "client_key"

    def url(self, host: str = GIT_NAME) -> str:
        return f"ssh://root@{host}{self.repository}"

    def connections(self) -> int:
        return self.log.read_text().count("Connection from ")

    def commits(self) -> list[str]:
        out = subprocess.run(
            ["git", "--git-dir", str(self.repository), "log", "--format=%s", "main"], capture_output=True, text=True
        )
        return out.stdout.split()


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def make_repository(bare: Path, work: Path) -> None:
    git("init", "-q", "--bare", "-b", "main", str(bare), cwd=bare.parent)
    git("init", "-q", "-b", "main", str(work), cwd=bare.parent)
    (work / "README").write_text("served over ssh\n")
    git("add", "README", cwd=work)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "initial", cwd=work)
    git("push", "-q", str(bare), "main", cwd=work)


def sshd_config(directory: Path, address: str) -> str:
    return "\n".join(
        [
            "Port 22",
            f"ListenAddress {address}",
            f"HostKey {directory / 'host_key'}",
            f"PidFile {directory / 'sshd.pid'}",
            f"AuthorizedKeysFile {directory / 'authorized_keys'}",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "LogLevel VERBOSE",
            "",
        ]
    )


def without_test_name(hosts: str) -> str:
    return "".join(line for line in hosts.splitlines(True) if not line.rstrip().endswith(f" {GIT_NAME}"))


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    directory = tmp_path_factory.mktemp("sshd")
    address = f"127.22.{random.randrange(1, 250)}.{random.randrange(2, 250)}"
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / key)], check=True)
    shutil.copy(directory / "client_key.pub", directory / "authorized_keys")
    make_repository(directory / "repo.git", directory / "seed")
    (directory / "sshd_config").write_text(sshd_config(directory, address))
    privsep = Path("/run/sshd")  # sshd refuses to start without its privilege separation folder
    made_privsep = not privsep.exists()
    privsep.mkdir(mode=0o755, exist_ok=True)
    with (directory / "sshd.log").open("w") as log:
        process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(directory / "sshd_config")], stderr=log)
    server = SshServer(address, directory, process)
    # A line left by an interrupted run (or restored by another fixture's snapshot of the file) goes first.
    HOSTS_FILE.write_text(without_test_name(HOSTS_FILE.read_text()))
    map_names([f"{address} {GIT_NAME}"])
    try:
        assert wait_for(lambda: "Server listening" in server.log.read_text(), 10), server.log.read_text()
        yield server
    finally:
        unmap_names([f"{address} {GIT_NAME}"])
        process.terminate()
        process.wait(10)
        if made_privsep:
            privsep.rmdir()


@pytest.fixture
def project(tmp_path: Path, sshd: SshServer) -> Path:
    """The jailed command's folder, holding the client key (only the project is readable for keys)."""
    key = tmp_path / "deploy_key"
    shutil.copy(sshd.client_key, key)
    key.chmod(0o600)
    return tmp_path


# What the jailed shell adds to jail's GIT_SSH_COMMAND: the project's key, no prompts, known hosts in the project.
SSH_OPTIONS = (
    "-i $PWD/deploy_key -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no"
    " -o UserKnownHostsFile=$PWD/known_hosts -o ConnectTimeout=10"
)


def with_key(script: str) -> str:
    return f'export GIT_SSH_COMMAND="$GIT_SSH_COMMAND {SSH_OPTIONS}"; {script}'


def git_environment(jail_env: dict[str, str]) -> dict[str, str]:
    return {
        **jail_env,
        "GIT_AUTHOR_NAME": "jailed",
        "GIT_AUTHOR_EMAIL": "j@example.test",
        "GIT_COMMITTER_NAME": "jailed",
        "GIT_COMMITTER_EMAIL": "j@example.test",
    }


@pytest.fixture
def jailed_git(run_jail, jail_env, sshd: SshServer, project: Path):
    """Run a shell script under `jail --weak` in the project, with the sshd's address allowed by the guard."""

    def run(*rule: str, script: str, audit: Path | None = None) -> subprocess.CompletedProcess:
        logs = ("--audit-log", str(audit)) if audit else ()
        return run_jail(
            "--weak",
            "--allow-private",
            f"{sshd.address}/32",
            *logs,
            *rule,
            "--",
            "sh",
            "-c",
            with_key(script),
            cwd=project,
            env=git_environment(jail_env),
        )

    return run


def streams(audit: Path) -> list[dict]:
    return [r for r in map(json.loads, audit.read_text().splitlines()) if r.get("scheme") == "tcp"]


def test_clone_commit_and_push_through_jail(jailed_git, sshd, project, tmp_path):
    audit = tmp_path / "audit.jsonl"
    script = (
        f"git clone -q {sshd.url()} clone && cd clone && echo from-the-jail > NEW && git add NEW"
        " && git commit -qm from-the-jail && git push -q origin main"
    )
    result = jailed_git("--js", ALLOW_SSH, script=script, audit=audit)
    assert result.returncode == 0, result.stderr
    assert (project / "clone" / "README").read_text() == "served over ssh\n"
    assert sshd.commits()[0] == "from-the-jail"
    records = streams(audit)
    assert [r["url"] for r in records] == [f"tcp://{GIT_NAME}:22"] * 2  # clone, push: one record each
    for record in records:
        assert (record["decision"], record["method"], record["address"]) == ("allow", "CONNECT", sshd.address)
        assert record["bytes_up"] > 1000 and record["bytes_down"] > 1000 and record["duration_ms"] > 0
        assert record["end"] == "closed"


def test_a_policy_file_allows_it(jailed_git, sshd, project, tmp_path):
    policy = tmp_path / "git-ssh.toml"
    policy.write_text(f'[[rule]]\naction = "allow"\nhost = "{GIT_NAME}"\nscheme = "tcp"\nport = 22\n')
    result = jailed_git("--policy", str(policy), script=f"git clone -q {sshd.url()} clone")
    assert result.returncode == 0, result.stderr
    assert (project / "clone" / "README").exists()


@pytest.mark.parametrize(
    "rule",
    [
        ("--js", "r.scheme === 'https'"),  # no stream at all
        ("--js", f"r.scheme === 'tcp' && r.host === '{GIT_NAME}' && r.port === 2222"),  # another port
    ],
)
def test_denied_clone_never_reaches_sshd_and_says_why(jailed_git, sshd, project, tmp_path, rule):
    audit = tmp_path / "audit.jsonl"
    before = sshd.connections()
    result = jailed_git(*rule, script=f"git clone -q {sshd.url()} clone", audit=audit)
    assert result.returncode != 0
    # The ProxyCommand prints jail's 403 reason where ssh (and git) show it.
    assert f"jail: blocked CONNECT tcp://{GIT_NAME}:22" in result.stderr
    assert "reason: denied by rule" in result.stderr
    assert not (project / "clone" / "README").exists()
    time.sleep(0.2)
    assert sshd.connections() == before, "a denied stream reached sshd"
    [record] = streams(audit)
    assert (record["decision"], record["end"], record["bytes_up"], record["address"]) == ("deny", "denied", 0, "")


def test_the_address_guard_still_decides(run_jail, jail_env, sshd, project, tmp_path):
    """A rule allowing the stream does not open a loopback address the guard refuses."""
    audit = tmp_path / "audit.jsonl"
    before = sshd.connections()
    result = run_jail(
        "--weak", "--audit-log", str(audit), "--js", ALLOW_SSH, "--", "sh", "-c",
        with_key(f"git clone -q {sshd.url()} clone"), cwd=project, env=jail_env,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"jail: blocked CONNECT tcp://{GIT_NAME}:22" in result.stderr
    assert sshd.connections() == before
    [record] = streams(audit)
    assert record["decision"] == "deny" and record["address"] == sshd.address and record["end"] == "denied"


# --- any client's CONNECT: a tunnel that is neither TLS nor HTTP is a stream ----------------------


def open_tunnel(server, target: str, header: str = "") -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{header}\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        data = sock.recv(4096)
        if not data:
            break
        answer += data
    return sock, answer


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    try:
        while data := sock.recv(4096):
            received += data
    except OSError:
        pass
    return received


@pytest.fixture
def rule_calls(tmp_path: Path) -> tuple[Path, str]:
    """A shell rule that writes each URL it judges to a file and allows tcp to the test name on 22 only."""
    calls = tmp_path / "calls"
    rule = f'echo "$JAIL_URL" >> {calls}; test "$JAIL_URL" = tcp://{GIT_NAME}:22'
    return calls, rule


@pytest.mark.parametrize("header", ["", "Jail-Tunnel: tcp\r\n"])
def test_a_raw_tunnel_is_judged_once_and_relayed(jail_server, sshd, rule_calls, header):
    calls, rule = rule_calls
    server = jail_server("--allow-private", f"{sshd.address}/32", "--sh", rule)
    sock, answer = open_tunnel(server, f"{GIT_NAME}:22", header)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    sock.sendall(b"SSH-2.0-jail_test\r\n")  # the client speaks first, as OpenSSH does
    assert sock.recv(4096).startswith(b"SSH-2.0-OpenSSH")
    sock.close()
    assert calls.read_text().splitlines() == [f"tcp://{GIT_NAME}:22"]


@pytest.mark.parametrize("header", ["", "Jail-Tunnel: tcp\r\n"])
def test_a_denied_raw_tunnel_dials_nothing(jail_server, sshd, rule_calls, header):
    calls, rule = rule_calls
    server = jail_server("--allow-private", f"{sshd.address}/32", "--sh", rule)
    before = sshd.connections()
    sock, answer = open_tunnel(server, f"{sshd.address}:22", header)  # by address: not what the rule allows
    if header:
        answer += read_until_closed(sock)  # the body: jail's reason
        assert answer.startswith(b"HTTP/1.1 403") and f"blocked CONNECT tcp://{sshd.address}:22".encode() in answer
    else:
        assert answer.startswith(b"HTTP/1.1 200")
        sock.sendall(b"SSH-2.0-jail_test\r\n")
        assert read_until_closed(sock) == b""  # the tunnel is closed, nothing came from sshd
    sock.close()
    time.sleep(0.2)
    assert sshd.connections() == before
    assert calls.read_text().splitlines() == [f"tcp://{sshd.address}:22"]


@pytest.mark.parametrize("header", ["", "Jail-Tunnel: tcp\r\n"])
def test_http_inside_a_tunnel_allowed_as_tcp_is_still_judged_as_http(jail_server, http_upstream, header):
    """Saying "tcp" (or the rule allowing tcp to the port) opens no HTTP: each request is judged as one."""
    authority = f"{UPSTREAM_HOST}:{http_upstream.port}"
    server = jail_server("--js", "r.scheme === 'tcp'")
    sock, answer = open_tunnel(server, authority, header)
    assert answer.startswith(b"HTTP/1.1 200")
    sock.sendall(f"GET /inside HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode())
    assert read_until_closed(sock).startswith(b"HTTP/1.1 403")
    sock.close()
    assert http_upstream.connections == []


# --- the child's environment --------------------------------------------------------------------


def test_weak_mode_sets_git_ssh_command_unless_the_caller_did(tmp_path):
    endpoint = ProxyEndpoint("127.0.0.1", 4321, tmp_path / "ca.pem", tmp_path / "bundle.pem")
    env = WeakBackend("abcd").child_environment({}, endpoint)
    assert env["GIT_SSH_COMMAND"] == ssh_command(endpoint)
    assert "127.0.0.1:4321 %h %p" in env["GIT_SSH_COMMAND"]
    own = WeakBackend("abcd").child_environment({"GIT_SSH_COMMAND": "ssh -i mine"}, endpoint)
    assert own["GIT_SSH_COMMAND"] == "ssh -i mine"


def test_proxy_command_survives_odd_paths(tmp_path, monkeypatch, sshd, jail_server, project):
    """The helper at a path with a space, a quote and a `%` (ssh's token character) still runs."""
    import jail.platform.weak as weak

    odd = tmp_path / "it's 100% odd" / "connect_helper.py"
    odd.parent.mkdir()
    shutil.copy(weak.CONNECT_HELPER, odd)
    monkeypatch.setattr(weak, "CONNECT_HELPER", odd)
    server = jail_server("--allow-private", f"{sshd.address}/32", "--js", ALLOW_SSH)
    endpoint = ProxyEndpoint("127.0.0.1", server.port, tmp_path / "ca.pem", tmp_path / "bundle.pem")
    command = f"{ssh_command(endpoint)} {SSH_OPTIONS} root@{GIT_NAME} echo over-the-odd-path"
    result = subprocess.run(["sh", "-c", command], cwd=project, capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "over-the-odd-path", result.stderr


# --- the user's SSH agent -----------------------------------------------------------------------


@pytest.fixture
def ssh_agent(tmp_path: Path, sshd: SshServer) -> Iterator[dict[str, str]]:
    """A real ssh-agent outside the jail holding the test key (its socket path in SSH_AUTH_SOCK)."""
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL)
    try:
        assert wait_for(socket_path.exists, 10)
        env = {**os.environ, "SSH_AUTH_SOCK": str(socket_path)}
        subprocess.run(["ssh-add", "-q", str(sshd.client_key)], env=env, check=True, capture_output=True)
        yield {"SSH_AUTH_SOCK": str(socket_path)}
    finally:
        agent.terminate()
        agent.wait(10)


def test_the_users_agent_is_out_of_reach_inside(run_jail, jail_env, ssh_agent, sshd, tmp_path):
    """Without a way to relay it safely (no --ssh-agent yet), the agent's socket stays unreachable like every
    other Unix socket, and a clone that needs its key fails without reaching the key."""
    listed = subprocess.run(["ssh-add", "-l"], env={**os.environ, **ssh_agent}, capture_output=True, text=True)
    assert listed.returncode == 0, "the agent outside holds the key"
    env = {**jail_env, **ssh_agent}
    inside = run_jail("--weak", "--js", ALLOW_SSH, "--", "ssh-add", "-l", env=env, cwd=tmp_path)
    assert inside.returncode == 2, inside.stdout + inside.stderr  # 2: cannot reach the agent
    assert "Error connecting to agent" in inside.stderr
    clone = run_jail(
        "--weak", "--allow-private", f"{sshd.address}/32", "--js", ALLOW_SSH, "--", "sh", "-c",
        'export GIT_SSH_COMMAND="$GIT_SSH_COMMAND -o BatchMode=yes -o StrictHostKeyChecking=no '
        f'-o UserKnownHostsFile=$PWD/known_hosts"; git clone -q {sshd.url()} clone',
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert clone.returncode != 0 and "Permission denied (publickey)" in clone.stderr


# --- the isolated modes: no GIT_SSH_COMMAND, every TCP connection goes to jail and is judged by name ----


CLONE_AND_PUSH = (
    "set -ex; git clone -q {url} clone; cd clone; echo {message} > NEW; git add NEW;"
    " git commit -qm {message}; git push -q origin main"
)
# The child's own ssh, as a user runs it: no ProxyCommand, the project's key, known hosts in the project.
PLAIN_SSH = f'export GIT_SSH_COMMAND="ssh {SSH_OPTIONS}"; '


def check_isolated_clone(run, sshd: SshServer, project: Path, audit: Path, message: str) -> None:
    """Allowed: clone, commit and push work, one allowed stream each; denied: sshd sees nothing."""
    script = PLAIN_SSH + CLONE_AND_PUSH.format(url=sshd.url(), message=message)
    allowed = run("--audit-log", str(audit), "--js", ALLOW_SSH, "--", "sh", "-c", script)
    assert allowed.returncode == 0, allowed.stderr
    assert sshd.commits()[0] == message
    records = streams(audit)
    assert [(r["url"], r["decision"]) for r in records] == [(f"tcp://{GIT_NAME}:22", "allow")] * 2
    assert all(r["bytes_up"] > 1000 and r["bytes_down"] > 1000 for r in records)

    before = sshd.connections()
    denied_audit = audit.with_name("denied.jsonl")
    rule = f"r.scheme === 'tcp' && r.host === '{GIT_NAME}' && r.port === 2222"
    denied = run(
        "--audit-log",
        str(denied_audit),
        "--js",
        rule,
        "--",
        "sh",
        "-c",
        PLAIN_SSH + f"git clone -q {sshd.url()} denied",
    )
    assert denied.returncode != 0
    assert not (project / "denied").exists()
    time.sleep(0.2)
    assert sshd.connections() == before, "a denied stream reached sshd"
    assert [(r["url"], r["decision"]) for r in streams(denied_audit)] == [(f"tcp://{GIT_NAME}:22", "deny")]


def test_clone_and_push_in_strong_mode(run_jail, jail_env, sshd, project, tmp_path):
    from jail.platform.netns import strong_mode_unavailable

    if (unavailable := strong_mode_unavailable()) is not None:
        pytest.skip(f"strong mode unavailable: {unavailable}")

    def run(*args: str) -> subprocess.CompletedProcess:
        return run_jail("--allow-private", f"{sshd.address}/32", *args, cwd=project, env=git_environment(jail_env))

    check_isolated_clone(run, sshd, project, tmp_path / "audit.jsonl", "from-strong-mode")


def test_clone_and_push_in_rootless_mode(sshd, request):
    if (unavailable := rootless_unavailable()) is not None:
        pytest.skip(f"rootless jail unavailable: {unavailable}")
    jailed = request.getfixturevalue("user")  # tests/test_rootless.py's test user, made once per module
    project = jailed.workspace / "git-ssh"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir()
    shutil.copy(sshd.client_key, project / "deploy_key")
    for path in (project, project / "deploy_key"):
        os.chown(path, jailed.uid, jailed.entry.pw_gid)
    (project / "deploy_key").chmod(0o600)
    audit = project / "audit.jsonl"

    def run(*args: str) -> subprocess.CompletedProcess:
        argv = jailed.jail_argv("--allow-private", f"{sshd.address}/32", *args)
        names = " ".join(f"{k}={v}" for k, v in git_environment({}).items())
        return jailed.run(["sh", "-c", f'cd git-ssh && exec env {names} "$@"', "sh", *argv])

    try:
        check_isolated_clone(run, sshd, project, audit, "from-rootless-mode")
    finally:
        shutil.rmtree(project, ignore_errors=True)
