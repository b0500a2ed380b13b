"""The byte path of large bodies (jail.proxy.bulk): reads hand on the socket's own chunks, and a read wholly
inside a Content-Length body skips h11's buffer. Neither may change what is judged or what arrives."""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import h2.config
import h2.connection
import h2.events
import h2.settings
import hyperframe.frame
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy.proxy.layers.http._http_h2 import BufferedH2Connection
from mitmproxy.proxy.layers.tls import TLSLayer
from OpenSSL import SSL

from jail.proxy.bulk import (
    BULK_READ_BYTES,
    ChunkReader,
    describe_frames_cheaply,
    frame_h2_data_in_runs,
    join_h2_data_frames,
    send_tls_output_whole,
)
from tests.conftest import UPSTREAM_HOST, wait_for


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")


def chunk_reader() -> tuple[ChunkReader, FakeTransport]:
    reader = asyncio.StreamReader()
    transport = FakeTransport()
    reader.set_transport(transport)
    reader.feed_data(b"already buffered ")
    ChunkReader.adopt(reader)
    assert isinstance(reader, ChunkReader)
    return reader, transport


def test_a_read_joins_small_chunks_up_to_the_bulk_size_and_splits_a_large_one():
    async def scenario() -> None:
        reader, _ = chunk_reader()
        assert await reader.read(65535) == b"already buffered "
        pieces = [bytes([n % 256]) * 1000 for n in range(300)]  # 300 kB in 1 kB receives
        for piece in pieces:
            reader.feed_data(piece)
        first = await reader.read(65535)  # mitmproxy asks for 64 KiB; up to 256 KiB come
        assert len(first) == 262000 and first == b"".join(pieces[:262])
        assert await reader.read(65535) == b"".join(pieces[262:])
        huge = bytes(range(256)) * 4096  # 1 MiB in one receive
        reader.feed_data(huge)
        reads = [await reader.read(65535) for _ in range(4)]
        assert [len(r) for r in reads] == [BULK_READ_BYTES] * 4 and b"".join(reads) == huge
        reader.feed_data(b"tail")
        reader.feed_eof()
        assert not reader.at_eof()
        assert await reader.read(-1) == b"tail"
        assert reader.at_eof() and await reader.read(65535) == b""

    asyncio.run(scenario())


def test_the_transport_pauses_above_twice_the_bulk_size_and_resumes_once_read():
    async def scenario() -> None:
        reader, transport = chunk_reader()
        await reader.read(65535)
        block = b"x" * BULK_READ_BYTES
        reader.feed_data(block)
        reader.feed_data(block)
        assert transport.calls == []  # a 256 KiB receive must not pause the socket every time
        reader.feed_data(b"y")
        assert transport.calls == ["pause"]
        await reader.read(65535)
        assert transport.calls == ["pause"]  # still above the limit
        await reader.read(65535)
        assert transport.calls == ["pause", "resume"]

    asyncio.run(scenario())


def test_a_waiting_read_wakes_on_data_and_an_error_is_raised():
    async def scenario() -> None:
        reader, _ = chunk_reader()
        await reader.read(65535)
        pending = asyncio.ensure_future(reader.read(65535))
        await asyncio.sleep(0)
        assert not pending.done()
        reader.feed_data(b"late")
        assert await pending == b"late"
        reader.set_exception(ConnectionResetError())
        try:
            await reader.read(65535)
        except ConnectionResetError:
            return
        raise AssertionError("the reader's error was not raised")

    asyncio.run(scenario())


def request(method: str, path: str, port: int, body: bytes) -> bytes:
    head = f"{method} http://{UPSTREAM_HOST}:{port}{path} HTTP/1.1\r\nHost: {UPSTREAM_HOST}:{port}\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


def read_responses(sock: socket.socket, count: int) -> list[bytes]:
    """The status lines of `count` responses (each with a Content-Length body)."""
    data, statuses = b"", []
    sock.settimeout(10)
    while len(statuses) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return statuses
            data += chunk
        head, data = data.split(b"\r\n\r\n", 1)
        statuses.append(head.split(b"\r\n", 1)[0])
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        while len(data) < length:
            data += sock.recv(65536)
        data = data[length:]
    return statuses


def test_a_read_holding_a_bodys_end_and_the_next_request_gets_the_next_request_judged(jail_server, http_upstream):
    """The body's last bytes and a second request arrive in one read while the first body is being
    read: the second request must be parsed and judged, never passed on as body bytes."""
    server = jail_server("--js", "r.path.indexOf('/deny') < 0")
    body = b"a" * 100_000
    first = request("POST", "/upload", http_upstream.port, body)
    second = request("POST", "/deny", http_upstream.port, b"smuggled")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(first[:-10])  # headers and all but the body's last 10 bytes
        time.sleep(0.3)  # read apart: the proxy is now reading the body
        sock.sendall(first[-10:] + second)
        statuses = read_responses(sock, 2)
    assert [s.split()[1] for s in statuses] == [b"200", b"403"], statuses
    assert wait_for(lambda: len(http_upstream.requests) >= 1)
    time.sleep(0.2)
    assert [(r["path"], r["body_len"]) for r in http_upstream.requests] == [("/upload", len(body))]


def test_a_body_sent_in_pieces_arrives_whole_and_the_connection_serves_the_next_request(jail_server, http_upstream):
    server = jail_server("--js", "true")
    body = bytes(range(256)) * 4000  # 1 MB, sent in uneven pieces with pauses between some
    first = request("PUT", "/first", http_upstream.port, body)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        offset = 0
        for size in (50, 70_000, 1, 300_000, 12_345):
            sock.sendall(first[offset : offset + size])
            offset += size
            time.sleep(0.05)
        sock.sendall(first[offset:])
        sock.sendall(request("POST", "/second", http_upstream.port, b"next"))
        statuses = read_responses(sock, 2)
    assert [s.split()[1] for s in statuses] == [b"200", b"200"], statuses
    got = [(r["path"], r["body_len"]) for r in http_upstream.requests]
    assert got == [("/first", len(body)), ("/second", 4)], got


def h2_wire(send_data, client_window: int, connection_window: int, body: bytes) -> tuple[bytes, bytes, list[int], bool]:
    """What mitmproxy's server-side HTTP/2 connection sends a client with a small window when `send_data`
    gives it `body` and the stream ends: (the wire bytes, what the client received, its frame sizes,
    whether the stream ended). The client acknowledges what it gets, which opens its window again."""
    server = BufferedH2Connection(h2.config.H2Configuration(client_side=False))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: client_window})
    if connection_window > 65_535:  # HTTP/2's initial window for the connection
        client.increment_flow_control_window(connection_window - 65_535)
    server.initiate_connection()
    for receiver, sender in ((server, client), (client, server), (server, client)):
        receiver.receive_data(sender.data_to_send())
    stream_id = client.get_next_available_stream_id()
    client.send_headers(stream_id, [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "x")])
    server.receive_data(client.data_to_send())
    server.send_headers(stream_id, [(":status", "200")])
    send_data(server, stream_id, body)
    server.end_stream(stream_id)
    wire, received, frame_sizes, ended = b"", b"", [], False
    while chunk := server.data_to_send():
        wire += chunk
        for event in client.receive_data(chunk):
            if isinstance(event, h2.events.DataReceived):
                received += event.data
                frame_sizes.append(len(event.data))
                client.acknowledge_received_data(event.flow_controlled_length, stream_id)
            ended = ended or isinstance(event, h2.events.StreamEnded)
        server.receive_data(client.data_to_send())
    return wire, received, frame_sizes, ended


def test_an_http2_body_in_runs_of_frames_is_what_mitmproxy_sends_frame_by_frame():
    frame_h2_data_in_runs()
    runs = BufferedH2Connection.send_data
    body = bytes(range(256)) * 4096  # 1 MiB: more than the client's window
    # The stream's window or the connection's sets how far a run goes.
    for windows in ((300_000, 8 << 20), (40_000, 8 << 20), (4 << 20, 65_535), (4 << 20, 200_000)):
        wire, received, sizes, ended = h2_wire(runs, *windows, body)
        assert received == body and ended
        assert max(sizes) == 16384 and sum(sizes) == len(body)
        assert wire == h2_wire(runs.jail_original, *windows, body)[0], windows  # byte for byte


def tls_pair(test_ca) -> tuple[SSL.Connection, SSL.Connection]:
    """Two pyOpenSSL ends over memory BIOs, as mitmproxy's TLS layers hold them, past their handshake."""
    server_context = SSL.Context(SSL.TLS_METHOD)
    cert = test_ca.issue_cert("jail.test")
    server_context.use_certificate(x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()))
    server_context.use_privatekey(serialization.load_pem_private_key(cert.private_key_pem.bytes(), None))
    server, client = SSL.Connection(server_context), SSL.Connection(SSL.Context(SSL.TLS_METHOD))
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(4):
        for end, peer in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                end.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                while True:
                    peer.bio_write(end.bio_read(1 << 20))
    return server, client


def test_what_tls_encrypted_leaves_in_one_write(test_ca):
    send_tls_output_whole()
    server, client = tls_pair(test_ca)
    layer = SimpleNamespace(tls=server, conn=object())
    plaintext = bytes(range(256)) * 1024  # 256 KiB: sixteen records, more than mitmproxy's 64 KiB reads
    server.sendall(plaintext)
    commands = list(TLSLayer.tls_interact(layer))
    assert len(commands) == 1 and commands[0].connection is layer.conn
    client.bio_write(commands[0].data)
    received = b""
    with contextlib.suppress(SSL.WantReadError):
        while True:
            received += client.recv(1 << 20)
    assert received == plaintext
    assert list(TLSLayer.tls_interact(layer)) == []  # nothing waiting: no empty write


HEAP_PROBE = """
import ctypes, sys
from jail.proxy.bulk import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def heap():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            return start, end

# First (glibc's defaults move with the first mapped block freed): 2 MB at the heap's top, freed.
blocks = [libc.malloc(100 << 10) for _ in range(20)]
grown = heap()[1]
for block in reversed(blocks):
    libc.free(block)
kept = heap()[1] >= grown  # or the top was given back
block = libc.malloc(2 << 20)  # on the heap, or mapped apart
start, end = heap()
print(start <= block < end, kept)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap, seen in /proc/self/maps")
@pytest.mark.parametrize("keep", [True, False])
def test_freed_blocks_stay_on_the_heap(keep):
    """A 2 MiB block comes from the heap and stays there once freed (the next one needs no fresh pages);
    glibc's defaults map it apart, or give the heap's top back."""
    probe = subprocess.run(
        [sys.executable, "-c", HEAP_PROBE, "keep" if keep else "defaults"], capture_output=True, text=True
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == [str(keep), str(keep)], probe.stdout


def test_a_data_frames_description_is_hyperframes_own():
    describe_frames_cheaply()
    for size in (0, 1, 9, 10, 11, 12, 16384):
        data = bytes(range(256))[:size] if size <= 256 else b"\xab" * size
        full = binascii.hexlify(data).decode()
        expected = "None" if not data else f"<hex:{full[:20] + '...' if len(full) > 20 else full}>"
        assert hyperframe.frame._raw_data_repr(data) == expected
        if data:
            frame = hyperframe.frame.DataFrame(1, data)
            assert repr(frame).endswith(f"data={expected}>") or expected in repr(frame)


def test_data_frames_of_one_stream_in_one_read_go_on_as_one_with_their_flow_control_credit():
    join_h2_data_frames()
    server = BufferedH2Connection(h2.config.H2Configuration(client_side=False))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    server.initiate_connection()
    for receiver, sender in ((server, client), (client, server), (server, client)):
        receiver.receive_data(sender.data_to_send())
    headers = [(":method", "PUT"), (":path", "/"), (":scheme", "https"), (":authority", "x")]
    first, second = client.get_next_available_stream_id(), 0
    client.send_headers(first, headers)
    second = client.get_next_available_stream_id()
    client.send_headers(second, headers)
    server.receive_data(client.data_to_send())
    pieces = [bytes([n]) * 10_000 for n in range(5)]
    for piece in pieces[:3]:
        client.send_data(first, piece)
    client.send_data(second, b"other stream")  # not joined across streams
    client.send_data(first, pieces[3])
    client.send_data(first, pieces[4], end_stream=True)
    events = server.receive_data(client.data_to_send())
    data_events = [
        (e.stream_id, e.data, e.flow_controlled_length) for e in events if isinstance(e, h2.events.DataReceived)
    ]
    assert data_events == [
        (first, b"".join(pieces[:3]), 30_000),
        (second, b"other stream", 12),
        (first, b"".join(pieces[3:]), 20_000),
    ]
    ended = [e for e in events if isinstance(e, h2.events.StreamEnded)]
    assert [e.stream_id for e in ended] == [first]
    assert events[-2].stream_ended is ended[0]  # the joined event says it ended the stream
