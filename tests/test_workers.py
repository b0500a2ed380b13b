"""`jail --server --workers N`: N proxy processes behind one port, one audit log, one stop."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import requests

from jail.workers import RESTART_MIN_UPTIME_SECONDS
from tests.conftest import free_port, server_argv, wait_for

REQUEST_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [+-] GET https://\S+")


def worker_pids(server_pid: int, count: int = 2) -> list[int]:
    """The workers of a jail --server (its children running python -m jail)."""
    assert wait_for(lambda: len(psutil.Process(server_pid).children()) == count)
    return sorted(child.pid for child in psutil.Process(server_pid).children())


def audit_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def get(server, url: str, session: requests.Session | None = None) -> requests.Response:
    """One request through the jail; without a session, on a connection of its own."""
    proxies = {"http": server.proxy_url, "https": server.proxy_url}
    return (session or requests).get(url, proxies=proxies, verify=str(server.bundle), timeout=30)


def test_both_workers_serve_and_every_request_is_one_whole_audit_line(jail_server, https_upstream, tmp_path):
    audit, request_log = tmp_path / "audit.jsonl", tmp_path / "requests.log"
    server = jail_server(
        "--workers",
        "2",
        "--js",
        "r.path.indexOf('/deny') < 0",
        # V8's 100 ms default is for a rule that loops; this machine is shared with other test runs.
        "--rule-timeout",
        "10",
        "--audit-log",
        str(audit),
        "--request-log",
        str(request_log),
    )
    pids = worker_pids(server.process.pid)
    # Long, uneven lines (a few KB each): a torn or interleaved write would show in the JSON.
    urls = [https_upstream.url(f"/{'deny' if i % 5 == 0 else 'ok'}/{i}?pad={'x' * (i * 7 % 4000)}") for i in range(500)]

    # 20 curl clients at once, 25 requests each: half keep their connection, half open one per request
    # (new connections are spread over the workers by the kernel; kept ones stay with theirs).
    clients = [
        subprocess.Popen(
            [
                "curl",
                "-sS",
                "--proxy",
                server.proxy_url,
                "--cacert",
                str(server.bundle),
                *(["-H", "Connection: close"] if number % 2 else []),
                *[arg for url in urls[number::20] for arg in ("-o", "/dev/null", "-w", "%{http_code}\\n", url)],
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for number in range(20)
    ]
    statuses = Counter(line for client in clients for line in client.communicate(timeout=120)[0].split())
    assert statuses == {"200": 400, "403": 100}
    records = audit_records(audit)
    assert len(records) == 500
    assert sorted(record["url"] for record in records) == sorted(urls)
    served = Counter(record["worker_pid"] for record in records)
    assert set(served) == set(pids), served
    assert min(served.values()) >= 50, served  # the kernel spreads 260 connections over both sockets
    assert {record["jail_id"] for record in records} == {records[0]["jail_id"]}
    lines = request_log.read_text().splitlines()
    assert len(lines) == 500 and all(REQUEST_LOG_LINE.fullmatch(line) for line in lines)


@pytest.fixture
def start_server(jail_env, test_ca_file):
    """Start a jail --server in a process group of its own (a terminal's Ctrl-C goes to the whole group);
    whatever a test leaves running is stopped at the end (killed with its workers if it does not stop)."""
    started: list[subprocess.Popen] = []

    def start(*args: str) -> tuple[subprocess.Popen, int]:
        port = free_port()
        process = subprocess.Popen(
            server_argv(port, test_ca_file, *args),
            env=jail_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        started.append(process)
        assert "listening" in process.stdout.readline(), process.stderr.read()
        return process, port

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(psutil.Error):
                for worker in psutil.Process(process.pid).children():
                    worker.kill()
            process.kill()
            process.wait()


def run_dirs_of(pids: list[int]) -> list[Path]:
    """The temp dirs whose owner mark names one of these processes."""
    found = []
    for mark in Path(tempfile.gettempdir()).glob("jail-*/jail.pid"):
        try:
            if int(mark.read_text().split()[0]) in pids:
                found.append(mark.parent)
        except (OSError, ValueError, IndexError):
            pass
    return found


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_a_signal_stops_every_worker_and_leaves_nothing(start_server, how):
    process, _ = start_server("--workers", "2", "--js", "true")
    pids = [process.pid, *worker_pids(process.pid)]
    assert len(run_dirs_of(pids)) == 3  # the parent's work dir and each worker's
    if how == "sigterm":
        process.terminate()
    else:  # the terminal sends SIGINT to the whole foreground group
        os.killpg(process.pid, signal.SIGINT)
    assert process.wait(20) == 0
    assert not [pid for pid in pids[1:] if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert run_dirs_of(pids) == []
    assert "Traceback" not in process.stderr.read()


def test_a_worker_that_dies_at_once_stops_the_server_with_one_line(start_server):
    process, _ = start_server("--workers", "2", "--js", "true")
    first, second = worker_pids(process.pid)
    os.kill(first, signal.SIGKILL)
    assert process.wait(20) == 125
    stderr = process.stderr.read()
    assert f"worker 0 (pid {first}) was killed by signal 9 soon after it started; stopping the server" in stderr
    assert not psutil.pid_exists(second) or psutil.Process(second).status() == "zombie"
    assert "Traceback" not in stderr


def test_js_file_edited_from_outside_reaches_every_worker(jail_server, https_upstream, tmp_path):
    rule = tmp_path / "rule.js"
    rule.write_text("r.path.startsWith('/a')")
    audit = tmp_path / "audit.jsonl"
    server = jail_server("--workers", "2", "--js-file", str(rule), "--audit-log", str(audit))
    pids = worker_pids(server.process.pid)

    def verdicts_by_worker(path: str) -> dict[int, set[str]]:
        seen: dict[int, set[str]] = {pid: set() for pid in pids}
        for record in audit_records(audit):
            if record["path"].startswith(path):
                seen[record["worker_pid"]].add(record["decision"])
        return seen

    def ask_until_each_worker_said(path: str, verdict: str) -> dict[int, set[str]]:
        for number in range(200):  # each on a new connection: the kernel picks the worker
            get(server, https_upstream.url(f"{path}/{number}"))
            seen = verdicts_by_worker(path)
            if all(verdict in verdicts for verdicts in seen.values()):
                break
        return seen

    assert ask_until_each_worker_said("/b-before", "deny") == {pid: {"deny"} for pid in pids}
    rule.write_text("r.path.startsWith('/a') || r.path.startsWith('/b')")
    time.sleep(1.5)  # each worker polls the file every 0.5 s
    assert ask_until_each_worker_said("/b-after", "allow") == {pid: {"allow"} for pid in pids}


def test_workers_need_the_server(run_jail):
    result = run_jail("--workers", "2", "--js", "true", "--", "true")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["jail: error: --workers only goes with --server (see jail --help)"]


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5", ""])
def test_a_bad_worker_count_is_one_clear_error(run_jail, value):
    result = run_jail("--server", "--listen", f"127.0.0.1:{free_port()}", "--js", "true", f"--workers={value}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--workers" in lines[0] and "1 or more" in lines[0] and "auto" in lines[0], lines


def test_what_lives_in_one_process_is_refused_with_workers(run_jail, tmp_path):
    result = run_jail("--server", "--workers", "2", "--js", "true", "--har", str(tmp_path / "run.har"))
    assert result.returncode == 2
    assert "--har works with one proxy process, not --workers 2" in result.stderr


def test_a_rule_that_does_not_compile_is_one_error_from_the_workers(run_jail):
    result = run_jail("--server", "--listen", f"127.0.0.1:{free_port()}", "--workers", "2", "--js", "r.host ===")
    assert result.returncode == 125
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jail: error: JavaScript rule does not compile"), lines


def test_a_worker_that_dies_later_is_replaced_and_the_server_goes_on(start_server, jail_env, https_upstream, tmp_path):
    audit = tmp_path / "audit.jsonl"
    process, port = start_server("--workers", "2", "--js", "true", "--audit-log", str(audit))
    first, second = worker_pids(process.pid)
    time.sleep(RESTART_MIN_UPTIME_SECONDS + 0.5)
    os.kill(first, signal.SIGKILL)
    assert wait_for(lambda: len(set(worker_pids(process.pid)) - {first, second}) == 1, timeout=20)
    replacement = (set(worker_pids(process.pid)) - {second}).pop()
    proxies = {"https": f"http://127.0.0.1:{port}"}
    bundle = Path(jail_env["JAIL_CA_DIR"]) / "trust" / "ca-bundle.pem"
    for number in range(200):  # new connections until the replacement has served one
        assert requests.get(https_upstream.url(f"/{number}"), proxies=proxies, verify=bundle, timeout=30).ok
        if replacement in {record["worker_pid"] for record in audit_records(audit)}:
            break
    assert replacement in {record["worker_pid"] for record in audit_records(audit)}
    process.terminate()
    assert process.wait(20) == 0
    assert f"worker 0 (pid {first}) was killed by signal 9; starting another" in process.stderr.read()


def test_fail_on_deny_counts_every_worker_s_denials(start_server, jail_env, https_upstream):
    process, port = start_server("--workers", "2", "--js", "false", "--fail-on-deny")
    proxies = {"https": f"http://127.0.0.1:{port}"}
    bundle = Path(jail_env["JAIL_CA_DIR"]) / "trust" / "ca-bundle.pem"
    for number in range(6):
        assert (
            requests.get(https_upstream.url(f"/{number}"), proxies=proxies, verify=bundle, timeout=30).status_code
            == 403
        )
    process.terminate()
    assert process.wait(20) == 1
    assert "jail: 6 requests were denied or would have been (--fail-on-deny)" in process.stderr.read()


def test_a_port_another_jail_with_workers_listens_on_is_refused(start_server, run_jail):
    process, port = start_server("--workers", "2", "--js", "true")
    second = run_jail("--server", "--listen", f"127.0.0.1:{port}", "--workers", "2", "--js", "true", timeout=30)
    process.terminate()
    process.wait(20)
    assert second.returncode == 125
    assert second.stderr.strip().splitlines() == [
        f"jail: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
