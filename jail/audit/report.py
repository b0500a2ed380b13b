"""Read audit logs back: filter, count per host and method, render text, Markdown or HTML, suggest a policy.

Pure logic (no click). Everything taken from a log is untrusted: the agent chose the host, path and query,
and a rule's deny reason may quote them. Text output neutralises control characters, Markdown escapes its
punctuation (and HTML), the HTML page escapes every value and forbids any script but its own, and the
suggested TOML escapes every string.
"""

from __future__ import annotations

import base64
import hashlib
import html
import ipaddress
import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path

from jail.model import JailError, canonical_path, format_authority

VERDICTS = ("allow", "deny", "would_deny")
REFUSED = frozenset({"deny", "would_deny"})
# How many malformed lines are named one by one before the rest are only counted.
MAX_LINE_WARNINGS = 10
# Distinct denied requests listed in a report (the counts above them are always complete).
MAX_DENIED_ROWS = {"text": 50, "markdown": 50, "html": 500}
# Timeline lanes: the busiest hosts get one each, the rest share the last.
MAX_LANES = 24
# Fewer distinct first path segments than this (inclusive) give one suggested rule per path prefix.
MAX_PREFIX_RULES = 3


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class Entry:
    """One audit record, checked and typed."""

    time: datetime
    method: str
    scheme: str
    host: str
    port: int
    path: str
    query: str
    decision: str
    reason: str = ""
    reason_code: str = ""
    rule: str = ""
    status: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    duration_ms: float = 0.0
    source: str = ""
    end: str = ""  # a TCP stream: how it ended
    answered_by: str = ""  # a person was asked (cli, ui, fd) or nobody answered (timeout)

    @property
    def url(self) -> str:
        query = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{format_authority(self.scheme, self.host, self.port)}{self.path}{query}"

    @property
    def bytes(self) -> int:
        return self.bytes_up + self.bytes_down


@dataclass
class AuditLog:
    """The entries of one or more logs, in time order, and what was skipped."""

    entries: list[Entry] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)  # "file:line: why", one per skipped line

    def warnings(self) -> list[str]:
        """One line per skipped line, at most MAX_LINE_WARNINGS, then a count of the rest."""
        shown = [f"{problem} (line skipped)" for problem in self.malformed[:MAX_LINE_WARNINGS]]
        hidden = len(self.malformed) - len(shown)
        if hidden > 0:
            shown.append(f"{hidden} more malformed lines skipped ({len(self.malformed)} in all)")
        return shown


def parse_time(text: str) -> datetime:
    """An RFC3339 time (`2025-09-22T14:23:45.123Z`, or with an offset); a naive time is taken as UTC."""
    moment = datetime.fromisoformat(text.strip())
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _text(record: dict, key: str, default: str | None = None) -> str:
    value = record.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} is missing or not a string")
    return value


def _number(record: dict, key: str, kind: type = int) -> int | float:
    value = record.get(key)
    if value is None:
        return kind(0)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"field {key!r} is not a non-negative number")
    return kind(value)


def entry_from_record(record: object, source: str = "") -> Entry:
    """Check one decoded JSON line; raises ValueError naming what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    try:
        moment = parse_time(_text(record, "time"))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"bad time: {exc}") from None
    decision = _text(record, "decision")
    if decision not in VERDICTS:
        raise ValueError(f"unknown decision {decision!r}")
    host = _text(record, "host").lower()
    if not host:
        raise ValueError("empty host")
    scheme = _text(record, "scheme", "http").lower()
    port = record.get("port")
    if port is None:
        port = 443 if scheme in ("https", "wss") else 80
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError("field 'port' is not a port number")
    return Entry(
        time=moment,
        method=_text(record, "method").upper(),
        scheme=scheme,
        host=host,
        port=port,
        path="" if scheme == "tcp" else _text(record, "path", "/") or "/",
        query=_text(record, "query", ""),
        decision=decision,
        reason=_text(record, "reason", ""),
        reason_code=_text(record, "reason_code", ""),
        rule=_text(record, "rule", ""),
        status=int(_number(record, "status")),
        bytes_up=int(_number(record, "bytes_up")),
        bytes_down=int(_number(record, "bytes_down")),
        duration_ms=float(_number(record, "duration_ms", float)),
        source=source,
        end=_text(record, "end", ""),
        answered_by=_text(record, "answered_by", "") if record.get("asked") is True else "",
    )


def _lines(path: str) -> Iterator[str]:
    if path == "-":
        yield from sys.stdin
        return
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            yield from stream
    except OSError as exc:
        raise JailError(f"cannot read audit log {path}: {exc.strerror or exc}") from None


def is_event(record: object) -> bool:
    """Audit records that are events, not requests (a DNS query, a refused answer, an ssh-agent use) carry
    a `kind`; they are not part of the request report."""
    return isinstance(record, dict) and "kind" in record


def load_audit_logs(paths: Sequence[str | Path]) -> AuditLog:
    """Read JSON-lines audit logs (`-` is stdin). Blank lines are ignored; malformed ones are skipped and
    named in `malformed`. A file that cannot be read raises JailError."""
    log = AuditLog()
    for raw_path in paths:
        path = str(raw_path)
        name = "<stdin>" if path == "-" else path
        log.files.append(name)
        for number, line in enumerate(_lines(path), start=1):
            if not line.strip():
                continue
            where = f"{name}:{number}"
            try:
                record = json.loads(line)
                if is_event(record):
                    continue
                log.entries.append(entry_from_record(record, where))
            except json.JSONDecodeError:
                log.malformed.append(f"{where}: not JSON")
            except (ValueError, TypeError, OverflowError) as exc:
                log.malformed.append(f"{where}: {exc}")
    log.entries.sort(key=lambda entry: entry.time)
    return log


# --------------------------------------------------------------------------- filtering

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`15m`, `2h`, `1d` (before `now`) or an RFC3339 time; raises ValueError with a readable message."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text)
    if match:
        now = now or datetime.now(UTC)
        return now - timedelta(seconds=int(match[1]) * DURATION_UNITS[match[2]])
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a time like 2025-01-31T12:00:00Z nor a duration like 15m, 2h, 1d"
        ) from None


def host_matches(host: str, pattern: str) -> bool:
    """`example.com` matches itself only; `*.example.com` matches its subdomains (not example.com)."""
    pattern = pattern.strip().lower().rstrip(".")
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def filter_entries(
    entries: Iterable[Entry],
    *,
    denied: bool = False,
    hosts: Sequence[str] = (),
    since: datetime | None = None,
) -> list[Entry]:
    """Keep the denied and would-deny ones (`denied`), those whose host matches any of `hosts`, and
    those at or after `since`."""
    kept = []
    for entry in entries:
        if denied and entry.decision not in REFUSED:
            continue
        if hosts and not any(host_matches(entry.host, pattern) for pattern in hosts):
            continue
        if since is not None and entry.time < since:
            continue
        kept.append(entry)
    return kept


# --------------------------------------------------------------------------- counting


@dataclass
class Tally:
    count: int = 0
    allowed: int = 0
    denied: int = 0
    would_deny: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    def add(self, entry: Entry) -> None:
        self.count += 1
        if entry.decision == "allow":
            self.allowed += 1
        elif entry.decision == "deny":
            self.denied += 1
        else:
            self.would_deny += 1
        self.bytes_up += entry.bytes_up
        self.bytes_down += entry.bytes_down

    @property
    def bytes(self) -> int:
        return self.bytes_up + self.bytes_down


@dataclass(frozen=True)
class RefusedRequest:
    """Denied (or would-be-denied) requests with the same verdict, method, URL and reason."""

    decision: str
    method: str
    url: str
    reason: str
    count: int
    first: datetime


@dataclass
class Summary:
    rows: dict[tuple[str, str], Tally]  # (host, method), sorted by host then method
    hosts: dict[str, Tally]  # sorted by host
    total: Tally
    refused: list[RefusedRequest]  # most frequent first
    streams: list[Entry] = field(default_factory=list)  # the TCP streams, in time order
    asked: list[Entry] = field(default_factory=list)  # the requests a person was asked about, in time order
    first: datetime | None = None
    last: datetime | None = None

    @property
    def span(self) -> timedelta:
        return (self.last - self.first) if self.first and self.last else timedelta(0)


def summarize(entries: Sequence[Entry]) -> Summary:
    rows: dict[tuple[str, str], Tally] = defaultdict(Tally)
    hosts: dict[str, Tally] = defaultdict(Tally)
    total = Tally()
    refused: dict[tuple[str, str, str, str], list] = {}
    for entry in entries:
        rows[entry.host, entry.method].add(entry)
        hosts[entry.host].add(entry)
        total.add(entry)
        if entry.decision in REFUSED:
            key = (entry.decision, entry.method, entry.url, entry.reason)
            seen = refused.setdefault(key, [0, entry.time])
            seen[0] += 1
            seen[1] = min(seen[1], entry.time)
    times = [entry.time for entry in entries]
    refused_list = [RefusedRequest(*key, count, first) for key, (count, first) in refused.items()]
    refused_list.sort(key=lambda r: (-r.count, r.first, r.url, r.method, r.decision, r.reason))
    return Summary(
        rows=dict(sorted(rows.items())),
        hosts=dict(sorted(hosts.items())),
        total=total,
        refused=refused_list,
        streams=[entry for entry in entries if entry.scheme == "tcp"],
        asked=[entry for entry in entries if entry.answered_by],
        first=min(times) if times else None,
        last=max(times) if times else None,
    )


# --------------------------------------------------------------------------- formatting helpers


def format_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def format_span(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    if seconds < 60:
        return f"{span.total_seconds():.3g}s" if seconds < 10 else f"{seconds}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return " ".join(parts[:2])


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def plural_requests(count: int) -> str:
    return f"{count} request" if count == 1 else f"{count} requests"


def summary_line(summary: Summary) -> str:
    """`12 requests: 7 allowed, 3 denied, 2 would-deny; from ... to ... (15m)`."""
    total = summary.total
    counts = (
        f"{plural_requests(total.count)}: {total.allowed} allowed, {total.denied} denied, "
        f"{total.would_deny} would-deny, {format_bytes(total.bytes)}"
    )
    if summary.first is None or summary.last is None:
        return counts
    return f"{counts}; {format_time(summary.first)} to {format_time(summary.last)} ({format_span(summary.span)})"


VERDICT_LABELS = {"allow": "allow", "deny": "deny", "would_deny": "would-deny"}
COLUMNS = ("requests", "allowed", "denied", "would-deny", "bytes")


def _tally_cells(tally: Tally) -> list[str]:
    return [str(tally.count), str(tally.allowed), str(tally.denied), str(tally.would_deny), format_bytes(tally.bytes)]


# --------------------------------------------------------------------------- text

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def safe_text(value: str) -> str:
    """No terminal escape sequences or line breaks from the log reach the screen."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match[0]):02x}", value)


def _shorten(value: str, width: int) -> str:
    return value if len(value) <= width else value[: width - 1] + "…"


def _aligned(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """Columns padded to their widest cell; `align` has one `l` (left) or `r` (right) per column."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.ljust(w) if side == "l" else cell.rjust(w) for cell, w, side in zip(row, widths, align, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def render_text(summary: Summary) -> str:
    lines = [summary_line(summary)]
    if not summary.total.count:
        return lines[0] + "\n"
    rows = [
        [safe_text(host), safe_text(method), *_tally_cells(tally)] for (host, method), tally in summary.rows.items()
    ]
    rows.append(["TOTAL", "", *_tally_cells(summary.total)])
    lines += ["", *_aligned(["HOST", "METHOD", *(c.upper() for c in COLUMNS)], rows, "llrrrrr")]
    if len(summary.hosts) > 1:
        host_rows = [[safe_text(host), *_tally_cells(tally)] for host, tally in summary.hosts.items()]
        lines += ["", *_aligned(["HOST", *(c.upper() for c in COLUMNS)], host_rows, "lrrrrr")]
    if summary.refused:
        limit = MAX_DENIED_ROWS["text"]
        refused_rows = [
            [
                VERDICT_LABELS[r.decision],
                str(r.count),
                safe_text(r.method),
                _shorten(safe_text(r.url), 80),
                _shorten(safe_text(r.reason), 60),
            ]
            for r in summary.refused[:limit]
        ]
        lines += ["", "Denied and would-deny requests:"]
        lines += _aligned(["VERDICT", "COUNT", "METHOD", "URL", "REASON"], refused_rows, "lrlll")
        if len(summary.refused) > limit:
            lines.append(f"... and {len(summary.refused) - limit} more")
    if summary.asked:
        limit = MAX_DENIED_ROWS["text"]
        asked_rows = [
            [
                format_time(e.time),
                VERDICT_LABELS[e.decision],
                e.answered_by,
                safe_text(e.method),
                _shorten(safe_text(e.url), 80),
            ]
            for e in summary.asked[-limit:]
        ]
        lines += ["", "Asked a person:"]
        lines += _aligned(["TIME", "VERDICT", "ANSWERED BY", "METHOD", "URL"], asked_rows, "lllll")
        if len(summary.asked) > limit:
            lines.append(f"... and {len(summary.asked) - limit} earlier")
    if summary.streams:
        limit = MAX_DENIED_ROWS["text"]
        lines += ["", "TCP streams:"]
        lines += _aligned(
            STREAM_COLUMNS, [_stream_cells(entry, safe_text) for entry in summary.streams[-limit:]], "llrrrl"
        )
        if len(summary.streams) > limit:
            lines.append(f"... and {len(summary.streams) - limit} earlier")
    return "\n".join(lines) + "\n"


STREAM_COLUMNS = ("TIME", "URL", "UP", "DOWN", "DURATION", "END")


def _stream_cells(entry: Entry, quote: Callable[[str], str]) -> list[str]:
    """One TCP stream: when, where, bytes each way, how long, how it ended (or why it was denied)."""
    end = entry.end or VERDICT_LABELS[entry.decision]
    if entry.decision != "allow" and entry.reason:
        end = f"{end}: {_shorten(entry.reason, 60)}"
    return [
        format_time(entry.time),
        quote(entry.url),
        format_bytes(entry.bytes_up),
        format_bytes(entry.bytes_down),
        f"{entry.duration_ms / 1000:.3g}s",
        quote(end),
    ]


# --------------------------------------------------------------------------- Markdown

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&])")


def md_text(value: str) -> str:
    """Plain text in a Markdown table cell: no HTML, no links, no emphasis, no broken cells."""
    value = _CONTROL.sub(" ", value)
    return _MD_SPECIAL.sub(r"\\\1", value)


def md_code(value: str) -> str:
    """A code span that holds any text: fenced with more backticks than it contains, pipes escaped."""
    value = _CONTROL.sub(" ", value).replace("|", "\\|")
    runs = re.findall(r"`+", value)
    fence = "`" * (max((len(run) for run in runs), default=0) + 1)
    pad = " " if value.startswith("`") or value.endswith("`") or not value.strip() else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def _md_table(header: Sequence[str], align: str, rows: Iterable[Sequence[str]]) -> list[str]:
    separator = ["---" if side == "l" else "--:" for side in align]
    return [f"| {' | '.join(row)} |" for row in [header, separator, *rows]]


def render_markdown(summary: Summary, title: str = "jail egress") -> str:
    """GitHub-flavoured Markdown, e.g. for `$GITHUB_STEP_SUMMARY`: a summary line, then tables."""
    lines = [f"**{md_text(title)}**: {md_text(summary_line(summary))}", ""]
    if not summary.total.count:
        return "\n".join(lines)
    header = ["Host", "Method", "Requests", "Allowed", "Denied", "Would deny", "Bytes"]
    rows = [[md_code(host), md_text(method), *_tally_cells(t)] for (host, method), t in summary.rows.items()]
    rows.append(["**Total**", "", *(f"**{cell}**" for cell in _tally_cells(summary.total))])
    lines += _md_table(header, "llrrrrr", rows)
    if summary.refused:
        limit = MAX_DENIED_ROWS["markdown"]
        lines += ["", "**Denied and would-deny requests**", ""]
        refused_rows = [
            [VERDICT_LABELS[r.decision], str(r.count), md_text(r.method), md_code(r.url), md_text(r.reason)]
            for r in summary.refused[:limit]
        ]
        lines += _md_table(["Verdict", "Count", "Method", "URL", "Reason"], "lrlll", refused_rows)
        if len(summary.refused) > limit:
            lines += ["", f"… and {len(summary.refused) - limit} more"]
    if summary.streams:
        limit = MAX_DENIED_ROWS["markdown"]
        lines += ["", "**TCP streams**", ""]
        rows = [_stream_cells(entry, md_code) for entry in summary.streams[-limit:]]
        lines += _md_table([c.capitalize() for c in STREAM_COLUMNS], "llrrrl", rows)
        if len(summary.streams) > limit:
            lines += ["", f"… and {len(summary.streams) - limit} earlier"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- HTML

# The report's look, shared with the live page of `jail --ui` (jail/approvals/page.py).
HTML_CSS = resources.files("jail.audit").joinpath("report.css").read_text(encoding="utf-8")

# Click a header to sort by it; numbers (data-sort, else the text) sort as numbers. No data from the log
# is ever put into this script: it only reads the DOM.
HTML_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (th) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], index = th.cellIndex;
      var descending = th.getAttribute("aria-sort") === "ascending";
      table.querySelectorAll("thead th").forEach(function (other) { other.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", descending ? "descending" : "ascending");
      var key = function (row) {
        var cell = row.cells[index];
        return cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
      };
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
        var order = (!isNaN(nx) && !isNaN(ny) && String(nx) === x && String(ny) === y)
          ? nx - ny : x.localeCompare(y, undefined, {numeric: true});
        return descending ? -order : order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def esc(value: object) -> str:
    """Escape for HTML text and double-quoted attributes (also inside inline SVG)."""
    return html.escape(_CONTROL.sub(" ", str(value)), quote=True)


def _num_cell(value: int, shown: str | None = None) -> str:
    css = "n zero" if value == 0 else "n"
    return f'<td class="{css}" data-sort="{value}">{esc(shown if shown is not None else value)}</td>'


def _tally_html(tally: Tally) -> str:
    return "".join(
        [
            _num_cell(tally.count),
            _num_cell(tally.allowed),
            _num_cell(tally.denied),
            _num_cell(tally.would_deny),
            _num_cell(tally.bytes, format_bytes(tally.bytes)),
        ]
    )


def _table(head: Sequence[tuple[str, bool]], body: Iterable[str], foot: str = "") -> str:
    headers = "".join(
        f'<th class="n">{esc(name)}</th>' if numeric else f"<th>{esc(name)}</th>" for name, numeric in head
    )
    rows = "".join(f"<tr>{row}</tr>" for row in body)
    footer = f"<tfoot><tr>{foot}</tr></tfoot>" if foot else ""
    return f'<table class="sortable"><thead><tr>{headers}</tr></thead><tbody>{rows}</tbody>{footer}</table>'


TALLY_HEAD = [("Requests", True), ("Allowed", True), ("Denied", True), ("Would deny", True), ("Bytes", True)]

# Tick spacings for the timeline's time axis, in seconds.
TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800)


def _timeline_svg(entries: Sequence[Entry], summary: Summary) -> str:
    """One lane per host (busiest first), one mark per request at its time, coloured by verdict.
    Requests that fall on the same pixel of a lane with the same verdict share one mark."""
    if summary.first is None or summary.last is None:
        return ""
    ranked = sorted(summary.hosts.items(), key=lambda item: (-item[1].count, item[0]))
    lanes = [host for host, _ in ranked[:MAX_LANES]]
    others = len(ranked) - len(lanes)
    if others > 0:
        lanes[-1:] = [f"({others + 1} other hosts)"]
    lane_of = {host: min(i, len(lanes) - 1) for i, (host, _) in enumerate(ranked)}

    width, label_w, right, top, lane_h, axis_h = 1200, 230, 16, 8, 22, 26
    plot_w = width - label_w - right
    height = top + lane_h * len(lanes) + axis_h
    start, end = summary.first.timestamp(), summary.last.timestamp()
    pad = max((end - start) * 0.02, 1.0)
    start, end = start - pad, end + pad
    scale = plot_w / (end - start)

    def x_of(timestamp: float) -> float:
        return label_w + (timestamp - start) * scale

    out = [
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="requests over time, one lane per host" '
        f'xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, name in enumerate(lanes):
        y = top + i * lane_h
        if i % 2 == 0:
            out.append(f'<rect class="lane" x="{label_w}" y="{y}" width="{plot_w}" height="{lane_h}"/>')
        shown = name if len(name) <= 34 else name[:33] + "…"
        out.append(
            f'<text x="{label_w - 8}" y="{y + lane_h / 2 + 4:.1f}" text-anchor="end">{esc(shown)}<title>{esc(name)}</title></text>'
        )
    step = next((s for s in TICK_STEPS if (end - start) / s <= 8), TICK_STEPS[-1])
    tick = (int(start) // step + 1) * step
    axis_y = top + lane_h * len(lanes)
    day_format = "%m-%d %H:%M" if end - start > 86400 else "%H:%M:%S" if step < 60 else "%H:%M"
    while tick < end:
        x = x_of(tick)
        label = datetime.fromtimestamp(tick, UTC).strftime(day_format)
        out.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{axis_y}"/>')
        out.append(f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">{label}</text>')
        tick += step
    out.append(f'<text x="{label_w - 8}" y="{axis_y + 16}" text-anchor="end">UTC</text>')

    marks: dict[tuple[int, int, str], list[Entry]] = defaultdict(list)
    for entry in entries:
        marks[lane_of[entry.host], round(x_of(entry.time.timestamp())), entry.decision].append(entry)
    # Allowed first, so that denies are drawn on top and stay visible.
    order = {"allow": 0, "would_deny": 1, "deny": 2}
    for (lane, x, decision), group in sorted(marks.items(), key=lambda item: (order[item[0][2]], item[0])):
        first = group[0]
        label = f"{format_time(first.time)} {VERDICT_LABELS[decision]} {first.method} {first.url}"
        if first.reason and decision != "allow":
            label += f" ({first.reason})"
        if len(group) > 1:
            label = f"{plural_requests(len(group))}, e.g. {label}"
        y = top + lane * lane_h + 3
        out.append(
            f'<rect class="{decision}" x="{x - 1}" y="{y}" width="3" height="{lane_h - 6}" rx="1">'
            f"<title>{esc(label)}</title></rect>"
        )
    out.append("</svg>")
    return "".join(out)


def csp_hash(source: str) -> str:
    """A CSP source expression for one inline element."""
    return "sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()


def render_html(
    entries: Sequence[Entry], summary: Summary, files: Sequence[str] = (), title: str = "jail audit report"
) -> str:
    """One self-contained page: no external resources, and a Content-Security-Policy that lets only its
    own inline style and script (by hash), so even a mistake in escaping could not run a script from the log."""
    total = summary.total
    csp = f"default-src 'none'; style-src '{csp_hash(HTML_CSS)}'; script-src '{csp_hash(HTML_JS)}'"
    span = ""
    if summary.first and summary.last:
        span = f"{format_time(summary.first)} to {format_time(summary.last)} ({format_span(summary.span)})"
    sources = ", ".join(files)
    cards = [
        ("", total.count, "requests"),
        ("allow", total.allowed, "allowed"),
        ("deny", total.denied, "denied"),
        ("would", total.would_deny, "would deny"),
        ("", format_bytes(total.bytes), "transferred"),
        ("", len(summary.hosts), "hosts"),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{esc(csp)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{esc(title)}</title>",
        f"<style>{HTML_CSS}</style>",
        "</head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="sub">{esc(span or "no requests")}{" &middot; " + esc(sources) if sources else ""}</p>',
        '<div class="cards">',
        *(f'<div class="card {css}"><b>{esc(value)}</b><span>{esc(label)}</span></div>' for css, value, label in cards),
        "</div>",
    ]
    if total.count:
        parts += [
            "<h2>Timeline</h2>",
            f'<div class="timeline">{_timeline_svg(entries, summary)}</div>',
            '<p class="legend"><i class="k-allow"></i>allowed'
            '<i class="k-would"></i>would deny (audit mode)'
            '<i class="k-deny"></i>denied'
            " &middot; hover a mark for the request</p>",
            "<h2>Requests by host and method</h2>",
            _table(
                [("Host", False), ("Method", False), *TALLY_HEAD],
                (
                    f"<td>{esc(host)}</td><td>{esc(method)}</td>{_tally_html(t)}"
                    for (host, method), t in summary.rows.items()
                ),
                foot=f"<td>Total</td><td></td>{_tally_html(total)}",
            ),
            "<h2>Per host</h2>",
            _table(
                [("Host", False), *TALLY_HEAD],
                (f"<td>{esc(host)}</td>{_tally_html(t)}" for host, t in summary.hosts.items()),
            ),
        ]
    if summary.refused:
        limit = MAX_DENIED_ROWS["html"]
        parts += [
            "<h2>Denied and would-deny requests</h2>",
            _table(
                [
                    ("Verdict", False),
                    ("Count", True),
                    ("First seen", False),
                    ("Method", False),
                    ("URL", False),
                    ("Reason", False),
                ],
                (
                    f'<td data-sort="{esc(r.decision)}"><span class="tag {esc(r.decision)}">{esc(VERDICT_LABELS[r.decision])}</span></td>'
                    f"{_num_cell(r.count)}<td>{esc(format_time(r.first))}</td><td>{esc(r.method)}</td>"
                    f'<td class="url">{esc(r.url)}</td><td class="reason">{esc(r.reason)}</td>'
                    for r in summary.refused[:limit]
                ),
            ),
        ]
        if len(summary.refused) > limit:
            parts.append(f'<p class="note">… and {len(summary.refused) - limit} more (see the log)</p>')
    parts += [f"<script>{HTML_JS}</script>", "</body></html>", ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- policy suggestion

# What a policy file accepts (jail/policies/policy_file.py): host labels, HTTP method tokens; requests
# with anything else cannot be written as a rule and are left out (and counted).
HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")
METHOD_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# A policy `path` with `*` or `?` is a glob, not a prefix.
GLOB_CHARS = re.compile(r"[*?]")


def plain_host(host: str) -> bool:
    """A host a policy rule can name: an IP address or dot-separated labels."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return all(HOST_LABEL.fullmatch(label) for label in host.split("."))


def canonical(path: str) -> bool:
    """No `.`/`..` segment and no percent-escaped unreserved character: a policy's path prefix never
    allows a path that is not canonical (it fails closed), so such paths need a rule without `path`."""
    return canonical_path(path) == path


def toml_string(value: str) -> str:
    """A TOML basic string holding any text."""
    out = []
    for char in value:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


# An [[expect]] request is "METHOD URL", split at white space; a `#` would start a fragment.
EXAMPLE_PATH = re.compile(r"/[^\s#]*")


def first_segment(path: str) -> tuple[str, bool]:
    """(`simple`, True) for `/simple/x`, (`robots.txt`, False) for `/robots.txt`, (``, False) for `/`."""
    segment, slash, _ = path.lstrip("/").partition("/")
    return segment, bool(slash)


@dataclass
class _Rule:
    host: str
    path: str | None
    methods: set[str] = field(default_factory=set)
    example: Entry | None = None

    def add(self, entry: Entry) -> None:
        self.methods.add(entry.method)
        if self.example is None and entry.scheme in ("http", "https") and EXAMPLE_PATH.fullmatch(entry.path):
            self.example = entry


def suggest_rules(entries: Iterable[Entry], include_denied: bool = False) -> tuple[list[_Rule], int]:
    """The rules that allow what was seen, and how many requests were left out (a host or method that no
    policy rule can name). Per host: one rule per first path segment when there are few, else one rule."""
    by_host: dict[str, list[Entry]] = defaultdict(list)
    skipped = 0
    for entry in sorted(entries, key=lambda e: (e.time, e.method, e.url)):
        if entry.decision == "deny" and not include_denied:
            continue
        if not plain_host(entry.host) or not METHOD_TOKEN.fullmatch(entry.method):
            skipped += 1
            continue
        by_host[entry.host].append(entry)
    rules: list[_Rule] = []
    for host in sorted(by_host):
        seen = by_host[host]
        segments: dict[str, list[Entry]] = defaultdict(list)
        for entry in seen:
            segments[first_segment(entry.path)[0]].append(entry)
        prefixable = all(
            canonical(entry.path) and not GLOB_CHARS.search(first_segment(entry.path)[0]) for entry in seen
        )
        if len(segments) > MAX_PREFIX_RULES or not prefixable:
            rule = _Rule(host, None)
            for entry in seen:
                rule.add(entry)
            rules.append(rule)
            continue
        for segment in sorted(segments):
            group = segments[segment]
            if not segment:
                prefix = "/"
            elif all(first_segment(entry.path)[1] for entry in group):
                prefix = f"/{segment}/"
            else:  # the bare `/segment` was requested too
                prefix = f"/{segment}"
            rule = _Rule(host, prefix)
            for entry in group:
                rule.add(entry)
            rules.append(rule)
    return rules, skipped


def suggest_policy(entries: Sequence[Entry], include_denied: bool = False, sources: Sequence[str] = ()) -> str:
    """A minimal TOML policy allowing exactly what the log shows: per host the methods seen, narrowed to
    path prefixes when a host was asked for few (<= 3 distinct first path segments), and one [[expect]]
    per rule from a real request (its query left out). Requests denied in enforce mode are left out unless
    `include_denied`; would-deny ones (audit mode) are what this is for, and are kept."""
    rules, skipped = suggest_rules(entries, include_denied)
    used = [e for e in entries if include_denied or e.decision != "deny"]
    lines = ["# Suggested by `jail policy suggest`: it allows exactly what the audit log shows. Review it."]
    if sources:
        lines.append(f"# From: {safe_text(', '.join(sources))}")
    if used:
        first, last = min(e.time for e in used), max(e.time for e in used)
        lines.append(f"# {plural_requests(len(used))}, {format_time(first)} to {format_time(last)}.")
    excluded = sum(1 for e in entries if e.decision == "deny") if not include_denied else 0
    if excluded:
        lines.append(f"# {plural_requests(excluded)} denied in enforce mode are not allowed here (--include-denied).")
    if skipped:
        lines.append(f"# {plural_requests(skipped)} with a host or method no rule can name were left out.")
    if not rules:
        lines.append("# Nothing was allowed: this policy denies everything.")
    lines += ["", 'default = "deny"']
    for rule in rules:
        name = rule.host if rule.path is None else f"{rule.host} {rule.path}"
        lines += ["", "[[rule]]", f"name = {toml_string(name)}", 'action = "allow"', f"host = {toml_string(rule.host)}"]
        lines.append(f"methods = [{', '.join(toml_string(m) for m in sorted(rule.methods))}]")
        if rule.path is not None:
            lines.append(f"path = {toml_string(rule.path)}")
        if rule.example is not None:
            example = rule.example
            url = f"{example.scheme}://{format_authority(example.scheme, example.host, example.port)}{example.path}"
            lines += ["", "[[expect]]", f"request = {toml_string(f'{example.method} {url}')}", 'decision = "allow"']
    return "\n".join(lines) + "\n"
