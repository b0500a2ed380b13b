"""Secrets the agent never sees: placeholders in the child, real values only to the listed hosts."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from jail.platform.netns import strong_mode_unavailable
from tests.conftest import PYTHON

REAL = "sk-real-0123456789abcdefSECRET"

CLIENT = textwrap.dedent(
    """
    import base64, json, os, ssl, sys, urllib.request, urllib.error
    token = os.environ["API_TOKEN"]
    https_base, http_base = sys.argv[1], sys.argv[2]
    context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(), urllib.request.HTTPSHandler(context=context))
    def call(url, headers=None, data=None):
        try:
            with opener.open(urllib.request.Request(url, headers=headers or {}, data=data), timeout=20) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    out = {
        "env": token,
        "environ_file": open("/proc/self/environ", "rb").read().decode(errors="replace"),
        "bearer": call(https_base + "/echo", {"Authorization": f"Bearer {token}"}),
        "basic": call(https_base + "/echo", {"Authorization": f"Basic {basic}"}),
        "query": call(https_base + f"/echo?key={token}"),
        "chunked": call(https_base + "/echo-chunked", {"Authorization": f"Bearer {token}"}),
        "other_host": call(f"https://elsewhere.invalid/x", {"Authorization": f"Bearer {token}"}),
        "plain_http": call(http_base + "/x", {"X-Key": token}),
        "body_elsewhere": call(http_base + "/x", data=f"key={token}".encode()),
    }
    print(json.dumps(out))
    """
)


@pytest.fixture
def secret_run(weak_jail, jail_env, https_upstream, http_upstream, tmp_path):
    audit, requests = tmp_path / "audit.jsonl", tmp_path / "requests.log"
    result = weak_jail(
        "-vv",
        "--secret",
        "API_TOKEN=127.0.0.2",
        "--js",
        "true",
        "--audit-log",
        str(audit),
        "--request-log",
        str(requests),
        "--log-header-values",
        "--",
        sys.executable,
        "-c",
        CLIENT,
        https_upstream.url(""),
        http_upstream.url(""),
        env={**jail_env, "API_TOKEN": REAL},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout), result, audit, requests


def test_child_holds_only_a_placeholder(secret_run):
    seen, *_ = secret_run
    assert seen["env"] != REAL and seen["env"].startswith("sk-")
    assert REAL not in seen["environ_file"]


def test_listed_host_gets_the_real_value_and_echoes_come_back_masked(secret_run, https_upstream):
    seen, *_ = secret_run
    upstream_saw = [r["headers"].get("authorization", "") + r["path"] for r in https_upstream.requests]
    assert f"Bearer {REAL}" in upstream_saw[0]
    import base64

    assert base64.b64encode(f"x-access-token:{REAL}".encode()).decode() in upstream_saw[1]
    assert f"key={REAL}" in https_upstream.requests[2]["path"]
    for name in ("bearer", "basic", "query", "chunked"):
        status, body = seen[name]
        assert status == 200, (name, body)
        assert REAL not in body, name
    assert seen["env"] in seen["bearer"][1] and seen["env"] in seen["chunked"][1]


def test_placeholder_elsewhere_is_denied_and_never_sent(secret_run, http_upstream):
    seen, *_ = secret_run
    for name in ("other_host", "plain_http", "body_elsewhere"):
        status, body = seen[name]
        assert status == 403, name
        assert "API_TOKEN" in body
    assert http_upstream.connections == []


def test_real_value_never_reaches_logs_or_diagnostics(secret_run):
    _, result, audit, requests = secret_run
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert sum(r["reason_code"] == "secret_leak" for r in records) == 3
    for text in (audit.read_text(), requests.read_text(), result.stderr, result.stdout):
        assert REAL not in text


def test_explain_names_secrets_but_never_their_value(run_jail, jail_env):
    result = run_jail(
        "--explain", "--secret", "API_TOKEN=api.example.com", "--js", "true", env={**jail_env, "API_TOKEN": REAL}
    )
    assert "secret API_TOKEN" in result.stdout and "api.example.com" in result.stdout
    assert REAL not in result.stdout + result.stderr


def test_secret_without_a_value_is_one_clear_line(run_jail, jail_env):
    env = {k: v for k, v in jail_env.items() if k != "API_TOKEN"}
    result = run_jail("--secret", "API_TOKEN=api.example.com", "--js", "true", "--", "true", env=env)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "jail: error: --secret API_TOKEN: set API_TOKEN in jail's environment or give --secret-file API_TOKEN=PATH"
    ]


@pytest.mark.parametrize("protocol", ["--http1.1", "--http2"])
@pytest.mark.parametrize("real", [REAL, "short-1", "x" * 200])
def test_echoed_secret_is_masked_and_the_answer_arrives_whole(weak_jail, jail_env, https_upstream, protocol, real):
    """The placeholder and the real value differ in length: the upstream's Content-Length must not be kept."""
    script = (
        'curl -sS --max-time 20 {p} -w "\\n%{{http_version}} %{{size_download}}" '
        '"{url}/echo?key=$API_TOKEN" -D "$TMPDIR/headers"; echo " $?"; cat "$TMPDIR/headers"'
    ).format(p=protocol, url=https_upstream.url(""))
    result = weak_jail(
        "--secret", "API_TOKEN=127.0.0.2", "--js", "true", "--", "sh", "-c", script, env={**jail_env, "API_TOKEN": real}
    )
    body, _, rest = result.stdout.partition("\n")
    version, size, curl_status = rest.split("\n")[0].split()
    assert curl_status == "0", result.stdout + result.stderr
    assert version == ("2" if protocol == "--http2" else "1.1")
    assert int(size) == len(body.encode())
    echoed = json.loads(body)["path"]
    assert f"key={real}" in https_upstream.requests[-1]["path"]
    assert echoed.startswith("/echo?key=") and real not in echoed


# Reads every /proc file of jail's processes that could hold the real value: the parent (jail itself)
# and anything else whose command line names jail (the namespace holder, rule programs).
PROC_PROBE = textwrap.dedent(
    """
    import json, os, sys
    real = sys.argv[1].encode()
    targets = {os.getppid()}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                line = open(f"/proc/{entry}/cmdline", "rb").read()
            except OSError:
                continue
            try:
                parent = int(open(f"/proc/{entry}/stat", "rb").read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                parent = 0
            # jail's other processes: its rule program (a sibling of ours), and anything naming jail.
            if parent == os.getppid() or (b"jail" in line and b"pytest" not in line):
                targets.add(int(entry))
    found, examined = [], 0
    for pid in sorted(targets):
        for name in ("environ", "cmdline"):
            try:
                examined += 1
                if real in open(f"/proc/{pid}/{name}", "rb").read():
                    found.append(f"{pid}/{name}")
            except OSError:
                pass
        try:
            regions = [line.split()[0] for line in open(f"/proc/{pid}/maps") if line.split()[1].startswith("r")]
            memory = open(f"/proc/{pid}/mem", "rb", buffering=0)
        except OSError:
            continue
        with memory:
            for region in regions:
                start, end = (int(x, 16) for x in region.split("-"))
                try:
                    memory.seek(start)
                    if real in memory.read(end - start):
                        found.append(f"{pid}/mem")
                except (OSError, OverflowError, ValueError):
                    pass
    print(json.dumps({"targets": sorted(targets), "found": found, "examined": examined}))
    """
)


def probe_for(real: str) -> list[str]:
    # The value reaches the probe as its argument, split in two so the probe's own command line never
    # holds it whole (it would find itself otherwise).
    return ["sh", "-c", 'exec "$0" -c "$1" "$2$3"', PYTHON, PROC_PROBE, real[:4], real[4:]]


@pytest.mark.parametrize("mode", ["--weak", "strong"])
def test_real_value_is_not_readable_in_any_proc_file_of_jail(run_jail, jail_env, mode):
    if mode == "strong" and (reason := strong_mode_unavailable()) is not None:
        pytest.skip(f"strong mode unavailable: {reason}")
    flags = ("--weak",) if mode == "--weak" else ()
    result = run_jail(
        *flags,
        "--secret",
        "API_TOKEN=api.example.com",
        "--proc",
        f"{sys.executable} -u -c 'import sys\\nfor l in sys.stdin: print(\"true\", flush=True)'",
        "--",
        *probe_for(REAL),
        env={**jail_env, "API_TOKEN": REAL},
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["found"] == [], seen
    assert seen["examined"] >= 2, seen  # environ and cmdline of jail itself at least
