"""The managed policy: a policy file the administrator owns, asked before the user's own rule.

It lives at `/etc/jail/policy.toml`, or at the path in `$JAIL_MANAGED_POLICY`. It is a policy file
(jail/policies/policy_file.py) whose answers mean something narrower:

- a rule that allows, or `default = "allow"`, lets the request go on to the user's rule (which may still
  deny it); an allow rule's `max_tx_bytes` caps whatever the user's rule allows;
- a rule that denies, or `default = "deny"`, denies the request, finally: audit mode does not turn it into
  an allow, nobody is asked, an agent profile's hosts do not widen it.

So `default = "allow"` with deny rules is a deny list, `default = "deny"` with allow rules an allow list.
`default` must be written (no file-wide fallback is guessed) and `ask` is not an answer it may give.

The user must not be able to change it: the file and every folder above it must be owned by root and
not writable by group or others (a root-owned sticky folder such as /tmp is fine: only root can replace
what root owns there). Otherwise jail refuses to run.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from jail.model import Decision, JailError, Request

DEFAULT_PATH = Path("/etc/jail/policy.toml")
ENVIRONMENT_VARIABLE = "JAIL_MANAGED_POLICY"
ENGINE = "managed"
REASON_CODE = "managed"


def find_managed_policy(environ: Mapping[str, str], default: Path = DEFAULT_PATH) -> Path | None:
    """The managed policy file, checked to be safe from the user; None when there is none.

    `$JAIL_MANAGED_POLICY` names one that must exist; the default path may be missing."""
    named = environ.get(ENVIRONMENT_VARIABLE)
    path = Path(named).absolute() if named else default
    if not named and not os.path.lexists(path):
        return None
    if not path.is_file():
        raise JailError(f"managed policy {path} (${ENVIRONMENT_VARIABLE}): no such file")
    check_owned_by_root(path)
    return path


def check_owned_by_root(path: Path) -> None:
    """Raise JailError unless `path`, every folder above it, and the same for the file a symlink leads
    to, are root's and writable by nobody else."""
    for chain in (path, Path(os.path.realpath(path))):
        for entry in (chain, *chain.parents):
            status = os.lstat(entry)
            if status.st_uid != 0:
                raise JailError(
                    f"managed policy {path}: {entry} is owned by uid {status.st_uid}, not root:"
                    " a policy the user can change is not managed; refusing to run"
                )
            sticky_folder = stat.S_ISDIR(status.st_mode) and status.st_mode & stat.S_ISVTX
            # A symlink's own mode means nothing (its target is checked as the second chain).
            loose = status.st_mode & 0o022 and not stat.S_ISLNK(status.st_mode)
            if loose and not (sticky_folder and entry != chain):
                raise JailError(
                    f"managed policy {path}: {entry} is writable by group or others"
                    f" (mode {stat.S_IMODE(status.st_mode):o}); refusing to run"
                )


class ManagedPolicy:
    """The administrator's policy, asked before the user's rule (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        from jail.policies.policy_file import PolicyEngine  # here: finding the file needs no TOML parser

        self.path = path
        self.engine = PolicyEngine([path])
        policy = self.engine.policy
        if not policy.default_where:
            raise JailError(
                f'{path}: a managed policy must set default = "allow" (what it does not deny goes on to the'
                ' user\'s rule) or default = "deny" (only what it allows goes on)'
            )
        if policy.default == "ask":
            raise JailError(f"{policy.default_where}: a managed policy allows or denies; it cannot ask")
        for rule in policy.rules:
            if rule.action == "ask":
                raise JailError(f"{rule.file}:{rule.line}: a managed policy allows or denies; it cannot ask")

    async def start(self) -> None:
        await self.engine.start()

    async def close(self) -> None:
        await self.engine.close()

    async def check(self, request: Request) -> Decision:
        """An allow means "goes on to the user's rule"; a deny is final (engine and reason code `managed`)."""
        started = time.perf_counter()
        try:
            decision = await self.engine.decide(request)
        except Exception as exc:  # a broken hook denies, like any broken rule
            decision = Decision.denied(f"rule error: {exc}")
        if decision.allow:
            return decision
        return Decision(
            False,
            f"denied by the managed policy {self.path}: {decision.reason}",
            REASON_CODE,
            ENGINE,
            rule_us=int((time.perf_counter() - started) * 1e6),
            rule=decision.rule,
        )


def capped(decision: Decision, floor: Decision) -> Decision:
    """The user's allow, with the managed allow rule's upload cap when it is the lower one."""
    limit = floor.max_tx_bytes
    if limit is None or not decision.allow or (decision.max_tx_bytes is not None and decision.max_tx_bytes <= limit):
        return decision
    return replace(decision, max_tx_bytes=limit)
