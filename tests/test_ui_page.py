"""The live page of `jail --ui`, in a real browser and under attack from inside the jail.

The browser is Debian's headless Chromium driven by its DevTools protocol over a pipe
(--remote-debugging-pipe: NUL-separated JSON on fds 3 and 4), so no driver or package is needed. Every
test runs the real jail with a real jailed command; the page's address comes from --ui-file.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import PYTHON, UPSTREAM_HOST, jail_argv, wait_for, weak_and_strong
from tests.test_approvals import Run

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
MODES = weak_and_strong()
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="headless Chromium not installed: apt-get install chromium (/usr/bin/chromium)"
)


class DevTools:
    """Headless Chromium and one page of it, spoken to over the DevTools pipe."""

    def __init__(self, profile: Path) -> None:
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4; moved there in the child.
        low = {commands_read: 3, replies_write: 4}

        def move_fds() -> None:
            high = {os.dup(fd): target for fd, target in low.items()}
            for fd, target in high.items():
                os.dup2(fd, target)

        self.process = subprocess.Popen(
            [
                str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=1280,900", "about:blank",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=move_fds, close_fds=False,
        )  # fmt: skip
        os.close(commands_read)
        os.close(replies_write)
        self._next = 0
        self._answers: dict[int, dict[str, Any]] = {}
        self._arrived = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.session = ""

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._replies, 65536):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._arrived:
                        self._answers[message["id"]] = message
                        self._arrived.notify_all()

    def send(self, method: str, params: dict[str, Any] | None = None, session: bool = True) -> dict[str, Any]:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        with self._arrived:
            assert self._arrived.wait_for(lambda: self._next in self._answers, 30), f"no answer to {method}"
            answer = self._answers.pop(self._next)
        assert "error" not in answer, answer
        return answer["result"]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": url}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)[
            "sessionId"
        ]

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 10.0) -> Any:
        """Until EXPRESSION is truthy; an exception (the page still loading) counts as not yet."""
        found: list[Any] = []
        probe = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
        assert wait_for(lambda: bool(found.append(self.evaluate(probe)) or found[-1]), timeout, 0.02), expression
        return found[-1]

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the middle of the element."""
        box = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1}
            )

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"]))
        return path

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self._commands)
        os.close(self._replies)


@pytest.fixture
def browser(tmp_path):
    devtools = DevTools(tmp_path / "chromium-profile")
    yield devtools
    devtools.close()


class Jail(Run):
    """`jail --ui --ui-file` in the background, in a session of its own: it has no terminal."""

    def __init__(self, tmp_path: Path, env: dict[str, str], test_ca_file: Path, *args: str) -> None:
        # In a folder of its own: a folder holding a file denied to the command is closed to new files.
        (tmp_path / "ui").mkdir()
        self.ui_file = tmp_path / "ui" / "page-address"
        self.audit = tmp_path / "audit.jsonl"
        base = ["--upstream-ca", str(test_ca_file), "--allow-private", f"{UPSTREAM_HOST}/32"]
        base += ["--ui", "--ui-file", str(self.ui_file), "--audit-log", str(self.audit)]
        # cwd: --ask makes ./jail-approved.toml, which a killed jail leaves behind.
        super().__init__([*base, *args], env, cwd=tmp_path, start_new_session=True)
        assert wait_for(lambda: self.ui_file.exists() and self.ui_file.read_text().endswith("\n"), 30), self.finish()
        self.address = self.ui_file.read_text().strip()
        self.base, _, query = self.address.partition("?")
        self.token = query.removeprefix("token=")
        self.port = int(self.base.rsplit(":", 1)[1].strip("/"))

    def stop(self) -> None:
        """Ended like Ctrl-C ends it, else killed with its command (which would hold the output pipes open)."""
        if self.process.poll() is None:
            tree = psutil.Process(self.process.pid).children(recursive=True)
            self.process.terminate()
            try:
                self.process.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                for process in [*tree, self.process]:
                    process.kill()
        self.process.communicate()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line.strip()]

    def request(self, method: str, path: str, body: bytes | None = None, **headers: str) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})
            reply = connection.getresponse()
            return reply.status, reply.read()
        finally:
            connection.close()


@pytest.fixture
def start_jail(tmp_path, jail_env, test_ca_file):
    runs: list[Jail] = []

    def start(*args: str) -> Jail:
        run = Jail(tmp_path, jail_env, test_ca_file, *args)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.stop()


def curl(url: str) -> str:
    return f"curl -s -o /dev/null -w '%{{http_code}}\\n' {shlex.quote(url)}"


def wait_file(path: Path) -> str:
    return f"while [ ! -e {shlex.quote(str(path))} ]; do sleep 0.02; done"


@needs_chromium
def test_the_page_live_in_a_browser_answers_a_question(start_jail, browser, http_upstream, tmp_path, capsys):
    go = tmp_path / "go"
    base = http_upstream.url("")
    script = f"{wait_file(go)}; {curl(base + '/free')}; {curl(base + '/held')}; {curl(base + '/again')}"
    run = start_jail("--weak", "--ask", "--js", "r.path.startsWith('/free')", "--", "sh", "-c", script)
    browser.open(run.address)
    browser.wait("document.getElementById('status').textContent === 'live'")

    # A request while the page is open shows up within a second of it.
    go.touch()
    browser.wait("document.querySelector('#requests tbody td.url') !== null", timeout=10)
    shown = time.time()
    free = next(r for r in run.records() if r.get("path") == "/free")
    started = time.mktime(time.strptime(free["time"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    started += float(free["time"][19:-1] or 0)
    assert shown - started < 1.0, f"the row came {shown - started:.2f} s after the request"
    assert browser.evaluate("document.querySelector('#requests tbody td.url').textContent") == base + "/free"

    # The held request is a question on top of the page, with its buttons.
    question = browser.wait("(q => q && q.textContent)(document.querySelector('.question .what'))")
    assert question == f"ask GET {base}/held"
    assert http_upstream.requests == [r for r in http_upstream.requests if r["path"] == "/free"]
    assert browser.evaluate("document.querySelector('[data-total=questions]').textContent") == "1"

    # A page of another origin cannot answer, even one that knew the token.
    browser_session = browser.session
    browser.open(base + "/elsewhere")
    question_id = json.loads(run.request("GET", f"/api/state?token={run.token}")[1])["questions"][0]["id"]
    forged = json.dumps({"id": question_id, "verdict": "allow", "scope": "always"})
    attempts = browser.evaluate(
        f"""Promise.all([
          fetch({json.dumps(run.address.replace("/?", "/api/answer?"))}, {{method: "POST", mode: "no-cors",
                headers: {{"Content-Type": "text/plain"}}, body: {json.dumps(forged)}}})
            .then(r => "sent " + r.type, e => "failed " + e),
          fetch({json.dumps(run.base + "api/answer")}, {{method: "POST",
                headers: {{"Content-Type": "application/json", "X-Jail-Token": {json.dumps(run.token)}}},
                body: {json.dumps(forged)}}})
            .then(r => "answered " + r.status, e => "failed " + e)])"""
    )
    assert attempts[1].startswith("failed"), attempts  # the CORS preflight is never granted
    state = json.loads(run.request("GET", f"/api/state?token={run.token}")[1])
    assert [q["id"] for q in state["questions"]] == [question_id], "a cross-origin page answered"
    browser.session = browser_session

    artefacts = tmp_path / "artefacts"
    artefacts.mkdir()
    shot = browser.screenshot(artefacts / "live-page.png")
    kept = REPO / "test-artifacts"
    kept.mkdir(exist_ok=True)
    shutil.copyfile(shot, kept / "live-page.png")
    with capsys.disabled():
        print(f"\nlive page screenshot: {shot} (and {kept / 'live-page.png'})")

    browser.click("button.allow.run")
    browser.wait("document.querySelectorAll('.question').length === 0")
    status, out, err = run.finish()
    assert (status, out.split()) == (0, ["200", "200", "200"]), err
    assert run.token not in out + err
    by_path = {r.get("path"): r for r in run.records() if "path" in r}
    assert (by_path["/held"]["asked"], by_path["/held"]["answered_by"]) == (True, "ui")
    assert (by_path["/again"]["reason_code"], by_path["/again"]["asked"]) == ("approved", False)
    refused = [r for r in run.records() if r.get("kind") == "ask_refused"]
    assert refused and all(r["channel"] == "ui" for r in refused)
    assert any("text/plain" in r["reason"] or "cross-origin" in r["reason"] for r in refused), refused
    assert browser.wait("document.getElementById('status').textContent === 'run ended'")


def test_without_the_token_the_page_and_its_api_answer_403(start_jail, http_upstream, tmp_path):
    go = tmp_path / "go"
    run = start_jail("--weak", "--ask", "--", "sh", "-c", f"{wait_file(go)}; {curl(http_upstream.url('/x'))}")
    host = {"Host": f"127.0.0.1:{run.port}"}
    # The last character swapped for one it is not: the forged token differs from the real one every run.
    forged_token = run.token[:-1] + ("B" if run.token.endswith("A") else "A")
    for path in ("/", "/api/state", "/api/events", "/?token=", "/api/state?token=" + forged_token):
        assert run.request("GET", path, **host)[0] == 403, path
    assert run.request("GET", "/?token=" + run.token, **host)[0] == 200
    assert run.request("GET", "/?token=" + run.token, Host="evil.test")[0] == 403  # DNS rebinding
    go.touch()
    question = wait_for(lambda: json.loads(run.request("GET", "/api/state?token=" + run.token)[1])["questions"], 20)
    assert question
    qid = json.loads(run.request("GET", "/api/state?token=" + run.token)[1])["questions"][0]["id"]
    answer = json.dumps({"id": qid, "verdict": "allow", "scope": "once"}).encode()
    json_type = {"Content-Type": "application/json"}
    forged = [
        run.request("POST", "/api/answer", answer, **json_type),  # no token
        run.request("POST", "/api/answer?token=" + run.token, answer, **json_type),  # not in the header
        run.request("POST", "/api/answer", answer, X_Jail_Token=run.token, Content_Type="text/plain"),
        run.request("POST", "/api/answer", answer, X_Jail_Token=run.token, Origin="http://evil.test", **json_type),
        run.request("POST", "/api/answer", answer, X_Jail_Token=run.token, Sec_Fetch_Site="cross-site", **json_type),
    ]
    assert [status for status, _ in forged] == [403] * 5
    assert json.loads(run.request("GET", "/api/state?token=" + run.token)[1])["questions"], "a forged answer counted"
    status, body = run.request("POST", "/api/answer", answer, X_Jail_Token=run.token, **json_type)
    assert (status, json.loads(body)["answered_by"]) == (200, "ui")
    assert run.finish()[:2] == (0, "200\n")
    refused = [r for r in run.records() if r.get("kind") == "ask_refused"]
    assert len(refused) >= 11 and {r["channel"] for r in refused} == {"ui"}


def test_no_terminal_and_no_ui_file_refuses_to_start(jail_env, tmp_path):
    """Without a terminal the address would go to stderr, which the command can read back: refused."""
    err = tmp_path / "stderr"
    with err.open("w") as stderr:
        status = subprocess.run(
            jail_argv("--weak", "--ui", "--", "true"), env=jail_env, stderr=stderr, start_new_session=True, timeout=60
        ).returncode
    assert status != 0
    assert "--ui-file" in err.read_text() and "token" not in err.read_text().replace("--ui-file", "")


# Run inside the jail: tries every listening port of jail on loopback (and on the address it listens on),
# directly and through the proxy, with no token, with a guessed one and with the real one, reads the
# --ui-file, and dumps every environ, cmdline and readable fd target of every process it can see.
PROBE = r"""
import json, os, socket, subprocess, sys
ports, ui_file, dump = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
token = open(sys.argv[4]).read().strip()
results = {}
for address, port in ports:
    for host in sorted({"127.0.0.1", address}):
        for path in ("/", "/api/state?token=guess", "/api/state?token=" + token):
            key = f"{host}:{port}{path.replace(token, 'TOKEN')}"
            try:
                with socket.create_connection((host, port), timeout=3) as sock:
                    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
                    sock.settimeout(3)
                    reply = b""
                    while chunk := sock.recv(65536):
                        reply += chunk
                results[key] = reply.decode("latin-1")
            except OSError as exc:
                results[key] = f"failed: {exc}"
        # Through jail's proxy (the child's NO_PROXY would send loopback past it).
        curl = subprocess.run(["curl", "-s", "-i", "--max-time", "5", f"http://127.0.0.1:{port}/?token={token}"],
                              capture_output=True, text=True, env={**os.environ, "NO_PROXY": "", "no_proxy": ""})
        results[f"proxy {port}"] = curl.stdout or f"curl status {curl.returncode}"
try:
    results["ui_file"] = open(ui_file).read()
except OSError as exc:
    results["ui_file"] = f"failed: {exc}"
with open(dump, "wb") as out:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for name in ("environ", "cmdline"):
            try:
                out.write(open(f"/proc/{pid}/{name}", "rb").read())
            except OSError:
                pass
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            path = f"/proc/{pid}/fd/{fd}"
            try:
                out.write(os.readlink(path).encode())
                handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    out.write(os.read(handle, 1 << 20))
                finally:
                    os.close(handle)
            except OSError:
                pass
print(json.dumps(results))
"""


@pytest.mark.parametrize("mode", MODES)
def test_from_inside_the_jail_the_page_and_its_token_are_out_of_reach(start_jail, tmp_path, mode):
    box = tmp_path / "box"
    box.mkdir()
    probe, ready, dump, handed = box / "probe.py", box / "ports.json", box / "dump", box / "token"
    probe.write_text(PROBE)
    command = (
        f'{wait_file(ready)}; {PYTHON} {probe} "$(cat {ready})" {tmp_path / "ui" / "page-address"} {dump} {handed}'
    )
    # Every request allowed by the rule: what refuses the page's address is the address guard.
    run = start_jail(*mode, "--js", "true", "--allow-write", str(box), "--", "sh", "-c", command)
    jail = psutil.Process(run.process.pid)
    listening = sorted(
        {(c.laddr.ip, c.laddr.port) for c in jail.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    )
    assert ("127.0.0.1", run.port) in listening
    # The test hands the jailed command the real token: even that must not open the page from inside.
    handed.write_text(run.token)
    ready.write_text(json.dumps(listening))
    status, out, err = run.finish(timeout=90)
    assert status == 0, err
    results = json.loads(out.strip().splitlines()[-1])
    page_replies = {key: reply for key, reply in results.items() if f":{run.port}/" in key}
    assert page_replies and all(reply.startswith(("failed", "HTTP/1.1 403")) for reply in page_replies.values()), (
        page_replies
    )
    assert not any('"questions"' in reply or "<title>jail" in reply for reply in results.values()), results
    assert results[f"proxy {run.port}"].startswith(("HTTP/1.1 403", "curl status")), results[f"proxy {run.port}"]
    assert results["ui_file"].startswith("failed"), "the command read the page's address"
    assert run.token not in results["ui_file"]
    stolen = dump.read_bytes()
    assert len(stolen) > 1000, "the probe read nothing: it proves nothing"
    assert run.token.encode() not in stolen, "the token is readable in /proc"
    assert run.token not in err
    if mode == ("--weak",):
        refused = [r for r in run.records() if r.get("kind") == "ask_refused"]
        assert any("process of the jailed command" in r["reason"] for r in refused), refused
        via_proxy = [r for r in run.records() if r.get("port") == run.port and "decision" in r]
        assert via_proxy and all(r["decision"] == "deny" for r in via_proxy)
