"""The child's life under jail: timeouts, signals, leftovers, and logs under concurrency."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import psutil

from tests.conftest import jail_argv, wait_for


def processes_with(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


def test_timeout_kills_the_whole_tree_and_exits_124(run_jail):
    marker = f"{300 + uuid.uuid4().int % 1000}.5"
    script = f"sleep {marker} & (sleep {marker} &) ; setsid sleep {marker} & sleep {marker}"
    started = time.monotonic()
    result = run_jail("--timeout", "1", "--js", "true", "--", "sh", "-c", script)
    assert result.returncode == 124
    assert time.monotonic() - started < 15
    assert wait_for(lambda: not processes_with(marker), timeout=5), processes_with(marker)


def test_background_processes_do_not_outlive_the_command(run_jail):
    marker = f"{300 + uuid.uuid4().int % 1000}.25"
    result = run_jail("--js", "true", "--", "sh", "-c", f"setsid sleep {marker} & exit 3")
    assert result.returncode == 3
    assert wait_for(lambda: not processes_with(marker), timeout=5), processes_with(marker)


def test_sigterm_is_passed_to_the_child_and_jail_exits_with_its_status(jail_env, tmp_path):
    flag = tmp_path / "got-term"
    child = textwrap.dedent(f"""
        import signal, sys, time, pathlib
        def on_term(*_):
            pathlib.Path({str(flag)!r}).write_text("yes")
            sys.exit(3)
        signal.signal(signal.SIGTERM, on_term)
        print("ready", flush=True)
        time.sleep(60)
    """)
    process = subprocess.Popen(
        jail_argv("--allow-write", str(tmp_path), "--js", "true", "--", sys.executable, "-c", child),
        env=jail_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 3
    assert flag.read_text() == "yes"


def test_sighup_to_a_child_ignoring_it_still_tears_down(jail_env):
    marker = f"{300 + uuid.uuid4().int % 1000}.75"
    process = subprocess.Popen(
        jail_argv("--js", "true", "--", "sh", "-c", f"trap '' HUP TERM; echo ready; sleep {marker}"),
        env=jail_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGHUP)
    assert process.wait(20) != 0
    assert wait_for(lambda: not processes_with(marker), timeout=5), [
        (p.pid, p.status(), p.cmdline(), p.ppid()) for p in processes_with(marker)
    ]


CONCURRENT_CLIENT = """
import sys, urllib.request, concurrent.futures
base = sys.argv[1]
opener = urllib.request.build_opener(urllib.request.ProxyHandler())
def fetch(i):
    try:
        return opener.open(f"{base}/item/{i}", timeout=30).status
    except urllib.error.HTTPError as e:
        return e.code
with concurrent.futures.ThreadPoolExecutor(50) as pool:
    codes = list(pool.map(fetch, range(200)))
print(codes.count(200), codes.count(403))
"""


def test_200_concurrent_requests_give_200_lines_in_each_log(run_jail, http_upstream, tmp_path):
    request_log, audit_log = tmp_path / "requests.log", tmp_path / "audit.jsonl"
    result = run_jail(
        "--js",
        "Number(r.path.split('/').pop()) % 2 === 0",
        "--request-log",
        str(request_log),
        "--audit-log",
        str(audit_log),
        "--",
        sys.executable,
        "-c",
        CONCURRENT_CLIENT,
        http_upstream.url(""),
        timeout=120,
    )
    assert result.stdout.split() == ["100", "100"], result.stderr
    lines = request_log.read_text().splitlines()
    assert len(lines) == 200
    pattern = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ([+-]) GET http://127\.0\.0\.2:\d+/item/(\d+)$")
    seen = set()
    for line in lines:
        match = pattern.match(line)
        assert match, line
        assert (match[1] == "+") == (int(match[2]) % 2 == 0)
        seen.add(int(match[2]))
    assert seen == set(range(200))
    records = [json.loads(line) for line in audit_log.read_text().splitlines()]
    assert len(records) == 200
    assert sorted(int(r["path"].rsplit("/", 1)[1]) for r in records) == list(range(200))
    assert {r["status"] for r in records if r["decision"] == "deny"} == {403}


def test_proxy_sockets_accept_connections_with_nagle_off():
    # Without TCP_NODELAY every small proxied response waited ~40 ms for the client's delayed ACK.
    import socket

    from jail.platform import listening_socket

    with listening_socket("127.0.0.1") as server, socket.create_connection(server.getsockname()) as client:
        accepted, _ = server.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert client.fileno() >= 0
