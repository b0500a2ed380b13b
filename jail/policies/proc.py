"""`--proc PROG`: one long-lived program, one JSON request per line in, one answer per line out.

Each request carries an `id`. A program that echoes it (`{"id": 7, "allow": true}`) may answer
out of order; a program that does not is answered in order. The program is restarted when it
dies, answers garbage, stops reading its input, or (when answering in order) misses a deadline,
since a late in-order answer would be taken for the next request's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shlex
import signal
import time
from collections import OrderedDict

from jail.model import Decision, JailError, Request
from jail.policies import answer

logger = logging.getLogger("jail.rule.proc")

LINE_LIMIT_BYTES = 1024 * 1024
RESTART_BACKOFF_SECONDS = 0.5


class RuleProgram:
    """One running instance of the program and the answers it still owes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pending: OrderedDict[int, asyncio.Future[Decision]] = OrderedDict()
        self.timed_out: set[int] = set()
        self.echoes_ids = False
        self.broken = False
        self.tasks = [
            asyncio.create_task(self._read_answers()),
            asyncio.create_task(self._forward_stderr()),
        ]

    @property
    def alive(self) -> bool:
        return not self.broken and self.process.returncode is None

    async def ask(self, request_id: int, line: bytes) -> asyncio.Future[Decision]:
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        assert self.process.stdin is not None
        self.process.stdin.write(line)
        await self.process.stdin.drain()
        return future

    async def _read_answers(self) -> None:
        assert self.process.stdout is not None
        while True:
            try:
                raw = await self.process.stdout.readline()
            except ValueError:
                self.fail(f"answer longer than {LINE_LIMIT_BYTES} bytes")
                return
            if not raw:
                self.fail("rule program exited")
                return
            try:
                self._take_answer(raw.decode().strip())
            except (UnicodeDecodeError, ValueError) as exc:
                self.fail(f"rule program answered garbage ({exc})")
                return

    def _take_answer(self, text: str) -> None:
        document = _json_object(text)
        if document is not None and "id" in document:
            self.echoes_ids = True
            request_id = document.pop("id")
            future = self.pending.pop(request_id, None) if isinstance(request_id, int) else None
            if future is None:
                if request_id in self.timed_out:
                    self.timed_out.discard(request_id)
                    return  # a late answer; the request was already denied
                raise ValueError(f"answer for unknown id {request_id!r}")
            decision = answer.parse_value(document)
        else:
            if not self.pending:
                raise ValueError("an answer nobody asked for")
            _, future = self.pending.popitem(last=False)
            decision = answer.parse_text(text)
        if not future.done():
            future.set_result(decision)

    async def _forward_stderr(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            logger.info("rule program: %s", line.decode(errors="replace").rstrip())

    def fail(self, reason: str) -> None:
        """Deny everything still waiting and mark this instance for replacement."""
        if not self.broken:
            logger.warning("%s; it will be restarted", reason)
        self.broken = True
        for future in self.pending.values():
            if not future.done():
                future.set_result(Decision.denied(reason, "rule_error"))
        self.pending.clear()

    async def stop(self) -> None:
        if self.pending:
            self.fail("rule program stopped")
        self.broken = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        await self.process.wait()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _json_object(text: str) -> dict | None:
    if not text.startswith("{"):
        return None
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


class ProcEngine:
    name = "proc"

    def __init__(self, command: str, timeout: float) -> None:
        try:
            self.argv = shlex.split(command)
        except ValueError as exc:
            raise JailError(f"--proc: cannot split command line {command!r}: {exc}") from None
        if not self.argv:
            raise JailError("--proc needs a program to run")
        self.timeout = timeout
        self._program: RuleProgram | None = None
        self._last_start = 0.0
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)

    async def start(self) -> None:
        try:
            self._program = await self._spawn()
        except OSError as exc:
            raise JailError(f"--proc: cannot start {self.argv[0]!r}: {exc.strerror or exc}") from None

    async def _spawn(self) -> RuleProgram:
        self._last_start = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=LINE_LIMIT_BYTES,
        )
        return RuleProgram(process)

    async def _running_program(self) -> RuleProgram:
        async with self._lock:
            if self._program is not None and self._program.alive:
                return self._program
            if self._program is not None:
                await self._program.stop()
            # A program that dies at once must not be restarted in a tight loop.
            await asyncio.sleep(max(0.0, self._last_start + RESTART_BACKOFF_SECONDS - time.monotonic()))
            logger.warning("restarting rule program %s", self.argv[0])
            self._program = await self._spawn()
            return self._program

    async def decide(self, request: Request) -> Decision:
        try:
            program = await self._running_program()
        except OSError as exc:
            return Decision.denied(f"rule program cannot start: {exc}", "rule_error")
        request_id = next(self._ids)
        line = json.dumps({**request.to_dict(), "id": request_id}, separators=(",", ":")) + "\n"
        # One deadline for writing the request and getting the answer: a program that stops
        # reading its input must not leave the request waiting for the pipe forever.
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                future = await program.ask(request_id, line.encode())
        except (BrokenPipeError, ConnectionResetError):
            program.fail("rule program closed its input")
            return Decision.denied("rule program closed its input", "rule_error")
        except TimeoutError:
            program.fail(f"rule program stopped reading its input for {self.timeout:g} s")
            return Decision.denied(f"rule program timed out after {self.timeout:g} s", "rule_timeout")
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(future)
        except TimeoutError:
            program.pending.pop(request_id, None)
            program.timed_out.add(request_id)
            if not program.echoes_ids:
                program.fail(f"rule program missed a {self.timeout:g} s deadline")
            return Decision.denied(f"rule program timed out after {self.timeout:g} s", "rule_timeout")

    async def close(self) -> None:
        if self._program is not None:
            await self._program.stop()
            self._program = None
