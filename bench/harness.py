"""The benchmark's shared machinery: processes, ports, peak RSS, timing, and the servers every cell
measures against (nginx, jail, mitmdump, tinyproxy). A cell gets one `Bench` and asks it for them."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.workload import CONDITIONS, MITMDUMP_ADDON, UPSTREAM_HOST

UPSTREAM_CIDR = "127.0.0.2/32"
PROXY_HOST = "127.0.0.1"
INSTALL_HINT = "apt-get install -y hey nginx tinyproxy"

STARTUP_RUN_TIMEOUT_S = 30  # one `jail -- true` is killed after this long
READY_TIMEOUT_S = 30  # a server must be listening within this long
RSS_SAMPLE_S = 0.05  # peak RSS is sampled this often


class BenchError(Exception):
    pass


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


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


def sibling_command(name: str, fallback: list[str]) -> list[str]:
    """The script installed beside this Python (a pyenv shim would add its own start-up), else `fallback`."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    return fallback


class RssSampler:
    """Peak resident set size of named processes (with their descendants unless told otherwise),
    sampled in a thread."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self.watched: dict[str, tuple[Any, bool]] = {}
        self.peak_bytes: dict[str, int] = {}
        self.samples = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._active = threading.Event()
        self._active.set()
        self._thread: threading.Thread | None = None

    def watch(self, name: str, pid: int, children: bool = True) -> None:
        with self._lock:
            self.watched[name] = (self.psutil.Process(pid), children)
            self.peak_bytes.setdefault(name, 0)

    def unwatch(self, name: str) -> None:
        with self._lock:
            self.watched.pop(name, None)

    def _rss(self, process: Any, children: bool) -> int:
        total = 0
        with contextlib.suppress(self.psutil.Error):
            total += process.memory_info().rss
            for child in process.children(recursive=True) if children else ():
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
            with self._lock:
                watched = list(self.watched.items())
            for name, (process, children) in watched:
                self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), self._rss(process, children))
            self.samples += 1

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._active.set()
        if self._thread is not None:
            self._thread.join()


NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {body_temp};
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_max_body_size 0;
    root {prefix}/www;
    server {{
        listen {host}:{http_port};
        {locations}
    }}
    server {{
        listen {host}:{https_port} ssl;
        ssl_certificate {prefix}/server-cert.pem;
        ssl_certificate_key {prefix}/server-key.pem;
        {locations}
    }}
}}
"""
# `/`: the one-line answer of the per-request cells. `/bulk/NAME`: a file under www/bulk (sendfile).
# `/sink`: reads the whole upload (request buffering into a temp file in memory) before it answers, so
# the answer is the end of the upload; the body itself goes nowhere.
NGINX_LOCATIONS = """\
location = / {{ default_type text/plain; return 200 "ok\\n"; }}
        location /bulk/ {{ default_type application/octet-stream; }}
        location = /sink {{
            proxy_pass http://{host}:{http_port}/;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
        }}"""


class Upstream:
    """nginx on 127.0.0.2, HTTP and HTTPS (a throwaway trustme CA), serving the cells' paths."""

    def __init__(self, processes: Processes, nginx: str, workdir: Path, test_ca: Any) -> None:
        self.prefix = workdir / "nginx"
        (self.prefix / "tmp").mkdir(parents=True)
        (self.prefix / "www" / "bulk").mkdir(parents=True)
        # Uploads are buffered by nginx in a file: in memory, so that a disk does not set the pace.
        shm = Path("/dev/shm")
        self.body_temp = Path(tempfile.mkdtemp(prefix="jail-bench-body-", dir=shm if shm.is_dir() else workdir))
        cert = test_ca.issue_cert(UPSTREAM_HOST, "localhost")
        (self.prefix / "server-cert.pem").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(self.prefix / "server-key.pem"))
        self.ports = {"http": free_port(UPSTREAM_HOST), "https": free_port(UPSTREAM_HOST)}
        conf = self.prefix / "nginx.conf"
        user = "user root;\n" if os.geteuid() == 0 else ""
        locations = NGINX_LOCATIONS.format(host=UPSTREAM_HOST, http_port=self.ports["http"])
        conf.write_text(
            NGINX_CONF.format(
                user=user,
                prefix=self.prefix,
                body_temp=self.body_temp,
                host=UPSTREAM_HOST,
                http_port=self.ports["http"],
                https_port=self.ports["https"],
                locations=locations,
            )
        )
        argv = [nginx, "-p", str(self.prefix), "-c", str(conf), "-e", str(self.prefix / "error.log")]
        process = processes.start("nginx", argv, clean_environment())
        for port in self.ports.values():
            wait_for_port(UPSTREAM_HOST, port, process, "nginx")
        log(f"nginx on {UPSTREAM_HOST}:{self.ports['http']} (http) and :{self.ports['https']} (https)")

    def url(self, scheme: str, path: str = "/") -> str:
        return f"{scheme}://{UPSTREAM_HOST}:{self.ports[scheme]}{path}"

    def bulk_file(self, name: str) -> Path:
        """Where a file served at /bulk/NAME lives."""
        return self.prefix / "www" / "bulk" / name

    def close(self) -> None:
        shutil.rmtree(self.body_temp, ignore_errors=True)


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


class Bench:
    """What every cell shares: the arguments, tools, temp dir, processes, the RSS sampler, the upstream
    and the proxies (each started once, on first use), the time budget and the notes of the run."""

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
        self.rss = RssSampler()
        self._test_ca: Any = None
        self._upstream: Upstream | None = None
        self._tinyproxy_port: int | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def within_budget(self) -> bool:
        if not self.out_of_time and self.elapsed() > self.args.budget:
            self.out_of_time = True
            self.note(f"time budget of {self.args.budget:g} s reached; later measurements skipped")
            log(f"time budget of {self.args.budget:g} s reached; skipping the rest")
        return not self.out_of_time

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def test_ca_file(self) -> Path:
        """The throwaway CA nginx's certificate is issued by (the proxies' upstream trust)."""
        if self._test_ca is None:
            import trustme

            self._test_ca = trustme.CA()
            self._test_ca.cert_pem.write_to_path(str(self.workdir / "test-ca.pem"))
        return self.workdir / "test-ca.pem"

    def upstream(self) -> Upstream:
        if self._upstream is None:
            self.test_ca_file  # noqa: B018 - makes the CA
            self._upstream = Upstream(self.processes, self.tools["nginx"], self.workdir, self._test_ca)
        return self._upstream

    @property
    def jail_ca_file(self) -> Path:
        """The CA jail intercepts with (made by jail on first start, in the temporary JAIL_CA_DIR)."""
        return Path(self.env["JAIL_CA_DIR"]) / "trust" / "jail-ca.pem"

    def jail_upstream_args(self) -> list[str]:
        """What any jail needs to reach the benchmark's nginx: the loopback range and its CA."""
        return ["--allow-private", UPSTREAM_CIDR, "--upstream-ca", str(self.test_ca_file)]

    def start_jail_server(self, system: str, rule: list[str], extra: list[str] | tuple[str, ...] = ()) -> int:
        """A `jail --server` with this rule; its RSS is watched under `system`. Returns its port."""
        self.upstream()
        name = re.sub(r"\W+", "-", system).strip("-")
        port = free_port(PROXY_HOST)
        argv = [*self.jail, "--server", "--listen", f"{PROXY_HOST}:{port}", *self.jail_upstream_args()]
        argv += [*rule, *extra]
        process = self.processes.start(name, argv, self.env)
        match = self.processes.wait_for_line(name, process, r"proxy listening on http://[^:]+:(\d+)")
        self.rss.watch(system, process.pid)
        return int(match.group(1))

    def start_mitmdump(self, system: str, options: list[str] | tuple[str, ...] = (), addon: bool = True) -> int:
        """mitmdump (with the 20-condition Python addon unless told otherwise), its own confdir."""
        name = re.sub(r"\W+", "-", system).strip("-")
        port = free_port(PROXY_HOST)
        prefix = self.workdir / name
        prefix.mkdir()
        argv = [*self.mitmdump, "-q", "--listen-host", PROXY_HOST, "-p", str(port)]
        if addon:
            script = prefix / "addon.py"
            script.write_text(MITMDUMP_ADDON.format(conditions=CONDITIONS))
            argv += ["-s", str(script)]
        argv += ["--set", "connection_strategy=lazy", "--set", f"ssl_verify_upstream_trusted_ca={self.test_ca_file}"]
        argv += ["--set", f"confdir={prefix}"]  # its own CA in the temporary directory, not ~/.mitmproxy
        for option in options:
            argv += ["--set", option]
        process = self.processes.start(name, argv, clean_environment())
        wait_for_port(PROXY_HOST, port, process, name)
        self.rss.watch(system, process.pid)
        return port

    def mitmdump_ca_file(self, system: str) -> Path:
        return self.workdir / re.sub(r"\W+", "-", system).strip("-") / "mitmproxy-ca-cert.pem"

    def tinyproxy(self, system: str) -> int:
        """Debian's tinyproxy in the foreground with a private config (one for the whole run)."""
        if self._tinyproxy_port is not None:
            return self._tinyproxy_port
        prefix = self.workdir / "tinyproxy"
        prefix.mkdir()
        port = free_port(PROXY_HOST)
        # As root tinyproxy drops to this user; the log directory must then stay writable for it.
        user = "User nobody\nGroup nogroup\n" if os.geteuid() == 0 else ""
        if os.geteuid() == 0:
            os.chmod(prefix, 0o777)
        conf = prefix / "tinyproxy.conf"
        https_port = self.upstream().ports["https"]
        conf.write_text(
            TINYPROXY_CONF.format(user=user, port=port, host=PROXY_HOST, prefix=prefix, https_port=https_port)
        )
        process = self.processes.start(
            "tinyproxy", [self.tools["tinyproxy"], "-d", "-c", str(conf)], clean_environment()
        )
        wait_for_port(PROXY_HOST, port, process, "tinyproxy")
        self.rss.watch(system, process.pid)
        self._tinyproxy_port = port
        return port

    def close(self) -> None:
        self.rss.stop()
        self.processes.stop_all()
        if self._upstream is not None:
            self._upstream.close()


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
        "curl": deb_version("curl") or tools.get("curl"),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
