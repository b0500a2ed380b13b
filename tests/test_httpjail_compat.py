"""httpjail's own ways of calling jail, through the real proxy: the forms its users and tests write."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import DENIED_NAME, TEST_NAME, UPSTREAM_HOST, jail_argv, wait_for

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")

CURL = ["curl", "-sS", "--max-time", "20"]


@pytest.fixture
def server_on_free_port(jail_env, test_ca_file, tmp_path):
    """`jail --server --listen 127.0.0.1:0 --ready-file F`: the address comes from the file, not from us."""
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        jail_argv(
            "--server",
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
            "--upstream-ca",
            str(test_ca_file),
            "--allow-private",
            f"{UPSTREAM_HOST}/32",
            "--js",
            "r.path.startsWith('/ok')",
        ),
        env=jail_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(ready.exists, timeout=30), "no ready file"
        yield process, ready.read_text()
    finally:
        process.terminate()
        process.wait(10)


def test_listen_port_zero_picks_a_free_port_and_says_which(server_on_free_port, https_upstream, ca_dir):
    process, written = server_on_free_port
    assert written.endswith("\n")
    address = written.strip()
    host, _, port = address.rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    proxy = f"http://{address}"
    allowed = subprocess.run(
        [*CURL, "-x", proxy, "--cacert", str(ca_dir / "trust" / "ca-bundle.pem"), https_upstream.url("/ok/zero")],
        capture_output=True,
        text=True,
    )
    assert allowed.returncode == 0, allowed.stderr
    assert '"/ok/zero"' in allowed.stdout
    denied = subprocess.run(
        [
            *CURL,
            "-x",
            proxy,
            "--cacert",
            str(ca_dir / "trust" / "ca-bundle.pem"),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            https_upstream.url("/no"),
        ],
        capture_output=True,
        text=True,
    )
    assert denied.stdout == "403"
    process.terminate()
    _, stderr = process.communicate(timeout=10)
    assert f"jail: listening on {address}\n" in stderr


def test_ready_file_needs_server(run_jail, tmp_path):
    result = run_jail("--ready-file", str(tmp_path / "r"), "--", "true")
    assert result.returncode == 2
    assert "--ready-file only goes with --server" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the named origins listen on ports 80/443 and edit /etc/hosts")
def test_allow_with_deny_message_through_the_proxy(weak_jail, named_upstreams):
    rule = f"({{allow: r.host === '{TEST_NAME}', deny_message: 'only {TEST_NAME}'}})"
    allowed = weak_jail("--js", rule, "--", *CURL, f"https://{TEST_NAME}/a")
    assert allowed.returncode == 0, allowed.stderr
    assert '"/a"' in allowed.stdout
    denied = weak_jail("--js", rule, "--", *CURL, "-i", "--suppress-connect-headers", f"https://{DENIED_NAME}/b")
    assert " 403 " in denied.stdout.splitlines()[0]
    assert f"reason: only {TEST_NAME}" in denied.stdout
    assert [r["path"] for r in named_upstreams[1].requests] == ["/a"]
