"""What the per-request and rule cells ask of each system: the 20 host/path conditions, and the same rule
as JS, a policy file, a mitmdump addon and a Python reference; varied requests for the rule cost."""

from __future__ import annotations

import json
import random
from typing import Any

UPSTREAM_HOST = "127.0.0.2"

# The "realistic" rule: 20 host + path-prefix conditions, the benchmark's upstream last, so that every
# measured request is checked against all 20. The JS rule, the policy file and the mitmdump addon are
# all generated from this one list and must agree (checked in-process on the varied requests).
CONDITIONS: list[tuple[str, str]] = [
    ("pypi.org", "/simple/"),
    ("files.pythonhosted.org", "/packages/"),
    ("registry.npmjs.org", "/"),
    ("github.com", "/myorg/"),
    ("api.github.com", "/repos/myorg/"),
    ("codeload.github.com", "/myorg/"),
    ("objects.githubusercontent.com", "/github-production-release-asset-"),
    ("proxy.golang.org", "/"),
    ("sum.golang.org", "/lookup/"),
    ("index.crates.io", "/"),
    ("static.crates.io", "/crates/"),
    ("deb.debian.org", "/debian/"),
    ("security.debian.org", "/debian-security/"),
    ("api.openai.com", "/v1/"),
    ("api.anthropic.com", "/v1/"),
    ("registry-1.docker.io", "/v2/"),
    ("auth.docker.io", "/token"),
    ("production.cloudflare.docker.com", "/registry-v2/"),
    ("huggingface.co", "/api/models/"),
    (UPSTREAM_HOST, "/"),
]

JS_ALLOW_ALL = "true"
JS_REALISTIC = " ||\n".join(
    f"(r.host === {json.dumps(h)} && r.path.startsWith({json.dumps(p)}))" for h, p in CONDITIONS
)
SH_RULE = 'test "$JAIL_METHOD" = GET'


def policy_toml() -> str:
    lines = ['default = "deny"', ""]
    for index, (host, path) in enumerate(CONDITIONS, 1):
        lines += ["[[rule]]", f'name = "c{index}"', 'action = "allow"', f"host = {json.dumps(host)}"]
        lines += [f"path = {json.dumps(path)}", ""]
    return "\n".join(lines)


MITMDUMP_ADDON = """\
from mitmproxy import http

CONDITIONS = {conditions!r}


class Gate:
    \"\"\"Allow by the same 20 host/path-prefix conditions as the JS rule; 403 otherwise.\"\"\"

    def request(self, flow: http.HTTPFlow) -> None:
        host = flow.request.host.lower()
        path = flow.request.path.split("?", 1)[0]
        for allowed_host, prefix in CONDITIONS:
            if host == allowed_host and path.startswith(prefix):
                return
        flow.response = http.Response.make(403, b"denied\\n", {{"Content-Type": "text/plain"}})


addons = [Gate()]
"""

# The --proc rule program: one line in, `true` out, until its input closes.
PROC_RULE_SOURCE = """\
import sys
for _ in sys.stdin:
    sys.stdout.write("true\\n")
    sys.stdout.flush()
"""


def reference_allows(host: str, path: str) -> bool:
    return any(host == h and path.startswith(p) for h, p in CONDITIONS)


def varied_requests(count: int, seed: int = 7) -> list[Any]:
    """`count` different Requests: hosts that the realistic rule allows and ones it does not, matching and
    non-matching paths, four methods, queries and headers. The same list for every engine."""
    from jail.model import Request

    rng = random.Random(seed)
    other_hosts = [
        "evil.example",
        "api.github.com.evil.example",
        "pypi.org.attacker.net",
        "example.com",
        "10.0.0.7",
        "metadata.google.internal",
        "cdn.jsdelivr.net",
        "www.google.com",
    ]
    other_paths = ["/", "/login", "/upload", "/api/v2/items", "/simple", "/v1", "/static/app.js"]
    requests = []
    for index in range(count):
        host, prefix = rng.choice(CONDITIONS)
        if rng.random() < 0.3:
            host = rng.choice(other_hosts)
        path = prefix + rng.choice(["", f"pkg-{index}/", f"a/b/c-{index}.tar.gz", "x"])
        if rng.random() < 0.2:
            path = rng.choice(other_paths)
        scheme = rng.choice(["https", "https", "https", "http"])
        requests.append(
            Request.build(
                rng.choice(["GET", "GET", "GET", "HEAD", "POST", "PUT"]),
                scheme,
                host,
                None,
                path,
                query=rng.choice(["", "", f"page={index}", "q=a%20b&x=1"]),
                headers={"User-Agent": "bench/1.0", "Accept": "*/*", "X-Request-Id": str(index)},
                requester_ip="127.0.0.1",
            )
        )
    return requests
