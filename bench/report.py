"""The report: each cell's section, the targets as PASS/FAIL lines, and an optional chart."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.cells import Cell


class ReportError(Exception):
    pass


def fmt(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def fmt_ms(seconds: float | None) -> str:
    return f"{seconds * 1000:.2f}" if seconds is not None else "-"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass(frozen=True)
class Verdict:
    """One target of an issue: the measured value against its limit (None: not measured)."""

    target: str
    value: float | None
    limit: float
    unit: str
    at_least: bool

    @classmethod
    def at_most(cls, target: str, value: float | None, limit: float, unit: str) -> Verdict:
        return cls(target, value, limit, unit, at_least=False)

    @classmethod
    def at_least(cls, target: str, value: float | None, limit: float, unit: str) -> Verdict:
        return cls(target, value, limit, unit, at_least=True)

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pass": self.passed}

    def row(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[self.passed]
        value = fmt(self.value, ".2f" if self.unit in ("x", "ms") else ".1f")
        sign = "≥" if self.at_least else "≤"
        return f"| {self.target} | {value} {self.unit} | {sign} {self.limit:g} {self.unit} | {verdict} |"


def markdown(results: dict[str, Any], cells: list[Cell]) -> str:
    machine, params = results["machine"], results["params"]
    out = [
        f"jail benchmark, {results['when']}: {machine['cpus']} CPUs, Python {machine['python']}, "
        f"egress-jail {machine['egress-jail']}, mitmproxy {machine['mitmproxy']}, nginx {machine['nginx']}, "
        f"tinyproxy {machine['tinyproxy']}, hey {machine['hey']}, curl {machine['curl']}; load average at the "
        f"start {fmt(machine['load_average_start'], '.2f')} and the end {fmt(machine['load_average'], '.2f')}; "
        f"median of {params['rounds']} round(s){' (--quick)' if params['quick'] else ''}; "
        f"parts {', '.join(params['parts'])}; took {results['elapsed_s']:.0f} s",
        "",
    ]
    verdicts: list[Verdict] = []
    for cell in cells:
        section = results["cells"][cell.part]
        out += cell.markdown(section)
        verdicts += cell.targets(section)
    out += ["**Targets**", "", "| target | measured | limit | verdict |", "|---|--:|--:|---|"]
    out += [verdict.row() for verdict in verdicts]
    out.append("")
    out += [f"- note: {note}" for note in results["notes"]]
    return "\n".join(out).rstrip() + "\n"


def draw_chart(results: dict[str, Any], path: Path) -> None:
    """One panel per measured part: req/s at the highest concurrency, µs per decision, start-up ms,
    bulk MB/s. matplotlib is optional."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError("--chart needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    panels = [p for p in ("load", "rules", "startup", "bulk") if p in cells]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 6), squeeze=False)
    for ax, part in zip(axes[0], panels, strict=True):
        PANELS[part](ax, cells[part])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _load_panel(ax: Any, section: dict[str, Any]) -> None:
    rows = section["rows"]
    if not rows:
        return
    top = max(row["concurrency"] for row in rows)
    systems = list(dict.fromkeys(row["system"] for row in rows))
    by_key = {(row["system"], row["scheme"], row["concurrency"]): row for row in rows}
    width = 0.4
    for offset, scheme in ((-width / 2, "http"), (width / 2, "https")):
        values = [by_key.get((s, scheme, top), {}).get("median_rps") or 0 for s in systems]
        ax.bar([i + offset for i in range(len(systems))], values, width, label=scheme)
    ax.set_xticks(range(len(systems)), [s.replace(" (", "\n(") for s in systems], fontsize=8)
    ax.set_ylabel("requests/s (median)")
    ax.set_title(f"throughput at concurrency {top}")
    ax.legend()


def _rules_panel(ax: Any, section: dict[str, Any]) -> None:
    rules = section["engines"]
    if not rules:
        return
    names = list(rules)
    ax.barh(names, [rules[n]["p99_us"] for n in names], color="tab:orange", alpha=0.35, label="p99")
    ax.barh(names, [rules[n]["median_us"] for n in names], color="tab:blue", label="median")
    ax.axvline(50, color="red", linestyle="--", label="50 µs target")
    ax.set_xscale("log")
    ax.set_xlabel("µs per decision (log)")
    ax.set_title("rule cost, in-process")
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=8)


def _startup_panel(ax: Any, section: dict[str, Any]) -> None:
    startup = {name: row["median_ms"] for name, row in section["commands"].items() if row["median_ms"] is not None}
    if not startup:
        return
    ax.bar(range(len(startup)), list(startup.values()))
    ax.set_xticks(range(len(startup)), [n.replace(" -- ", "\n-- ") for n in startup], fontsize=7)
    ax.axhline(300, color="red", linestyle="--", label="300 ms target (weak)")
    ax.set_ylabel("ms (median)")
    ax.set_title("start-up")
    ax.legend(fontsize=8)


def _bulk_panel(ax: Any, section: dict[str, Any]) -> None:
    rows = section["rows"]
    if not rows:
        return
    kinds = list(dict.fromkeys(f"{row['scheme']} {row['direction']}" for row in rows))
    systems = list(dict.fromkeys(row["system"] for row in rows))
    by_key = {(row["system"], f"{row['scheme']} {row['direction']}"): row for row in rows}
    width = 0.8 / max(1, len(systems))
    for index, system in enumerate(systems):
        values = [(by_key.get((system, kind), {}).get("median_mb_s") or 0) for kind in kinds]
        ax.bar([k + index * width for k in range(len(kinds))], values, width, label=system)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(kinds))], kinds, fontsize=8)
    ax.set_ylabel("MB/s (median)")
    ax.set_title(f"bulk transfer of {section['size_mb']:.0f} MB")
    ax.legend(fontsize=7)


PANELS = {"load": _load_panel, "rules": _rules_panel, "startup": _startup_panel, "bulk": _bulk_panel}
