"""The request log (httpjail's line format) and the JSON audit log.

Each record is one `os.write` on an O_APPEND descriptor: lines from concurrent requests (and
from other jails sharing the file) never interleave, and nothing waits in a buffer to be lost.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from jail.model import Decision, JailError, Request

logger = logging.getLogger("jail.audit")


def rfc3339_ms(timestamp: float) -> str:
    """`datetime.fromtimestamp(timestamp, UTC)` to the millisecond, without making a datetime: the
    same rounding (to the nearest microsecond, half to even), and the second's text made once."""
    fraction, whole = math.modf(timestamp)
    micro = round(fraction * 1e6)
    if micro >= 1_000_000:
        whole, micro = whole + 1, micro - 1_000_000
    elif micro < 0:
        whole, micro = whole - 1, micro + 1_000_000
    return f"{_second_text(int(whole))}.{micro // 1000:03d}Z"


@functools.lru_cache(maxsize=8)
def _second_text(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


class AppendOnlyFile:
    def __init__(self, path: Path, option: str) -> None:
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise JailError(f"{option}: cannot open {path}: {exc.strerror}") from None

    def write_line(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Exchange:
    """The HTTP messages around a decision, beyond what the audit log keeps: made only for a sink that
    writes them (HAR), and with bodies only when it asks for them (`Keep.BODIES`)."""

    http_version: str = ""
    status_text: str = ""
    response_headers: list[tuple[str, str]] | None = None
    # Bodies as the child sent and received them (placeholders, never a secret's real value), decoded
    # from their Content-Encoding, at most BODY_LIMIT bytes each; None when not kept.
    request_body: bytes | None = None
    response_body: bytes | None = None
    # The body was longer than BODY_LIMIT (or its content encoding could not be undone).
    truncated: bool = False


# The most of each body a sink is handed: a HAR of a run that downloads an image stays readable.
BODY_LIMIT = 1 << 20


class Keep(enum.IntEnum):
    """How much of the HTTP exchange a record sink needs beyond the audit record."""

    RECORD = 0  # the audit record alone
    MESSAGES = 1  # also the status text and response headers (`Outcome.exchange`)
    BODIES = 2  # also both bodies


@dataclass
class Outcome:
    """What happened after the decision: the status the client got and the bytes moved."""

    status: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    duration_ms: float = 0.0
    error: str = ""
    # The address dialled (or refused by the address guard).
    address: str = ""
    # The upstream proxy the request went through.
    via: str = ""
    # Why an allowed request failed upstream (upstream_dns, upstream_refused, ...); the record's
    # reason_code then, the rule's reason code otherwise.
    reason_code: str = ""
    # A TCP stream only: how it ended, one of the STREAM_END_* values or "error: what happened".
    end: str = ""
    # Set by the proxy only when a record sink asks for more than the audit record (`Keep`).
    exchange: Exchange | None = None


# How a TCP stream ended (`Outcome.end`, the record's "end").
STREAM_END_CLIENT = "client_closed"  # the child closed its side first
STREAM_END_SERVER = "server_closed"  # the server closed its side first
STREAM_END_CLOSED = "closed"  # both sides closed, which one first not known (mitmproxy's TCP flows)
STREAM_END_DENIED = "denied"  # the rule denied it: nothing was dialled
STREAM_END_REFUSED = "refused"  # allowed, but the address guard or the server refused it


def stream_error(problem: str) -> str:
    """The `end` of a stream cut by a failure (a reset, a timeout)."""
    return f"error: {problem}"


@dataclass(frozen=True, slots=True)
class Record:
    """One judged request or stream as every record sink sees it: the audit log's fields (made in one
    place, so a field added there reaches every sink), and the objects they were made from."""

    started: float
    fields: dict[str, Any]
    request: Request
    decision: Decision
    outcome: Outcome


class RecordSink(Protocol):
    """A writer of decision records besides the two logs (OTLP, HAR). `write` runs on the proxy's
    event loop for every request: it hands the record on (a queue, a list) and does no I/O."""

    keeps: Keep

    def write(self, record: Record) -> None: ...

    def close(self) -> None: ...


class AuditSink:
    """Writes one line per judged request to each configured log, and hands the record to each sink."""

    def __init__(
        self,
        jail_id: str,
        request_log: Path | None = None,
        audit_log: Path | None = None,
        include_header_values: bool = False,
        sinks: Sequence[RecordSink] = (),
    ) -> None:
        self.jail_id = jail_id
        self.sinks = list(sinks)
        # What the proxy must keep of each exchange for the most demanding sink.
        self.keeps = max((sink.keeps for sink in self.sinks), default=Keep.RECORD)
        self.include_header_values = include_header_values
        self.request_log = AppendOnlyFile(request_log, "--request-log") if request_log else None
        self.audit_log = AppendOnlyFile(audit_log, "--audit-log") if audit_log else None
        self.verdicts: Counter[str] = Counter()
        # Set in each proxy process of `jail --server --workers N`: its records name the process that served.
        self.worker_pid: int | None = None

    def record(self, started: float, request: Request, decision: Decision, outcome: Outcome) -> None:
        """One judged request or TCP stream (`Request.stream`, with `outcome.end` set): a line in the
        request log (`+ CONNECT tcp://host:22`), a record in the audit log, and the same record to each sink."""
        self.verdicts[decision.verdict] += 1
        if self.request_log is None and self.audit_log is None and not self.sinks:
            return
        when = rfc3339_ms(started)
        if self.request_log is not None:
            mark = "+" if decision.allow else "-"
            self.request_log.write_line(f"{when} {mark} {request.method} {request.url}")
        if self.audit_log is None and not self.sinks:
            return
        fields = self._audit_record(started, request, decision, outcome, when)
        if self.audit_log is not None:
            self.audit_log.write_line(json.dumps(fields))
        if self.sinks:
            self._hand_on(Record(started, fields, request, decision, outcome))

    def _hand_on(self, record: Record) -> None:
        """A failing sink is dropped with one warning: the request and the logs go on without it."""
        for sink in list(self.sinks):
            try:
                sink.write(record)
            except Exception as exc:
                logger.warning("%s stopped: %s", type(sink).__name__, exc)
                self.sinks.remove(sink)

    def record_dns(self, name: str, qtype: str, requester_ip: str, answer: str) -> None:
        """A query to jail's own resolver: recorded, never forwarded."""
        self.verdicts["dns"] += 1
        if self.audit_log is not None:
            record = {
                "time": rfc3339_ms(time.time()),
                "jail_id": self.jail_id,
                "kind": "dns",
                "name": name,
                "qtype": qtype,
                "requester_ip": requester_ip,
                "answer": answer,
            }
            self.audit_log.write_line(json.dumps(record))

    def record_event(self, event: dict) -> None:
        """Something that is not a request but belongs in the audit trail (e.g. a refused answer)."""
        if self.audit_log is not None:
            self.audit_log.write_line(json.dumps({"time": rfc3339_ms(time.time()), "jail_id": self.jail_id, **event}))

    def _audit_record(
        self, started: float, request: Request, decision: Decision, outcome: Outcome, when: str | None = None
    ) -> dict:
        fields = request.to_dict()
        if not self.include_header_values:
            fields["headers"] = sorted(request.headers)
        record = {
            "time": when or rfc3339_ms(started),
            "jail_id": self.jail_id,
            **fields,
            "decision": decision.verdict,
            "reason": decision.reason,
            "reason_code": outcome.reason_code or decision.reason_code,
            "engine": decision.engine,
            "rule": decision.rule,
            "rule_us": decision.rule_us,
            "max_tx_bytes": decision.max_tx_bytes,
            "status": outcome.status,
            "bytes_up": outcome.bytes_up,
            "bytes_down": outcome.bytes_down,
            "duration_ms": round(outcome.duration_ms, 3),
            "address": outcome.address,
        }
        if outcome.error:
            record["error"] = outcome.error
        if outcome.via:
            record["via"] = outcome.via
        if decision.asked or decision.answered_by:
            record["asked"] = decision.asked
            record["answered_by"] = decision.answered_by
        if outcome.end:
            record["end"] = outcome.end
        if self.worker_pid is not None:
            record["worker_pid"] = self.worker_pid
        return record

    def close(self) -> None:
        for log in (self.request_log, self.audit_log):
            if log is not None:
                log.close()
        for sink in self.sinks:
            sink.close()
