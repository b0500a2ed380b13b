"""A first run on a fresh machine: without nftables (no `nft` command), jail isolates in a network
namespace with no firewall and says so, as root and as a normal user. The README's first command gets
through; a program that ignores the proxy variables reaches nothing.

`nft` is hidden the way a fresh machine lacks it: jail runs in a private mount namespace in which every
`nft` on its search path is /dev/null (not executable), so `shutil.which` finds none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from jail.model import JailError
from jail.platform import TOOL_PATH
from jail.platform.rootless import rootless_unavailable
from tests.conftest import PYTHON, UPSTREAM_HOST, host_addresses, jail_argv, wait_for
from tests.test_rootless import GETCWD_PROBE, RUNUSER, SYS_GETCWD, RootlessUser, getcwd_answers, user  # noqa: F401

unavailable = rootless_unavailable()
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="hiding nft and making the test user need root (CI has it)"),
    pytest.mark.skipif(unavailable is not None, reason=f"no user namespaces: {unavailable}"),
]
UNSHARE = shutil.which("unshare", path=TOOL_PATH) or "unshare"
MOUNT = shutil.which("mount", path=TOOL_PATH) or "mount"
NOTICE = (
    "jail: isolated without a firewall (the 'nft' command is missing): only programs that use the proxy"
    " variables get out"
)
ALLOW_UPSTREAM = f"r.host === '{UPSTREAM_HOST}'"
ALLOW_ELSEWHERE = "r.host === 'api.openai.com'"


def without_nft(argv: list[str]) -> list[str]:
    """ARGV run in a private mount namespace where no `nft` can be executed."""
    search = f"{os.environ.get('PATH', '')}:{TOOL_PATH}".split(":")
    found = {os.path.realpath(p) for d in search if d and os.access(p := os.path.join(d, "nft"), os.X_OK)}
    hide = "".join(f'{MOUNT} --bind /dev/null "{path}" && ' for path in sorted(found))
    return [UNSHARE, "--mount", "--propagation", "private", "sh", "-c", f'{hide}exec "$@"', "sh", *argv]


class FirstRun:
    """Runs jail with nft hidden, as root or as the test user, from a project folder."""

    def __init__(self, as_user: RootlessUser | None, env: dict[str, str], project: Path, upstream_ca: Path) -> None:
        self.as_user = as_user
        self.env = env
        self.project = project
        self.upstream_ca = upstream_ca

    def argv(self, *args: str) -> list[str]:
        upstream = ("--upstream-ca", str(self.upstream_ca), "--allow-private", f"{UPSTREAM_HOST}/32")
        jail = jail_argv(*upstream, *args)
        return without_nft(jail if self.as_user is None else [RUNUSER, "-u", self.as_user.entry.pw_name, "--", *jail])

    def jail(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.argv(*args), env=self.env, cwd=self.project, capture_output=True, text=True, timeout=timeout
        )

    def python(self, code: str, *flags: str) -> subprocess.CompletedProcess:
        return self.jail(*flags, "--", PYTHON, "-c", textwrap.dedent(code))


@pytest.fixture(params=["root", "user"])
def first_run(request, jail_env: dict[str, str], test_ca_file: Path, tmp_path: Path) -> Iterator[FirstRun]:
    if request.param == "user":
        subject: RootlessUser = request.getfixturevalue("user")
        yield FirstRun(subject, subject.environment(), subject.workspace, subject.upstream_ca)
        assert wait_for(lambda: not subject.processes(), 5), [p.cmdline() for p in subject.processes()]
        assert subject.leftover_dirs() == []
        return
    project = tmp_path / "project"
    project.mkdir()
    yield FirstRun(None, jail_env, project, test_ca_file)


def run_leftovers(jail_id: str) -> list[str]:
    """Processes and temp dirs of one run, found by its id (other jails may be running beside it)."""
    mark = f"jail-{jail_id}-"
    dirs = [p.name for p in Path(tempfile.gettempdir()).glob(f"{mark}*")]
    processes = []
    for process in psutil.process_iter(["cmdline"]):
        if any(mark in part for part in process.info["cmdline"] or []):
            processes.append(" ".join(process.info["cmdline"]))
    return dirs + processes


def test_the_first_command_gets_through_and_says_its_mode(first_run, https_upstream):
    url = https_upstream.url("/first")
    result = first_run.jail("--js", ALLOW_UPSTREAM, "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url)
    assert (result.returncode, result.stdout) == (0, "200"), result.stderr
    assert result.stderr.splitlines() == [NOTICE]
    assert [r["path"] for r in https_upstream.requests] == ["/first"]


BYPASS_PROBE = """
import json, os, socket, subprocess, time
def attempt(action):
    start = time.monotonic()
    try:
        action()
        outcome = "succeeded"
    except OSError as e:
        outcome = type(e).__name__
    return outcome, round(time.monotonic() - start, 2)
def tcp(host, port):
    return attempt(lambda: socket.create_connection((host, port), timeout=5).close())
def udp(host, port):
    return attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"leak", (host, port)))
def raw(host):
    def send():
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        sock.sendto(b"\\x08\\x00\\xf7\\xff\\x00\\x00\\x00\\x00", (host, 0))
    return attempt(send)
curl = subprocess.run(["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", URL], capture_output=True, text=True)
direct = subprocess.run(["curl", "-s", "-m", "5", "--noproxy", "*", URL], capture_output=True, text=True)
results = {"proxied": curl.stdout, "direct_curl_exit": direct.returncode, "jail_id": os.environ["JAIL_ID"]}
for host in TARGETS:
    results[f"tcp {host}"] = tcp(host, PORT)
    if not host.startswith("127."):  # a datagram to the namespace's own loopback is sent, and stays there
        results[f"udp {host}"] = udp(host, PORT)
        results[f"raw {host}"] = raw(host)
results["tcp v6"] = tcp("2001:db8::1", 443)
print(json.dumps(results))
"""


def test_a_denied_request_and_every_bypass_reach_nothing(first_run, https_upstream, listener):
    targets = [*host_addresses(), UPSTREAM_HOST, "192.0.2.1"]
    code = BYPASS_PROBE.replace("URL", repr(https_upstream.url("/denied"))).replace("TARGETS", repr(targets))
    result = first_run.python(code.replace("PORT", str(listener.port)), "--js", ALLOW_ELSEWHERE)
    assert result.stderr.splitlines() == [NOTICE]
    results = json.loads(result.stdout)
    assert results.pop("proxied") == "403"
    # curl: 7 = could not connect (nothing routes there, or nothing listens on the namespace's own loopback).
    assert results.pop("direct_curl_exit") == 7
    jail_id = results.pop("jail_id")
    for target, (outcome, seconds) in results.items():
        assert outcome != "succeeded", target
        assert seconds < 2, (target, seconds)
    time.sleep(0.5)
    assert listener.seen == []
    assert https_upstream.connections == [] and https_upstream.requests == []
    assert wait_for(lambda: not run_leftovers(jail_id), 5), run_leftovers(jail_id)


def test_explain_names_the_namespace_mode(first_run):
    result = first_run.jail("--explain", "--js", ALLOW_UPSTREAM, "--", "curl", "-s", "https://example.com")
    assert result.returncode == 0, result.stderr
    modes = [line for line in result.stdout.splitlines() if line.startswith("mode: ")]
    assert modes == [
        "mode: namespace (the 'nft' command is missing): own user and network namespace with loopback only and"
        " no firewall: jail's proxy (reached through the proxy variables) and its resolver are the only way out;"
        " a program that ignores the proxy variables reaches nothing (its connections fail at once) instead of"
        " being judged; the command runs as you, without capabilities over its network"
    ]


@pytest.mark.skipif(
    os.uname().machine not in SYS_GETCWD, reason="getcwd's system call number is known for x86_64 and aarch64"
)
@pytest.mark.parametrize("flags", [(), ("--no-fs-restrictions",)], ids=["confined", "unconfined"])
def test_getcwd_is_the_real_path_in_the_namespace_mode(first_run, flags):
    answers = getcwd_answers(first_run.python(GETCWD_PROBE, "--js", "true", *flags))
    assert answers == [str(first_run.project)] * 4


def test_the_probe_sees_an_unreachable_directory(tmp_path):
    """The getcwd probe is not blind: entered the way nsenter --wd enters, the directory is unreachable."""
    holder = subprocess.Popen([UNSHARE, "--user", "--map-root-user", "--mount", "sleep", "30"])
    try:
        nsenter = shutil.which("nsenter", path=TOOL_PATH) or "nsenter"
        enter = [nsenter, f"--target={holder.pid}", "--user", "--mount", "--preserve-credentials", f"--wd={tmp_path}"]
        assert wait_for(lambda: os.readlink(f"/proc/{holder.pid}/ns/user") != os.readlink("/proc/self/ns/user"))
        probe = subprocess.run([*enter, sys.executable, "-c", GETCWD_PROBE], capture_output=True, text=True)
    finally:
        holder.kill()
        holder.wait()
    assert getcwd_answers(probe)[0] == f"(unreachable){tmp_path}"


@pytest.fixture
def broken_nft(tmp_path: Path, monkeypatch) -> Iterator[None]:
    """An `nft` first on jail's tool path that fails the way it does on a kernel without nf_tables."""
    import jail.platform
    from jail.platform import rootless

    fake = tmp_path / "nft"
    fake.write_text("#!/bin/sh\necho 'Error: Could not process rule: Operation not supported' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(jail.platform, "TOOL_PATH", f"{tmp_path}:{TOOL_PATH}")
    rootless.nftables_unavailable.cache_clear()
    yield
    rootless.nftables_unavailable.cache_clear()


@pytest.mark.parametrize("uid", [0, 1000], ids=["root", "user"])
def test_nftables_missing_from_the_kernel_is_found_by_trying(broken_nft, monkeypatch, uid):
    from jail.platform import choose_mode

    monkeypatch.setattr(os, "geteuid", lambda: uid)
    reason = "nftables does not work here: Error: Could not process rule: Operation not supported"
    assert choose_mode(weak=False) == ("namespace", reason)


def test_root_without_the_strong_mode_prefers_the_rootless_firewall(monkeypatch, capsys):
    from jail.platform import choose_mode, netns, rootless, select_backend

    rootless.nftables_unavailable.cache_clear()
    if (missing := rootless.nftables_unavailable()) is not None:
        pytest.skip(f"needs nftables: {missing}")
    monkeypatch.setattr(netns, "strong_mode_unavailable", lambda: "the 'ip' command is missing")
    assert choose_mode(weak=False) == ("rootless", "the 'ip' command is missing")
    assert select_backend("0123abcd", weak=False).firewall
    assert (
        capsys.readouterr().err
        == "jail: isolated in a user namespace, not the strong mode: the 'ip' command is missing\n"
    )
    with pytest.raises(JailError, match="--user needs the strong mode, which is unavailable: the 'ip' command"):
        choose_mode(weak=False, user="nobody")
