"""`--proc PROG`: one long-lived program, one JSON request per line in, one answer per line out.

Each request carries an `id`. A program that echoes it (`{"id": 7, "allow": true}`) may answer
out of order; a program that does not is answered in order. The program is restarted when it
dies, answers garbage, stops reading its input, or (when answering in order) misses a deadline,
since a late in-order answer would be taken for the next request's.

The pipes are jail's own, read without tasks or streams: the loop calls back when the program's
output is readable and an answer resolves its request's future right there; a request is written
at once (the transport buffers only what the pipe cannot take). A decision costs one wake-up.
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
from collections.abc import Callable

from jail.model import Decision, JailError, Request
from jail.policies import answer

logger = logging.getLogger("jail.rule.proc")

LINE_LIMIT_BYTES = 1024 * 1024
RESTART_BACKOFF_SECONDS = 0.5
# Under glibc's mmap threshold (128 KiB): a bigger read buffer can cost an mmap and a munmap per
# read (20 us, measured), depending on what the process allocated before.
READ_CHUNK_BYTES = 64 * 1024

# The answer almost every request gets; a Decision is immutable, so one serves them all.
ALLOWED = answer.parse_text("true")


class LineReader:
    """The read end of one of the program's output pipes: complete lines go to `on_line`, a line
    longer than `limit` to `on_overlong` (and is dropped), end of file to `on_end`."""

    def __init__(
        self,
        fd: int,
        on_line: Callable[[bytes], None],
        on_overlong: Callable[[bytes], None],
        on_end: Callable[[], None] = lambda: None,
        limit: int = LINE_LIMIT_BYTES,
    ) -> None:
        self.fd = fd
        self.on_line = on_line
        self.on_overlong = on_overlong
        self.on_end = on_end
        self.limit = limit
        self.partial = b""
        self.loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, READ_CHUNK_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            if self.partial:  # a last line without its newline is still a line
                self._line(self.partial)
            self.partial = b""
            self.on_end()
            return
        if self.partial:
            data = self.partial + data
        if data[-1] == 10 and data.find(b"\n") == len(data) - 1:
            self.partial = b""
            self._line(data[:-1])  # the usual case: exactly one line
            return
        *lines, self.partial = data.split(b"\n")
        for line in lines:
            self._line(line)
        if len(self.partial) > self.limit:
            self.on_overlong(self.partial)
            self.partial = b""

    def _line(self, line: bytes) -> None:
        if len(line) > self.limit:
            self.on_overlong(line)
        else:
            self.on_line(line)

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


class RuleProgram(asyncio.BaseProtocol):
    """One running instance of the program and the answers it still owes. It is also the protocol
    of the transport that writes its input."""

    def __init__(self, process: asyncio.subprocess.Process, stdout: int, stderr: int) -> None:
        self.process = process
        self.pending: OrderedDict[int, asyncio.Future[Decision]] = OrderedDict()
        self.timed_out: set[int] = set()
        self.echoes_ids = False
        self.broken = False
        # The program has more of jail's input unread than the transport's high-water mark.
        self.input_stuck = False
        self.input_closed = False
        self.stdin: asyncio.WriteTransport | None = None
        self.stdout = LineReader(stdout, self._answer_line, self._overlong_answer, self._output_ended)
        self.stderr = LineReader(stderr, self._log_line, self._log_line)

    async def connect_input(self, fd: int) -> None:
        pipe = os.fdopen(fd, "wb", buffering=0)
        try:
            self.stdin, _ = await asyncio.get_running_loop().connect_write_pipe(lambda: self, pipe)
        except BaseException:
            pipe.close()
            raise

    @property
    def alive(self) -> bool:
        return not self.broken and not self.input_closed and self.process.returncode is None

    def ask(self, request_id: int, line: bytes) -> asyncio.Future[Decision]:
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        assert self.stdin is not None
        self.stdin.write(line)
        return future

    def expire(self, request_id: int, timeout: float) -> None:
        """The deadline of a request still waiting for its answer (or for the pipe) has passed."""
        future = self.pending.pop(request_id, None)
        if future is None:
            return
        self.timed_out.add(request_id)
        if self.input_stuck:
            self.fail(f"rule program stopped reading its input for {timeout:g} s")
        elif not self.echoes_ids:
            self.fail(f"rule program missed a {timeout:g} s deadline")
        if not future.done():
            future.set_result(Decision.denied(f"rule program timed out after {timeout:g} s", "rule_timeout"))

    # --- the input transport's protocol

    def pause_writing(self) -> None:
        self.input_stuck = True

    def resume_writing(self) -> None:
        self.input_stuck = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.input_closed = True
        if exc is not None:  # a write failed: what was lost can never be answered
            self.fail("rule program closed its input")

    # --- its output

    def _answer_line(self, raw: bytes) -> None:
        if self.broken:
            return
        try:
            self._take_answer(raw.decode().strip())
        except (UnicodeDecodeError, ValueError) as exc:
            self.fail(f"rule program answered garbage ({exc})")

    def _overlong_answer(self, _: bytes) -> None:
        self.fail(f"answer longer than {LINE_LIMIT_BYTES} bytes")

    def _output_ended(self) -> None:
        self.fail("rule program exited")

    def _take_answer(self, text: str) -> None:
        if text == "true" and self.pending:
            _, future = self.pending.popitem(last=False)
            decision = ALLOWED
        elif (document := _json_object(text)) is not None and "id" in document:
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

    def _log_line(self, line: bytes) -> None:
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
        self.stdout.close()
        self.stderr.close()
        if self.stdin is not None and not self.stdin.is_closing():
            self.stdin.abort()
        await self.process.wait()


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
        # os.pipe's descriptors are not inherited: only the child's ends, passed as 0, 1 and 2, are.
        stdin_read, stdin_write = os.pipe()
        stdout_read, stdout_write = os.pipe()
        stderr_read, stderr_write = os.pipe()
        ours = [stdin_write, stdout_read, stderr_read]
        try:
            process = await asyncio.create_subprocess_exec(
                *self.argv, stdin=stdin_read, stdout=stdout_write, stderr=stderr_write, start_new_session=True
            )
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in (stdin_read, stdout_write, stderr_write):
                os.close(fd)
        program = RuleProgram(process, stdout_read, stderr_read)
        await program.connect_input(stdin_write)
        return program

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
        program = self._program
        if program is None or not program.alive:
            try:
                program = await self._running_program()
            except OSError as exc:
                return Decision.denied(f"rule program cannot start: {exc}", "rule_error")
        request_id = next(self._ids)
        line = f'{request.to_json()[:-1]},"id":{request_id}}}\n'
        future = program.ask(request_id, line.encode())
        # One deadline for writing the request and getting the answer: a program that stops
        # reading its input must not leave the request waiting for the pipe forever.
        deadline = asyncio.get_running_loop().call_later(self.timeout, program.expire, request_id, self.timeout)
        try:
            return await future
        finally:
            deadline.cancel()

    async def close(self) -> None:
        if self._program is not None:
            await self._program.stop()
            self._program = None
