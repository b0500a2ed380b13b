"""Decision records to an OpenTelemetry collector: one OTLP log record per decision, and a span with
its duration for each request that went out, through the official SDK and its OTLP/HTTP exporter.

Export is the SDK's batching: `write` puts the record on a queue and returns; a worker thread sends
batches. A collector that is down or slow costs a failed batch now and then, never a request's time
(a full queue drops records; the audit log still has every verdict), and shutdown waits at most
SHUTDOWN_SECONDS. The SDK is imported only here, and this module only when OTLP is asked for: jail's
start-up does not pay for it otherwise.

Endpoint, headers, resource and timeouts come from the usual `OTEL_*` variables (read by the SDK);
`--otlp-endpoint URL` sets the base URL for both signals, as OTEL_EXPORTER_OTLP_ENDPOINT does.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import trace
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from jail import __version__
from jail.audit import Keep, Record

# jail's exit waits this long at most for the last batches.
SHUTDOWN_SECONDS = 2.0
SCOPE = "jail"
logger = logging.getLogger("jail.otlp")

# Audit record fields with a semantic-convention name; every other field is `jail.<field>`.
SEMANTIC_NAMES = {
    "method": "http.request.method",
    "scheme": "url.scheme",
    "host": "server.address",
    "port": "server.port",
    "path": "url.path",
    "requester_ip": "client.address",
    "status": "http.response.status_code",
    "decision": "jail.verdict",
    "jail_id": "jail.id",
}
# Fields that are the record's timestamp, or are handled on their own below.
NOT_ATTRIBUTES = {"time", "url", "query", "headers"}


def without_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def attribute_value(value: Any) -> Any:
    """An OTLP attribute value: scalars and lists of strings as they are, anything else as JSON."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return json.dumps(value, sort_keys=True)


def record_attributes(fields: Mapping[str, Any], include_details: bool) -> dict[str, Any]:
    """The audit record's fields under semantic-convention names where they exist and `jail.*` for the
    rest, so a field the audit record gains is exported too. The query string and header values only
    with `include_details` (--log-header-values), as in the audit log."""
    attributes: dict[str, Any] = {}
    for name, value in fields.items():
        if name in NOT_ATTRIBUTES or value is None or value == "":
            continue
        if name == "status" and not value:
            continue  # no response (a stream, a cut connection): no status code to claim
        attributes[SEMANTIC_NAMES.get(name, f"jail.{name}")] = attribute_value(value)
    url = fields.get("url", "")
    attributes["url.full"] = url if include_details else without_query(url)
    if include_details and fields.get("query"):
        attributes["url.query"] = fields["query"]
    headers = fields.get("headers") or {}
    if isinstance(headers, dict):
        for name, value in headers.items():
            attributes[f"http.request.header.{name}"] = [value]
    else:
        attributes["jail.header_names"] = list(headers)
    return attributes


class FirstProblemOnly(logging.Handler):
    """The SDK warns at every failed batch: a collector that is down would fill jail's stderr. Its first
    warning is passed on to jail's log (with how to see the rest), later ones only with -v."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.shown = False

    def emit(self, record: logging.LogRecord) -> None:
        verbose = logger.isEnabledFor(logging.INFO)
        if self.shown and not verbose:
            return
        if not self.shown and not verbose:
            record.msg = f"OpenTelemetry export: {record.msg} (further export problems: jail -v)"
        self.shown = True
        logger.handle(record)

    @classmethod
    def install(cls) -> None:
        sdk = logging.getLogger("opentelemetry")
        sdk.propagate = False
        sdk.handlers[:] = [cls()]


def _resource() -> Resource:
    """service.name is "jail" unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES say otherwise."""
    return Resource.create({SERVICE_NAME: "jail", SERVICE_VERSION: __version__}).merge(OTELResourceDetector().detect())


def _signal_endpoint(base: str | None, signal: str) -> str | None:
    """With the flag, `base/v1/<signal>`; without, None lets the SDK read its variables
    (OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT/v1/<signal>)."""
    return f"{base.rstrip('/')}/v1/{signal}" if base else None


class OtlpSink:
    """A record sink: each decision a log record, each request that went out a span."""

    keeps = Keep.RECORD

    def __init__(self, endpoint: str | None, profile: str | None = None, include_details: bool = False) -> None:
        self.include_details = include_details
        FirstProblemOnly.install()
        self.profile = profile
        resource = _resource()
        self.logger_provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
        self.logger_provider.add_log_record_processor(
            BatchLogRecordProcessor(OTLPLogExporter(endpoint=_signal_endpoint(endpoint, "logs")))
        )
        self.tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self.tracer_provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=_signal_endpoint(endpoint, "traces")))
        )
        self.logger = self.logger_provider.get_logger(SCOPE, __version__)
        self.tracer = self.tracer_provider.get_tracer(SCOPE, __version__)

    def write(self, record: Record) -> None:
        attributes = record_attributes(record.fields, self.include_details)
        if self.profile:
            attributes["jail.profile"] = self.profile
        started_ns = int(record.started * 1e9)
        context = None
        if record.decision.allow:
            context = trace.set_span_in_context(self._span(record, attributes, started_ns))
        verdict = record.decision.verdict
        self.logger.emit(
            timestamp=started_ns,
            context=context,
            severity_number=SeverityNumber.INFO if verdict == "allow" else SeverityNumber.WARN,
            severity_text="INFO" if verdict == "allow" else "WARN",
            body=f"{verdict} {attributes['http.request.method']} {attributes['url.full']}",
            attributes=attributes,
            event_name="jail.decision",
        )

    def _span(self, record: Record, attributes: dict[str, Any], started_ns: int) -> trace.Span:
        """The request as it went out (allowed, or let through in audit mode), with its duration."""
        span = self.tracer.start_span(
            attributes["http.request.method"], kind=SpanKind.CLIENT, attributes=attributes, start_time=started_ns
        )
        if record.outcome.error or record.outcome.status >= 500:
            span.set_status(Status(StatusCode.ERROR, record.outcome.error or None))
        span.end(end_time=started_ns + int(record.outcome.duration_ms * 1e6))
        return span

    def close(self) -> None:
        """Send what is queued, for SHUTDOWN_SECONDS at most: an unreachable collector never holds jail's exit."""
        done = threading.Thread(target=self._shutdown, name="jail-otlp-shutdown", daemon=True)
        done.start()
        done.join(SHUTDOWN_SECONDS)

    def _shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.logger_provider.shutdown()
