"""Hold a crowd: 200 concurrent clients through one `jail --server` for a minute, over intercepted HTTPS,
keep-alive and new connections mixed, some of them denied by the rule. No errors but the denials, p99, no
file-descriptor or memory growth between the first and the last 10 s, every request in the audit log once."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.cells import Cell
from bench.cells.workers import jail_processes, started_pid
from bench.harness import PROXY_HOST, Bench, BenchError, clean_environment, log
from bench.hey import HEY_REQUEST_TIMEOUT_S, HeyRun, parse_hey
from bench.report import Verdict, fmt

SYSTEM = "jail --server (crowd)"
RULE = "r.query !== 'crowd=deny'"
WARMUP_S = 8.0
SAMPLE_S = 1.0
WINDOW_S = 10.0
# Allowed growth from the first to the last 10 s (medians of the samples).
TARGET_FD_GROWTH = 10
TARGET_RSS_GROWTH_MB = 10.0


@dataclass(frozen=True)
class Stream:
    """One hey in the crowd: its clients, whether each keeps its connection, its query (which the audit
    records tell apart), the status expected."""

    name: str
    concurrency: int
    keepalive: bool
    query: str
    status: str


STREAMS = (
    Stream("keep-alive", 140, True, "crowd=keep", "200"),
    Stream("new connection per request", 40, False, "crowd=new", "200"),
    Stream("denied by the rule", 20, True, "crowd=deny", "403"),
)


@dataclass
class Sample:
    at: float
    fds: int
    rss: int


@dataclass
class Usage:
    """The jail processes' open descriptors and resident memory, sampled in a thread."""

    pid: int
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        import psutil

        started = time.monotonic()
        while not self._stop.wait(SAMPLE_S):
            fds = rss = 0
            for process in jail_processes(self.pid):
                with contextlib.suppress(psutil.Error):
                    fds += process.num_fds()
                    rss += process.memory_info().rss
            self.samples.append(Sample(time.monotonic() - started, fds, rss))

    def stop(self) -> None:
        self._stop.set()

    def window(self, first: bool) -> list[Sample]:
        if not self.samples:
            return []
        end = self.samples[-1].at
        return [s for s in self.samples if (s.at <= WINDOW_S if first else s.at >= end - WINDOW_S)]


class CrowdCell(Cell):
    part = "crowd"

    def __init__(self) -> None:
        self.result: dict[str, Any] = {}

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--crowd-seconds", type=float, help="length of the crowd (default 60, quick 25)")
        parser.add_argument("--crowd-workers", default="1", help="--workers of the crowd's jail (default 1)")

    def seconds(self, bench: Bench) -> float:
        return bench.args.crowd_seconds or (25.0 if bench.args.quick else 60.0)

    def setup(self, bench: Bench) -> None:
        self.audit = bench.workdir / "crowd-audit.jsonl"
        extra = ["--workers", bench.args.crowd_workers, "--audit-log", str(self.audit)]
        self.port = bench.start_jail_server(SYSTEM, ["--js", RULE], extra)
        self.pid = started_pid(bench)
        # Warm-up by the crowd itself: jail's memory grows to its working set for 200 clients in the first
        # seconds (buffers, certificates), which is not the growth the measured minute looks for.
        for stream, run in zip(STREAMS, self._crowd(bench, WARMUP_S), strict=True):
            if run.failure or set(run.statuses) != {stream.status}:
                raise BenchError(f"crowd warm-up ({stream.name}) failed: {run.failure or run.statuses} {run.errors}")
        # The audit log keeps the measured crowd's records only: jail appends (O_APPEND) at the new end.
        time.sleep(1)
        os.truncate(self.audit, 0)

    def _crowd(self, bench: Bench, seconds: float) -> list[HeyRun]:
        """Every stream at once for `seconds`; hey's summaries."""
        heys = [self._start_hey(bench, stream, seconds) for stream in STREAMS]
        return [parse_hey(hey.communicate(timeout=seconds + 4 * HEY_REQUEST_TIMEOUT_S)[0]) for hey in heys]

    def measure(self, bench: Bench, round_index: int) -> None:
        if round_index > 0 or not bench.within_budget():
            return  # one crowd per run: a minute, and its audit log is the check
        seconds = self.seconds(bench)
        usage = Usage(self.pid)
        sampler = threading.Thread(target=usage.run, name="crowd-usage", daemon=True)
        load_before = os.getloadavg()[0]
        sampler.start()
        runs = self._crowd(bench, seconds)
        usage.stop()
        sampler.join()
        time.sleep(1)  # the last records of requests hey gave up on
        self.result = self._judge(runs, usage, seconds, load_before)
        for stream, row in zip(STREAMS, self.result["streams"], strict=True):
            log(
                f"crowd: {stream.name} c={stream.concurrency}: {row['rps']:.0f} req/s p99 {fmt(row['p99_ms'], '.0f')} ms, "
                f"statuses {row['statuses']}, errors {row['errors'] or 0}, audit {row['audit_records']}"
            )
        log(
            f"crowd: fds {self.result['fds_first']} -> {self.result['fds_last']}, RSS "
            f"{self.result['rss_first_mb']:.0f} -> {self.result['rss_last_mb']:.0f} MB"
        )

    def _start_hey(self, bench: Bench, stream: Stream, seconds: float) -> subprocess.Popen[str]:
        argv = [bench.tools["hey"], "-z", f"{seconds:g}s", "-c", str(stream.concurrency)]
        argv += ["-t", str(HEY_REQUEST_TIMEOUT_S), "-x", f"http://{PROXY_HOST}:{self.port}"]
        if not stream.keepalive:
            argv.append("-disable-keepalive")
        argv.append(bench.upstream().url("https", f"/?{stream.query}"))
        return subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_environment()
        )

    def _judge(self, runs: list[HeyRun], usage: Usage, seconds: float, load_before: float) -> dict[str, Any]:
        queries: Counter[str] = Counter()
        whole = torn = 0
        for line in self.audit.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                torn += 1
                continue
            whole += 1
            queries[record.get("query", "")] += 1
        streams = []
        for stream, run in zip(STREAMS, runs, strict=True):
            answered = sum(run.statuses.values())
            streams.append(
                {
                    "name": stream.name,
                    "concurrency": stream.concurrency,
                    "keepalive": stream.keepalive,
                    "rps": run.rps or 0.0,
                    "p50_ms": run.p50_s * 1000 if run.p50_s else None,
                    "p99_ms": run.p99_s * 1000 if run.p99_s else None,
                    "statuses": run.statuses,
                    "errors": run.errors,
                    "unexpected": answered - run.statuses.get(stream.status, 0) + sum(run.errors.values()),
                    "answered": answered,
                    "audit_records": queries[stream.query],
                }
            )
        first, last = usage.window(first=True), usage.window(first=False)

        def mid(samples: list[Sample], value: str) -> float:
            return statistics.median(getattr(s, value) for s in samples) if samples else 0.0

        return {
            "seconds": seconds,
            "clients": sum(stream.concurrency for stream in STREAMS),
            "streams": streams,
            "audit_lines": whole,
            "audit_torn_lines": torn,
            "audit_missing_or_extra": sum(abs(row["answered"] - row["audit_records"]) for row in streams),
            "fds_first": mid(first, "fds"),
            "fds_last": mid(last, "fds"),
            "rss_first_mb": mid(first, "rss") / 2**20,
            "rss_last_mb": mid(last, "rss") / 2**20,
            "samples": [(round(s.at, 1), s.fds, s.rss) for s in usage.samples],
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
        }

    def results(self, bench: Bench) -> dict[str, Any]:
        return {**self.result, "workers": bench.args.crowd_workers} if self.result else {}

    def targets(self, results: dict[str, Any]) -> list[Verdict]:
        if not results:
            return []
        clients = results["clients"]
        unexpected = sum(row["unexpected"] for row in results["streams"])
        return [
            Verdict.at_most(f"crowd of {clients}: answers other than the rule's (errors, timeouts)", unexpected, 0, ""),
            Verdict.at_most(
                f"crowd of {clients}: requests missing from or extra in the audit log",
                results["audit_missing_or_extra"] + results["audit_torn_lines"],
                0,
                "",
            ),
            Verdict.at_most(
                f"crowd of {clients}: open fds, last 10 s - first 10 s",
                results["fds_last"] - results["fds_first"],
                TARGET_FD_GROWTH,
                "",
            ),
            Verdict.at_most(
                f"crowd of {clients}: RSS, last 10 s - first 10 s",
                results["rss_last_mb"] - results["rss_first_mb"],
                TARGET_RSS_GROWTH_MB,
                "MB",
            ),
        ]

    def markdown(self, results: dict[str, Any]) -> list[str]:
        if not results:
            return []
        out = [
            f"**Crowd** ({results['clients']} concurrent hey clients for {results['seconds']:g} s through one "
            f'`jail --server --workers {results["workers"]} --js "{RULE}" --audit-log`, intercepted HTTPS to nginx; '
            f"load average {results['load_average_before']:.2f} before, {results['load_average_after']:.2f} after)",
            "",
            "| clients | connections | expected | req/s | p50 ms | p99 ms | statuses | errors | audit records |",
            "|--:|---|--:|--:|--:|--:|---|---|--:|",
        ]
        for row, stream in zip(results["streams"], STREAMS, strict=True):
            errors = ", ".join(f"{count} {text}" for text, count in row["errors"].items()) or "none"
            statuses = ", ".join(f"{code}: {count}" for code, count in row["statuses"].items())
            out.append(
                f"| {row['concurrency']} | {'kept' if row['keepalive'] else 'new per request'} | {stream.status} | "
                f"{row['rps']:.0f} | {fmt(row['p50_ms'], '.0f')} | {fmt(row['p99_ms'], '.0f')} | {statuses} | "
                f"{errors} | {row['audit_records']} |"
            )
        out.append(
            f"\nOpen fds (all jail processes, medians): {results['fds_first']:.0f} in the first 10 s, "
            f"{results['fds_last']:.0f} in the last; RSS {results['rss_first_mb']:.0f} MB then "
            f"{results['rss_last_mb']:.0f} MB. Audit log: {results['audit_lines']} whole lines, "
            f"{results['audit_torn_lines']} torn."
        )
        return [*out, ""]
