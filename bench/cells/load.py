"""Per-request cost: hey through each proxy (and direct) at each concurrency, HTTP and HTTPS, small answers."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field
from typing import Any

from bench.cells import Cell
from bench.harness import Bench, BenchError, log
from bench.hey import HeyRun, run_hey
from bench.report import Verdict, fmt, fmt_ms, ratio
from bench.workload import JS_ALLOW_ALL, JS_REALISTIC, policy_toml

JAIL_ALLOW_ALL = "jail --js true"
JAIL_REALISTIC = "jail --js (20 conditions)"
JAIL_POLICY = "jail --policy (20 rules)"
MITMDUMP = "mitmdump + addon (20 conditions)"
TINYPROXY = "tinyproxy (no interception)"
DIRECT = "direct (nginx)"


@dataclass
class LoadTarget:
    """One load measurement: a system (direct or a proxy), a scheme and a concurrency."""

    system: str
    scheme: str
    concurrency: int
    port: int | None  # the proxy's port, None for direct
    runs: list[HeyRun] = field(default_factory=list)

    def median(self, attribute: str) -> float | None:
        values = [getattr(run, attribute) for run in self.runs if getattr(run, attribute) is not None]
        return statistics.median(values) if values else None


class LoadCell(Cell):
    part = "load"

    def __init__(self) -> None:
        self.targets_: list[LoadTarget] = []

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--duration", type=float, help="seconds of hey per load cell and round (default 2, quick 1)"
        )
        parser.add_argument(
            "--warmup", type=float, default=0.3, help="seconds of unmeasured hey per cell (default 0.3)"
        )
        parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10], help="hey -c values (default: 1 10)")

    def setup(self, bench: Bench) -> None:
        policy = bench.workdir / "bench-policy.toml"
        policy.write_text(policy_toml())
        ports: dict[str, int] = {}
        jails = {
            JAIL_ALLOW_ALL: ["--js", JS_ALLOW_ALL],
            JAIL_REALISTIC: ["--js", JS_REALISTIC],
            JAIL_POLICY: ["--policy", str(policy)],
        }
        for system, rule in jails.items():
            ports[system] = bench.start_jail_server(system, rule)
        ports[MITMDUMP] = bench.start_mitmdump(MITMDUMP)
        ports[TINYPROXY] = bench.tinyproxy(TINYPROXY)
        for scheme in ("http", "https"):
            for concurrency in bench.args.concurrency:
                self.targets_.append(LoadTarget(DIRECT, scheme, concurrency, None))
                for system, port in ports.items():
                    self.targets_.append(LoadTarget(system, scheme, concurrency, port))
        bench.rss.start()
        # Warm-up, not measured: connections, the proxies' leaf certificates, V8, caches.
        for target in self.targets_:
            run = run_hey(
                bench.tools["hey"], self.url(bench, target), bench.args.warmup, target.concurrency, target.port
            )
            if run.failure or run.bad or not run.total:
                raise BenchError(
                    f"warm-up of {target.system} {target.scheme} failed: {run.failure or run.statuses} {run.errors}"
                )

    @staticmethod
    def url(bench: Bench, target: LoadTarget) -> str:
        return bench.upstream().url(target.scheme, "/")

    def measure(self, bench: Bench, round_index: int) -> None:
        rounds = bench.args.rounds
        # Each round starts one measurement later, so no system always runs first or last.
        shift = round_index * max(1, len(self.targets_) // rounds)
        for target in self.targets_[shift:] + self.targets_[:shift]:
            if not bench.within_budget():
                break
            run = run_hey(
                bench.tools["hey"], self.url(bench, target), bench.args.duration, target.concurrency, target.port
            )
            target.runs.append(run)
            shown = (
                f"{run.rps:7.0f} req/s p50 {fmt_ms(run.p50_s)} ms p99 {fmt_ms(run.p99_s)} ms"
                if run.rps is not None
                else run.failure
            )
            extra = f", {run.bad} not 200" if run.bad else ""
            log(
                f"round {round_index + 1}/{rounds}: {target.system:<33} {target.scheme:<5} "
                f"c={target.concurrency:<3} {shown}{extra}"
            )

    def results(self, bench: Bench) -> dict[str, Any]:
        direct = {(t.scheme, t.concurrency): t for t in self.targets_ if t.port is None}
        rows = []
        for target in self.targets_:
            base = direct.get((target.scheme, target.concurrency))
            rps, p50, p99 = target.median("rps"), target.median("p50_s"), target.median("p99_s")
            base_p50 = base.median("p50_s") if base else None
            proxied = target.port is not None
            rows.append(
                {
                    "system": target.system,
                    "scheme": target.scheme,
                    "concurrency": target.concurrency,
                    "median_rps": rps,
                    "median_p50_ms": p50 * 1000 if p50 is not None else None,
                    "median_p99_ms": p99 * 1000 if p99 is not None else None,
                    "p50_added_ms": (p50 - base_p50) * 1000
                    if proxied and p50 is not None and base_p50 is not None
                    else None,
                    "ratio_vs_direct": ratio(rps, base.median("rps")) if base and proxied else None,
                    "rounds_rps": [run.rps for run in target.runs],
                    "not_200_total": sum(run.bad for run in target.runs),
                    "runs": [{**run.__dict__, "bad": run.bad} for run in target.runs],
                }
            )
        systems = {t.system for t in self.targets_ if t.port is not None}
        peak = {name: mb / 2**20 for name, mb in bench.rss.peak_bytes.items() if name in systems}
        return {
            "duration_s": bench.args.duration,
            "concurrency": bench.args.concurrency,
            "js_realistic_rule": JS_REALISTIC,
            "rows": rows,
            "peak_rss_mb": peak,
        }

    def targets(self, results: dict[str, Any]) -> list[Verdict]:
        load = {(row["system"], row["scheme"], row["concurrency"]): row for row in results["rows"]}
        verdicts = []
        for scheme in ("http", "https"):
            allow_all = load.get((JAIL_ALLOW_ALL, scheme, 10), {}).get("median_rps")
            realistic = load.get((JAIL_REALISTIC, scheme, 10), {}).get("median_rps")
            cost = (1 - realistic / allow_all) * 100 if allow_all and realistic is not None else None
            verdicts.append(
                Verdict.at_most(f"{scheme} c=10: 20-condition JS costs vs allow-all throughput", cost, 10, "%")
            )
        for scheme in ("http", "https"):
            mitm = load.get((MITMDUMP, scheme, 10), {}).get("median_rps")
            for system in (JAIL_REALISTIC, JAIL_ALLOW_ALL):
                value = ratio(load.get((system, scheme, 10), {}).get("median_rps"), mitm)
                verdicts.append(Verdict.at_least(f"{scheme} c=10: {system} req/s / mitmdump", value, 1.5, "x"))
        for scheme in ("http", "https"):
            added = load.get((JAIL_REALISTIC, scheme, 1), {}).get("p50_added_ms")
            verdicts.append(Verdict.at_most(f"{scheme} c=1: p50 added over direct, {JAIL_REALISTIC}", added, 1.0, "ms"))
        jail_rss = [v for k, v in results["peak_rss_mb"].items() if k.startswith("jail")]
        largest = max(jail_rss) if jail_rss else None
        verdicts.append(Verdict.at_most("peak RSS of a jail server under load (largest)", largest, 150, "MB"))
        return verdicts

    def markdown(self, results: dict[str, Any]) -> list[str]:
        rows = results["rows"]
        if not rows:
            return []
        rss = results["peak_rss_mb"]
        concurrencies = sorted({row["concurrency"] for row in rows})
        by_key = {(row["system"], row["scheme"], row["concurrency"]): row for row in rows}
        header, rule = "| system | scheme |", "|---|---|"
        for c in concurrencies:
            header += f" c={c} req/s | c={c} p50 ms | c={c} p99 ms | c={c} / direct |"
            rule += "--:|--:|--:|--:|"
        header += " c=1 p50 added ms | peak RSS MB | not 200 |"
        rule += "--:|--:|--:|"
        out = ["**Per-request cost** (hey through the proxy with `-x`; HTTPS is intercepted except by tinyproxy)", ""]
        out += [header, rule]
        systems = list(dict.fromkeys(row["system"] for row in rows))
        for scheme in ("http", "https"):
            for system in systems:
                line, bad = f"| {system} | {scheme} |", 0
                for c in concurrencies:
                    row = by_key.get((system, scheme, c))
                    if row is None:
                        line += " - | - | - | - |"
                        continue
                    bad += row["not_200_total"]
                    line += (
                        f" {fmt(row['median_rps'], '.0f')} | {fmt(row['median_p50_ms'], '.2f')} |"
                        f" {fmt(row['median_p99_ms'], '.2f')} | {fmt(row['ratio_vs_direct'], '.3f')} |"
                    )
                added = by_key.get((system, scheme, 1), {}).get("p50_added_ms")
                line += f" {fmt(added, '+.2f')} | {fmt(rss.get(system), '.0f')} | {bad} |"
                out.append(line)
        for row in rows:
            for run in row["runs"]:
                if run["failure"] or run["bad"]:
                    detail = run["failure"] or f"statuses {run['statuses']} errors {run['errors']}"
                    out.append(f"- problem: {row['system']} {row['scheme']} c={row['concurrency']}: {detail}")
        return [*out, ""]
