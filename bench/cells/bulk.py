"""Bulk transfers: one large download and one large upload with curl, HTTP and HTTPS (intercepted by jail
and mitmdump, a CONNECT tunnel through tinyproxy), direct and through each proxy, the systems alternated
transfer by transfer. jail runs as an agent meets it: `jail --weak -- curl` and, as root, the strong mode's
`jail -- curl` (redirected by nftables), one jail per transfer; its own RSS (not curl's) is sampled."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cells import Cell
from bench.harness import PROXY_HOST, Bench, BenchError, log
from bench.report import Verdict, fmt, ratio

DIRECT = "direct (nginx)"
JAIL_WEAK = "jail --weak -- curl"
JAIL_STRONG = "jail -- curl (strong)"
MITMDUMP = "mitmdump (streaming)"
TINYPROXY = "tinyproxy (no interception)"
JAILS = (JAIL_WEAK, JAIL_STRONG)

TARGET_RATIO = 0.6  # of direct (issue 18)
TARGET_RSS_MB = 150
TRANSFER_TIMEOUT_S = 300
WARMUP_SIZE_MB = 16  # each system's unmeasured first transfer; jail's RSS after it is the baseline
CURL_FORMAT = "%{http_code} %{size_download} %{size_upload} %{time_total}"


@dataclass
class Transfer:
    system: str
    scheme: str
    direction: str  # "down" | "up"
    rates: list[float] = field(default_factory=list)  # MB/s (10^6 bytes), one per round
    failures: list[str] = field(default_factory=list)


def make_payload(path: Path, size: int) -> None:
    """Random bytes (nothing on the way can compress them), written once per run."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as out:
        for offset in range(0, size, len(block)):
            out.write(block[: size - offset] if size - offset < len(block) else block)
            block = block[1:] + block[:1]  # rotate: no two megabytes alike
        # On disk before the first transfer: its write-back would otherwise share the first round's
        # CPU and disk with whichever system came first (direct uploads ran at a third of their speed).
        out.flush()
        os.fsync(out.fileno())


class BulkCell(Cell):
    part = "bulk"

    def __init__(self) -> None:
        self.transfers: list[Transfer] = []
        self.proxies: dict[str, int] = {}
        self.baseline_rss: dict[str, int] = {}
        self.size = 0

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--bulk-size", type=int, metavar="MB", help="bytes per bulk transfer, in MiB (default 1024, quick 128)"
        )

    def setup(self, bench: Bench) -> None:
        upstream = bench.upstream()
        self.size = bench.args.bulk_size << 20
        log(f"bulk: writing a {bench.args.bulk_size} MiB payload")
        make_payload(upstream.bulk_file("payload"), self.size)
        self.payload = upstream.bulk_file("payload")
        self.proxies[MITMDUMP] = bench.start_mitmdump(MITMDUMP, ["stream_large_bodies=1m"])
        self.proxies[TINYPROXY] = bench.tinyproxy(TINYPROXY)
        systems = [DIRECT, JAIL_WEAK, *([JAIL_STRONG] if os.geteuid() == 0 else []), MITMDUMP, TINYPROXY]
        if os.geteuid() != 0:
            bench.note("bulk: the strong mode needs root; only `jail --weak` measured")
        for scheme in ("http", "https"):
            for direction in ("down", "up"):
                self.transfers += [Transfer(system, scheme, direction) for system in systems]
        bench.rss.start()
        # Warm-up: jail's CA, the proxies' leaf certificates, the page cache; jail's RSS after it is the
        # baseline its peak over the large transfers is compared with (no growth with the size).
        for transfer in self.transfers:
            _, failure = self.transfer(bench, transfer, WARMUP_SIZE_MB << 20)
            if failure:
                raise BenchError(f"bulk warm-up of {transfer.system} {transfer.scheme} {transfer.direction}: {failure}")
        self.baseline_rss = {name: bench.rss.peak_bytes.get(name, 0) for name in JAILS}

    def transfer(self, bench: Bench, transfer: Transfer, size: int) -> tuple[float | None, str]:
        """One curl run: MB/s as curl measured it (its own time, not jail's start-up), or a failure."""
        upstream = bench.upstream()
        curl = [bench.tools["curl"], "-sS", "-o", "/dev/null", "-w", CURL_FORMAT]
        if transfer.direction == "down":
            curl += ["-r", f"0-{size - 1}"] if size < self.size else []
            curl.append(upstream.url(transfer.scheme, "/bulk/payload"))
        else:
            source = self.payload if size == self.size else self.small_payload(size)
            curl += ["-T", str(source), upstream.url(transfer.scheme, "/sink")]
        env = dict(bench.env)
        if transfer.system in JAILS:
            mode = ["--weak"] if transfer.system == JAIL_WEAK else []
            # A first small request waits out jail's start-up (connections wait in its backlog meanwhile),
            # so that only the measured curl's own time is counted.
            ready = f'curl -s -o /dev/null {upstream.url(transfer.scheme, "/")} && exec "$@"'
            argv = [
                *bench.jail,
                *mode,
                "--js",
                "true",
                *bench.jail_upstream_args(),
                "--",
                "sh",
                "-c",
                ready,
                "sh",
                *curl,
            ]
        else:
            argv = list(curl)
            if transfer.system in self.proxies:
                argv[1:1] = ["-x", f"http://{PROXY_HOST}:{self.proxies[transfer.system]}"]
            ca = bench.mitmdump_ca_file(MITMDUMP) if transfer.system == MITMDUMP else bench.test_ca_file
            argv[1:1] = ["--cacert", str(ca)]
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
        )
        if transfer.system in JAILS:
            bench.rss.watch(transfer.system, process.pid, children=False)
        try:
            out, err = process.communicate(timeout=TRANSFER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            bench.processes.stop(process)
            return None, f"killed after {TRANSFER_TIMEOUT_S} s"
        finally:
            bench.rss.unwatch(transfer.system)
        fields = out.decode(errors="replace").split()
        if process.returncode != 0 or len(fields) != 4:
            return None, f"exit {process.returncode}: {err.decode(errors='replace').strip()[-200:]}"
        status, down, up, seconds = fields[0], int(fields[1]), int(fields[2]), float(fields[3])
        moved = down if transfer.direction == "down" else up
        if status not in ("200", "206") or moved != size:
            return None, f"status {status}, {moved} of {size} bytes"
        return size / seconds / 1e6, ""

    def small_payload(self, size: int) -> Path:
        path = self.payload.with_name(f"payload-{size}")
        if not path.exists():
            with open(self.payload, "rb") as source, open(path, "wb") as out:
                out.write(source.read(size))
        return path

    def measure(self, bench: Bench, round_index: int) -> None:
        # Kind by kind, the systems in turn, each round starting with the next system.
        kinds = list(dict.fromkeys((t.scheme, t.direction) for t in self.transfers))
        for scheme, direction in kinds:
            row = [t for t in self.transfers if (t.scheme, t.direction) == (scheme, direction)]
            shift = round_index % len(row)
            for transfer in row[shift:] + row[:shift]:
                if not bench.within_budget():
                    return
                rate, failure = self.transfer(bench, transfer, self.size)
                if failure:
                    transfer.failures.append(failure)
                else:
                    transfer.rates.append(rate)  # type: ignore[arg-type]
                shown = f"{rate:8.0f} MB/s" if rate is not None else failure
                log(
                    f"round {round_index + 1}/{bench.args.rounds}: bulk {scheme:<5} {direction:<4} {transfer.system:<28} {shown}"
                )

    def results(self, bench: Bench) -> dict[str, Any]:
        direct = {(t.scheme, t.direction): t for t in self.transfers if t.system == DIRECT}
        rows = []
        for transfer in self.transfers:
            median = statistics.median(transfer.rates) if transfer.rates else None
            base = direct[(transfer.scheme, transfer.direction)]
            rows.append(
                {
                    "system": transfer.system,
                    "scheme": transfer.scheme,
                    "direction": transfer.direction,
                    "median_mb_s": median,
                    "rounds_mb_s": transfer.rates,
                    "ratio_vs_direct": None
                    if transfer.system == DIRECT
                    else ratio(median, statistics.median(base.rates) if base.rates else None),
                    "failures": transfer.failures,
                }
            )
        peak = {name: bench.rss.peak_bytes.get(name, 0) / 2**20 for name in JAILS if name in bench.rss.peak_bytes}
        proxies_rss = {name: bench.rss.peak_bytes.get(name, 0) / 2**20 for name in self.proxies}
        baseline = {name: value / 2**20 for name, value in self.baseline_rss.items() if value}
        return {
            "size_mb": self.size / 2**20,
            "rows": rows,
            "peak_rss_mb": {**peak, **proxies_rss},
            "jail_rss_after_warmup_mb": baseline,
            "warmup_size_mb": WARMUP_SIZE_MB,
        }

    def targets(self, results: dict[str, Any]) -> list[Verdict]:
        verdicts = []
        size = f"{results['size_mb']:.0f} MiB"
        for row in results["rows"]:
            if row["system"] in JAILS:
                name = f"bulk {row['scheme']} {row['direction']} {size}: {row['system']} / direct"
                verdicts.append(Verdict.at_least(name, row["ratio_vs_direct"], TARGET_RATIO, "x"))
        for name in JAILS:
            peak = results["peak_rss_mb"].get(name)
            if peak is None:
                continue
            verdicts.append(Verdict.at_most(f"bulk: peak RSS of {name} (jail alone)", peak, TARGET_RSS_MB, "MB"))
            after_warmup = results["jail_rss_after_warmup_mb"].get(name)
            growth = peak - after_warmup if after_warmup is not None else None
            verdicts.append(
                Verdict.at_most(
                    f"bulk: {name} RSS growth from {results['warmup_size_mb']} MiB to {size} transfers",
                    growth,
                    16,
                    "MB",
                )
            )
        return verdicts

    def markdown(self, results: dict[str, Any]) -> list[str]:
        rows = results["rows"]
        if not rows:
            return []
        out = [
            f"**Bulk transfers** ({results['size_mb']:.0f} MiB of random bytes with curl; nginx sendfile down, "
            "an nginx sink that reads the whole body up; MB/s = 10^6 bytes/s as curl timed it; HTTPS intercepted "
            "except by tinyproxy; medians of the rounds, systems alternated)",
            "",
            "| scheme | direction | system | median MB/s | / direct | per round MB/s | peak RSS MB |",
            "|---|---|---|--:|--:|---|--:|",
        ]
        for row in rows:
            rounds = " ".join(f"{v:.0f}" for v in row["rounds_mb_s"])
            rss = results["peak_rss_mb"].get(row["system"])
            out.append(
                f"| {row['scheme']} | {row['direction']} | {row['system']} | {fmt(row['median_mb_s'], '.0f')} | "
                f"{fmt(row['ratio_vs_direct'], '.2f')} | {rounds} | {fmt(rss, '.0f')} |"
            )
            out += [f"- problem: {row['system']} {row['scheme']} {row['direction']}: {f}" for f in row["failures"][:3]]
        return [*out, ""]
