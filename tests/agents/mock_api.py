"""Local stand-ins for the model APIs the agents talk to: OpenAI Responses (Codex), Anthropic Messages
(Claude Code) and Gemini generateContent (Gemini CLI). Each answers every turn with one fixed text and
records every request it receives, so a test can tell an answered turn from one that never left the jail."""

from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ANSWER = "MOCK-ANSWER-42"


def _sse(events: list[tuple[str | None, dict]]) -> bytes:
    lines = []
    for name, data in events:
        if name:
            lines.append(f"event: {name}")
        lines.append(f"data: {json.dumps(data)}\n")
    return ("\n".join(lines) + "\n").encode()


class Dialect:
    """How one vendor's API answers a turn."""

    def answer(self, method: str, path: str, body: dict) -> tuple[int, str, bytes]:
        raise NotImplementedError


class OpenAIResponses(Dialect):
    def answer(self, method: str, path: str, body: dict) -> tuple[int, str, bytes]:
        if method == "GET" and path.split("?")[0].endswith("/models"):
            return 200, "application/json", json.dumps({"object": "list", "data": [], "models": []}).encode()
        if not path.split("?")[0].endswith("/responses"):
            return 404, "application/json", b'{"error": {"message": "not mocked"}}'
        message = {
            "type": "message",
            "role": "assistant",
            "id": "msg_mock",
            "content": [{"type": "output_text", "text": ANSWER, "annotations": []}],
        }
        usage = {
            "input_tokens": 1,
            "input_tokens_details": None,
            "output_tokens": 1,
            "output_tokens_details": None,
            "total_tokens": 2,
        }
        events = [
            ("response.created", {"type": "response.created", "response": {"id": "resp_mock"}}),
            ("response.output_item.done", {"type": "response.output_item.done", "item": message}),
            ("response.completed", {"type": "response.completed", "response": {"id": "resp_mock", "usage": usage}}),
        ]
        return 200, "text/event-stream", _sse(events)


class AnthropicMessages(Dialect):
    def answer(self, method: str, path: str, body: dict) -> tuple[int, str, bytes]:
        route = path.split("?")[0]
        if route.endswith("/count_tokens"):
            return 200, "application/json", b'{"input_tokens": 1}'
        if not route.endswith("/v1/messages"):
            return 404, "application/json", b'{"type": "error", "error": {"type": "not_found_error", "message": "x"}}'
        usage = {"input_tokens": 1, "output_tokens": 1}
        message = {
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "mock"),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        if not body.get("stream"):
            whole = {**message, "content": [{"type": "text", "text": ANSWER}], "stop_reason": "end_turn"}
            return 200, "application/json", json.dumps(whole).encode()
        events = [
            ("message_start", {"type": "message_start", "message": message}),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ANSWER}},
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": usage},
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        return 200, "text/event-stream", _sse(events)


class GeminiGenerate(Dialect):
    def answer(self, method: str, path: str, body: dict) -> tuple[int, str, bytes]:
        route = path.split("?")[0]
        if route.endswith(":countTokens"):
            return 200, "application/json", b'{"totalTokens": 1}'
        if not route.endswith("Content"):
            return 404, "application/json", b'{"error": {"code": 404, "message": "not mocked"}}'
        wants_json = (body.get("generationConfig") or {}).get("responseMimeType") == "application/json"
        # Gemini CLI's model router asks for JSON first; a valid verdict keeps its stderr clean.
        verdict = {"complexity_reasoning": ANSWER, "complexity_score": 1, "reasoning": ANSWER, "model_choice": "flash"}
        text = json.dumps(verdict) if wants_json else ANSWER
        chunk = {
            "candidates": [
                {"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP", "index": 0}
            ],
            "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1, "totalTokenCount": 2},
        }
        if route.endswith(":streamGenerateContent"):
            return 200, "text/event-stream", _sse([(None, chunk)])
        return 200, "application/json", json.dumps(chunk).encode()


@dataclass
class MockAPI:
    """One HTTPS mock on ADDRESS:port, answering in one dialect; `requests` lists what reached it."""

    server: ThreadingHTTPServer
    name: str
    requests: list[dict] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def base(self) -> str:
        suffix = "" if self.port == 443 else f":{self.port}"
        return f"https://{self.name}{suffix}"

    def paths(self) -> list[str]:
        return [r["path"] for r in self.requests]

    def bodies(self, since: int = 0) -> str:
        return "\n".join(r["body"] for r in self.requests[since:])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_mock(dialect: Dialect, address: str, name: str, context: ssl.SSLContext, port: int = 443) -> MockAPI:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _respond(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = {}
            text = raw.decode(errors="replace")
            mock.requests.append(
                {"method": self.command, "path": self.path, "host": self.headers.get("host"), "body": text}
            )
            status, kind, payload = dialect.answer(self.command, self.path, body if isinstance(body, dict) else {})
            self.send_response(status)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _respond

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True

        def get_request(self):  # type: ignore[no-untyped-def]
            sock, address = super().get_request()
            return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    server = Server((address, port), Handler)
    mock = MockAPI(server, name)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return mock
