"""The measured things, one module each. A cell starts what it needs through the shared `Bench`,
measures one round at a time (rounds alternate the cells, and each cell rotates its own systems),
then gives its results, its PASS/FAIL lines and its part of the report. See bench/README.md."""

from __future__ import annotations

import argparse
from typing import Any

from bench.harness import Bench
from bench.report import Verdict


class Cell:
    part = ""  # the name `--only` selects it by

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The cell's own flags, if any."""

    def setup(self, bench: Bench) -> None:
        """Start what the cell measures against; an unmeasured warm-up belongs here."""

    def measure(self, bench: Bench, round_index: int) -> None:
        raise NotImplementedError

    def results(self, bench: Bench) -> dict[str, Any]:
        """JSON-able, kept under results["cells"][part]."""
        raise NotImplementedError

    def targets(self, results: dict[str, Any]) -> list[Verdict]:
        return []

    def markdown(self, results: dict[str, Any]) -> list[str]:
        return []


def all_cells() -> list[type[Cell]]:
    from bench.cells.bulk import BulkCell
    from bench.cells.crowd import CrowdCell
    from bench.cells.load import LoadCell
    from bench.cells.rules import RulesCell
    from bench.cells.startup import StartupCell
    from bench.cells.workers import WorkersCell

    return [RulesCell, StartupCell, LoadCell, BulkCell, WorkersCell, CrowdCell]
