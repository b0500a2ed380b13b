#!/usr/bin/env python3
"""Benchmark jail against a local nginx: startup cost and proxy throughput. See bench/README.md.

Needs `hey` and `nginx` (Debian: apt-get install -y hey nginx) and the `trustme` Python package.
Installs nothing, sends traffic only over loopback, and stops every process it started on any exit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_PATH = BENCH_DIR / "results-latest.json"
UPSTREAM_HOST = "127.0.0.2"
PROXY_HOST = "127.0.0.1"
INSTALL_HINT = "apt-get install -y hey nginx"
DUMPMASTER_FLAG = "--internal-run-dumpmaster"

HEY_REQUEST_TIMEOUT_S = 10  # hey -t: one request may take at most this long
HEY_RUN_TIMEOUT_S = 60  # one hey run is killed after this long
STARTUP_RUN_TIMEOUT_S = 30  # one `jail -- true` is killed after this long
READY_TIMEOUT_S = 30  # a server must be listening within this long

# The --proc rule program: one line in, `true` out, until its input closes.
PROC_RULE_SOURCE = """\
import sys
for _ in sys.stdin:
    sys.stdout.write("true\\n")
    sys.stdout.flush()
"""


# ---------------------------------------------------------------------------- the DumpMaster runner


def run_dumpmaster(port: int, upstream_ca: str, confdir: str) -> None:
    """mitmproxy's default addon set (DumpMaster) plus a do-nothing addon, configured like jail's proxy."""
    import asyncio

    from mitmproxy import options
    from mitmproxy.tools.dump import DumpMaster

    class DoNothing:
        def request(self, flow: Any) -> None:
            pass

    class Ready:
        def __init__(self, master: DumpMaster) -> None:
            self.master = master

        def running(self) -> None:
            server = self.master.addons.get("proxyserver")
            for host, bound_port, *_ in server.listen_addrs():
                print(f"dumpmaster listening on http://{host}:{bound_port}", flush=True)

    async def main() -> None:
        opts = options.Options(listen_host=PROXY_HOST, listen_port=port, confdir=confdir, mode=["regular"])
        # No terminal log and no per-flow dump: the addon set is measured, not printing to a terminal.
        master = DumpMaster(opts, with_termlog=False, with_dumper=False)
        master.addons.add(DoNothing(), Ready(master))
        master.options.update(
            connection_strategy="lazy",
            stream_large_bodies="1m",  # as jail sets it
            ssl_verify_upstream_trusted_ca=upstream_ca,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, master.shutdown)
        await master.run()

    asyncio.run(main())


# ---------------------------------------------------------------------------- processes


class Processes:
    """Every long-running process this script starts, each in its own session, stopped by its group id."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.logdir / f"{name}.out", "wb") as out, open(self.logdir / f"{name}.err", "wb") as err:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, start_new_session=True
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
        tail = self.output(name, "err").strip().splitlines()[-5:]
        raise BenchError(f"{name} did not start (exit {process.poll()}): " + " | ".join(tail))

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


# ---------------------------------------------------------------------------- the upstream


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
    keepalive_requests 100000;
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


# ---------------------------------------------------------------------------- measurements


@dataclass
class HeyRun:
    rps: float | None
    ok: int = 0
    requested: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    p50_s: float | None = None
    p99_s: float | None = None
    total_s: float | None = None
    failure: str = ""

    @property
    def bad(self) -> int:
        return self.requested - self.ok


def parse_hey(text: str, requested: int) -> HeyRun:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"Total:\s+([\d.]+) secs", text)
    p50 = re.search(r"50% in ([\d.]+) secs", text)
    p99 = re.search(r"99% in ([\d.]+) secs", text)
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
        requested=requested,
        statuses=statuses,
        errors=errors,
        p50_s=float(p50.group(1)) if p50 else None,
        p99_s=float(p99.group(1)) if p99 and float(p99.group(1)) > 0 else None,
        total_s=float(total.group(1)) if total else None,
    )


def run_hey(hey: str, url: str, requests: int, concurrency: int, proxy_port: int | None) -> HeyRun:
    argv = [hey, "-n", str(requests), "-c", str(min(concurrency, requests)), "-t", str(HEY_REQUEST_TIMEOUT_S)]
    if proxy_port is not None:
        argv += ["-x", f"http://{PROXY_HOST}:{proxy_port}"]
    try:
        done = subprocess.run(
            [*argv, url], capture_output=True, text=True, timeout=HEY_RUN_TIMEOUT_S, env=clean_environment()
        )
    except subprocess.TimeoutExpired:
        return HeyRun(None, requested=requests, failure=f"hey killed after {HEY_RUN_TIMEOUT_S} s")
    result = parse_hey(done.stdout, requests)
    if done.returncode != 0 or result.rps is None:
        result.failure = f"hey exit {done.returncode}: {(done.stderr or done.stdout).strip()[:200]}"
    return result


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


@dataclass
class Target:
    """One throughput measurement: a system (direct or a proxy) and a scheme."""

    system: str
    scheme: str
    requests: int
    proxy: str | None  # name of the proxy process, None for direct
    runs: list[HeyRun] = field(default_factory=list)
    port: int | None = None

    @property
    def median_rps(self) -> float | None:
        values = [run.rps for run in self.runs if run.rps is not None]
        return statistics.median(values) if values else None


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ---------------------------------------------------------------------------- the benchmark


class Benchmark:
    def __init__(self, args: argparse.Namespace, hey: str, nginx: str, workdir: Path) -> None:
        self.args = args
        self.hey = hey
        self.nginx = nginx
        self.workdir = workdir
        self.processes = Processes(workdir)
        self.started = time.monotonic()
        self.out_of_time = False
        self.notes: list[str] = []
        self.jail = jail_command()
        self.env = clean_environment()
        self.env["JAIL_CA_DIR"] = str(workdir / "jail-ca")  # never the user's own CA
        self.startup: dict[str, list[float]] = {"true": [], "jail": []}
        self.startup_failures: list[str] = []
        self.targets: list[Target] = []
        self.upstream_ports: dict[str, int] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def within_budget(self) -> bool:
        if not self.out_of_time and self.elapsed() > self.args.budget:
            self.out_of_time = True
            self.notes.append(f"time budget of {self.args.budget:g} s reached; later measurements skipped")
            log(f"time budget of {self.args.budget:g} s reached; skipping the rest")
        return not self.out_of_time

    def setup(self) -> None:
        import trustme

        test_ca = trustme.CA()
        self.test_ca_file = self.workdir / "test-ca.pem"
        test_ca.cert_pem.write_to_path(str(self.test_ca_file))
        http_port, https_port = start_nginx(self.processes, self.nginx, self.workdir, test_ca)
        self.upstream_ports = {"http": http_port, "https": https_port}
        log(f"nginx on {UPSTREAM_HOST}:{http_port} (http) and :{https_port} (https)")
        # One run creates jail's CA, so that no measured run pays for it.
        _, failure = time_command([*self.jail, "--js", "true", "--", "true"], self.env)
        if failure:
            raise BenchError(f"`jail --js true -- true` failed: {failure}")
        proc_rule = self.workdir / "proc_rule.py"
        proc_rule.write_text(PROC_RULE_SOURCE)
        rules = {
            "jail --js true": ["--js", "true"],
            "jail --proc (python)": ["--proc", f"{sys.executable} -u {proc_rule}"],
            "jail --sh 'exit 0'": ["--sh", "exit 0"],
        }
        ports: dict[str, int] = {}
        for system, rule in rules.items():
            ports[system] = self.start_jail(system, rule)
        ports["DumpMaster (no-op addon)"] = self.start_dumpmaster()
        n, n_sh = self.args.requests, self.args.shell_requests
        for scheme in ("http", "https"):
            self.targets.append(Target("direct (nginx)", scheme, n, None))
            for system, port in ports.items():
                count = n_sh if "--sh" in system else n
                self.targets.append(Target(system, scheme, count, system, port=port))
        # Warm-up, not measured: connections, mitmproxy's leaf certificate, V8, the rule program.
        for target in self.targets:
            run = run_hey(self.hey, self.url(target.scheme), max(20, target.requests // 20), 10, target.port)
            if run.failure or run.bad:
                raise BenchError(f"warm-up of {target.system} {target.scheme} failed: {run.failure or run.statuses}")
        log(f"setup done in {self.elapsed():.1f} s")

    def url(self, scheme: str) -> str:
        return f"{scheme}://{UPSTREAM_HOST}:{self.upstream_ports[scheme]}/"

    def start_jail(self, system: str, rule: list[str]) -> int:
        name = re.sub(r"\W+", "-", system).strip("-")
        port = free_port(PROXY_HOST)
        argv = [
            *self.jail,
            "--server",
            "--listen",
            f"{PROXY_HOST}:{port}",
            "--upstream-ca",
            str(self.test_ca_file),
            *rule,
        ]
        process = self.processes.start(name, argv, self.env)
        match = self.processes.wait_for_line(name, process, r"proxy listening on http://[^:]+:(\d+)")
        return int(match.group(1))

    def start_dumpmaster(self) -> int:
        port = free_port(PROXY_HOST)
        confdir = self.workdir / "dumpmaster-conf"
        confdir.mkdir()
        argv = [sys.executable, str(Path(__file__).resolve()), DUMPMASTER_FLAG, str(port)]
        argv += [str(self.test_ca_file), str(confdir)]
        process = self.processes.start("dumpmaster", argv, clean_environment())
        match = self.processes.wait_for_line("dumpmaster", process, r"listening on http://[^:]+:(\d+)")
        return int(match.group(1))

    def measure(self) -> None:
        rounds = self.args.rounds
        for round_index in range(rounds):
            if not self.within_budget():
                break
            log(f"round {round_index + 1}/{rounds}: startup")
            self.measure_startup()
            # Each round starts one system later, so no system always runs first or last.
            shift = round_index % len(self.targets)
            for target in self.targets[shift:] + self.targets[:shift]:
                if not self.within_budget():
                    break
                run = run_hey(self.hey, self.url(target.scheme), target.requests, self.args.concurrency, target.port)
                target.runs.append(run)
                shown = f"{run.rps:.0f} req/s" if run.rps is not None else run.failure
                extra = f", {run.bad} not 200" if run.bad else ""
                log(f"round {round_index + 1}/{rounds}: {target.system:<26} {target.scheme:<5} {shown}{extra}")

    def measure_startup(self) -> None:
        """`true` and `jail --js true -- true`, alternating run by run; one median per round each."""
        true = shutil.which("true") or "/bin/true"
        commands = {"true": [true], "jail": [*self.jail, "--js", "true", "--", true]}
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(self.args.startup_runs):
            for name, argv in commands.items():
                elapsed, failure = time_command(argv, self.env)
                if failure:
                    self.startup_failures.append(f"{name}: {failure}")
                else:
                    samples[name].append(elapsed)
        for name, values in samples.items():
            if values:
                self.startup[name].append(statistics.median(values))

    def results(self) -> dict[str, Any]:
        direct = {t.scheme: t.median_rps for t in self.targets if t.proxy is None}
        dump = {t.scheme: t.median_rps for t in self.targets if t.system.startswith("DumpMaster")}
        throughput = []
        for target in self.targets:
            median = target.median_rps
            throughput.append(
                {
                    "system": target.system,
                    "scheme": target.scheme,
                    "requests_per_run": target.requests,
                    "concurrency": min(self.args.concurrency, target.requests),
                    "median_rps": median,
                    "rounds_rps": [run.rps for run in target.runs],
                    "ratio_vs_direct": ratio(median, direct[target.scheme]) if target.proxy else None,
                    "ratio_vs_dumpmaster": ratio(median, dump[target.scheme])
                    if target.system.startswith("jail")
                    else None,
                    "not_200_total": sum(run.bad for run in target.runs),
                    "runs": [run.__dict__ for run in target.runs],
                }
            )
        true_ms = median_or_none(self.startup["true"])
        jail_ms = median_or_none(self.startup["jail"])
        return {
            "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine_info(self.hey, self.nginx),
            "params": {
                "rounds": self.args.rounds,
                "startup_runs_per_round": self.args.startup_runs,
                "requests": self.args.requests,
                "shell_requests": self.args.shell_requests,
                "concurrency": self.args.concurrency,
                "jail_command": self.jail,
            },
            "startup": {
                "true_median_s": true_ms,
                "jail_median_s": jail_ms,
                "true_rounds_s": self.startup["true"],
                "jail_rounds_s": self.startup["jail"],
                "ratio_jail_vs_true": ratio(jail_ms, true_ms),
                "jail_overhead_s": jail_ms - true_ms if jail_ms is not None and true_ms is not None else None,
                "failures": self.startup_failures,
            },
            "throughput": throughput,
            "elapsed_s": round(self.elapsed(), 1),
            "complete": not self.out_of_time,
            "notes": self.notes,
        }


def jail_command() -> list[str]:
    """The installed `jail` script beside this Python (a pyenv shim would add its own startup), else `-m jail`."""
    beside = Path(sys.executable).parent / "jail"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    return [sys.executable, "-m", "jail"]


def machine_info(hey: str, nginx: str) -> dict[str, Any]:
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
        "hey": deb_version("hey") or hey,
        "nginx": deb_version("nginx") or nginx,
    }


# ---------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted by `spec`, or a dash just as wide."""
    width = re.match(r"\d*", spec).group()
    return format(value, spec) if value is not None else format("-", f">{width}")


def print_table(results: dict[str, Any]) -> None:
    machine, params, startup = results["machine"], results["params"], results["startup"]
    print()
    print(
        f"jail benchmark: {machine['cpus']} CPUs, Python {machine['python']}, mitmproxy {machine['mitmproxy']}, "
        f"nginx {machine['nginx']}, hey {machine['hey']}; median of {len(startup['jail_rounds_s'])} rounds"
    )
    print()
    header = f"{'system':<28} {'metric':<18} {'median':>9}  {'rounds':<23} {'/ direct':>8} {'/ DumpMaster':>12} {'not 200':>8}"
    print(header)
    print("-" * len(header))

    def ms(values: list[float]) -> str:
        return " ".join(f"{v * 1000:.1f}" for v in values)

    rows = [
        ("true", startup["true_median_s"], startup["true_rounds_s"]),
        ("jail --js true -- true", startup["jail_median_s"], startup["jail_rounds_s"]),
    ]
    for system, median, rounds in rows:
        print(
            f"{system:<28} {'startup ms':<18} {fmt(median and median * 1000, '9.1f')}  {ms(rounds):<23} "
            f"{'':>8} {'':>12} {'':>8}"
        )
    for row in results["throughput"]:
        rounds = " ".join(fmt(v, ".0f") for v in row["rounds_rps"])
        metric = f"{row['scheme']} req/s n={row['requests_per_run']}"
        print(
            f"{row['system']:<28} {metric:<18} {fmt(row['median_rps'], '9.0f')}  {rounds:<23} "
            f"{fmt(row['ratio_vs_direct'], '8.3f')} {fmt(row['ratio_vs_dumpmaster'], '12.2f')} {row['not_200_total']:>8}"
        )
    print()
    by_key = {(row["system"], row["scheme"]): row for row in results["throughput"]}
    summary = []
    if startup["jail_overhead_s"] is not None:
        summary.append(
            f"startup: jail / true = {startup['ratio_jail_vs_true']:.0f}x (+{startup['jail_overhead_s'] * 1000:.0f} ms)"
        )
    for scheme in ("http", "https"):
        row = by_key.get(("jail --js true", scheme))
        if row:
            summary.append(
                f"{scheme}: jail --js / direct = {fmt(row['ratio_vs_direct'], '.3f')}, "
                f"jail lean / DumpMaster = {fmt(row['ratio_vs_dumpmaster'], '.2f')}"
            )
    for line in summary:
        print(line)
    problems = [f"startup {f}" for f in startup["failures"]]
    for row in results["throughput"]:
        for run in row["runs"]:
            if run["failure"] or run["requested"] != run["ok"]:
                detail = run["failure"] or f"statuses {run['statuses']} errors {run['errors']}"
                problems.append(f"{row['system']} {row['scheme']}: {detail}")
    for problem in problems[:20]:
        print(f"problem: {problem}")
    for note in results["notes"]:
        print(f"note: {note}")
    print(
        f"\nparams: rounds={params['rounds']}, startup runs/round={params['startup_runs_per_round']}, "
        f"n={params['requests']} (sh n={params['shell_requests']}), c={params['concurrency']}, "
        f"took {results['elapsed_s']:.0f} s"
    )
    print(f"results written to {RESULTS_PATH} (untracked; do not commit)")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- main


def find_tools() -> tuple[str, str]:
    hey = shutil.which("hey")
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    missing = [name for name, path in (("hey", hey), ("nginx", nginx)) if not path]
    if missing:
        sys.exit(
            f"bench: missing {' and '.join(missing)}; install with: {INSTALL_HINT} (Debian/Ubuntu; run apt-get update first)"
        )
    try:
        import trustme  # noqa: F401
    except ImportError:
        sys.exit(
            "bench: the trustme package is missing; install with: pip install trustme (or pip install -e '.[test]')"
        )
    try:
        with socket.socket() as sock:
            sock.bind((UPSTREAM_HOST, 0))
    except OSError as exc:
        sys.exit(f"bench: cannot bind {UPSTREAM_HOST} ({exc}); this benchmark needs Linux's whole 127.0.0.0/8 loopback")
    assert hey is not None and nginx is not None
    return hey, nginx


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark jail's startup and proxy throughput against local nginx.")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every measurement (default 3)")
    parser.add_argument("--startup-runs", type=int, default=10, help="startup runs per system per round (default 10)")
    parser.add_argument("--requests", type=int, default=2000, help="hey -n per run (default 2000)")
    parser.add_argument("--shell-requests", type=int, default=300, help="hey -n for the --sh rule (default 300)")
    parser.add_argument("--concurrency", type=int, default=10, help="hey -c (default 10)")
    parser.add_argument(
        "--budget", type=float, default=200, help="start no measurement after this many s (default 200)"
    )
    args = parser.parse_args(argv)
    for name in ("rounds", "startup_runs", "requests", "shell_requests", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def raise_exit(signum: int, _frame: Any) -> None:
    log(f"stopped by {signal.Signals(signum).name}; cleaning up")
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    if argv[:1] == [DUMPMASTER_FLAG]:
        run_dumpmaster(int(argv[1]), argv[2], argv[3])
        return 0
    args = parse_args(argv)
    hey, nginx = find_tools()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_exit)
    workdir = Path(tempfile.mkdtemp(prefix="jail-bench-"))
    bench = Benchmark(args, hey, nginx, workdir)
    status = 0
    try:
        bench.setup()
        bench.measure()
        results = bench.results()
        RESULTS_PATH.write_text(json.dumps(results, indent=2) + "\n")
        print_table(results)
    except BenchError as exc:
        log(f"error: {exc}")
        status = 1
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        bench.processes.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
