#!/usr/bin/env python3
"""Benchmark jail against the alternatives: per-request cost, rule cost, start-up, memory. See bench/README.md.

Needs `hey`, `nginx` and `tinyproxy` (Debian: apt-get install -y hey nginx tinyproxy), the `trustme` and
`psutil` Python packages, and mitmproxy's `mitmdump` (installed with jail). `--chart` needs matplotlib.
Installs nothing, sends traffic only over loopback, and stops every process it started on any exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import pwd
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_PATH = BENCH_DIR / "results-latest.json"
UPSTREAM_HOST = "127.0.0.2"
UPSTREAM_CIDR = "127.0.0.2/32"
PROXY_HOST = "127.0.0.1"
INSTALL_HINT = "apt-get install -y hey nginx tinyproxy"

HEY_REQUEST_TIMEOUT_S = 10  # hey -t: one request may take at most this long
HEY_RUN_TIMEOUT_S = 60  # one hey run is killed after this long
STARTUP_RUN_TIMEOUT_S = 30  # one `jail -- true` is killed after this long
READY_TIMEOUT_S = 30  # a server must be listening within this long
RSS_SAMPLE_S = 0.05  # peak RSS is sampled this often

# ---------------------------------------------------------------------------- the rules

# The "realistic" rule: 20 host + path-prefix conditions, the benchmark's upstream last, so that every
# measured request is checked against all 20. The JS rule, the policy file and the mitmdump addon are
# all generated from this one list and must agree (checked in-process on the varied requests).
CONDITIONS: list[tuple[str, str]] = [
    ("pypi.org", "/simple/"),
    ("files.pythonhosted.org", "/packages/"),
    ("registry.npmjs.org", "/"),
    ("github.com", "/myorg/"),
    ("api.github.com", "/repos/myorg/"),
    ("codeload.github.com", "/myorg/"),
    ("objects.githubusercontent.com", "/github-production-release-asset-"),
    ("proxy.golang.org", "/"),
    ("sum.golang.org", "/lookup/"),
    ("index.crates.io", "/"),
    ("static.crates.io", "/crates/"),
    ("deb.debian.org", "/debian/"),
    ("security.debian.org", "/debian-security/"),
    ("api.openai.com", "/v1/"),
    ("api.anthropic.com", "/v1/"),
    ("registry-1.docker.io", "/v2/"),
    ("auth.docker.io", "/token"),
    ("production.cloudflare.docker.com", "/registry-v2/"),
    ("huggingface.co", "/api/models/"),
    (UPSTREAM_HOST, "/"),
]

JS_ALLOW_ALL = "true"
JS_REALISTIC = " ||\n".join(
    f"(r.host === {json.dumps(h)} && r.path.startsWith({json.dumps(p)}))" for h, p in CONDITIONS
)
SH_RULE = 'test "$JAIL_METHOD" = GET'


def policy_toml() -> str:
    lines = ['default = "deny"', ""]
    for index, (host, path) in enumerate(CONDITIONS, 1):
        lines += ["[[rule]]", f'name = "c{index}"', 'action = "allow"', f"host = {json.dumps(host)}"]
        lines += [f"path = {json.dumps(path)}", ""]
    return "\n".join(lines)


MITMDUMP_ADDON = """\
from mitmproxy import http

CONDITIONS = {conditions!r}


class Gate:
    \"\"\"Allow by the same 20 host/path-prefix conditions as the JS rule; 403 otherwise.\"\"\"

    def request(self, flow: http.HTTPFlow) -> None:
        host = flow.request.host.lower()
        path = flow.request.path.split("?", 1)[0]
        for allowed_host, prefix in CONDITIONS:
            if host == allowed_host and path.startswith(prefix):
                return
        flow.response = http.Response.make(403, b"denied\\n", {{"Content-Type": "text/plain"}})


addons = [Gate()]
"""

# The --proc rule program: one line in, `true` out, until its input closes.
PROC_RULE_SOURCE = """\
import sys
for _ in sys.stdin:
    sys.stdout.write("true\\n")
    sys.stdout.flush()
"""


def reference_allows(host: str, path: str) -> bool:
    return any(host == h and path.startswith(p) for h, p in CONDITIONS)


# ---------------------------------------------------------------------------- processes


class Processes:
    """Every long-running process this script starts, each in its own session, stopped by its group id."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        with open(self.logdir / f"{name}.out", "wb") as out, open(self.logdir / f"{name}.err", "wb") as err:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True
            )
        self.running.append((name, process))
        return process

    def output(self, name: str, stream: str = "out") -> str:
        path = self.logdir / f"{name}.{stream}"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_line(self, name: str, process: subprocess.Popen[bytes], pattern: str) -> re.Match[str]:
        """Wait until the process prints a line matching `pattern` on stdout."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output(name))
            if match:
                return match
            if process.poll() is not None:
                break
            time.sleep(0.05)
        raise BenchError(f"{name} did not start (exit {process.poll()}): {self.tail(name)}")

    def tail(self, name: str) -> str:
        return " | ".join(self.output(name, "err").strip().splitlines()[-5:])

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
        # Whatever is left of the group (nginx workers, a stuck master) is killed.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)

    def stop_all(self) -> None:
        while self.running:
            _, process = self.running.pop()
            self.stop(process)


class BenchError(Exception):
    pass


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, process: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{name} exited with status {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    raise BenchError(f"{name} is not listening on {host}:{port}")


def clean_environment() -> dict[str, str]:
    """No proxy variables: every request goes exactly where the benchmark sends it."""
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


class RssSampler:
    """Peak resident set size (the process and its descendants) of named processes, sampled in a thread."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self.watched: dict[str, Any] = {}
        self.peak_bytes: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._active = threading.Event()
        self._active.set()
        self._thread: threading.Thread | None = None

    def watch(self, name: str, pid: int) -> None:
        self.watched[name] = self.psutil.Process(pid)
        self.peak_bytes.setdefault(name, 0)

    def _rss(self, process: Any) -> int:
        total = 0
        with contextlib.suppress(self.psutil.Error):
            total += process.memory_info().rss
            for child in process.children(recursive=True):
                with contextlib.suppress(self.psutil.Error):
                    total += child.memory_info().rss
        return total

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No sampling meanwhile: its GIL time would be counted in in-process timings (rule cost)."""
        self._active.clear()
        try:
            yield
        finally:
            self._active.set()

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self._active.wait()
            for name, process in self.watched.items():
                self.peak_bytes[name] = max(self.peak_bytes[name], self._rss(process))
            self.samples += 1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._active.set()
        if self._thread is not None:
            self._thread.join()


# ---------------------------------------------------------------------------- the upstream and tinyproxy


NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {{
        listen {host}:{http_port};
        location / {{ default_type text/plain; return 200 "ok\\n"; }}
    }}
    server {{
        listen {host}:{https_port} ssl;
        ssl_certificate {prefix}/server-cert.pem;
        ssl_certificate_key {prefix}/server-key.pem;
        location / {{ default_type text/plain; return 200 "ok\\n"; }}
    }}
}}
"""


def start_nginx(processes: Processes, nginx: str, workdir: Path, test_ca: Any) -> tuple[int, int]:
    prefix = workdir / "nginx"
    (prefix / "tmp").mkdir(parents=True)
    cert = test_ca.issue_cert(UPSTREAM_HOST, "localhost")
    (prefix / "server-cert.pem").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(prefix / "server-key.pem"))
    http_port, https_port = free_port(UPSTREAM_HOST), free_port(UPSTREAM_HOST)
    conf = prefix / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf.write_text(
        NGINX_CONF.format(user=user, prefix=prefix, host=UPSTREAM_HOST, http_port=http_port, https_port=https_port)
    )
    argv = [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    process = processes.start("nginx", argv, clean_environment())
    for port in (http_port, https_port):
        wait_for_port(UPSTREAM_HOST, port, process, "nginx")
    return http_port, https_port


TINYPROXY_CONF = """\
{user}Port {port}
Listen {host}
Timeout 120
MaxClients 200
LogLevel Error
LogFile "{prefix}/tinyproxy.log"
PidFile "{prefix}/tinyproxy.pid"
DisableViaHeader Yes
Allow {host}
ConnectPort 443
ConnectPort {https_port}
"""


def start_tinyproxy(processes: Processes, tinyproxy: str, workdir: Path, https_port: int) -> tuple[int, Any]:
    prefix = workdir / "tinyproxy"
    prefix.mkdir()
    port = free_port(PROXY_HOST)
    # As root tinyproxy drops to this user; the log directory must then stay writable for it.
    user = "User nobody\nGroup nogroup\n" if os.geteuid() == 0 else ""
    if os.geteuid() == 0:
        os.chmod(prefix, 0o777)
    conf = prefix / "tinyproxy.conf"
    conf.write_text(TINYPROXY_CONF.format(user=user, port=port, host=PROXY_HOST, prefix=prefix, https_port=https_port))
    process = processes.start("tinyproxy", [tinyproxy, "-d", "-c", str(conf)], clean_environment())
    wait_for_port(PROXY_HOST, port, process, "tinyproxy")
    return port, process


# ---------------------------------------------------------------------------- hey


@dataclass
class HeyRun:
    rps: float | None
    ok: int = 0
    total: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    p50_s: float | None = None
    p99_s: float | None = None
    failure: str = ""

    @property
    def bad(self) -> int:
        return self.total - self.ok


def parse_hey(text: str) -> HeyRun:
    """hey's summary: Requests/sec, the latency distribution (50% and 99%), status codes and errors."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    percentiles = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"(\d+)%+ in ([\d.]+) secs", text)}
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("Status code distribution"):
            section = "status"
        elif line.startswith("Error distribution"):
            section = "error"
        elif section == "status" and (m := re.match(r"\s+\[(\d+)\]\s+(\d+) responses", line)):
            statuses[m.group(1)] = statuses.get(m.group(1), 0) + int(m.group(2))
        elif section == "error" and (m := re.match(r"\s+\[(\d+)\]\s+(.*)", line)):
            errors[m.group(2).strip()] = errors.get(m.group(2).strip(), 0) + int(m.group(1))
    return HeyRun(
        rps=float(rps.group(1)) if rps else None,
        ok=statuses.get("200", 0),
        total=sum(statuses.values()) + sum(errors.values()),
        statuses=statuses,
        errors=errors,
        # hey prints 0 for a percentile it has no sample for
        p50_s=percentiles.get(50) or None,
        p99_s=percentiles.get(99) or None,
    )


def run_hey(hey: str, url: str, seconds: float, concurrency: int, proxy_port: int | None) -> HeyRun:
    """hey for `seconds` (-z) at `concurrency`, keep-alive on, through the proxy when a port is given."""
    argv = [hey, "-z", f"{seconds:g}s", "-c", str(concurrency), "-t", str(HEY_REQUEST_TIMEOUT_S)]
    if proxy_port is not None:
        argv += ["-x", f"http://{PROXY_HOST}:{proxy_port}"]
    try:
        done = subprocess.run(
            [*argv, url], capture_output=True, text=True, timeout=HEY_RUN_TIMEOUT_S, env=clean_environment()
        )
    except subprocess.TimeoutExpired:
        return HeyRun(None, failure=f"hey killed after {HEY_RUN_TIMEOUT_S} s")
    result = parse_hey(done.stdout)
    if done.returncode != 0 or result.rps is None:
        result.failure = f"hey exit {done.returncode}: {(done.stderr or done.stdout).strip()[:200]}"
    return result


# ---------------------------------------------------------------------------- rule cost, in-process


def varied_requests(count: int, seed: int = 7) -> list[Any]:
    """`count` different Requests: hosts that the realistic rule allows and ones it does not, matching and
    non-matching paths, four methods, queries and headers. The same list for every engine."""
    from jail.model import Request

    rng = random.Random(seed)
    other_hosts = [
        "evil.example",
        "api.github.com.evil.example",
        "pypi.org.attacker.net",
        "example.com",
        "10.0.0.7",
        "metadata.google.internal",
        "cdn.jsdelivr.net",
        "www.google.com",
    ]
    other_paths = ["/", "/login", "/upload", "/api/v2/items", "/simple", "/v1", "/static/app.js"]
    requests = []
    for index in range(count):
        host, prefix = rng.choice(CONDITIONS)
        if rng.random() < 0.3:
            host = rng.choice(other_hosts)
        path = prefix + rng.choice(["", f"pkg-{index}/", f"a/b/c-{index}.tar.gz", "x"])
        if rng.random() < 0.2:
            path = rng.choice(other_paths)
        scheme = rng.choice(["https", "https", "https", "http"])
        requests.append(
            Request.build(
                rng.choice(["GET", "GET", "GET", "HEAD", "POST", "PUT"]),
                scheme,
                host,
                None,
                path,
                query=rng.choice(["", "", f"page={index}", "q=a%20b&x=1"]),
                headers={"User-Agent": "bench/1.0", "Accept": "*/*", "X-Request-Id": str(index)},
                requester_ip="127.0.0.1",
            )
        )
    return requests


async def time_engine(spec: Any, requests: list[Any], warmup: int) -> dict[str, Any]:
    from jail.policies import Judge, build_engine

    engine = build_engine(spec)
    await engine.start()
    judge = Judge(engine)
    try:
        for request in requests[:warmup]:
            await judge.decide(request)
        times_us: list[float] = []
        allowed = 0
        mismatches = 0
        clock = time.perf_counter_ns
        for request in requests:
            started = clock()
            decision = await judge.decide(request)
            times_us.append((clock() - started) / 1000)
            allowed += decision.allow
            mismatches += decision.allow != reference_allows(request.host, request.path)
    finally:
        await engine.close()
    times_us.sort()
    return {
        "decisions": len(times_us),
        "median_us": statistics.median(times_us),
        "p99_us": times_us[min(len(times_us) - 1, int(len(times_us) * 0.99))],
        "mean_us": statistics.fmean(times_us),
        "allowed": allowed,
        "mismatches_vs_realistic": mismatches,
    }


def measure_rule_cost(workdir: Path, count: int, shell_count: int) -> dict[str, dict[str, Any]]:
    """Microseconds per Judge.decide for each engine, in this process, over `count` varied requests."""
    from jail.policies import RuleSpec

    policy = workdir / "bench-policy.toml"
    policy.write_text(policy_toml())
    proc_rule = workdir / "proc_rule.py"
    proc_rule.write_text(PROC_RULE_SOURCE)
    requests = varied_requests(count)
    engines = {
        "js: true (allow-all)": (RuleSpec("js", JS_ALLOW_ALL), requests),
        "js: 20 conditions": (RuleSpec("js", JS_REALISTIC), requests),
        "policy file: 20 rules": (RuleSpec("policy", files=(policy,)), requests),
        "proc: python answers true": (RuleSpec("proc", f"{sys.executable} -u {proc_rule}"), requests),
        f"sh: {SH_RULE}": (RuleSpec("sh", SH_RULE), requests[:shell_count]),
    }
    results = {}
    for name, (spec, batch) in engines.items():
        log(f"rule cost: {name} over {len(batch)} requests")
        results[name] = asyncio.run(time_engine(spec, batch, warmup=min(200, len(batch) // 10)))
        results[name]["kind"] = spec.kind
    return results


def combine_rule_rounds(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per engine: the median over rounds of each round's median, p99 and mean (and each round's median)."""
    combined = {}
    for name, last in rounds[-1].items():
        runs = [round_[name] for round_ in rounds if name in round_]
        combined[name] = dict(last)
        for key in ("median_us", "p99_us", "mean_us"):
            combined[name][key] = statistics.median(run[key] for run in runs)
        combined[name]["round_medians_us"] = [round(run["median_us"], 1) for run in runs]
    return combined


# ---------------------------------------------------------------------------- start-up


def time_command(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall-clock seconds from spawn to exit; a failure description unless it exited 0."""
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, timeout=STARTUP_RUN_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - started, f"killed after {STARTUP_RUN_TIMEOUT_S} s"
    elapsed = time.perf_counter() - started
    failure = "" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.decode(errors='replace')[-200:]}"
    return elapsed, failure


# ---------------------------------------------------------------------------- the benchmark

JAIL_ALLOW_ALL = "jail --js true"
JAIL_REALISTIC = "jail --js (20 conditions)"
JAIL_POLICY = "jail --policy (20 rules)"
MITMDUMP = "mitmdump + addon (20 conditions)"
TINYPROXY = "tinyproxy (no interception)"
DIRECT = "direct (nginx)"


@dataclass
class Target:
    """One load measurement: a system (direct or a proxy), a scheme and a concurrency."""

    system: str
    scheme: str
    concurrency: int
    port: int | None  # the proxy's port, None for direct
    runs: list[HeyRun] = field(default_factory=list)

    def median(self, attribute: str) -> float | None:
        values = [getattr(run, attribute) for run in self.runs if getattr(run, attribute) is not None]
        return statistics.median(values) if values else None


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


class Benchmark:
    def __init__(self, args: argparse.Namespace, tools: dict[str, str], workdir: Path) -> None:
        self.args = args
        self.tools = tools
        self.workdir = workdir
        self.processes = Processes(workdir)
        self.started = time.monotonic()
        self.out_of_time = False
        self.notes: list[str] = []
        self.jail = sibling_command("jail", [sys.executable, "-m", "jail"])
        self.mitmdump = sibling_command("mitmdump", [tools.get("mitmdump", "mitmdump")])
        self.env = clean_environment()
        self.env["JAIL_CA_DIR"] = str(workdir / "jail-ca")  # never the user's own CA
        self.startup_commands: dict[str, list[str]] = {}
        self.startup: dict[str, list[float]] = {}
        self.startup_failures: list[str] = []
        self.targets: list[Target] = []
        self.upstream_ports: dict[str, int] = {}
        self.rule_cost: dict[str, dict[str, Any]] = {}
        self.rss: RssSampler | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def within_budget(self) -> bool:
        if not self.out_of_time and self.elapsed() > self.args.budget:
            self.out_of_time = True
            self.notes.append(f"time budget of {self.args.budget:g} s reached; later measurements skipped")
            log(f"time budget of {self.args.budget:g} s reached; skipping the rest")
        return not self.out_of_time

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        if "startup" in self.args.parts:
            self.setup_startup_commands()
        if "load" not in self.args.parts:
            return
        import trustme

        test_ca = trustme.CA()
        self.test_ca_file = self.workdir / "test-ca.pem"
        test_ca.cert_pem.write_to_path(str(self.test_ca_file))
        http_port, https_port = start_nginx(self.processes, self.tools["nginx"], self.workdir, test_ca)
        self.upstream_ports = {"http": http_port, "https": https_port}
        log(f"nginx on {UPSTREAM_HOST}:{http_port} (http) and :{https_port} (https)")
        policy = self.workdir / "bench-policy.toml"
        policy.write_text(policy_toml())
        self.rss = RssSampler()
        ports: dict[str, int] = {}
        jails = {
            JAIL_ALLOW_ALL: ["--js", JS_ALLOW_ALL],
            JAIL_REALISTIC: ["--js", JS_REALISTIC],
            JAIL_POLICY: ["--policy", str(policy)],
        }
        for system, rule in jails.items():
            ports[system] = self.start_jail(system, rule)
        ports[MITMDUMP] = self.start_mitmdump()
        ports[TINYPROXY], tinyproxy = start_tinyproxy(self.processes, self.tools["tinyproxy"], self.workdir, https_port)
        self.rss.watch(TINYPROXY, tinyproxy.pid)
        for scheme in ("http", "https"):
            for concurrency in self.args.concurrency:
                self.targets.append(Target(DIRECT, scheme, concurrency, None))
                for system, port in ports.items():
                    self.targets.append(Target(system, scheme, concurrency, port))
        self.rss.start()
        # Warm-up, not measured: connections, the proxies' leaf certificates, V8, caches.
        for target in self.targets:
            run = run_hey(self.tools["hey"], self.url(target.scheme), self.args.warmup, target.concurrency, target.port)
            if run.failure or run.bad or not run.total:
                raise BenchError(
                    f"warm-up of {target.system} {target.scheme} failed: {run.failure or run.statuses} {run.errors}"
                )
        log(f"setup done in {self.elapsed():.1f} s")

    def setup_startup_commands(self) -> None:
        true = shutil.which("true") or "/bin/true"
        # One run creates jail's CA, so that no measured run pays for it.
        _, failure = time_command([*self.jail, "--weak", "--js", "true", "--", true], self.env)
        if failure:
            raise BenchError(f"`jail --weak --js true -- true` failed: {failure}")
        self.startup_commands = {
            "true": [true],
            "jail --weak --js true -- true": [*self.jail, "--weak", "--js", "true", "--", true],
        }
        default_name = f"jail --js true -- true ({'strong' if os.geteuid() == 0 else 'default'})"
        default = [*self.jail, "--js", "true", "--", true]
        _, failure = time_command(default, self.env)
        if failure:
            self.notes.append(f"default mode not measured: `jail --js true -- true` failed: {failure.strip()[:160]}")
        else:
            self.startup_commands[default_name] = default
        if self.args.rootless_user:
            self.add_rootless_startup(self.args.rootless_user, true)
        srt = shutil.which("srt")
        if srt:
            self.startup_commands["srt true"] = [srt, true]
        else:
            self.notes.append("srt (@anthropic-ai/sandbox-runtime) is not on PATH: `srt true` not measured")
        self.startup = {name: [] for name in self.startup_commands}

    def add_rootless_startup(self, user: str, true: str) -> None:
        """The rootless jail, as `user` through runuser (beside `runuser ... true`, its own cost)."""
        runuser = shutil.which("runuser")
        if os.geteuid() != 0 or runuser is None:
            self.notes.append("rootless mode not measured: --rootless-user needs root and runuser")
            return
        home = Path(pwd.getpwnam(user).pw_dir)
        environment = ["env", f"HOME={home}", f"JAIL_CA_DIR={home}/.cache/jail-bench-ca", "PATH=/usr/bin:/bin"]
        as_user = [runuser, "-u", user, "--", *environment]
        rootless = [*as_user, *self.jail, "--js", "true", "--", true]
        _, failure = time_command(rootless, self.env)  # also makes the user's CA
        if failure:
            self.notes.append(
                f"rootless mode not measured (can {user} execute {self.jail[0]}?): {failure.strip()[:160]}"
            )
            return
        self.startup_commands[f"runuser -u {user} -- true"] = [*as_user, true]
        self.startup_commands[f"runuser -u {user} -- jail --js true -- true (rootless)"] = rootless

    def url(self, scheme: str) -> str:
        return f"{scheme}://{UPSTREAM_HOST}:{self.upstream_ports[scheme]}/"

    def start_jail(self, system: str, rule: list[str]) -> int:
        name = re.sub(r"\W+", "-", system).strip("-")
        port = free_port(PROXY_HOST)
        argv = [*self.jail, "--server", "--listen", f"{PROXY_HOST}:{port}", "--upstream-ca", str(self.test_ca_file)]
        argv += ["--allow-private", UPSTREAM_CIDR, *rule]
        process = self.processes.start(name, argv, self.env)
        match = self.processes.wait_for_line(name, process, r"proxy listening on http://[^:]+:(\d+)")
        assert self.rss is not None
        self.rss.watch(system, process.pid)
        return int(match.group(1))

    def start_mitmdump(self) -> int:
        port = free_port(PROXY_HOST)
        prefix = self.workdir / "mitmdump"
        prefix.mkdir()
        addon = prefix / "addon.py"
        addon.write_text(MITMDUMP_ADDON.format(conditions=CONDITIONS))
        argv = [*self.mitmdump, "-q", "-s", str(addon), "--listen-host", PROXY_HOST, "-p", str(port)]
        argv += ["--set", "connection_strategy=lazy", "--set", f"ssl_verify_upstream_trusted_ca={self.test_ca_file}"]
        argv += ["--set", f"confdir={prefix}"]  # its own CA in the temporary directory, not ~/.mitmproxy
        process = self.processes.start("mitmdump", argv, clean_environment())
        wait_for_port(PROXY_HOST, port, process, "mitmdump")
        assert self.rss is not None
        self.rss.watch(MITMDUMP, process.pid)
        return port

    # ------------------------------------------------------------------ measuring

    def measure(self) -> None:
        rounds = self.args.rounds
        rule_rounds: list[dict[str, dict[str, Any]]] = []
        for round_index in range(rounds):
            if not self.within_budget():
                break
            if "rules" in self.args.parts:
                # Every round, like the rest: one slow minute on a shared machine must not decide a verdict.
                with self.rss.paused() if self.rss is not None else contextlib.nullcontext():
                    rule_rounds.append(
                        measure_rule_cost(self.workdir, self.args.rule_requests, self.args.shell_requests)
                    )
                self.rule_cost = combine_rule_rounds(rule_rounds)
            if "startup" in self.args.parts:
                log(f"round {round_index + 1}/{rounds}: startup")
                self.measure_startup()
            # Each round starts one measurement later, so no system always runs first or last.
            shift = round_index * max(1, len(self.targets) // rounds)
            order = self.targets[shift:] + self.targets[:shift] if self.targets else []
            for target in order:
                if not self.within_budget():
                    break
                run = run_hey(
                    self.tools["hey"], self.url(target.scheme), self.args.duration, target.concurrency, target.port
                )
                target.runs.append(run)
                shown = (
                    f"{run.rps:7.0f} req/s p50 {fmt_ms(run.p50_s)} ms p99 {fmt_ms(run.p99_s)} ms"
                    if run.rps is not None
                    else run.failure
                )
                extra = f", {run.bad} not 200" if run.bad else ""
                log(
                    f"round {round_index + 1}/{rounds}: {target.system:<33} {target.scheme:<5} "
                    f"c={target.concurrency:<3} {shown}{extra}"
                )
        if self.rss is not None:
            self.rss.stop()

    def measure_startup(self) -> None:
        """Each start-up command in turn, run by run; one median per round each."""
        samples: dict[str, list[float]] = {name: [] for name in self.startup_commands}
        for _ in range(self.args.startup_runs):
            for name, argv in self.startup_commands.items():
                elapsed, failure = time_command(argv, self.env)
                if failure:
                    self.startup_failures.append(f"{name}: {failure}")
                else:
                    samples[name].append(elapsed)
        for name, values in samples.items():
            if values:
                self.startup[name].append(statistics.median(values))

    # ------------------------------------------------------------------ results

    def results(self) -> dict[str, Any]:
        direct = {(t.scheme, t.concurrency): t for t in self.targets if t.port is None}
        load = []
        for target in self.targets:
            base = direct.get((target.scheme, target.concurrency))
            rps, p50 = target.median("rps"), target.median("p50_s")
            base_p50 = base.median("p50_s") if base else None
            load.append(
                {
                    "system": target.system,
                    "scheme": target.scheme,
                    "concurrency": target.concurrency,
                    "median_rps": rps,
                    "median_p50_ms": p50 * 1000 if p50 is not None else None,
                    "median_p99_ms": target.median("p99_s") * 1000 if target.median("p99_s") is not None else None,
                    "p50_added_ms": (p50 - base_p50) * 1000
                    if target.port is not None and p50 is not None and base_p50 is not None
                    else None,
                    "ratio_vs_direct": ratio(rps, base.median("rps")) if base and target.port is not None else None,
                    "rounds_rps": [run.rps for run in target.runs],
                    "not_200_total": sum(run.bad for run in target.runs),
                    "runs": [{**run.__dict__, "bad": run.bad} for run in target.runs],
                }
            )
        startup = {
            name: {
                "median_ms": median_or_none(values) * 1000 if values else None,
                "rounds_ms": [v * 1000 for v in values],
                "argv": self.startup_commands[name],
            }
            for name, values in self.startup.items()
        }
        rss = {name: peak / 2**20 for name, peak in self.rss.peak_bytes.items()} if self.rss is not None else {}
        results: dict[str, Any] = {
            "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine_info(self.tools),
            "params": {
                "quick": self.args.quick,
                "parts": sorted(self.args.parts),
                "rounds": self.args.rounds,
                "duration_s": self.args.duration,
                "concurrency": self.args.concurrency,
                "startup_runs_per_round": self.args.startup_runs,
                "rule_requests": self.args.rule_requests,
                "shell_requests": self.args.shell_requests,
                "jail_command": self.jail,
                "mitmdump_command": self.mitmdump,
                "js_realistic_rule": JS_REALISTIC,
            },
            "load": load,
            "rule_cost": self.rule_cost,
            "startup": startup,
            "startup_failures": self.startup_failures,
            "peak_rss_mb": rss,
            "rss_samples": self.rss.samples if self.rss is not None else 0,
            "elapsed_s": round(self.elapsed(), 1),
            "complete": not self.out_of_time,
            "notes": self.notes,
        }
        results["targets"] = evaluate_targets(results)
        return results


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets: measured value, limit, PASS/FAIL (None when not measured)."""
    load = {(row["system"], row["scheme"], row["concurrency"]): row for row in results["load"]}
    targets: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, unit: str, higher_is_better: bool = False) -> None:
        verdict = None if value is None else value >= limit if higher_is_better else value <= limit
        targets.append({"target": name, "value": value, "limit": limit, "unit": unit, "pass": verdict})

    rules = results["rule_cost"]
    for name in ("js: true (allow-all)", "js: 20 conditions"):
        add(f"{name} decision, median", rules.get(name, {}).get("median_us"), 50, "µs")
    proc = next((v for k, v in rules.items() if k.startswith("proc")), {})
    add("proc decision, median", proc.get("median_us"), 50, "µs")
    for scheme in ("http", "https"):
        allow_all = load.get((JAIL_ALLOW_ALL, scheme, 10), {}).get("median_rps")
        realistic = load.get((JAIL_REALISTIC, scheme, 10), {}).get("median_rps")
        cost = (1 - realistic / allow_all) * 100 if allow_all and realistic is not None else None
        add(f"{scheme} c=10: 20-condition JS costs vs allow-all throughput", cost, 10, "%")
    for scheme in ("http", "https"):
        mitm = load.get((MITMDUMP, scheme, 10), {}).get("median_rps")
        for system in (JAIL_REALISTIC, JAIL_ALLOW_ALL):
            value = ratio(load.get((system, scheme, 10), {}).get("median_rps"), mitm)
            add(f"{scheme} c=10: {system} req/s / mitmdump", value, 1.5, "x", higher_is_better=True)
    for scheme in ("http", "https"):
        added = load.get((JAIL_REALISTIC, scheme, 1), {}).get("p50_added_ms")
        add(f"{scheme} c=1: p50 added over direct, {JAIL_REALISTIC}", added, 1.0, "ms")
    add(
        "jail --weak --js true -- true, wall",
        results["startup"].get("jail --weak --js true -- true", {}).get("median_ms"),
        300,
        "ms",
    )
    jail_rss = [v for k, v in results["peak_rss_mb"].items() if k.startswith("jail")]
    add("peak RSS of a jail server under load (largest)", max(jail_rss) if jail_rss else None, 150, "MB")
    return targets


def sibling_command(name: str, fallback: list[str]) -> list[str]:
    """The script installed beside this Python (a pyenv shim would add its own start-up), else `fallback`."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    return fallback


def machine_info(tools: dict[str, str]) -> dict[str, Any]:
    def version(package: str) -> str | None:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(package)
        return None

    def deb_version(package: str) -> str | None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                ["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True, timeout=10
            )
            return done.stdout.strip() or None
        return None

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "egress-jail": version("egress-jail"),
        "mitmproxy": version("mitmproxy"),
        "mini-racer": version("mini-racer"),
        "hey": deb_version("hey") or tools.get("hey"),
        "nginx": deb_version("nginx") or tools.get("nginx"),
        "tinyproxy": deb_version("tinyproxy") or tools.get("tinyproxy"),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# ---------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def fmt_ms(seconds: float | None) -> str:
    return f"{seconds * 1000:.2f}" if seconds is not None else "-"


def markdown(results: dict[str, Any]) -> str:
    machine, params = results["machine"], results["params"]
    out = [
        f"jail benchmark, {results['when']}: {machine['cpus']} CPUs, Python {machine['python']}, "
        f"egress-jail {machine['egress-jail']}, mitmproxy {machine['mitmproxy']}, nginx {machine['nginx']}, "
        f"tinyproxy {machine['tinyproxy']}, hey {machine['hey']}; load average at the end "
        f"{fmt(machine['load_average'], '.2f')}; median of {params['rounds']} round(s), "
        f"hey -z {params['duration_s']:g}s per cell{' (--quick)' if params['quick'] else ''}; "
        f"took {results['elapsed_s']:.0f} s",
        "",
    ]
    if results["load"]:
        rss = results["peak_rss_mb"]
        concurrencies = sorted({row["concurrency"] for row in results["load"]})
        by_key = {(row["system"], row["scheme"], row["concurrency"]): row for row in results["load"]}
        header = "| system | scheme |"
        rule = "|---|---|"
        for c in concurrencies:
            header += f" c={c} req/s | c={c} p50 ms | c={c} p99 ms | c={c} / direct |"
            rule += "--:|--:|--:|--:|"
        header += " c=1 p50 added ms | peak RSS MB | not 200 |"
        rule += "--:|--:|--:|"
        out += ["**Per-request cost** (hey through the proxy with `-x`; HTTPS is intercepted except by tinyproxy)", ""]
        out += [header, rule]
        systems = list(dict.fromkeys(row["system"] for row in results["load"]))
        for scheme in ("http", "https"):
            for system in systems:
                line = f"| {system} | {scheme} |"
                bad = 0
                for c in concurrencies:
                    row = by_key.get((system, scheme, c))
                    if row is None:
                        line += " - | - | - | - |"
                        continue
                    bad += row["not_200_total"]
                    line += (
                        f" {fmt(row['median_rps'], '.0f')} | {fmt(row['median_p50_ms'], '.2f')} |"
                        f" {fmt(row['median_p99_ms'], '.2f')} | {fmt(row['ratio_vs_direct'], '.3f')} |"
                    )
                added = by_key.get((system, scheme, 1), {}).get("p50_added_ms")
                line += f" {fmt(added, '+.2f')} | {fmt(rss.get(system), '.0f')} | {bad} |"
                out.append(line)
        out.append("")
    if results["rule_cost"]:
        out += [
            "**Rule cost** (in-process `Judge.decide`, one decision at a time, varied requests; medians over rounds)",
            "",
        ]
        out += [
            "| engine | decisions | median µs | p99 µs | mean µs | allowed | differs from reference | per-round medians µs |"
        ]
        out += ["|---|--:|--:|--:|--:|--:|--:|---|"]
        for name, row in results["rule_cost"].items():
            differs = row["mismatches_vs_realistic"] if row["kind"] == "policy" or "20" in name else "n/a"
            per_round = " ".join(f"{v:.1f}" for v in row.get("round_medians_us", []))
            out.append(
                f"| {name} | {row['decisions']} | {row['median_us']:.1f} | {row['p99_us']:.1f} | "
                f"{row['mean_us']:.1f} | {row['allowed']} | {differs} | {per_round} |"
            )
        out.append("")
    if results["startup"]:
        out += ["**Start-up** (wall time, spawn to exit)", ""]
        out += ["| command | median ms | per-round medians ms |", "|---|--:|---|"]
        for name, row in results["startup"].items():
            rounds = " ".join(f"{v:.1f}" for v in row["rounds_ms"])
            out.append(f"| `{name}` | {fmt(row['median_ms'], '.1f')} | {rounds} |")
        out.append("")
    out += ["**Targets**", "", "| target | measured | limit | verdict |", "|---|--:|--:|---|"]
    for target in results["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[target["pass"]]
        sign = "≥" if target["unit"] == "x" else "≤"
        value = fmt(target["value"], ".2f" if target["unit"] in ("x", "ms") else ".1f")
        out.append(
            f"| {target['target']} | {value} {target['unit']} | {sign} {target['limit']:g} {target['unit']} | {verdict} |"
        )
    out.append("")
    problems = [f"startup {failure}" for failure in results["startup_failures"]]
    for row in results["load"]:
        for run in row["runs"]:
            if run["failure"] or run["bad"]:
                detail = run["failure"] or f"statuses {run['statuses']} errors {run['errors']}"
                problems.append(f"{row['system']} {row['scheme']} c={row['concurrency']}: {detail}")
    out += [f"- problem: {problem}" for problem in problems[:20]]
    out += [f"- note: {note}" for note in results["notes"]]
    return "\n".join(out).rstrip() + "\n"


def draw_chart(results: dict[str, Any], path: Path) -> None:
    """Three panels: req/s at the highest concurrency, µs per decision, start-up ms. matplotlib is optional."""
    try:
        import matplotlib
    except ImportError:
        raise BenchError("--chart needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 6), gridspec_kw={"width_ratios": [3, 2, 1.3]})
    load = results["load"]
    if load:
        top = max(row["concurrency"] for row in load)
        systems = list(dict.fromkeys(row["system"] for row in load))
        by_key = {(row["system"], row["scheme"], row["concurrency"]): row for row in load}
        width = 0.4
        for offset, scheme in ((-width / 2, "http"), (width / 2, "https")):
            values = [by_key.get((s, scheme, top), {}).get("median_rps") or 0 for s in systems]
            axes[0].bar([i + offset for i in range(len(systems))], values, width, label=scheme)
        axes[0].set_xticks(range(len(systems)), [s.replace(" (", "\n(") for s in systems], fontsize=8)
        axes[0].set_ylabel("requests/s (median)")
        axes[0].set_title(f"throughput at concurrency {top}")
        axes[0].legend()
    rules = results["rule_cost"]
    if rules:
        names = list(rules)
        axes[1].barh(names, [rules[n]["p99_us"] for n in names], color="tab:orange", alpha=0.35, label="p99")
        axes[1].barh(names, [rules[n]["median_us"] for n in names], color="tab:blue", label="median")
        axes[1].axvline(50, color="red", linestyle="--", label="50 µs target")
        axes[1].set_xscale("log")
        axes[1].set_xlabel("µs per decision (log)")
        axes[1].set_title("rule cost, in-process")
        axes[1].tick_params(axis="y", labelsize=8)
        axes[1].legend(fontsize=8)
    startup = {name: row["median_ms"] for name, row in results["startup"].items() if row["median_ms"] is not None}
    if startup:
        axes[2].bar(range(len(startup)), list(startup.values()))
        axes[2].set_xticks(range(len(startup)), [n.replace(" -- ", "\n-- ") for n in startup], fontsize=7)
        axes[2].axhline(300, color="red", linestyle="--", label="300 ms target (weak)")
        axes[2].set_ylabel("ms (median)")
        axes[2].set_title("start-up")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- main


def find_tools(parts: set[str]) -> dict[str, str]:
    def sbin(name: str) -> str | None:
        return shutil.which(name) or next(
            (p for p in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)),
            None,
        )

    needed = ["nginx"]
    if "load" in parts:
        needed += ["hey", "tinyproxy", "mitmdump"]
    found = {name: sbin(name) for name in needed}
    missing = [name for name, path in found.items() if not path]
    if missing:
        sys.exit(
            f"bench: missing {', '.join(missing)}; install with: {INSTALL_HINT} (Debian/Ubuntu; run apt-get update "
            "first); mitmdump comes with jail's mitmproxy dependency"
        )
    for module, hint in (("trustme", "pip install trustme"), ("psutil", "pip install psutil")):
        try:
            __import__(module)
        except ImportError:
            sys.exit(f"bench: the {module} package is missing; install with: {hint} (or pip install -e '.[test]')")
    try:
        with socket.socket() as sock:
            sock.bind((UPSTREAM_HOST, 0))
    except OSError as exc:
        sys.exit(f"bench: cannot bind {UPSTREAM_HOST} ({exc}); this benchmark needs Linux's whole 127.0.0.0/8 loopback")
    return {name: path for name, path in found.items() if path}


PARTS = ("rules", "startup", "load")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark jail against direct, mitmdump and tinyproxy: per-request cost, rule cost, "
        "start-up and memory. About 5 minutes on 2 cores; --quick about 1."
    )
    parser.add_argument("--quick", action="store_true", help="1 round, 1 s per load cell, fewer decisions and starts")
    parser.add_argument("--rounds", type=int, help="rounds of load and start-up (default 3, quick 1)")
    parser.add_argument("--duration", type=float, help="seconds of hey per load cell and round (default 2, quick 1)")
    parser.add_argument("--warmup", type=float, default=0.3, help="seconds of unmeasured hey per cell (default 0.3)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10], help="hey -c values (default: 1 10)")
    parser.add_argument("--startup-runs", type=int, help="start-up runs per command per round (default 5, quick 3)")
    parser.add_argument("--rule-requests", type=int, help="in-process decisions per engine (default 10000, quick 2000)")
    parser.add_argument("--shell-requests", type=int, help="decisions for the shell engine (default 1000, quick 200)")
    parser.add_argument(
        "--only", nargs="+", choices=PARTS, default=list(PARTS), help="measure only these parts (default: all)"
    )
    parser.add_argument("--budget", type=float, help="start no measurement after this many s (default 420, quick 120)")
    parser.add_argument(
        "--rootless-user", metavar="NAME", help="also time the rootless jail's start-up as this user (run as root)"
    )
    parser.add_argument("--chart", type=Path, metavar="PNG", help="also draw a bar chart (needs matplotlib)")
    args = parser.parse_args(argv)
    defaults = {
        "rounds": (3, 1),
        "duration": (2.0, 1.0),
        "startup_runs": (5, 3),
        "rule_requests": (10000, 2000),
        "shell_requests": (1000, 200),
        "budget": (420.0, 120.0),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("rounds", "startup_runs", "rule_requests", "shell_requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.duration <= 0 or args.warmup <= 0 or min(args.concurrency) < 1:
        parser.error("--duration, --warmup and --concurrency must be positive")
    args.parts = set(args.only)
    return args


def raise_exit(signum: int, _frame: Any) -> None:
    log(f"stopped by {signal.Signals(signum).name}; cleaning up")
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    tools = find_tools(args.parts)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_exit)
    workdir = Path(tempfile.mkdtemp(prefix="jail-bench-"))
    bench = Benchmark(args, tools, workdir)
    status = 0
    try:
        bench.setup()
        bench.measure()
        results = bench.results()
        RESULTS_PATH.write_text(json.dumps(results, indent=2) + "\n")
        print(markdown(results))
        print(f"results written to {RESULTS_PATH} (untracked; do not commit)")
        if args.chart:
            draw_chart(results, args.chart)
            print(f"chart written to {args.chart}")
    except BenchError as exc:
        log(f"error: {exc}")
        status = 1
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if bench.rss is not None:
            bench.rss.stop()
        bench.processes.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
