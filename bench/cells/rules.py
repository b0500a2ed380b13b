"""Rule cost: microseconds per `Judge.decide` for each engine, in this process, one decision at a time."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.cells import Cell
from bench.harness import Bench, log
from bench.report import Verdict
from bench.workload import (
    JS_ALLOW_ALL,
    JS_REALISTIC,
    PROC_RULE_SOURCE,
    SH_RULE,
    policy_toml,
    reference_allows,
    varied_requests,
)


async def time_engine(spec: Any, requests: list[Any], warmup: int) -> dict[str, Any]:
    from jail.policies import Judge, build_engine

    engine = build_engine(spec)
    await engine.start()
    judge = Judge(engine)
    try:
        for request in requests[:warmup]:
            await judge.decide(request)
        times_us: list[float] = []
        allowed = 0
        mismatches = 0
        clock = time.perf_counter_ns
        for request in requests:
            started = clock()
            decision = await judge.decide(request)
            times_us.append((clock() - started) / 1000)
            allowed += decision.allow
            mismatches += decision.allow != reference_allows(request.host, request.path)
    finally:
        await engine.close()
    times_us.sort()
    return {
        "decisions": len(times_us),
        "median_us": statistics.median(times_us),
        "p99_us": times_us[min(len(times_us) - 1, int(len(times_us) * 0.99))],
        "mean_us": statistics.fmean(times_us),
        "allowed": allowed,
        "mismatches_vs_realistic": mismatches,
    }


def measure_rule_cost(workdir: Path, count: int, shell_count: int) -> dict[str, dict[str, Any]]:
    """Microseconds per Judge.decide for each engine, in this process, over `count` varied requests."""
    from jail.policies import RuleSpec

    policy = workdir / "bench-policy.toml"
    policy.write_text(policy_toml())
    proc_rule = workdir / "proc_rule.py"
    proc_rule.write_text(PROC_RULE_SOURCE)
    requests = varied_requests(count)
    engines = {
        "js: true (allow-all)": (RuleSpec("js", JS_ALLOW_ALL), requests),
        "js: 20 conditions": (RuleSpec("js", JS_REALISTIC), requests),
        "policy file: 20 rules": (RuleSpec("policy", files=(policy,)), requests),
        "proc: python answers true": (RuleSpec("proc", f"{sys.executable} -u {proc_rule}"), requests),
        f"sh: {SH_RULE}": (RuleSpec("sh", SH_RULE), requests[:shell_count]),
    }
    results = {}
    for name, (spec, batch) in engines.items():
        log(f"rule cost: {name} over {len(batch)} requests")
        results[name] = asyncio.run(time_engine(spec, batch, warmup=min(200, len(batch) // 10)))
        results[name]["kind"] = spec.kind
    return results


def combine_rule_rounds(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per engine: the median over rounds of each round's median, p99 and mean (and each round's median)."""
    combined = {}
    for name, last in rounds[-1].items():
        runs = [round_[name] for round_ in rounds if name in round_]
        combined[name] = dict(last)
        for key in ("median_us", "p99_us", "mean_us"):
            combined[name][key] = statistics.median(run[key] for run in runs)
        combined[name]["round_medians_us"] = [round(run["median_us"], 1) for run in runs]
    return combined


class RulesCell(Cell):
    part = "rules"

    def __init__(self) -> None:
        self.rounds: list[dict[str, dict[str, Any]]] = []

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--rule-requests", type=int, help="in-process decisions per engine (default 10000, quick 2000)"
        )
        parser.add_argument(
            "--shell-requests", type=int, help="decisions for the shell engine (default 1000, quick 200)"
        )

    def measure(self, bench: Bench, round_index: int) -> None:
        if not bench.within_budget():
            return
        # Every round, like the rest: one slow minute on a shared machine must not decide a verdict.
        with bench.rss.paused():
            self.rounds.append(measure_rule_cost(bench.workdir, bench.args.rule_requests, bench.args.shell_requests))

    def results(self, bench: Bench) -> dict[str, Any]:
        return {
            "rule_requests": bench.args.rule_requests,
            "shell_requests": bench.args.shell_requests,
            "engines": combine_rule_rounds(self.rounds) if self.rounds else {},
        }

    def targets(self, results: dict[str, Any]) -> list[Verdict]:
        engines = results["engines"]
        verdicts = [
            Verdict.at_most(f"{name} decision, median", engines.get(name, {}).get("median_us"), 50, "µs")
            for name in ("js: true (allow-all)", "js: 20 conditions")
        ]
        proc = next((v for k, v in engines.items() if k.startswith("proc")), {})
        verdicts.append(Verdict.at_most("proc decision, median", proc.get("median_us"), 50, "µs"))
        return verdicts

    def markdown(self, results: dict[str, Any]) -> list[str]:
        engines = results["engines"]
        if not engines:
            return []
        out = [
            "**Rule cost** (in-process `Judge.decide`, one decision at a time, varied requests; medians over rounds)",
            "",
            "| engine | decisions | median µs | p99 µs | mean µs | allowed | differs from reference | per-round medians µs |",
            "|---|--:|--:|--:|--:|--:|--:|---|",
        ]
        for name, row in engines.items():
            differs = row["mismatches_vs_realistic"] if row["kind"] == "policy" or "20" in name else "n/a"
            per_round = " ".join(f"{v:.1f}" for v in row.get("round_medians_us", []))
            out.append(
                f"| {name} | {row['decisions']} | {row['median_us']:.1f} | {row['p99_us']:.1f} | "
                f"{row['mean_us']:.1f} | {row['allowed']} | {differs} | {per_round} |"
            )
        return [*out, ""]
