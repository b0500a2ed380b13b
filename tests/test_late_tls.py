"""A connection judged as a plain TCP stream (its client was silent, as a server-first protocol's is)
must not go on to carry TLS or HTTP: the rule judged `tcp://host:port` (an empty path), never the
requests. The client's opening is checked before any of it reaches the server; a client that opens
with a TLS record or an HTTP request line is cut off, and the stream's record says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from jail.platform.netns import strong_mode_unavailable
from jail.proxy.streams import LATE_HANDSHAKE, SNIFF_SECONDS, StreamOpening
from tests.conftest import PYTHON, UPSTREAM_HOST, host_addresses, wait_for
from tests.test_connect_streams import one_stream_record, open_tunnel, read_banner
from tests.test_tcp_streams import BANNER, BannerServer

# Allows every stream and every request whose path lacks /deny: what a stream's empty path passes.
PATH_RULE = "r.path.indexOf('/deny') < 0"
HTTP_OPENING = b"GET /deny HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n"
# Past the silence that makes a connection on a port other than the web's a stream.
SILENCE = SNIFF_SECONDS + 0.3


class RecordingServer:
    """Accepts every connection, says nothing, and keeps what each one sent until it closed."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("0.0.0.0", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.closed = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._record, args=(conn, len(self.received)), daemon=True).start()
            self.received.append(b"")

    def _record(self, conn: socket.socket, index: int) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    self.received[index] += data
            except OSError:
                pass
        self.closed += 1

    def all_closed(self) -> bool:
        return self.closed == len(self.received)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def recorder() -> Iterator[RecordingServer]:
    server = RecordingServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def banner_server() -> Iterator[BannerServer]:
    server = BannerServer()
    yield server
    server.close()


def assert_cut_off(sock: socket.socket) -> None:
    """The proxy closed the connection without a byte from the server."""
    sock.settimeout(5)
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(4096) == b""


def assert_refused_record(record: dict, target: str) -> None:
    assert (record["url"], record["decision"], record["end"]) == (f"tcp://{target}", "allow", "refused")
    assert (record["reason_code"], record["bytes_up"]) == (LATE_HANDSHAKE, 0)
    assert "TLS or HTTP" in record["error"]


# --- the opening ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunks",
    [[b"\x16\x03\x01\x02\x00"], [b"\x16", b"\x03\x01"], [b"GET /deny HTTP/1.1\r\n"], [b"GE", b"T ", b"htt", b"p://x/"]],
    ids=["tls", "tls-split", "http", "http-split"],
)
def test_an_opening_of_tls_or_http_is_refused_whole(chunks: list[bytes]) -> None:
    opening = StreamOpening()
    admitted = [opening.admit(chunk) for chunk in chunks]
    assert admitted[:-1] == [b""] * (len(chunks) - 1) and admitted[-1] is None
    assert opening.admit(b"more") is None and opening.rest() == b""


@pytest.mark.parametrize(
    "chunks",
    [
        [b"SSH-2.0-OpenSSH_9.2\r\n"],
        [b"EHLO x\r\n", b"STARTTLS\r\n", b"\x16\x03\x01"],
        [b"GE", b"T key\r\n"],
        [b"\x16\x01"],
    ],
    ids=["ssh", "smtp-starttls", "redis-split", "not-a-tls-version"],
)
def test_other_openings_pass_unchanged(chunks: list[bytes]) -> None:
    opening = StreamOpening()
    assert b"".join(opening.admit(chunk) or b"" for chunk in chunks) == b"".join(chunks)


def test_an_undecided_opening_is_passed_on_when_the_client_ends() -> None:
    opening = StreamOpening()
    assert opening.admit(b"GET") == b""
    assert opening.rest() == b"GET"


# --- through the proxy (weak mode, jail --server) ---------------------------------------------


def test_tls_after_silence_in_a_tunnel_reaches_no_https_server(jail_server, https_upstream, test_ca_file, tmp_path):
    """The bypass: silent past the sniff, then TLS to the real HTTPS server and `GET /deny`."""
    audit = tmp_path / "audit.jsonl"
    target = f"{UPSTREAM_HOST}:{https_upstream.port}"
    server = jail_server("--audit-log", str(audit), "--js", PATH_RULE)
    sock = open_tunnel(server.port, target)
    time.sleep(SILENCE)
    context = ssl.create_default_context(cafile=str(test_ca_file))
    # An SSLError or a reset: no handshake with the real server.
    with pytest.raises(OSError), context.wrap_socket(sock, server_hostname=UPSTREAM_HOST) as tls:
        tls.sendall(b"GET /deny HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        tls.recv(4096)
    sock.close()
    assert_refused_record(one_stream_record(audit), target)
    assert https_upstream.requests == []


def client_hello() -> bytes:
    """A real ClientHello, as the first flight of a TLS client."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    with pytest.raises(ssl.SSLWantReadError):
        context.wrap_bio(incoming, outgoing, server_hostname="example").do_handshake()
    return outgoing.read()


HELLO = client_hello()
OPENINGS = {
    "tls": [HELLO],
    # The record's first byte alone, then the rest: too short to tell, held back, then told apart.
    "tls-split": [HELLO[:1], HELLO[1:]],
    "http": [HTTP_OPENING, HTTP_OPENING],  # a second request, should the first have been let through
    "http-split": [HTTP_OPENING[:2], HTTP_OPENING[2:], HTTP_OPENING],
}


@pytest.mark.parametrize("opening", OPENINGS)
def test_tls_or_http_after_silence_in_a_tunnel_sends_the_server_nothing(jail_server, recorder, tmp_path, opening):
    audit = tmp_path / "audit.jsonl"
    target = f"{UPSTREAM_HOST}:{recorder.port}"
    server = jail_server("--audit-log", str(audit), "--js", PATH_RULE)
    with open_tunnel(server.port, target) as sock:
        time.sleep(SILENCE)
        with contextlib.suppress(OSError):  # the proxy may have closed already
            for piece in OPENINGS[opening]:
                sock.sendall(piece)
                time.sleep(0.1)
        assert_cut_off(sock)
    assert_refused_record(one_stream_record(audit), target)
    assert wait_for(recorder.all_closed), "the server's connection stayed open"
    assert recorder.received == [b""]  # dialled once the stream was allowed, never sent a byte


def test_a_server_first_stream_still_talks_in_a_tunnel(jail_server, banner_server, tmp_path):
    audit = tmp_path / "audit.jsonl"
    target = f"{UPSTREAM_HOST}:{banner_server.port}"
    server = jail_server("--audit-log", str(audit), "--js", PATH_RULE)
    with open_tunnel(server.port, target) as sock:
        assert read_banner(sock) == BANNER
        sock.sendall(b"hello")
        assert sock.recv(5) == b"HELLO"
    record = one_stream_record(audit)
    assert (record["decision"], record["bytes_up"], record["reason_code"]) == ("allow", 5, "rule_allow")
    assert "error" not in record


# --- the isolated modes' redirected connections (strong mode) --------------------------------

JAILED_CLIENT = """
import json, socket, ssl, sys, time
host, recorder, banner = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def late(opening):
    s = socket.create_connection((host, recorder), timeout=10)
    time.sleep({silence})
    try:
        if opening == "tls":
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            context.wrap_socket(s, server_hostname="example")
            return "handshake"
        s.sendall({http!r})
        return s.recv(4096).decode(errors="replace")
    except OSError as e:
        return type(e).__name__
    finally:
        s.close()

def server_first():
    s = socket.create_connection((host, banner), timeout=10)
    got = b""
    while len(got) < {banner_size} and (chunk := s.recv(4096)):
        got += chunk
    s.sendall(b"hello")
    got += s.recv(5)
    s.close()
    return got.decode(errors="replace")

# The server-first stream goes first: once its banner is through, jail serves redirected connections, and
# the silences below are measured by jail from their start (a connection made while jail was still
# starting waits in the backlog, and a client that spoke by the time it is accepted was never silent).
banner = server_first()
print(json.dumps([late("tls"), late("http"), banner]))
"""


def test_tls_or_http_after_silence_on_a_redirected_connection_sends_the_server_nothing(
    run_jail, recorder, banner_server, tmp_path
):
    """A client that ignores proxy variables, to an address on a port other than the web's: the
    firewall redirects it to jail, which makes it a stream after the silence."""
    if os.geteuid() != 0:
        pytest.skip("strong mode needs root (CI has it)")
    if (reason := strong_mode_unavailable()) is not None:
        pytest.skip(f"strong mode unavailable: {reason}")
    if not (addresses := host_addresses()):
        pytest.skip("this machine has no address but loopback")
    address = addresses[0]
    audit = tmp_path / "audit.jsonl"
    code = textwrap.dedent(JAILED_CLIENT).format(silence=SILENCE, http=HTTP_OPENING, banner_size=len(BANNER))
    result = run_jail(
        "--audit-log", str(audit), "--js", PATH_RULE, "--allow-private", f"{address}/32",
        "--", PYTHON, "-c", code, address, str(recorder.port), str(banner_server.port),
    )  # fmt: skip
    assert result.stdout, result.stderr
    tls, http, server_first = json.loads(result.stdout)
    assert tls != "handshake" and http in ("", "ConnectionResetError"), result.stdout
    assert server_first == BANNER.decode() + "HELLO"
    assert wait_for(recorder.all_closed), "the server's connection stayed open"
    assert recorder.received == [b"", b""]
    records = [r for r in map(json.loads, audit.read_text().splitlines()) if r.get("scheme") == "tcp"]
    banner, late_tls, late_http = records
    for record in (late_tls, late_http):
        assert_refused_record(record, f"{address}:{recorder.port}")
    assert (banner["end"], banner["bytes_up"], banner["reason_code"]) == ("client_closed", 5, "rule_allow")
