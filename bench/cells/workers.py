"""`jail --server --workers N`: requests/s at c=50 over intercepted HTTPS with 1 and 2 proxy processes,
alternated, with the CPU the load generator and jail took (they share the machine's cores)."""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from bench.cells import Cell
from bench.harness import Bench, BenchError, log
from bench.hey import HeyRun, run_hey
from bench.report import Verdict, fmt, fmt_ms, ratio

CONCURRENCY = 50
# hey on one OS thread: with Go's default of one per core it took 0.29-0.31 of this machine's 2 cores to
# drive 2 workers (0.10-0.22 on one thread, never its limit), cores the system under test then lacked.
HEY_THREADS = 1
WORKER_COUNTS = (1, 2)
TARGET_SPEEDUP = 1.6


def started_pid(bench: Bench) -> int:
    """The process the bench started last (the jail server a cell just started)."""
    return bench.processes.running[-1][1].pid


def jail_processes(pid: int) -> list[Any]:
    """A jail server and its worker processes (psutil)."""
    import psutil

    parent = psutil.Process(pid)
    return [parent, *parent.children(recursive=True)]


def cpu_seconds(processes: list[Any]) -> float:
    import psutil

    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def idle_seconds() -> float:
    """The machine's idle CPU time, all cores."""
    import psutil

    return psutil.cpu_times().idle


def children_cpu_seconds() -> float:
    """CPU of this process's waited-for children: hey's, once each run has ended."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class WorkersRun:
    hey: HeyRun
    hey_cores: float
    jail_cores: float
    # What no process used meanwhile: near 0, the machine was the limit (not jail's processes).
    idle_cores: float
    load_average: float


@dataclass
class WorkersTarget:
    workers: int
    port: int
    pid: int
    runs: list[WorkersRun] = field(default_factory=list)


def median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


class WorkersCell(Cell):
    part = "workers"

    def __init__(self) -> None:
        self.targets_: list[WorkersTarget] = []

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--workers-duration", type=float, help="seconds of hey per worker count and round (default 8, quick 3)"
        )

    def duration(self, bench: Bench) -> float:
        return bench.args.workers_duration or (3.0 if bench.args.quick else 8.0)

    def setup(self, bench: Bench) -> None:
        for count in WORKER_COUNTS:
            system = f"jail --workers {count}"
            port = bench.start_jail_server(system, ["--js", "true"], ["--workers", str(count)])
            pid = started_pid(bench)
            self.targets_.append(WorkersTarget(count, port, pid))
        for target in self.targets_:  # warm-up: connections, leaf certificates, each worker's caches
            run = run_hey(
                bench.tools["hey"], bench.upstream().url("https", "/"), 2, CONCURRENCY, target.port, HEY_THREADS
            )
            if run.failure or run.bad or not run.total:
                raise BenchError(f"warm-up of --workers {target.workers} failed: {run.failure or run.statuses}")

    def measure(self, bench: Bench, round_index: int) -> None:
        # Alternated, and each round starts with the other one.
        order = self.targets_ if round_index % 2 == 0 else self.targets_[::-1]
        for target in order:
            if not bench.within_budget():
                break
            processes = jail_processes(target.pid)
            jail_before, hey_before, idle_before = cpu_seconds(processes), children_cpu_seconds(), idle_seconds()
            started = time.monotonic()
            url = bench.upstream().url("https", "/")
            run = run_hey(bench.tools["hey"], url, self.duration(bench), CONCURRENCY, target.port, HEY_THREADS)
            wall = time.monotonic() - started
            measured = WorkersRun(
                run,
                hey_cores=(children_cpu_seconds() - hey_before) / wall,
                jail_cores=(cpu_seconds(processes) - jail_before) / wall,
                idle_cores=(idle_seconds() - idle_before) / wall,
                load_average=os.getloadavg()[0],
            )
            target.runs.append(measured)
            shown = f"{run.rps:7.0f} req/s p99 {fmt_ms(run.p99_s)} ms" if run.rps is not None else run.failure
            log(
                f"round {round_index + 1}: --workers {target.workers} https c={CONCURRENCY} {shown}, "
                f"hey {measured.hey_cores:.2f} cores, jail {measured.jail_cores:.2f} cores, "
                f"idle {measured.idle_cores:.2f} cores, "
                f"load {measured.load_average:.2f}" + (f", {run.bad} not 200" if run.bad else "")
            )

    def results(self, bench: Bench) -> dict[str, Any]:
        rows = [
            {
                "workers": target.workers,
                "median_rps": median([run.hey.rps for run in target.runs]),
                "median_p99_ms": median([run.hey.p99_s * 1000 if run.hey.p99_s else None for run in target.runs]),
                "median_hey_cores": median([run.hey_cores for run in target.runs]),
                "median_jail_cores": median([run.jail_cores for run in target.runs]),
                "median_idle_cores": median([run.idle_cores for run in target.runs]),
                # What jail's processes serve per core they got: flat from 1 to 2 workers means the workers
                # scale with the CPU they are given, whatever else the machine runs.
                "median_rps_per_jail_core": median(
                    [run.hey.rps / run.jail_cores if run.hey.rps and run.jail_cores else None for run in target.runs]
                ),
                "rounds_rps": [run.hey.rps for run in target.runs],
                "load_averages": [run.load_average for run in target.runs],
                "not_200_total": sum(run.hey.bad for run in target.runs),
            }
            for target in self.targets_
        ]
        by_count = {row["workers"]: row["median_rps"] for row in rows}
        per_core = {row["workers"]: row["median_rps_per_jail_core"] for row in rows}
        return {
            "concurrency": CONCURRENCY,
            "duration_s": self.duration(bench),
            "cores": os.cpu_count(),
            "rows": rows,
            "speedup_2_vs_1": ratio(by_count.get(2), by_count.get(1)),
            "per_core_2_vs_1": ratio(per_core.get(2), per_core.get(1)),
        }

    def targets(self, results: dict[str, Any]) -> list[Verdict]:
        return [
            Verdict.at_least(
                f"workers: 2 / 1 worker req/s, HTTPS intercepted, c={results['concurrency']}",
                results["speedup_2_vs_1"],
                TARGET_SPEEDUP,
                "x",
            )
        ]

    def markdown(self, results: dict[str, Any]) -> list[str]:
        if not results["rows"]:
            return []
        out = [
            f"**Workers** (`jail --server --js true --workers N`, `GOMAXPROCS={HEY_THREADS} hey -c "
            f"{results['concurrency']}` keep-alive over "
            f"intercepted HTTPS to nginx, {results['duration_s']:g} s per run, 1 and 2 workers alternated, medians; "
            f"hey runs on the same {results['cores']} cores: its CPU is shown)",
            "",
            "| workers | median req/s | p99 ms | hey cores | jail cores | idle cores | req/s per jail core "
            "| per round req/s | load average |",
            "|--:|--:|--:|--:|--:|--:|--:|---|---|",
        ]
        for row in results["rows"]:
            rounds = " ".join(f"{v:.0f}" for v in row["rounds_rps"] if v is not None)
            loads = " ".join(f"{v:.2f}" for v in row["load_averages"])
            out.append(
                f"| {row['workers']} | {fmt(row['median_rps'], '.0f')} | {fmt(row['median_p99_ms'], '.1f')} | "
                f"{fmt(row['median_hey_cores'], '.2f')} | {fmt(row['median_jail_cores'], '.2f')} | "
                f"{fmt(row['median_idle_cores'], '.2f')} | {fmt(row['median_rps_per_jail_core'], '.0f')} | "
                f"{rounds} | {loads} |"
            )
        out.append(
            f"\n2 workers / 1 worker: {fmt(results['speedup_2_vs_1'], '.2f')}x in req/s, "
            f"{fmt(results['per_core_2_vs_1'], '.2f')}x in req/s per core jail's processes got."
        )
        return [*out, ""]
