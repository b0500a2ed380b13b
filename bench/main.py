"""`python bench/run.py`: the arguments, the tools, and the rounds that alternate the cells."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.cells import Cell, all_cells
from bench.harness import INSTALL_HINT, UPSTREAM_HOST, Bench, BenchError, log, machine_info
from bench.report import ReportError, draw_chart, markdown

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_PATH = BENCH_DIR / "results-latest.json"

# Per part, the tools it cannot run without (nginx is every measured part's upstream).
TOOLS = {
    "load": ["nginx", "hey", "tinyproxy", "mitmdump"],
    "bulk": ["nginx", "curl", "mitmdump", "tinyproxy"],
    "workers": ["nginx", "hey"],
    "crowd": ["nginx", "hey"],
}


def find_tools(parts: set[str]) -> dict[str, str]:
    def sbin(name: str) -> str | None:
        # mitmdump sits beside this Python in a virtualenv that is not on PATH
        beside = str(Path(sys.executable).parent / name)
        return shutil.which(name) or next(
            (
                p
                for p in (beside, f"/usr/sbin/{name}", f"/usr/local/sbin/{name}", f"/usr/bin/{name}")
                if os.access(p, os.X_OK)
            ),
            None,
        )

    needed = sorted({"nginx", *(tool for part in parts for tool in TOOLS.get(part, []))})
    found = {name: sbin(name) for name in needed}
    missing = [name for name, path in found.items() if not path]
    if missing:
        sys.exit(
            f"bench: missing {', '.join(missing)}; install with: {INSTALL_HINT} (Debian/Ubuntu; run apt-get update "
            "first); mitmdump comes with jail's mitmproxy dependency"
        )
    for module, hint in (("trustme", "pip install trustme"), ("psutil", "pip install psutil")):
        try:
            __import__(module)
        except ImportError:
            sys.exit(f"bench: the {module} package is missing; install with: {hint} (or pip install -e '.[test]')")
    try:
        with socket.socket() as sock:
            sock.bind((UPSTREAM_HOST, 0))
    except OSError as exc:
        sys.exit(f"bench: cannot bind {UPSTREAM_HOST} ({exc}); this benchmark needs Linux's whole 127.0.0.0/8 loopback")
    return {name: path for name, path in found.items() if path}


# flag: (full run, --quick)
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "rounds": (3, 1),
    "duration": (2.0, 1.0),
    "startup_runs": (5, 3),
    "rule_requests": (10000, 2000),
    "shell_requests": (1000, 200),
    "budget": (900.0, 240.0),
    "bulk_size": (1024, 128),
}


def parse_args(argv: list[str], cells: list[type[Cell]]) -> argparse.Namespace:
    parts = [cell.part for cell in cells]
    parser = argparse.ArgumentParser(
        description="Benchmark jail against direct, mitmdump and tinyproxy: rule cost, start-up, per-request "
        "cost and memory, bulk transfers. About 8 minutes on 2 cores; --quick about 2."
    )
    parser.add_argument("--quick", action="store_true", help="1 round, short cells, fewer decisions and starts")
    parser.add_argument("--rounds", type=int, help="rounds of every part (default 3, quick 1)")
    parser.add_argument(
        "--only", nargs="+", choices=parts, default=parts, help="measure only these parts (default: all)"
    )
    parser.add_argument("--budget", type=float, help="start no measurement after this many s (default 900, quick 240)")
    parser.add_argument("--chart", type=Path, metavar="PNG", help="also draw a bar chart (needs matplotlib)")
    for cell in cells:
        cell.add_arguments(parser)
    args = parser.parse_args(argv)
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("rounds", "startup_runs", "rule_requests", "shell_requests", "bulk_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.duration <= 0 or args.warmup <= 0 or min(args.concurrency) < 1:
        parser.error("--duration, --warmup and --concurrency must be positive")
    args.parts = set(args.only)
    return args


def run(bench: Bench, cells: list[Cell]) -> dict[str, Any]:
    load_at_start = os.getloadavg()[0]
    for cell in cells:
        cell.setup(bench)
    log(f"setup done in {bench.elapsed():.1f} s")
    for round_index in range(bench.args.rounds):
        for cell in cells:
            if bench.within_budget():
                cell.measure(bench, round_index)
    bench.rss.stop()
    machine = machine_info(bench.tools)
    machine["load_average_start"] = load_at_start
    results: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "params": {
            "quick": bench.args.quick,
            "parts": [cell.part for cell in cells],
            "rounds": bench.args.rounds,
            "jail_command": bench.jail,
            "mitmdump_command": bench.mitmdump,
        },
        "cells": {cell.part: cell.results(bench) for cell in cells},
        "elapsed_s": round(bench.elapsed(), 1),
        "complete": not bench.out_of_time,
        "notes": bench.notes,
    }
    results["targets"] = [verdict.as_dict() for cell in cells for verdict in cell.targets(results["cells"][cell.part])]
    return results


def raise_exit(signum: int, _frame: Any) -> None:
    log(f"stopped by {signal.Signals(signum).name}; cleaning up")
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    cell_types = all_cells()
    args = parse_args(argv, cell_types)
    tools = find_tools(args.parts)
    cells = [cell() for cell in cell_types if cell.part in args.parts]
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_exit)
    workdir = Path(tempfile.mkdtemp(prefix="jail-bench-"))
    bench = Bench(args, tools, workdir)
    status = 0
    try:
        results = run(bench, cells)
        RESULTS_PATH.write_text(json.dumps(results, indent=2) + "\n")
        print(markdown(results, cells))
        print(f"results written to {RESULTS_PATH} (untracked; do not commit)")
        if args.chart:
            draw_chart(results, args.chart)
            print(f"chart written to {args.chart}")
    except (BenchError, ReportError) as exc:
        log(f"error: {exc}")
        status = 1
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return status
