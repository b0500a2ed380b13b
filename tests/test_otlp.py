"""--otlp-endpoint (or the SDK's OTEL_* variables): every decision reaches a real OTLP/HTTP receiver as a
log record, every allowed request as a span; a collector that is down slows nothing and loses nothing
from the audit log."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

SIGNALS = {
    "/v1/logs": (ExportLogsServiceRequest, ExportLogsServiceResponse),
    "/v1/traces": (ExportTraceServiceRequest, ExportTraceServiceResponse),
}
QUERY_SECRET = "token=query-value-77"
HEADER_SECRET = "header-value-55"


def flat_attributes(attributes: list[dict[str, Any]]) -> dict[str, Any]:
    """OTLP KeyValue list (as MessageToDict gives it) to {key: value}."""
    flat: dict[str, Any] = {}
    for item in attributes:
        value = item["value"]
        if "arrayValue" in value:
            flat[item["key"]] = [next(iter(v.values())) for v in value["arrayValue"].get("values", [])]
        else:
            kind, scalar = next(iter(value.items()), ("", None))
            flat[item["key"]] = int(scalar) if kind == "intValue" else scalar
    return flat


@dataclass
class Receiver:
    """An OTLP/HTTP collector on loopback: it decodes what it is sent with opentelemetry-proto."""

    server: ThreadingHTTPServer
    logs: list[dict[str, Any]] = field(default_factory=list)
    spans: list[dict[str, Any]] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self, path: str, body: bytes, headers: dict[str, str]) -> bool:
        if path not in SIGNALS:
            return False
        request_type, _ = SIGNALS[path]
        if headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        message = MessageToDict(request_type.FromString(body))
        self.payloads.append(body)
        self.headers.append(headers)
        for resource in message.get("resourceLogs", []) + message.get("resourceSpans", []):
            owner = flat_attributes(resource["resource"].get("attributes", []))
            for scope in resource.get("scopeLogs", []) + resource.get("scopeSpans", []):
                for item in scope.get("logRecords", []) + scope.get("spans", []):
                    item["attributes"] = flat_attributes(item.get("attributes", []))
                    item["resource"] = owner
                    (self.logs if path == "/v1/logs" else self.spans).append(item)
        return True


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            if not collector.take(self.path, body, {k.lower(): v for k, v in self.headers.items()}):
                self.send_error(404)
                return
            answer = SIGNALS[self.path][1]().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    collector = Receiver(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield collector
    server.shutdown()
    server.server_close()


def two_requests(upstream_url: str) -> str:
    """An allowed request (with a query string and a header value to keep out) and a denied one."""
    return (
        f"curl -s -o /dev/null -H 'X-Api-Key: {HEADER_SECRET}' '{upstream_url}/ok?{QUERY_SECRET}'"
        f" && curl -s -o /dev/null '{upstream_url}/denied?{QUERY_SECRET}'"
    )


RULE = ("--js", "r.path !== '/denied'")


def test_each_decision_is_a_log_record_and_each_allowed_request_a_span(
    weak_jail, receiver: Receiver, http_upstream, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    base = http_upstream.url("")
    result = weak_jail(
        *RULE, "--otlp-endpoint", receiver.endpoint, "--audit-log", str(audit), "--", "sh", "-c", two_requests(base)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert len(receiver.logs) == len(records) == 2
    allowed, denied = sorted(receiver.logs, key=lambda item: int(item["timeUnixNano"]))
    jail_id = records[0]["jail_id"]
    wanted = {
        "http.request.method": "GET",
        "url.full": f"{base}/ok",
        "url.scheme": "http",
        "url.path": "/ok",
        "server.address": "127.0.0.2",
        "server.port": http_upstream.port,
        "client.address": "127.0.0.1",
        "http.response.status_code": 200,
        "jail.id": jail_id,
        "jail.verdict": "allow",
        "jail.engine": "js",
        "jail.rule_us": records[0]["rule_us"],
        "jail.bytes_up": 0,
        "jail.bytes_down": records[0]["bytes_down"],
        "jail.duration_ms": records[0]["duration_ms"],
        "jail.address": "127.0.0.2",
        "jail.header_names": ["accept", "host", "proxy-connection", "user-agent", "x-api-key"],
    }
    assert wanted.items() <= allowed["attributes"].items()
    assert "url.query" not in allowed["attributes"]
    assert denied["attributes"]["jail.verdict"] == "deny"
    assert denied["attributes"]["jail.reason_code"] == "rule_deny"
    assert denied["attributes"]["jail.reason"] == records[1]["reason"]
    assert denied["attributes"]["http.response.status_code"] == 403
    assert denied["attributes"]["url.full"] == f"{base}/denied"
    assert (allowed["severityText"], denied["severityText"]) == ("INFO", "WARN")
    assert allowed["eventName"] == "jail.decision" and allowed["body"]["stringValue"] == f"allow GET {base}/ok"
    assert allowed["resource"]["service.name"] == "jail"
    # Query strings and header values stay out of everything sent.
    for payload in receiver.payloads:
        assert QUERY_SECRET.encode() not in payload and HEADER_SECRET.encode() not in payload
    # One span, for the allowed request, as long as the request took, and its log record points at it.
    [span] = receiver.spans
    assert span["name"] == "GET" and span["kind"] == "SPAN_KIND_CLIENT"
    assert span["attributes"]["url.full"] == f"{base}/ok" and span["attributes"]["jail.verdict"] == "allow"
    duration_ms = (int(span["endTimeUnixNano"]) - int(span["startTimeUnixNano"])) / 1e6
    assert duration_ms == pytest.approx(records[0]["duration_ms"], abs=0.01)
    assert (allowed["traceId"], allowed["spanId"]) == (span["traceId"], span["spanId"])
    assert "traceId" not in denied


def test_the_sdk_variables_turn_export_on_and_shape_it(
    weak_jail, jail_env, receiver: Receiver, http_upstream, tmp_path: Path
) -> None:
    env = {
        **jail_env,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=team-blue",
        "OTEL_SERVICE_NAME": "agents-ci",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
    }
    script = two_requests(http_upstream.url("")) + ' && echo "child sees: ${OTEL_EXPORTER_OTLP_HEADERS:-nothing}"'
    result = weak_jail(*RULE, "--log-header-values", "--", "sh", "-c", script, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    # The collector's credentials are jail's, like its proxy settings: the agent never sees them.
    assert result.stdout.strip() == "child sees: nothing"
    assert len(receiver.logs) == 2 and len(receiver.spans) == 1
    assert all(headers.get("x-tenant") == "team-blue" for headers in receiver.headers)
    resource = receiver.logs[0]["resource"]
    assert (resource["service.name"], resource["deployment.environment"]) == ("agents-ci", "test")
    # --log-header-values: the query and the header values go too, as in the audit log.
    attributes = next(log["attributes"] for log in receiver.logs if log["attributes"]["jail.verdict"] == "allow")
    assert attributes["url.full"].endswith(f"/ok?{QUERY_SECRET}") and attributes["url.query"] == QUERY_SECRET
    assert attributes["http.request.header.x-api-key"] == [HEADER_SECRET]


def test_explain_names_the_collector(run_jail, jail_env) -> None:
    result = run_jail("--explain", "--js", "true", "--otlp-endpoint", "http://collector:4318", "--", "true")
    assert "OpenTelemetry: a log record per decision, a span per allowed request, to http://collector:4318" in (
        result.stdout
    )
    result = run_jail("--explain", "--js", "true", "--", "true", env={**jail_env, "OTEL_EXPORTER_OTLP_ENDPOINT": "x"})
    assert "the OTEL_EXPORTER_OTLP_* endpoint" in result.stdout
    assert "OpenTelemetry" not in run_jail("--explain", "--js", "true", "--", "true").stdout


# A load through `jail --server`: the same 1,000 requests without export and with a collector that is down.
LOAD = 1000
CLIENTS = 4


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed when the block ends: connections are refused


def run_load(jail_server, http_upstream, audit: Path, *flags: str) -> tuple[float, float]:
    """(seconds for LOAD requests, seconds jail took to exit after SIGTERM)."""
    server = jail_server("--js", "true", "--audit-log", str(audit), *flags)
    url = http_upstream.url("/bytes/64")

    def client(count: int) -> None:
        with httpx.Client(proxy=server.proxy_url, timeout=30) as session:
            for _ in range(count):
                assert session.get(url).status_code == 200

    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, [LOAD // CLIENTS] * CLIENTS))
    elapsed = time.monotonic() - started
    stopping = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(30)
    return elapsed, time.monotonic() - stopping


def test_a_collector_that_is_down_costs_no_time_and_no_verdict(jail_server, http_upstream, tmp_path: Path) -> None:
    plain, plain_exit = run_load(jail_server, http_upstream, tmp_path / "plain.jsonl")
    down = f"http://127.0.0.1:{closed_port()}"
    exported, exported_exit = run_load(jail_server, http_upstream, tmp_path / "down.jsonl", "--otlp-endpoint", down)
    print(f"\n{LOAD} requests: {plain:.2f} s without export, {exported:.2f} s with the collector down;")
    print(f"exit after SIGTERM: {plain_exit:.2f} s without, {exported_exit:.2f} s with")
    assert exported < 1.5 * plain + 2
    assert exported_exit < plain_exit + 3  # the last batch is given up after 2 s at most
    records = [json.loads(line) for line in (tmp_path / "down.jsonl").read_text().splitlines()]
    decisions = [record["decision"] for record in records if "decision" in record]  # not other kinds of record
    assert decisions == ["allow"] * LOAD


def test_the_sdk_is_not_imported_without_otlp() -> None:
    """jail's start-up does not pay for OpenTelemetry unless asked."""
    probe = "import sys, jail.cli, jail.session; print(any(m.startswith('opentelemetry') for m in sys.modules))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, text=True, capture_output=True)
    assert out.stdout.strip() == "False", out.stderr
