"""hey, the load generator of the per-request cells: one run, its summary parsed."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

from bench.harness import PROXY_HOST, clean_environment

HEY_REQUEST_TIMEOUT_S = 10  # hey -t: one request may take at most this long
HEY_RUN_TIMEOUT_S = 60  # one hey run is killed after this long


@dataclass
class HeyRun:
    rps: float | None
    ok: int = 0
    total: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    p50_s: float | None = None
    p99_s: float | None = None
    failure: str = ""

    @property
    def bad(self) -> int:
        return self.total - self.ok


def parse_hey(text: str) -> HeyRun:
    """hey's summary: Requests/sec, the latency distribution (50% and 99%), status codes and errors."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    percentiles = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"(\d+)%+ in ([\d.]+) secs", text)}
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("Status code distribution"):
            section = "status"
        elif line.startswith("Error distribution"):
            section = "error"
        elif section == "status" and (m := re.match(r"\s+\[(\d+)\]\s+(\d+) responses", line)):
            statuses[m.group(1)] = statuses.get(m.group(1), 0) + int(m.group(2))
        elif section == "error" and (m := re.match(r"\s+\[(\d+)\]\s+(.*)", line)):
            errors[m.group(2).strip()] = errors.get(m.group(2).strip(), 0) + int(m.group(1))
    return HeyRun(
        rps=float(rps.group(1)) if rps else None,
        ok=statuses.get("200", 0),
        total=sum(statuses.values()) + sum(errors.values()),
        statuses=statuses,
        errors=errors,
        # hey prints 0 for a percentile it has no sample for
        p50_s=percentiles.get(50) or None,
        p99_s=percentiles.get(99) or None,
    )


def run_hey(
    hey: str, url: str, seconds: float, concurrency: int, proxy_port: int | None, threads: int | None = None
) -> HeyRun:
    """hey for `seconds` (-z) at `concurrency`, keep-alive on, through the proxy when a port is given; with
    `threads`, Go runs its goroutines on that many OS threads (GOMAXPROCS)."""
    argv = [hey, "-z", f"{seconds:g}s", "-c", str(concurrency), "-t", str(HEY_REQUEST_TIMEOUT_S)]
    if proxy_port is not None:
        argv += ["-x", f"http://{PROXY_HOST}:{proxy_port}"]
    env = clean_environment() | ({"GOMAXPROCS": str(threads)} if threads else {})
    try:
        done = subprocess.run([*argv, url], capture_output=True, text=True, timeout=HEY_RUN_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return HeyRun(None, failure=f"hey killed after {HEY_RUN_TIMEOUT_S} s")
    result = parse_hey(done.stdout)
    if done.returncode != 0 or result.rps is None:
        result.failure = f"hey exit {done.returncode}: {(done.stderr or done.stdout).strip()[:200]}"
    return result
