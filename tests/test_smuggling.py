"""A request body the client frames one way must reach the upstream framed the same way.

An HTTP/2 request carries its body in DATA frames, with or without a Content-Length. Converted to HTTP/1.1
for an HTTP/1 upstream without either Content-Length or chunked framing, the body would be read by the
upstream as the *next request* on that connection: a request the rule never judged (any method, any path)."""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")

SMUGGLED = "/smuggled-admin"
INNER = f"GET {SMUGGLED} HTTP/1.1\\r\\nHost: 127.0.0.2\\r\\n\\r\\n"


def test_http2_body_without_length_cannot_become_an_unjudged_request(weak_jail, https_upstream):
    # `-T -` uploads stdin, of unknown length: over HTTP/2 curl sends it with no Content-Length.
    script = (
        f"printf '{INNER}' | curl -sS --max-time 20 --http2 -X POST -T - -o /dev/null"
        f" -w '%{{http_version}} %{{http_code}}' {https_upstream.url('/ok')}"
    )
    result = weak_jail("--js", "r.method === 'POST' && r.path === '/ok'", "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "2 200", result.stdout + result.stderr
    paths = [request["path"] for request in https_upstream.requests]
    assert SMUGGLED not in paths, paths
    assert paths == ["/ok"]
    assert https_upstream.requests[0]["body_len"] == len(INNER.replace("\\r\\n", "\r\n"))


def test_http2_requests_keep_their_own_framing(weak_jail, https_upstream):
    sized = f"curl -sS --max-time 20 --http2 -d abc -o /dev/null -w '%{{http_code}} ' {https_upstream.url('/ok')}"
    bare = f"curl -sS --max-time 20 --http2 -o /dev/null -w '%{{http_code}}' {https_upstream.url('/ok')}"
    result = weak_jail("--js", "true", "--", "sh", "-c", f"{sized}; {bare}")
    assert result.stdout == "200 200", result.stdout + result.stderr
    posted, got = https_upstream.requests
    assert posted["headers"]["content-length"] == "3" and "transfer-encoding" not in posted["headers"]
    assert posted["body_len"] == 3
    assert "transfer-encoding" not in got["headers"] and got["body_len"] == 0
