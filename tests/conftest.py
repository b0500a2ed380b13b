"""Hermetic fixtures: upstream servers on 127.0.0.2 (outside the child's NO_PROXY), a test CA,
and helpers that run the real `jail` command."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme

UPSTREAM_HOST = "127.0.0.2"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass
class Upstream:
    """A local origin server; it counts every TCP connection it accepts."""

    server: ThreadingHTTPServer
    scheme: str
    connections: list[tuple[str, int]] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def url(self, path: str = "/") -> str:
        return f"{self.scheme}://{UPSTREAM_HOST}:{self.port}{path}"

    def reset(self) -> None:
        self.connections.clear()
        self.requests.clear()

    def stop(self) -> None:
        """Stop serving and release the port (shutdown() alone keeps the socket bound)."""
        self.server.shutdown()
        self.server.server_close()


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream: Upstream

    def log_message(self, *args: object) -> None:
        pass

    def _respond(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            body = self.rfile.read(length) if length else b""
        record = {
            "method": self.command,
            "path": self.path,
            "host": self.headers.get("host"),
            "body_len": len(body),
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }
        self.upstream.requests.append(record)
        if self.path.startswith("/ws") and self.headers.get("upgrade", "").lower() == "websocket":
            self._websocket_echo()
            return
        if self.path.startswith("/echo-chunked"):
            self._send_chunked(json.dumps(record).encode())
            return
        if self.path.startswith("/bytes/"):
            payload = b"x" * int(self.path.rsplit("/", 1)[1])
        else:
            payload = json.dumps(record).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _send_chunked(self, payload: bytes, size: int = 7) -> None:
        """Small chunks, flushed one by one, so a value in the body is split across them."""
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for start in range(0, len(payload), size):
            piece = payload[start : start + size]
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _read_chunked(self) -> bytes:
        body = b""
        while True:
            size = int(self.rfile.readline().strip(), 16)
            if size == 0:
                self.rfile.readline()
                return body
            body += self.rfile.read(size)
            self.rfile.readline()

    def _websocket_echo(self) -> None:
        accept = base64.b64encode(hashlib.sha1((self.headers["sec-websocket-key"] + WS_GUID).encode()).digest())
        self.send_response(101)
        self.send_header("upgrade", "websocket")
        self.send_header("connection", "Upgrade")
        self.send_header("sec-websocket-accept", accept.decode())
        self.end_headers()
        self.wfile.flush()
        header = self.rfile.read(2)
        length = header[1] & 0x7F
        mask = self.rfile.read(4)
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
        self.wfile.write(bytes([0x81, len(data)]) + data)
        self.wfile.flush()
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _respond


def start_upstream(scheme: str, context: ssl.SSLContext | None, port: int = 0) -> Upstream:
    handler = type("Handler", (EchoHandler,), {})

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        # socketserver's default backlog of 5 drops bursts of concurrent connections from the proxy.
        request_queue_size = 256

        def get_request(self):  # type: ignore[no-untyped-def]
            sock, address = super().get_request()
            upstream.connections.append(address)
            if context is not None:
                sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            return sock, address

    server = Server((UPSTREAM_HOST, port), handler)
    upstream = Upstream(server, scheme)
    handler.upstream = upstream
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return upstream


@pytest.fixture(scope="session")
def test_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def test_ca_file(test_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("testca") / "ca.pem"
    test_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def http_upstream() -> Iterator[Upstream]:
    upstream = start_upstream("http", None)
    yield upstream
    upstream.stop()


@pytest.fixture(scope="session")
def https_upstream(test_ca: trustme.CA) -> Iterator[Upstream]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    test_ca.issue_cert(UPSTREAM_HOST, "localhost").configure_cert(context)
    upstream = start_upstream("https", context)
    yield upstream
    upstream.stop()


@pytest.fixture(autouse=True)
def _fresh_upstreams(request: pytest.FixtureRequest) -> None:
    for name in ("http_upstream", "https_upstream"):
        if name in request.fixturenames:
            request.getfixturevalue(name).reset()


@pytest.fixture(scope="session")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jail-ca")


@pytest.fixture(scope="session")
def jail_env(ca_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["JAIL_CA_DIR"] = str(ca_dir)
    return env


def jail_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "jail", *args]


def weak_and_strong() -> list:
    from jail.platform.netns import strong_mode_unavailable

    unavailable = strong_mode_unavailable()
    return [
        pytest.param(("--weak",), id="weak"),
        pytest.param(
            (), id="strong", marks=pytest.mark.skipif(unavailable is not None, reason=f"strong mode: {unavailable}")
        ),
    ]


@pytest.fixture
def run_jail(jail_env: dict[str, str], test_ca_file: Path):
    """Run `jail ARGS...` to completion; `--upstream-ca` for the test CA is added unless told not to."""

    def run(*args: str, timeout: float = 60, upstream_ca: bool = True, **kwargs) -> subprocess.CompletedProcess:
        extra = ("--upstream-ca", str(test_ca_file)) if upstream_ca else ()
        # The test upstreams live on loopback, which the address guard refuses unless told.
        extra += ("--allow-private", f"{UPSTREAM_HOST}/32")
        return subprocess.run(
            jail_argv(*extra, *args),
            env=kwargs.pop("env", jail_env),
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )

    return run


@pytest.fixture
def weak_jail(run_jail):
    """`run_jail` in weak mode, whatever the machine would pick."""

    def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return run_jail("--weak", *args, **kwargs)

    return run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class JailServer:
    process: subprocess.Popen
    port: int
    ca_dir: Path

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def bundle(self) -> Path:
        return self.ca_dir / "trust" / "ca-bundle.pem"


def server_argv(port: int, test_ca_file: Path, *args: str) -> list[str]:
    """`jail --server` on 127.0.0.1:PORT, trusting the test CA and reaching the test upstreams."""
    upstreams = ("--upstream-ca", str(test_ca_file), "--allow-private", f"{UPSTREAM_HOST}/32")
    return jail_argv("--server", "--listen", f"127.0.0.1:{port}", *upstreams, *args)


@pytest.fixture
def jail_server(jail_env: dict[str, str], test_ca_file: Path, ca_dir: Path):
    """Start `jail --server` with the given rule flags; stopped at the end of the test."""
    started: list[subprocess.Popen] = []

    def start(*args: str) -> JailServer:
        port = free_port()
        process = subprocess.Popen(
            server_argv(port, test_ca_file, *args),
            env=jail_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        line = process.stdout.readline()
        if "listening" not in line:
            process.kill()
            raise AssertionError(f"jail --server did not start: {line!r} {process.stderr.read()}")
        return JailServer(process, port, ca_dir)

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# Isolated modes (strong, rootless): origins reached by name on ports 80/443, and a watcher of bypasses.

TEST_NAME = "jail-upstream.test"
DENIED_NAME = "jail-denied.test"
HOSTS_FILE = Path("/etc/hosts")
# The child runs /usr/bin/python3: world-readable, unlike a pyenv interpreter under /root.
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


def map_names(lines: list[str]) -> None:
    """Add `ADDRESS NAME...` lines to /etc/hosts (those not there yet). Several fixtures map names at once,
    so each adds and removes only its own lines, never a snapshot of the whole file."""
    text = HOSTS_FILE.read_text()
    missing = [line for line in lines if line not in text.splitlines()]
    if missing:
        HOSTS_FILE.write_text(text.rstrip("\n") + "\n" + "".join(f"{line}\n" for line in missing))


def unmap_names(lines: list[str]) -> None:
    kept = [line for line in HOSTS_FILE.read_text().splitlines() if line not in lines]
    HOSTS_FILE.write_text("\n".join(kept) + "\n")


@pytest.fixture(scope="module")
def named_upstreams(test_ca):
    """Origins on 127.0.0.2:80 and :443, reached by names the host maps in /etc/hosts."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    test_ca.issue_cert(TEST_NAME, DENIED_NAME, UPSTREAM_HOST).configure_cert(context)
    lines = [f"{UPSTREAM_HOST} {TEST_NAME} {DENIED_NAME}"]
    map_names(lines)
    http = start_upstream("http", None, port=80)
    https = start_upstream("https", context, port=443)
    try:
        yield http, https
    finally:
        unmap_names(lines)
        http.stop()
        https.stop()


@pytest.fixture(autouse=True)
def _reset_named(request):
    if "named_upstreams" in request.fixturenames:
        for upstream in request.getfixturevalue("named_upstreams"):
            upstream.reset()


class Listener:
    """TCP and UDP on every host address: a bypass that reaches the host shows up here."""

    def __init__(self) -> None:
        self.tcp = socket.create_server(("0.0.0.0", 0))
        self.port = self.tcp.getsockname()[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("0.0.0.0", self.port))
        self.udp.settimeout(0.2)
        self.tcp.settimeout(0.2)
        self.seen: list[str] = []
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while self.running:
            for sock, kind in ((self.tcp, "tcp"), (self.udp, "udp")):
                try:
                    if kind == "tcp":
                        conn, addr = sock.accept()
                        conn.close()
                    else:
                        _, addr = sock.recvfrom(100)
                    self.seen.append(f"{kind} from {addr[0]}")
                except (TimeoutError, OSError):
                    pass

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.tcp.close()
        self.udp.close()


@pytest.fixture
def listener():
    watcher = Listener()
    yield watcher
    watcher.close()


def host_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines() if " lo " not in line and "vh_" not in line]


async def decide_all(engine, requests) -> list:
    """Start the engine, judge each request in turn through a Judge, close the engine."""
    from jail.policies import Judge

    await engine.start()
    try:
        judge = Judge(engine)
        return [await judge.decide(request) for request in requests]
    finally:
        await engine.close()
