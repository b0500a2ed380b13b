"""`--js` / `--js-file`: a JavaScript rule run in one embedded V8 isolate (mini-racer).

A call into mini-racer costs a few hundred microseconds and starting V8 about 100 ms, so a rule inside
the subset of js_subset (plain comparisons of request fields, most rules) is decided in Python with V8's
exact answer, and V8 is started only for a rule outside it, or for a request the subset hands back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jail.model import Decision, JailError, Request
from jail.policies import answer, js_subset

if TYPE_CHECKING:
    from py_mini_racer import MiniRacer

logger = logging.getLogger("jail.rule.js")

HEAP_LIMIT_BYTES = 128 * 1024 * 1024
RELOAD_POLL_SECONDS = 0.5

# console.* output is collected per call and sent to jail's diagnostics, never to the child.
PRELUDE = """
globalThis.__jail_logs = [];
globalThis.console = (() => {
  const put = (...args) => { __jail_logs.push(args.map(
      (a) => typeof a === 'string' ? a : JSON.stringify(a)).join(' ')); };
  return {log: put, info: put, warn: put, error: put, debug: put};
})();
"""

# The rule is either an expression (`r.host === 'x'`) or statements whose completion value is
# the answer (`if (r.method === 'GET') true; else false`), as httpjail accepts. Both are
# compiled once into a function; the statement form is evaluated by a direct eval, which V8
# caches, so that `r` is in scope and the completion value is returned.
# The rule body reaches V8 only as a JSON string given to the Function constructor, which parses
# it as a function body on its own: rule text cannot close the wrapper and run at compile time.
CALL_TEMPLATE = """((rule) => function (requestJson) {
  const r = JSON.parse(requestJson);
  __jail_logs = [];
  const value = rule(r);
  return JSON.stringify({value: value, logs: __jail_logs});
})(new Function('r', %s))"""


class JsEngine:
    name = "js"

    def __init__(self, source: str, timeout: float, from_file: bool = False) -> None:
        self.timeout = timeout
        self.path = Path(source) if from_file else None
        self.code = source
        self._racer: MiniRacer | None = None  # started on first need: importing and starting V8 cost ~100 ms
        self._fast: Any = None  # the rule compiled by js_subset, or None when V8 must run it
        self._rule: Any = None  # the rule compiled in V8; for a subset rule, only once a request needs it
        self._watcher: asyncio.Task[None] | None = None
        self._file_state: tuple[int, int, int] | None = None
        # One call in the isolate at a time: mini-racer prepares each call with a blocking eval,
        # which would freeze the event loop (and so the timeout of the running call) for good
        # if it queued behind a rule that loops.
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        if self.path is not None:
            self.code, self._file_state = self._read_file()
        await self._load(self.code)
        if self.path is not None:
            self._watcher = asyncio.create_task(self._watch_file())

    async def _load(self, code: str) -> None:
        """Make `code` the rule: compiled into the subset, else in V8 (so a syntax error shows now).
        Raises JailError if V8 rejects it; the previous rule then stays."""
        fast = js_subset.compile_rule(code)
        rule = None
        if fast is None:
            from py_mini_racer import JSEvalException

            try:
                async with self._lock:
                    rule = self._compile(code)
            except JSEvalException as exc:
                raise JailError(f"JavaScript rule does not compile: {_first_line(exc)}") from None
        self.code, self._fast, self._rule = code, fast, rule

    def _read_file(self) -> tuple[str, tuple[int, int, int]]:
        assert self.path is not None
        try:
            stat = self.path.stat()
            return self.path.read_text(), (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except (OSError, UnicodeDecodeError) as exc:
            raise JailError(f"cannot read --js-file {self.path}: {exc}") from None

    def _start_racer(self) -> MiniRacer:
        if self._racer is None:
            from py_mini_racer import MiniRacer

            racer = MiniRacer()
            racer.set_hard_memory_limit(HEAP_LIMIT_BYTES)
            racer.eval(PRELUDE)
            self._racer = racer
        return self._racer

    def _compile(self, code: str) -> Any:
        from py_mini_racer import JSEvalException

        racer = self._start_racer()
        try:
            return racer.eval(CALL_TEMPLATE % json.dumps(f"return (\n{code}\n);")).cancelable()
        except JSEvalException:
            pass
        # Not an expression: check it parses as statements, then evaluate it for its completion value.
        racer.eval(f"new Function('r', {json.dumps(code)})")
        return racer.eval(CALL_TEMPLATE % json.dumps(f"return eval({json.dumps(code)});")).cancelable()

    async def _watch_file(self) -> None:
        assert self.path is not None
        while True:
            await asyncio.sleep(RELOAD_POLL_SECONDS)
            try:
                stat = self.path.stat()
            except OSError:
                continue  # an editor replacing the file; keep the rule we have
            state = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if state == self._file_state:
                continue
            self._file_state = state
            try:
                code, _ = self._read_file()
                await self._load(code)
            except JailError as exc:
                logger.warning(
                    "--js-file %s: new version rejected, keeping the previous rule: %s", self.path, _first_line(exc)
                )
                continue
            logger.info("--js-file %s reloaded", self.path)

    async def decide(self, request: Request) -> Decision:
        fast = self._fast
        if fast is not None:
            try:
                value = fast(request.to_dict())
            except Exception:  # js_subset.Fallback (or anything unforeseen): V8 decides this request
                pass
            else:
                return answer.parse_value(value)
        return await self._decide_in_v8(request)

    async def _decide_in_v8(self, request: Request) -> Decision:
        from py_mini_racer import JSEvalException

        try:
            async with self._lock:
                if self._rule is None:  # a subset rule, compiled in V8 the first time a request needs it
                    self._rule = self._compile(self.code)
                raw = await asyncio.wait_for(self._rule(request.to_json()), self.timeout)
        except TimeoutError:
            return Decision.denied(f"rule timed out after {self.timeout * 1000:g} ms", "rule_timeout")
        except JSEvalException as exc:
            return Decision.denied(f"rule error: {_first_line(exc)}", "rule_error")
        result = json.loads(raw)
        for line in result["logs"]:
            logger.info("console: %s", line)
        return answer.parse_value(result.get("value"))

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._racer is not None:
            self._racer.close()
            self._racer = None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    syntax = [line for line in lines if "Error" in line]
    return (syntax[-1] if syntax else lines[0] if lines else type(exc).__name__).strip()
