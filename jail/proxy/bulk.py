"""The byte path of large bodies through mitmproxy: fewer copies, fewer trips down its layers, fewer
system calls. Each piece is measured in bench/RESULTS.md (1 GB through `jail --server`, before and after).

- Reads hand on the `bytes` objects the socket gave (ChunkReader), and a read wholly inside a
  Content-Length body skips h11's receive buffer: a byte was copied five times in user space before.
- HTTP/2: DATA frames to a client go in runs (`frame_h2_data_in_runs`); the frames of one stream in one
  read from a client go on as one event (`join_h2_data_frames`); h2's per-frame repr costs what it shows.
- TLS: what OpenSSL encrypted leaves in one socket write.
- Memory: glibc keeps freed bulk buffers instead of paging fresh ones in for every block.

What the stream callables see is unchanged: the same bytes, in chunks of the same or larger size, so the
audit's byte counts, `max_tx_bytes` and secret masking work as before. mitmproxy 11.0 and 12.x alike.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import ctypes
from typing import Any

import h2.events
import hyperframe.frame
from h2.connection import H2Connection
from h11._readers import ContentLengthReader
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy import server as proxy_server
from mitmproxy.proxy.layers.http import ReceiveHttp
from mitmproxy.proxy.layers.http._http1 import Http1Connection
from mitmproxy.proxy.layers.http._http_h2 import BufferedH2Connection
from mitmproxy.proxy.layers.tls import TLSLayer
from OpenSSL import SSL

# asyncio's selector transports receive at most 256 KiB per recv().
BULK_READ_BYTES = 256 * 1024
# An HTTP/2 frame header's type (DATA) and flags (none) bytes.
DATA_FRAME_NO_FLAGS = b"\x00\x00"
# What one read of OpenSSL's output BIO takes (mitmproxy: 64 KiB); more than a 256 KiB read encrypts to.
TLS_OUTPUT_READ_BYTES = 1 << 20
# The bytes hyperframe's repr of a frame shows (20 hex digits).
REPR_BYTES = 10


class ChunkReader(asyncio.StreamReader):
    """A StreamReader for mitmproxy's read loop (`await reader.read(n)`, nothing else): what the transport
    received is queued as the `bytes` it came in, and a read returns them whole, up to 256 KiB, however
    small the `n` asked for (mitmproxy asks for 64 KiB: every read travels down its whole layer stack).
    Flow control is StreamReader's own (pause above twice the limit, resume at the limit)."""

    _chunks: collections.deque[bytes]
    _queued: int

    @property
    def _pause_limit(self) -> int:
        # StreamReader's 64 KiB limit would pause the transport after every 256 KiB receive (an epoll
        # change to pause and another to resume per read).
        return max(self._limit, BULK_READ_BYTES)

    @classmethod
    def adopt(cls, reader: object) -> None:
        """Turn a plain StreamReader, with whatever it has buffered, into a ChunkReader."""
        if type(reader) is not asyncio.StreamReader:
            return
        reader.__class__ = cls
        assert isinstance(reader, ChunkReader)
        buffered = bytes(reader._buffer)
        reader._buffer.clear()
        reader._chunks = collections.deque([buffered] if buffered else [])
        reader._queued = len(buffered)

    def feed_data(self, data: bytes) -> None:
        assert not self._eof, "feed_data after feed_eof"
        if not data:
            return
        self._chunks.append(bytes(data))  # the transport's own bytes object: no copy
        self._queued += len(data)
        self._wakeup_waiter()
        if self._transport is not None and not self._paused and self._queued > 2 * self._pause_limit:
            try:
                self._transport.pause_reading()
            except NotImplementedError:
                self._transport = None
            else:
                self._paused = True

    def _maybe_resume_transport(self) -> None:
        if self._paused and self._queued <= self._pause_limit:
            self._paused = False
            assert self._transport is not None
            self._transport.resume_reading()

    def at_eof(self) -> bool:
        return self._eof and not self._queued

    async def read(self, n: int = -1) -> bytes:
        if self._exception is not None:
            raise self._exception
        if n == 0:
            return b""
        if n < 0:
            blocks = []
            while block := await self.read(BULK_READ_BYTES):
                blocks.append(block)
            return b"".join(blocks)
        if not self._chunks and not self._eof:
            await self._wait_for_data("read")
        if not self._chunks:
            return b""
        limit = max(n, BULK_READ_BYTES)
        data = self._chunks.popleft()
        if len(data) > limit:
            self._chunks.appendleft(data[limit:])
            data = data[:limit]
        elif self._chunks and len(data) + len(self._chunks[0]) <= limit:
            parts = [data]
            size = len(data)
            while self._chunks and size + len(self._chunks[0]) <= limit:
                parts.append(self._chunks.popleft())
                size += len(parts[-1])
            data = b"".join(parts)
        self._queued -= len(data)
        self._maybe_resume_transport()
        return data


def read_in_chunks() -> None:
    """Every connection mitmproxy reads gets a ChunkReader (mitmproxy 11.0 and 12.x build one ConnectionIO
    per connection, client and server alike)."""
    if getattr(proxy_server.ConnectionIO, "jail_reads_chunks", False):
        return

    class ChunkReadIO(proxy_server.ConnectionIO):
        jail_reads_chunks = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            ChunkReader.adopt(self.reader)

    proxy_server.ConnectionIO = ChunkReadIO  # type: ignore[misc]


def pass_bodies_through() -> None:
    """A read that lies wholly inside a Content-Length body, with nothing of the message buffered before
    it, is the body's next bytes as they are: it goes on as one ReceiveData without a trip through h11's
    receive buffer (two copies, and a third in `bytes()`). Anything else (chunked bodies, a read that
    also holds the next message, headers) takes mitmproxy's own path."""
    if getattr(Http1Connection._handle_event, "jail_passes_bodies", False):
        return
    original = Http1Connection._handle_event

    def _handle_event(self: Http1Connection, event: events.Event) -> layer.CommandGenerator[None]:
        reader = getattr(self, "body_reader", None)
        if (
            isinstance(event, events.DataReceived)
            and isinstance(reader, ContentLengthReader)
            and self.state == self.read_body
            and not self.buf
            and 0 < len(event.data) <= reader._remaining
        ):
            assert self.stream_id is not None
            reader._remaining -= len(event.data)
            yield ReceiveHttp(self.ReceiveData(self.stream_id, bytes(event.data)))
            if reader._remaining:
                return
            # The body is complete: mitmproxy's own path ends the message (its reader now says so).
            event = events.DataReceived(event.connection, b"")
        yield from original(self, event)

    _handle_event.jail_passes_bodies = True  # type: ignore[attr-defined]
    Http1Connection._handle_event = _handle_event  # type: ignore[method-assign]


def frame_h2_data_in_runs() -> None:
    """mitmproxy hands h2 a large body to an HTTP/2 client one DATA frame at a time (16 KiB, the most a
    client like curl accepts), and h2 runs its state machines, builds a frame object and joins bytes for
    each: 27 % of the proxy's time in a 1 GB HTTPS download. Here h2 sends the first frame of a run itself
    (its checks, its state changes) and the frames after it, which change no state but the flow-control
    windows, are written behind it as they are: a 9-byte header and the bytes. What the windows allow
    and what is left over take mitmproxy's own path, buffered until the client opens its window."""
    if getattr(BufferedH2Connection.send_data, "jail_frames_runs", False):
        return
    original = BufferedH2Connection.send_data

    def send_data(
        self: BufferedH2Connection, stream_id: int, data: bytes, end_stream: bool = False, pad_length: None = None
    ) -> None:
        size = self.max_outbound_frame_size
        if pad_length is not None or len(data) < 2 * size or self.stream_buffers.get(stream_id):
            return original(self, stream_id, data, end_stream, pad_length)
        run = min(len(data), self.local_flow_control_window(stream_id)) // size * size
        if run < 2 * size:
            return original(self, stream_id, data, end_stream, pad_length)
        H2Connection.send_data(self, stream_id, data[:size])
        header = size.to_bytes(3, "big") + DATA_FRAME_NO_FLAGS + stream_id.to_bytes(4, "big")
        view = memoryview(data)
        frames = [part for start in range(size, run, size) for part in (header, view[start : start + size])]
        # One copy, behind what h2 holds (the first frame): `+=` frame by frame reallocated again and again.
        self._data_to_send = bytearray().join([self._data_to_send, *frames])
        self.streams[stream_id].outbound_flow_control_window -= run - size
        self.outbound_flow_control_window -= run - size
        if run < len(data) or end_stream:
            original(self, stream_id, bytes(view[run:]), end_stream)

    send_data.jail_frames_runs = True  # type: ignore[attr-defined]
    send_data.jail_original = original  # type: ignore[attr-defined]  # the tests compare the wire bytes
    BufferedH2Connection.send_data = send_data  # type: ignore[method-assign]


def send_tls_output_whole() -> None:
    """mitmproxy takes what OpenSSL encrypted out of the memory BIO 64 KiB at a time, and each piece is
    a write to the socket of its own (a system call, and on loopback the peer's TCP receive work): a
    256 KiB read of plaintext went out in five. Here all that is waiting leaves in one write."""
    if getattr(TLSLayer.tls_interact, "jail_sends_whole", False):
        return

    def tls_interact(self: TLSLayer) -> layer.CommandGenerator[None]:
        pieces = []
        while True:
            try:
                pieces.append(self.tls.bio_read(TLS_OUTPUT_READ_BYTES))
            except SSL.WantReadError:
                break
        if pieces:
            yield commands.SendData(self.conn, pieces[0] if len(pieces) == 1 else b"".join(pieces))

    tls_interact.jail_sends_whole = True  # type: ignore[attr-defined]
    TLSLayer.tls_interact = tls_interact  # type: ignore[method-assign]


# glibc's mallopt(3) parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Freed memory glibc keeps at the top of the heap, and the size from which it maps a block apart.
KEPT_HEAP_BYTES = 32 << 20
MAPPED_BLOCK_BYTES = 4 << 20


def keep_freed_memory() -> None:
    """Bulk transfers allocate and free blocks of 256 KiB to 1 MiB at a high rate. glibc's defaults give
    such a block back to the kernel when it is freed (the heap's top shrinks, or the block was mapped
    apart) and take fresh pages, which the kernel must zero, for the next: in one transfer out of two or
    three the proxy spent half its time in `brk`, page faults and clearing, and an HTTPS download ran at
    300 MB/s instead of 800 (the same code). Kept, the heap serves the next block from memory already
    paged in; it costs at most KEPT_HEAP_BYTES of resident memory more."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (or no mallopt): its allocator's defaults stay
        return
    mallopt(M_MMAP_THRESHOLD, MAPPED_BLOCK_BYTES)
    mallopt(M_TRIM_THRESHOLD, KEPT_HEAP_BYTES)


def describe_frames_cheaply() -> None:
    """h2 writes `repr(frame)` for every frame it receives (to a trace logger that drops it), and
    hyperframe's repr of a DATA frame hex-encodes all of its bytes to show the first ten: a quarter of
    the proxy's time in a large HTTP/2 upload (hyperframe 6.0 and 6.1 alike). The same text, from the
    bytes it shows."""
    if getattr(hyperframe.frame._raw_data_repr, "jail_cheap", False):
        return

    def _raw_data_repr(data: bytes | None) -> str:
        if not data:
            return "None"
        shown = binascii.hexlify(data[: REPR_BYTES + 1]).decode("ascii")  # one more: it says "..." or not
        if len(shown) > 2 * REPR_BYTES:
            shown = shown[: 2 * REPR_BYTES] + "..."
        return "<hex:" + shown + ">"

    _raw_data_repr.jail_cheap = True  # type: ignore[attr-defined]
    hyperframe.frame._raw_data_repr = _raw_data_repr


def join_h2_data_frames() -> None:
    """A read of an HTTP/2 upload holds some sixteen DATA frames, and mitmproxy passes each on by itself:
    an event down the layers, a TLS write and a system call to the server per 16 KiB. Frames of one
    stream that follow each other in a read go on as one event, the flow-control credit they carry
    summed (h2 acknowledges the same bytes)."""
    if getattr(BufferedH2Connection.receive_data, "jail_joins_frames", False):
        return
    original = BufferedH2Connection.receive_data

    def receive_data(self: BufferedH2Connection, data: bytes) -> list[h2.events.Event]:
        joined: list[h2.events.Event] = []
        pieces: list[bytes] = []
        for event in original(self, data):
            previous = joined[-1] if joined else None
            if (
                isinstance(event, h2.events.DataReceived)
                and isinstance(previous, h2.events.DataReceived)
                and previous.stream_id == event.stream_id
                and previous.stream_ended is None
            ):
                pieces.append(event.data)
                previous.flow_controlled_length += event.flow_controlled_length
                previous.stream_ended = event.stream_ended
                continue
            if pieces:
                assert isinstance(previous, h2.events.DataReceived)
                previous.data = b"".join([previous.data, *pieces])
                pieces = []
            joined.append(event)
        if pieces:
            last = joined[-1]
            assert isinstance(last, h2.events.DataReceived)
            last.data = b"".join([last.data, *pieces])
        return joined

    receive_data.jail_joins_frames = True  # type: ignore[attr-defined]
    BufferedH2Connection.receive_data = receive_data  # type: ignore[method-assign]


def install() -> None:
    """Every change above, once per process (each is idempotent)."""
    read_in_chunks()
    pass_bodies_through()
    frame_h2_data_in_runs()
    join_h2_data_frames()
    describe_frames_cheaply()
    send_tls_output_whole()
    keep_freed_memory()
