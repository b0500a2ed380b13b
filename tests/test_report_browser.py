"""The HTML report in a real browser: headless Chromium (no DevTools) loads it from a file, its DOM shows
the logged requests with the hostile path as text, nothing complains on the console, and a screenshot
is kept as an artefact (test-artifacts/report.png)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest

from jail.model import Request

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
XSS = "<script>alert(1)</script>"
T0 = datetime(2026, 1, 10, 10, 0, 0, tzinfo=UTC)
REQUESTS = [
    ("GET", "pypi.org", "/simple/requests/", "allow", 2_000),
    ("GET", "files.pythonhosted.org", "/packages/aa/requests.whl", "allow", 60_000),
    ("POST", "api.example.com", "/v1/chat", "would_deny", 800),
    ("DELETE", "api.example.com", "/v1/files/1", "deny", 0),
    ("GET", "evil.test", "/" + XSS, "deny", 0),
]
HOSTS = sorted({host for _, host, _, _, _ in REQUESTS})

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="headless Chromium not installed: apt-get install chromium (/usr/bin/chromium)"
)


def write_audit_log(path: Path) -> Path:
    lines = []
    for index, (method, host, path_, decision, down) in enumerate(REQUESTS):
        moment = T0 + timedelta(seconds=45 * index)
        record = {
            "time": moment.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "jail_id": "j-browser",
            **Request.build(method, "https", host, 443, path_, "").to_dict(),
            "headers": ["accept"],
            "decision": decision,
            "reason": "" if decision == "allow" else "not on the list",
            "reason_code": "rule_allow" if decision == "allow" else "rule_deny",
            "engine": "js",
            "rule": "",
            "rule_us": 80,
            "max_tx_bytes": None,
            "status": 403 if decision == "deny" else 200,
            "bytes_up": 100,
            "bytes_down": down,
            "duration_ms": 4.0,
        }
        lines.append(json.dumps(record) + "\n")
    path.write_text("".join(lines))
    return path


class DomReader(HTMLParser):
    """The text of every table cell, and the content of every <script> element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.cells: list[str] = []
        self.scripts: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("td", "script"):
            self._in = tag
            (self.cells if tag == "td" else self.scripts).append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == self._in:
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "td":
            self.cells[-1] += data
        elif self._in == "script":
            self.scripts[-1] += data


def chromium(profile: Path, page: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *extra,
        page.as_uri(),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def assert_quiet_console(stderr: str) -> None:
    """The report logs nothing itself, so any console message (an error, a CSP violation) is a failure."""
    console = [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], "\n".join(console)


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    log = write_audit_log(tmp_path / "audit.jsonl")
    page = tmp_path / "report.html"
    subprocess.run(
        [sys.executable, "-m", "jail", "log", str(log), "--html", "-o", str(page)], check=True, timeout=60, cwd=REPO
    )
    assert page.stat().st_size > 0

    dumped = chromium(tmp_path / "profile-dom", page, "--dump-dom")
    assert_quiet_console(dumped.stderr)
    dom = dumped.stdout
    reader = DomReader()
    reader.feed(dom)
    for host in HOSTS:
        assert host in reader.cells, f"no table row for {host}"
    assert any(XSS in cell for cell in reader.cells), "the hostile path is not shown as text"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "<script>alert" not in dom
    assert not any("alert(" in script for script in reader.scripts), "a script from the log became live"
    assert len(reader.scripts) == 1  # the report's own, allowed by its CSP hash

    artefacts = tmp_path / "artefacts"
    artefacts.mkdir()
    shot = artefacts / "report.png"
    captured = chromium(tmp_path / "profile-shot", page, f"--screenshot={shot}", "--window-size=1280,900")
    assert_quiet_console(captured.stderr)
    assert shot.exists(), captured.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000, f"screenshot only {shot.stat().st_size} bytes: a blank page?"
    kept = REPO / "test-artifacts"
    kept.mkdir(exist_ok=True)
    shutil.copyfile(shot, kept / "report.png")
