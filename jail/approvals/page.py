"""The live page of a run (`--ui`): its requests as they are judged, the open questions with their
answer buttons, and the run's totals, served on loopback to the person who holds the page's token.

A tiny HTTP/1.1 server on asyncio streams in jail's own loop (no web framework, one request per
connection) with the live updates as Server-Sent Events. The page's markup, style and script are
package data (assets/), its look the `jail log --html` report's (jail/audit/report.css).

Who may use it (the jailed command shares loopback and the user id with jail in the weak mode):
- every request carries the token: the address's `?token=`, or the X-Jail-Token header; compared in
  constant time. No cookie: a browser sends a cookie of 127.0.0.1 to every port of it, the jailed
  command's own servers included.
- an answer is a POST with the token in the X-Jail-Token header and a JSON body, from the page's own
  origin (Origin, Sec-Fetch-Site): a page of another origin cannot send that without a CORS preflight,
  which this server never grants.
- a connection from a process of the jailed command is refused even with the token.
- the Host header must name the page (a DNS-rebinding page gets nothing).
Every refusal is logged and recorded in the audit log (`ask_refused`, channel `ui`). The token is
never in an environment or a command line: it is shown on jail's terminal or written to `--ui-file`
(which the jailed command cannot read), see `announce`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
import logging
import os
import secrets
import socket
import string
import sys
from collections import Counter, deque
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from jail.approvals.channels import hide_from_same_user
from jail.approvals.protocol import ProtocolError, parse_answer
from jail.approvals.questions import Approvals
from jail.audit import Keep, Record
from jail.audit.report import HTML_CSS, csp_hash
from jail.model import JailError

logger = logging.getLogger("jail.ask")

CHANNEL = "ui"
TOKEN_HEADER = "x-jail-token"
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 4 * 1024
HEAD_TIMEOUT_SECONDS = 10.0
# An idle event stream gets a comment this often: a closed browser tab is noticed on the write.
KEEPALIVE_SECONDS = 15.0
# The page lists the latest requests; its totals count every one.
MAX_ROWS = 1000
# Events waiting for a slow page; past this the stream is dropped and the page reconnects afresh.
MAX_PENDING_EVENTS = 2000
# The fields of an audit record the table shows (header names, addresses and rule details stay out).
ROW_FIELDS = (
    "time", "decision", "method", "url", "host", "status", "duration_ms", "reason", "reason_code", "asked",
    "answered_by", "end",
)  # fmt: skip
SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)
REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
}


def _asset(name: str) -> str:
    return resources.files("jail.approvals").joinpath("assets", name).read_text(encoding="utf-8")


class Refused(Exception):
    """A request that is not the person's: answered 403, logged and recorded."""


class BadRequest(Exception):
    """Not HTTP this server speaks: answered 400."""


@dataclass
class HttpRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""


async def read_request(reader: asyncio.StreamReader) -> HttpRequest:
    """One request head (and a small body); anything larger or malformed is a BadRequest."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise BadRequest("request head too large") from None
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise BadRequest("malformed request line") from None
    if not version.startswith("HTTP/1."):
        raise BadRequest("HTTP/1.x only")
    headers: dict[str, str] = {}
    for line in filter(None, lines[1:]):
        name, colon, value = line.partition(":")
        if not colon:
            raise BadRequest("malformed header")
        headers[name.strip().lower()] = value.strip()
    parts = urlsplit(target)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    length = headers.get("content-length", "0")
    if not length.isdigit() or int(length) > MAX_BODY_BYTES or "transfer-encoding" in headers:
        raise BadRequest(f"a body of at most {MAX_BODY_BYTES} bytes, with Content-Length")
    body = await reader.readexactly(int(length)) if int(length) else b""
    return HttpRequest(method, parts.path, query, headers, body)


def response(status: int, body: bytes, content_type: str, *extra: tuple[str, str]) -> bytes:
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *SECURITY_HEADERS,
        *extra,
    ]
    head = f"HTTP/1.1 {status} {REASONS[status]}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers)
    return head.encode("latin-1") + b"\r\n" + body


def json_response(status: int, payload: dict[str, Any]) -> bytes:
    return response(status, json.dumps(payload).encode(), "application/json")


# --------------------------------------------------------------------------- who is at the other end


def _hex_address(address: tuple[str, int]) -> str:
    """An IPv4 address as /proc/net/tcp writes it: the 32-bit word in the machine's byte order."""
    host, port = address[:2]
    return f"{int.from_bytes(socket.inet_aton(host), sys.byteorder):08X}:{port:04X}"


def socket_inode(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The inode of the TCP socket bound to `local` and connected to `remote` (in jail's network namespace)."""
    wanted = (_hex_address(local), _hex_address(remote))
    with contextlib.suppress(OSError), open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if (fields[1], fields[2]) == wanted:
                return int(fields[9])
    return None


def descendants(ancestor: int) -> list[int]:
    """Every process below `ancestor` (not itself): jail's are the jailed command and its rule programs."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                # pid (comm) state ppid ...: comm may hold spaces and parentheses.
                parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(name))
    found, todo = [], list(children.get(ancestor, ()))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, ())
    return found


def jailed_peer(peer: tuple[str, int], local: tuple[str, int]) -> int | None:
    """The pid of the process below jail holding the other end of a loopback connection, or None.
    Best effort on top of the token: a process whose fds jail cannot list is not seen."""
    inode = socket_inode(peer, local)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
    return None


# --------------------------------------------------------------------------- what the page shows


def table_row(fields: dict[str, Any]) -> dict[str, Any]:
    row = {name: fields[name] for name in ROW_FIELDS if name in fields}
    row["bytes"] = fields.get("bytes_up", 0) + fields.get("bytes_down", 0)
    return row


@dataclass
class Totals:
    verdicts: Counter[str] = field(default_factory=Counter)
    bytes: int = 0
    hosts: set[str] = field(default_factory=set)

    def add(self, row: dict[str, Any]) -> None:
        self.verdicts[row["decision"]] += 1
        self.bytes += row["bytes"]
        self.hosts.add(row.get("host", ""))

    def to_dict(self) -> dict[str, int]:
        return {
            "requests": sum(self.verdicts.values()),
            "allowed": self.verdicts["allow"],
            "denied": self.verdicts["deny"],
            "would_deny": self.verdicts["would_deny"],
            "bytes": self.bytes,
            "hosts": len(self.hosts),
        }


class LivePage:
    """The page's server, and a record sink of the run's AuditSink (`keeps`, `write`, `close`)."""

    keeps = Keep.RECORD

    def __init__(self, jail_id: str, approvals: Approvals) -> None:
        self.jail_id = jail_id
        self.approvals = approvals
        self.token = secrets.token_urlsafe(32)
        self.rows: deque[dict[str, Any]] = deque(maxlen=MAX_ROWS)
        self.totals = Totals()
        self.watchers: set[asyncio.Queue[bytes | None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0
        approvals.listeners.append(self._approvals_event)

    async def start(self) -> str:
        """Listen on a free loopback port; returns the page's address (with the token)."""
        # The token is in this process's memory only: a same-user process may not read it from there.
        hide_from_same_user()
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0, limit=MAX_HEAD_BYTES)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.address

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}/?token={self.token}"

    async def stop(self) -> None:
        self.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    # The record sink: runs on the proxy's loop for every request, and only queues.
    def write(self, record: Record) -> None:
        row = table_row(record.fields)
        self.rows.append(row)
        self.totals.add(row)
        self._push("record", {"row": row, "totals": self.totals.to_dict()})

    def close(self) -> None:
        """The run ends: every event stream ends (the page says so)."""
        for queue in self.watchers:
            queue.put_nowait(None)
        self.watchers.clear()

    def _approvals_event(self, event: dict[str, Any]) -> None:
        self._push(event["op"], event)

    def _push(self, kind: str, payload: dict[str, Any]) -> None:
        message = f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()
        for queue in list(self.watchers):
            if queue.qsize() >= MAX_PENDING_EVENTS:
                self.watchers.discard(queue)
                queue.put_nowait(None)
            else:
                queue.put_nowait(message)

    def state(self) -> dict[str, Any]:
        return {
            "jail_id": self.jail_id,
            "rows": list(self.rows),
            "totals": self.totals.to_dict(),
            "questions": self.approvals.questions(),
        }

    # ----------------------------------------------------------------------- HTTP

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            request = await asyncio.wait_for(read_request(reader), HEAD_TIMEOUT_SECONDS)
            await self._admit(request, peer, writer.get_extra_info("sockname"))
            await self._route(request, writer)
        except Refused as exc:
            self.approvals.refuse(CHANNEL, str(exc), peer=f"{peer[0]}:{peer[1]}")
            writer.write(json_response(403, {"error": str(exc)}))
        except BadRequest as exc:
            writer.write(json_response(400, {"error": str(exc)}))
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            return writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _admit(self, request: HttpRequest, peer: tuple[str, int], local: tuple[str, int]) -> None:
        """Raises Refused for anything but the person's page."""
        if request.headers.get("host") not in (f"127.0.0.1:{self.port}", f"localhost:{self.port}"):
            raise Refused(f"wrong Host header {request.headers.get('host', '')!r}")
        given = request.headers.get(TOKEN_HEADER) or request.query.get("token", "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise Refused(f"{'wrong' if given else 'no'} token ({request.method} {request.path})")
        pid = await asyncio.to_thread(jailed_peer, peer, local)
        if pid is not None:
            raise Refused(f"peer pid {pid} is a process of the jailed command")

    async def _route(self, request: HttpRequest, writer: asyncio.StreamWriter) -> None:
        routes = {
            "/": ("GET", self._page),
            "/api/state": ("GET", self._state),
            "/api/events": ("GET", self._events),
            "/api/answer": ("POST", self._answer),
        }
        if request.path not in routes:
            writer.write(json_response(404, {"error": f"no {request.path}"}))
            return
        method, handler = routes[request.path]
        if request.method != method:
            writer.write(json_response(405, {"error": f"{request.path} takes {method}"}))
            return
        await handler(request, writer)

    async def _page(self, request: HttpRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(response(200, self._html().encode(), "text/html; charset=utf-8"))

    async def _state(self, request: HttpRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(json_response(200, self.state()))

    async def _events(self, request: HttpRequest, writer: asyncio.StreamWriter) -> None:
        """Server-Sent Events: the whole state first, then each record, question and answer."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        head = ["HTTP/1.1 200 OK", "Content-Type: text/event-stream", "Connection: close"]
        head += [f"{name}: {value}" for name, value in SECURITY_HEADERS]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        writer.write(f"event: state\ndata: {json.dumps(self.state())}\n\n".encode())
        self.watchers.add(queue)
        try:
            while True:
                try:
                    message = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    message = b": keepalive\n\n"
                if message is None:
                    writer.write(b"event: ended\ndata: {}\n\n")
                    return
                writer.write(message)
                await writer.drain()
        finally:
            self.watchers.discard(queue)

    async def _answer(self, request: HttpRequest, writer: asyncio.StreamWriter) -> None:
        """An answer button: only the page's own script, from its own origin, can send this."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site != "same-origin":
            raise Refused(f"cross-origin answer (Sec-Fetch-Site: {site})")
        origin = request.headers.get("origin")
        if origin is not None and origin not in (f"http://127.0.0.1:{self.port}", f"http://localhost:{self.port}"):
            raise Refused(f"cross-origin answer (Origin: {origin})")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise Refused("an answer must be application/json")
        if TOKEN_HEADER not in request.headers:
            raise Refused(f"an answer must carry the token in {TOKEN_HEADER}")
        try:
            message = json.loads(request.body)
            if not isinstance(message, dict):
                raise ProtocolError("an answer is a JSON object")
            event = self.approvals.answer(parse_answer(message), CHANNEL)
        except (ProtocolError, ValueError) as exc:
            writer.write(json_response(409, {"error": str(exc)}))
            return
        writer.write(json_response(200, event))

    def _html(self) -> str:
        css = HTML_CSS + _asset("live.css")
        script = _asset("live.js")
        csp = (
            f"default-src 'none'; style-src '{csp_hash(css)}'; script-src '{csp_hash(script)}'; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        return string.Template(_asset("live.html")).substitute(
            csp=html.escape(csp), jail_id=html.escape(self.jail_id), css=css, script=script
        )


# --------------------------------------------------------------------------- telling the person


def prepare_ui_file(path: Path) -> None:
    """Make the (new, empty, 0600) --ui-file before the command starts, so that it can be denied to it."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        raise JailError(f"--ui-file: cannot create {path}: {exc.strerror}") from None


def announce(address: str, ui_file: Path | None) -> None:
    """Tell the person the page's address, where the jailed command cannot read it back: in --ui-file
    (denied to the command), else on jail's terminal. Never on stderr: the command inherits it, and a
    file or a pipe can be read back through /proc/self/fd/2."""
    if ui_file is not None:
        descriptor = os.open(ui_file, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(descriptor, "w") as file:
            file.write(address + "\n")
        print(f"jail: live page: its address is in {ui_file} (--ui-file)", file=sys.stderr, flush=True)
        return
    try:
        terminal = os.open("/dev/tty", os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        raise JailError(
            "--ui: no terminal to show the page's address on (the command could read it back from stderr): "
            "give --ui-file PATH"
        ) from None
    with os.fdopen(terminal, "w") as tty:
        tty.write(f"jail: live page: {address}\n")
