"""Start-up: wall time from spawn to exit of `true` with and without jail (and srt), alternated run by run."""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import statistics
from pathlib import Path
from typing import Any

from bench.cells import Cell
from bench.harness import Bench, BenchError, log, time_command
from bench.report import Verdict, fmt

WEAK = "jail --weak --js true -- true"


class StartupCell(Cell):
    part = "startup"

    def __init__(self) -> None:
        self.commands: dict[str, list[str]] = {}
        self.rounds: dict[str, list[float]] = {}
        self.failures: list[str] = []

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--startup-runs", type=int, help="start-up runs per command per round (default 5, quick 3)")
        parser.add_argument(
            "--rootless-user", metavar="NAME", help="also time the rootless jail's start-up as this user (run as root)"
        )

    def setup(self, bench: Bench) -> None:
        true = shutil.which("true") or "/bin/true"
        # One run creates jail's CA, so that no measured run pays for it.
        _, failure = time_command([*bench.jail, "--weak", "--js", "true", "--", true], bench.env)
        if failure:
            raise BenchError(f"`{WEAK}` failed: {failure}")
        self.commands = {"true": [true], WEAK: [*bench.jail, "--weak", "--js", "true", "--", true]}
        default_name = f"jail --js true -- true ({'strong' if os.geteuid() == 0 else 'default'})"
        default = [*bench.jail, "--js", "true", "--", true]
        _, failure = time_command(default, bench.env)
        if failure:
            bench.note(f"default mode not measured: `jail --js true -- true` failed: {failure.strip()[:160]}")
        else:
            self.commands[default_name] = default
        if bench.args.rootless_user:
            self.add_rootless(bench, bench.args.rootless_user, true)
        srt = shutil.which("srt")
        if srt:
            self.commands["srt true"] = [srt, true]
        else:
            bench.note("srt (@anthropic-ai/sandbox-runtime) is not on PATH: `srt true` not measured")
        self.rounds = {name: [] for name in self.commands}

    def add_rootless(self, bench: Bench, user: str, true: str) -> None:
        """The rootless jail, as `user` through runuser (beside `runuser ... true`, its own cost)."""
        runuser = shutil.which("runuser")
        if os.geteuid() != 0 or runuser is None:
            bench.note("rootless mode not measured: --rootless-user needs root and runuser")
            return
        home = Path(pwd.getpwnam(user).pw_dir)
        environment = ["env", f"HOME={home}", f"JAIL_CA_DIR={home}/.cache/jail-bench-ca", "PATH=/usr/bin:/bin"]
        as_user = [runuser, "-u", user, "--", *environment]
        rootless = [*as_user, *bench.jail, "--js", "true", "--", true]
        _, failure = time_command(rootless, bench.env)  # also makes the user's CA
        if failure:
            bench.note(f"rootless mode not measured (can {user} execute {bench.jail[0]}?): {failure.strip()[:160]}")
            return
        self.commands[f"runuser -u {user} -- true"] = [*as_user, true]
        self.commands[f"runuser -u {user} -- jail --js true -- true (rootless)"] = rootless

    def measure(self, bench: Bench, round_index: int) -> None:
        """Each command in turn, run by run; one median per round each."""
        if not bench.within_budget():
            return
        log(f"round {round_index + 1}/{bench.args.rounds}: startup")
        samples: dict[str, list[float]] = {name: [] for name in self.commands}
        for _ in range(bench.args.startup_runs):
            for name, argv in self.commands.items():
                elapsed, failure = time_command(argv, bench.env)
                if failure:
                    self.failures.append(f"{name}: {failure}")
                else:
                    samples[name].append(elapsed)
        for name, values in samples.items():
            if values:
                self.rounds[name].append(statistics.median(values))

    def results(self, bench: Bench) -> dict[str, Any]:
        return {
            "runs_per_round": bench.args.startup_runs,
            "commands": {
                name: {
                    "median_ms": statistics.median(values) * 1000 if values else None,
                    "rounds_ms": [v * 1000 for v in values],
                    "argv": self.commands[name],
                }
                for name, values in self.rounds.items()
            },
            "failures": self.failures,
        }

    def targets(self, results: dict[str, Any]) -> list[Verdict]:
        weak = results["commands"].get(WEAK, {}).get("median_ms")
        return [Verdict.at_most(f"{WEAK}, wall", weak, 300, "ms")]

    def markdown(self, results: dict[str, Any]) -> list[str]:
        if not results["commands"]:
            return []
        out = ["**Start-up** (wall time, spawn to exit)", "", "| command | median ms | per-round medians ms |"]
        out.append("|---|--:|---|")
        for name, row in results["commands"].items():
            rounds = " ".join(f"{v:.1f}" for v in row["rounds_ms"])
            out.append(f"| `{name}` | {fmt(row['median_ms'], '.1f')} | {rounds} |")
        out += [f"- problem: startup {failure}" for failure in results["failures"][:10]]
        return [*out, ""]
