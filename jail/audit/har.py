"""The run as a HAR 1.2 file (`--har FILE`), for browser developer tools and HAR viewers.

Every judged request is an entry, denied ones with the answer jail gave (403, 421...) and TCP streams
as `CONNECT tcp://host:port`; jail's verdict is in the custom field `_jail`. Header values, like the
audit log's, only with --log-header-values; bodies only with --har-bodies, as the child saw them:
secrets are placeholders there, and every string of the file is masked once more on its way in (any
secret's real value back to its placeholder).

Each entry is masked and set aside as it comes, in an unnamed temporary file next to FILE (a long run
with bodies would otherwise hold every body in memory: up to 1 MiB each). The file is written once, at
the end of the run, the entries in the order their requests started, through a temporary file renamed
over FILE: a reader never sees half a file. A run ended by SIGINT, SIGTERM or SIGHUP writes it during
jail's teardown; a SIGKILLed jail leaves no HAR (and no partial one).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qsl

from jail import __version__
from jail.audit import BODY_LIMIT, Exchange, Keep, Record
from jail.model import JailError

logger = logging.getLogger("jail.audit")

HAR_VERSION = "1.2"
HIDDEN_VALUE = "(hidden; --log-header-values shows it)"
# Audit record fields the HAR's own structure holds; every other one goes into `_jail`.
STANDARD_FIELDS = frozenset(
    {"time", "method", "scheme", "host", "port", "path", "query", "headers", "url", "status"}
    | {"bytes_up", "bytes_down", "duration_ms", "address", "decision"}
)
Mask = Callable[[bytes], bytes]


def _unmasked(data: bytes) -> bytes:
    return data


class HarSink:
    """A record sink that writes every record into one HAR file when the run ends."""

    def __init__(
        self, path: Path, bodies: bool = False, include_header_values: bool = False, mask: Mask | None = None
    ) -> None:
        if path.is_dir() or not os.access(path.parent.resolve(), os.W_OK):
            raise JailError(f"--har: cannot write {path}: not a writable file location")
        self.path = path
        self.keeps = Keep.BODIES if bodies else Keep.MESSAGES
        self.include_header_values = include_header_values
        # Every secret's real value back to its placeholder: a value that slipped past the proxy's own
        # masking (a server that echoed it where no masker ran) still never reaches the file.
        self.mask = mask or _unmasked
        # The entries, as JSON, one after the other; and where each is: (started, offset, length).
        self._spool = tempfile.TemporaryFile(dir=path.parent)  # noqa: SIM115 (open until close())
        self._index: list[tuple[float, int, int]] = []
        self._failure: OSError | None = None

    def write(self, record: Record) -> None:
        if self._failure is not None:
            return
        entry = json.dumps(self._masked(self._entry(record)), indent=1).encode("utf-8", "surrogateescape")
        try:
            offset = self._spool.seek(0, os.SEEK_END)
            self._spool.write(entry)
        except OSError as exc:  # a full disk: said once, at the end, instead of a file missing entries
            self._failure = exc
            return
        self._index.append((record.started, offset, len(entry)))

    def close(self) -> None:
        try:
            if self._failure is not None:
                raise self._failure
            self._write_atomically()
        except OSError as exc:
            logger.error("--har: cannot write %s: %s", self.path, exc.strerror or exc)
        finally:
            self._spool.close()

    def _write_atomically(self) -> None:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(descriptor, "wb") as file:
                self._write_document(file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def _write_document(self, file: BinaryIO) -> None:
        """The HAR document around the entries, each read back from the spool in the order requests started."""
        creator = json.dumps({"name": "jail", "version": __version__})
        file.write(f'{{"log": {{"version": "{HAR_VERSION}", "creator": {creator}, "entries": [\n'.encode())
        for number, (_, offset, length) in enumerate(sorted(self._index)):
            self._spool.seek(offset)
            file.write((b",\n" if number else b"") + self._spool.read(length))
        file.write(b"\n]}}\n")

    def _masked(self, value: Any) -> Any:
        """Every string in the document, masked (each before JSON escapes it, so a value is found as it is)."""
        if isinstance(value, str):
            return self.mask(value.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")
        if isinstance(value, dict):
            return {name: self._masked(item) for name, item in value.items()}
        if isinstance(value, list):
            return [self._masked(item) for item in value]
        return value

    def _headers(self, headers: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
        return [
            {"name": name, "value": value if self.include_header_values else HIDDEN_VALUE} for name, value in headers
        ]

    def _entry(self, record: Record) -> dict[str, Any]:
        fields, request, outcome = record.fields, record.request, record.outcome
        exchange = outcome.exchange or Exchange()
        duration = round(outcome.duration_ms, 3)
        entry: dict[str, Any] = {
            "startedDateTime": fields["time"],
            "time": duration,
            "request": {
                "method": request.method,
                "url": request.url,
                "httpVersion": exchange.http_version,
                "cookies": [],
                "headers": self._headers(request.headers.items()),
                "queryString": [
                    {"name": name, "value": value} for name, value in parse_qsl(request.query, keep_blank_values=True)
                ],
                "headersSize": -1,
                "bodySize": outcome.bytes_up,
            },
            "response": self._response(outcome.status, outcome.bytes_down, exchange),
            "cache": {},
            "timings": {"send": 0, "wait": duration, "receive": 0},
            "_jail": self._verdict(fields),
        }
        if exchange.request_body:
            entry["request"]["postData"] = {
                "mimeType": request.headers.get("content-type", ""),
                "text": exchange.request_body.decode("utf-8", "replace"),
            }
        if outcome.address:
            entry["serverIPAddress"] = outcome.address
        return entry

    def _response(self, status: int, size: int, exchange: Exchange) -> dict[str, Any]:
        headers = exchange.response_headers or []
        content_type = next((value for name, value in headers if name.lower() == "content-type"), "")
        content: dict[str, Any] = {"size": size, "mimeType": content_type}
        if exchange.response_body is not None:
            content.update(self._content(exchange.response_body))
            if exchange.truncated:
                content["comment"] = f"the first {BODY_LIMIT} bytes as received (the body was longer, or not decodable)"
        return {
            "status": status,
            "statusText": exchange.status_text,
            "httpVersion": exchange.http_version,
            "cookies": [],
            "headers": self._headers(headers),
            "content": content,
            "redirectURL": "",
            "headersSize": -1,
            "bodySize": size,
        }

    def _content(self, body: bytes) -> dict[str, Any]:
        body = self.mask(body)  # before base64 hides it from the document's masking
        try:
            return {"size": len(body), "text": body.decode("utf-8")}
        except UnicodeDecodeError:
            return {"size": len(body), "text": base64.b64encode(body).decode("ascii"), "encoding": "base64"}

    @staticmethod
    def _verdict(fields: Mapping[str, Any]) -> dict[str, Any]:
        """jail's verdict, and every audit field the HAR structure has no place for (a field the audit
        record gains appears here too)."""
        verdict = {"verdict": fields["decision"]}
        verdict.update((name, value) for name, value in fields.items() if name not in STANDARD_FIELDS)
        return verdict
