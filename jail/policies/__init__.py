"""Rule engines behind one protocol. They know nothing of mitmproxy, namespaces or click."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from jail.model import Decision, JailError, Request

if TYPE_CHECKING:
    from jail.policies.managed import ManagedPolicy

logger = logging.getLogger("jail.rule")

RuleKind = Literal["js", "js_file", "sh", "proc", "policy"]

DEFAULT_TIMEOUTS: dict[str, float] = {"js": 0.1, "js_file": 0.1, "sh": 5.0, "proc": 5.0, "policy": 5.0}


@dataclass(frozen=True)
class RuleSpec:
    """Which engine, its source (code, path, script or command line) and its per-request timeout.

    Policy files (`kind="policy"`) are given in `files`, in order: later files append rules.
    """

    kind: RuleKind | None = None
    source: str = ""
    timeout: float | None = None
    files: tuple[Path, ...] = ()

    @property
    def effective_timeout(self) -> float:
        return self.timeout if self.timeout is not None else DEFAULT_TIMEOUTS.get(self.kind or "", 1.0)


class Engine(Protocol):
    name: str

    async def start(self) -> None:
        """Get ready; raise JailError if the rule cannot work at all (bad syntax, no program)."""

    async def decide(self, request: Request) -> Decision: ...

    async def close(self) -> None: ...


class DenyAll:
    """No rule given: httpjail's behaviour, every request denied."""

    name = "none"

    async def start(self) -> None:
        pass

    async def decide(self, request: Request) -> Decision:
        return Decision.denied("no rule given: jail denies everything (use --js, --sh or --proc)", "no_rule")

    async def close(self) -> None:
        pass


@dataclass(frozen=True)
class HostGrant:
    """Hosts allowed over HTTPS whatever the rule answers (the hosts of an agent profile the user named):
    a request the rule denies is allowed when it goes to one of them, in a Decision that says so."""

    engine: str  # e.g. "profile:codex": the Decision's engine
    reason: str
    hosts: frozenset[str]

    def covers(self, request: Request) -> bool:
        return request.host in self.hosts and request.scheme in ("https", "wss") and request.port == 443


class Judge:
    """Asks the engine, times the answer, and turns any failure into a deny (fail closed).

    The `managed` policy is asked first: its deny is final, whatever comes after it (jail/policies/managed.py).
    A `grant` widens the rule: what the rule denies to a granted host is allowed (never the other way).
    In audit mode every deny of the rule is let through as `would_deny`.
    """

    def __init__(
        self,
        engine: Engine,
        audit_mode: bool = False,
        grant: HostGrant | None = None,
        managed: ManagedPolicy | None = None,
    ) -> None:
        self.engine = engine
        self.audit_mode = audit_mode
        self.grant = grant
        self.managed = managed

    async def decide(self, request: Request) -> Decision:
        if self.managed is None:
            return await self._decide(request)
        floor = await self.managed.check(request)
        if not floor.allow:
            return floor  # neither audit mode, nor a grant, nor a person asked later can lift it
        from jail.policies.managed import capped

        return capped(await self._decide(request), floor)

    async def _decide(self, request: Request) -> Decision:
        started = time.perf_counter()
        try:
            decision = await self.engine.decide(request)
        except Exception as exc:  # a broken rule must deny, never let the request through
            logger.warning("rule failed for %s %s: %s", request.method, request.url, exc)
            decision = Decision.denied(f"rule error: {exc}", "rule_error")
        rule_us = int((time.perf_counter() - started) * 1e6)
        if not decision.allow and self.grant is not None and self.grant.covers(request):
            return Decision.allowed(self.grant.reason).stamped(self.grant.engine, rule_us)
        decision = decision.stamped(self.engine.name, rule_us)
        return decision.audited() if self.audit_mode else decision


def rule_files(spec: RuleSpec) -> tuple[Path, ...]:
    """Every file the rule is taken from: the --js-file, the --policy files (and a hook's program file),
    and each word of a --sh or --proc command that names an existing file. The jailed command must never
    be able to change them (it would rewrite its own rule)."""
    if spec.kind == "js_file":
        return (Path(spec.source).absolute(),)
    if spec.kind in ("sh", "proc"):
        return _program_files(spec.source)
    if spec.kind != "policy":
        return ()
    from jail.policies.policy_file import load_policy

    files = [path.absolute() for path in spec.files]
    hook = load_policy(spec.files).hooks
    if hook is not None:
        files += [Path(hook.source)] if hook.kind == "js_file" else []
        files += _program_files(hook.source) if hook.kind in ("sh", "proc") else []
    return tuple(dict.fromkeys(files))


def _program_files(command: str) -> tuple[Path, ...]:
    import shlex

    try:
        words = shlex.split(command)
    except ValueError:
        return ()
    return tuple(dict.fromkeys(Path(word).absolute() for word in words if Path(word).is_file()))


def build_engine(spec: RuleSpec) -> Engine:
    """The engine for a rule spec; raises JailError for a spec that cannot work."""
    timeout = spec.effective_timeout
    if timeout <= 0:
        raise JailError(f"--rule-timeout must be positive, not {timeout}")
    if spec.kind in ("js", "js_file"):
        from jail.policies.js import JsEngine

        return JsEngine(spec.source, timeout, from_file=spec.kind == "js_file")
    if spec.kind == "sh":
        from jail.policies.shell import ShellEngine

        return ShellEngine(spec.source, timeout)
    if spec.kind == "proc":
        from jail.policies.proc import ProcEngine

        return ProcEngine(spec.source, timeout)
    if spec.kind == "policy":
        from jail.policies.policy_file import PolicyEngine

        return PolicyEngine(spec.files, timeout)
    return DenyAll()
