"""Large bodies stream through jail: byte-exact both ways over HTTP and HTTPS, counted in the audit log,
cut by max_tx_bytes, secrets masked across chunk boundaries, and jail's memory flat while 200 MiB go by."""

from __future__ import annotations

import hashlib
import json
import random
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from tests.conftest import UPSTREAM_HOST, jail_argv

SIZE = 200 << 20
BLOCK = random.Random(18).randbytes(1 << 20)
RSS_LIMIT = 150 << 20
REAL = "sk-real-7f3c9a1e5b2d4f60"
# The real value straddles every boundary of this many bytes: 16 KiB divides TLS records, the chunk sizes
# mitmproxy reads with and the HTTP chunks the upstream writes.
BOUNDARY = 16 << 10
SECRET_BODY_SIZE = 8 << 20


def pattern(size: int) -> Iterator[bytes]:
    """`size` deterministic bytes, 1 MiB at a time, no two MiB alike (a block out of place changes the hash)."""
    for index, offset in enumerate(range(0, size, len(BLOCK))):
        block = index.to_bytes(8, "big") + BLOCK[8:]
        yield block[: size - offset]


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for block in pattern(size):
        digest.update(block)
    return digest.hexdigest()


def secret_body() -> bytes:
    """Filler with the real value cut in two by every BOUNDARY."""
    body = bytearray(b"." * SECRET_BODY_SIZE)
    value = REAL.encode()
    for boundary in range(BOUNDARY, SECRET_BODY_SIZE - BOUNDARY, BOUNDARY):
        start = boundary - len(value) // 2
        body[start : start + len(value)] = value
    return bytes(body)


class BulkHandler(BaseHTTPRequestHandler):
    """GET /stream/N: N pattern bytes with a Content-Length. GET /secret: secret_body() in HTTP chunks of
    BOUNDARY bytes, each flushed. PUT/POST: the body (sized or chunked) read and answered with its
    length and sha256."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/stream/"):
            size = int(self.path.rsplit("/", 1)[1])
            self._head({"content-length": str(size)})
            for block in pattern(size):
                self.wfile.write(block)
            return
        body = secret_body()
        self._head({"transfer-encoding": "chunked"})
        for start in range(0, len(body), BOUNDARY):
            piece = body[start : start + BOUNDARY]
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _head(self, headers: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/octet-stream")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def do_PUT(self) -> None:
        digest, length = hashlib.sha256(), 0
        for piece in self._body():
            digest.update(piece)
            length += len(piece)
        answer = json.dumps({"length": length, "sha256": digest.hexdigest()}, separators=(",", ":")).encode()
        self._head({"content-length": str(len(answer))})
        self.wfile.write(answer)

    do_POST = do_PUT

    def _body(self) -> Iterator[bytes]:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while size := int(self.rfile.readline().strip().split(b";")[0], 16):
                yield self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return
        remaining = int(self.headers.get("content-length") or 0)
        while remaining:
            piece = self.rfile.read(min(remaining, 1 << 20))
            if not piece:
                return
            remaining -= len(piece)
            yield piece


class BulkServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, context: ssl.SSLContext | None) -> None:
        self.context = context
        super().__init__((UPSTREAM_HOST, 0), BulkHandler)

    def get_request(self):  # type: ignore[no-untyped-def]
        sock, address = super().get_request()
        if self.context is not None:
            sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address


@pytest.fixture(scope="module")
def bulk_upstreams(test_ca) -> Iterator[dict[str, str]]:
    """Base URLs by scheme."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    test_ca.issue_cert(UPSTREAM_HOST, "localhost").configure_cert(context)
    servers = {"http": BulkServer(None), "https": BulkServer(context)}
    for server in servers.values():
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {scheme: f"{scheme}://{UPSTREAM_HOST}:{server.server_address[1]}" for scheme, server in servers.items()}
    for server in servers.values():
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def upload_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bulk") / "upload.bin"
    with open(path, "wb") as out:
        for block in pattern(SIZE):
            out.write(block)
    return path


class PeakRss:
    """jail's own resident set (not its child's), sampled every 50 ms while it runs."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.05):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak


def run_weak(jail_env, test_ca_file, tmp_path: Path, script: str, *rule: str, env: dict | None = None):
    """`jail --weak RULE -- sh -c SCRIPT` with an audit log; (stdout, audit records, jail's peak RSS)."""
    audit = tmp_path / "audit.jsonl"
    argv = jail_argv(
        "--weak", "--upstream-ca", str(test_ca_file), "--allow-private", f"{UPSTREAM_HOST}/32",
        "--audit-log", str(audit), *rule, "--", "sh", "-c", script,
    )  # fmt: skip
    process = subprocess.Popen(argv, env=env or jail_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = PeakRss(process.pid)
    try:
        out, err = process.communicate(timeout=120)
    finally:
        peak = rss.stop()
        if process.poll() is None:
            process.kill()
            process.wait()
    records = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
    assert process.returncode == 0, err + "\n".join(json.dumps(r) for r in records)
    return out, records, peak


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_200_mib_down_and_up_arrive_whole_and_are_counted(
    scheme, bulk_upstreams, upload_file, jail_env, test_ca_file, tmp_path
):
    base = bulk_upstreams[scheme]
    script = (
        f"curl -sSf {base}/stream/{SIZE} | sha256sum | cut -d' ' -f1 && "
        f"curl -sSf -T {upload_file} {base}/sink && echo && "
        # chunked is HTTP/1.1's: curl's HTTP/2 to jail frames the body itself
        f"curl -sSf --http1.1 -H 'Transfer-Encoding: chunked' -T - {base}/sink < {upload_file}"
    )
    out, records, peak = run_weak(jail_env, test_ca_file, tmp_path, script, "--js", "true")
    downloaded, sized, chunked = out.split()
    assert downloaded == pattern_sha256(SIZE)
    for answer in (sized, chunked):
        assert json.loads(answer) == {"length": SIZE, "sha256": downloaded}
    assert [(r["method"], r["status"], r["bytes_up"], r["bytes_down"]) for r in records] == [
        ("GET", 200, 0, SIZE),
        ("PUT", 200, SIZE, len(sized)),
        ("PUT", 200, SIZE, len(chunked)),
    ]
    assert peak < RSS_LIMIT, f"jail's RSS reached {peak >> 20} MiB"


def test_max_tx_bytes_cuts_a_large_chunked_upload(bulk_upstreams, upload_file, jail_env, test_ca_file, tmp_path):
    limit = 3 << 20
    script = f"curl -sSf -H 'Transfer-Encoding: chunked' -T - {bulk_upstreams['http']}/sink < {upload_file}"
    out, records, _ = run_weak(
        jail_env, test_ca_file, tmp_path, script, "--js", f"({{allow: {{max_tx_bytes: {limit}}}}})"
    )
    assert json.loads(out) == {"length": limit, "sha256": pattern_sha256(limit)}
    assert [(r["bytes_up"], r["status"]) for r in records] == [(limit, 200)]


def test_a_secret_split_across_chunks_is_masked_in_a_large_streamed_response(
    bulk_upstreams, jail_env, test_ca_file, tmp_path
):
    script = f'echo "$API_TOKEN" && curl -sSf {bulk_upstreams["https"]}/secret'
    env = {**jail_env, "API_TOKEN": REAL}
    out, records, _ = run_weak(
        jail_env, test_ca_file, tmp_path, script, "--secret", "API_TOKEN=127.0.0.2", "--js", "true", env=env
    )
    placeholder, _, body = out.partition("\n")
    assert placeholder.startswith("sk-jail") and REAL not in out
    expected = secret_body().decode().replace(REAL, placeholder)
    assert body.count(placeholder) == SECRET_BODY_SIZE // BOUNDARY - 2
    assert body == expected
    assert [r["bytes_down"] for r in records] == [len(expected)]
