"""`--sh SCRIPT`: one shell process per request; exit 0 allows, exit 2 asks a person (jail/approvals),
any other status denies; stdout is the reason."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from jail.model import Decision, Request
from jail.policies import answer

logger = logging.getLogger("jail.rule.sh")

# The request fields under both prefixes, so httpjail scripts work unchanged.
ENV_PREFIXES = ("JAIL_", "HTTPJAIL_")
# JAIL_CLIENT: the name a `jail --server` client proved (--clients), "" for none.
ENV_FIELDS = ("url", "method", "scheme", "host", "port", "path", "query", "requester_ip", "client")
MAX_OUTPUT_BYTES = 64 * 1024
ASK_EXIT_STATUS = 2


def request_environment(request: Request) -> dict[str, str]:
    values = request.to_dict()
    return {prefix + name.upper(): str(values[name]) for prefix in ENV_PREFIXES for name in ENV_FIELDS}


class ShellEngine:
    name = "sh"

    def __init__(self, script: str, timeout: float) -> None:
        self.script = script
        self.timeout = timeout

    async def start(self) -> None:
        pass

    async def decide(self, request: Request) -> Decision:
        env = {**os.environ, **request_environment(request)}
        process = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            self.script,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # so a timeout can kill everything the script started
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), self.timeout)
        except TimeoutError:
            _kill_group(process.pid)
            await process.wait()
            return Decision.denied(f"rule script timed out after {self.timeout:g} s", "rule_timeout")
        if stderr:
            logger.info("script stderr: %s", stderr[:MAX_OUTPUT_BYTES].decode(errors="replace").rstrip())
        text = stdout[:MAX_OUTPUT_BYTES].decode(errors="replace").strip()
        if process.returncode == 0:
            # A structured answer on stdout (e.g. {"allow": {"max_tx_bytes": 1024}}) refines the allow.
            return answer.parse_text(text) if text.startswith("{") else Decision.allowed()
        if process.returncode == ASK_EXIT_STATUS:
            return Decision.asking(text)
        if text:
            return Decision.denied(text)
        return Decision.denied(f"rule script exited with status {process.returncode}")

    async def close(self) -> None:
        pass


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
