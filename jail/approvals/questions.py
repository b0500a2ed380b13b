"""Questions and answers: a request the rule would not allow on its own waits for a person.

`Approvals.decide` wraps the rule's decide: the proxy addon awaits it as it awaits the rule and knows
nothing of sockets or pages. A held request is an asyncio Future (no polling); requests for the same
host and port while a question is open wait on that one question.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from jail.approvals.protocol import Answer, ProtocolError
from jail.model import Decision, Request

logger = logging.getLogger("jail.ask")

Decide = Callable[[Request], Awaitable[Decision]]
# Whom the channels tell about a new question or an answer (a protocol event).
Listener = Callable[[dict[str, Any]], None]
# Appends an "always" answer to the policy file; returns the path written.
SaveRule = Callable[["Question", Answer, str], str]
# Records a refused answer or peer in the audit log.
RecordRefusal = Callable[[dict[str, Any]], None]

# Denials by the rule's own answer: `--ask` turns these into questions. Rule errors, timeouts and bad
# answers are not (a broken rule is fixed, not waived), nor anything the proxy refuses after the rule.
RULE_DENIALS = frozenset({"rule_deny", "no_rule", "policy_default"})


def rfc3339(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp % 1 * 1000):03d}Z"


@dataclass
class Question:
    id: str
    jail_id: str
    request: Request
    decision: Decision  # what the rule answered
    asked_at: float
    deadline: float
    answer: asyncio.Future[tuple[Answer, str]] = field(repr=False)
    waiting: int = 1

    @property
    def key(self) -> tuple[str, int]:
        return (self.request.host, self.request.port)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "jail_id": self.jail_id,
            "method": self.request.method,
            "url": self.request.url,
            "scheme": self.request.scheme,
            "host": self.request.host,
            "port": self.request.port,
            "reason": self.decision.reason,
            "engine": self.decision.engine,
            "asked_at": rfc3339(self.asked_at),
            "expires_in": round(max(0.0, self.deadline - time.time()), 1),
            "waiting": self.waiting,
        }


@dataclass(frozen=True)
class Remembered:
    """A `run` or `always` answer for a host and port."""

    allow: bool
    answered_by: str
    scope: str


class Approvals:
    """The questions of one run, the answers remembered for it, and the channels' listeners."""

    def __init__(
        self,
        jail_id: str,
        decide: Decide,
        ask_denials: bool,
        timeout: float,
        save_rule: SaveRule | None = None,
        record_refusal: RecordRefusal | None = None,
    ) -> None:
        self.jail_id = jail_id
        self.rule = decide
        self.ask_denials = ask_denials
        self.timeout = timeout
        self.save_rule = save_rule
        self.record_refusal = record_refusal
        self.open: dict[str, Question] = {}
        self.by_key: dict[tuple[str, int], Question] = {}
        self.remembered: dict[tuple[str, int], Remembered] = {}
        self.listeners: list[Listener] = []
        self._numbers = itertools.count(1)

    def asks(self, decision: Decision) -> bool:
        return decision.asks or (self.ask_denials and not decision.allow and decision.reason_code in RULE_DENIALS)

    async def decide(self, request: Request) -> Decision:
        decision = await self.rule(request)
        if not self.asks(decision):
            return decision
        key = (request.host, request.port)
        if (remembered := self.remembered.get(key)) is not None:
            return self._remembered_decision(decision, remembered)
        question = self.by_key.get(key)
        if question is None:
            question = self._ask(request, decision)
        else:
            question.waiting += 1
        try:
            answer, answered_by = await asyncio.wait_for(
                asyncio.shield(question.answer), max(0.0, question.deadline - time.time())
            )
        except TimeoutError:
            self._expire(question)
            answer, answered_by = await question.answer
        return self._answered_decision(decision, answer, answered_by)

    def _ask(self, request: Request, decision: Decision) -> Question:
        now = time.time()
        question = Question(
            id=f"{self.jail_id}-{next(self._numbers)}",
            jail_id=self.jail_id,
            request=request,
            decision=decision,
            asked_at=now,
            deadline=now + self.timeout,
            answer=asyncio.get_running_loop().create_future(),
        )
        self.open[question.id] = question
        self.by_key[question.key] = question
        logger.warning("jail %s asks: %s %s (answer with `jail ask`)", self.jail_id, request.method, request.url)
        self._tell({"op": "question", "question": question.to_dict()})
        return question

    def _expire(self, question: Question) -> None:
        if not question.answer.done():
            self._settle(question, Answer(question.id, "deny", "timeout"), "timeout", None)

    def questions(self) -> list[dict[str, Any]]:
        return [question.to_dict() for question in self.open.values()]

    def answer(self, answer: Answer, answered_by: str) -> dict[str, Any]:
        """A person's answer from a channel; returns the `answered` event. Raises ProtocolError for an
        unknown or already answered question."""
        question = self.open.get(answer.question_id)
        if question is None:
            raise ProtocolError(f"no open question {answer.question_id!r} in jail {self.jail_id}")
        saved_to = None
        if answer.scope == "always":
            if self.save_rule is None:
                raise ProtocolError("nowhere to save an always answer: jail runs without --ask, --ask-save or --policy")
            saved_to = self.save_rule(question, answer, answered_by)
        return self._settle(question, answer, answered_by, saved_to)

    def refuse(self, channel: str, reason: str, **details: Any) -> None:
        """A peer or an answer that is not the person's: logged, and recorded in the audit log."""
        logger.warning("jail %s: refused an answer on the %s channel: %s", self.jail_id, channel, reason)
        if self.record_refusal is not None:
            self.record_refusal({"kind": "ask_refused", "channel": channel, "reason": reason, **details})

    def _settle(self, question: Question, answer: Answer, answered_by: str, saved_to: str | None) -> dict[str, Any]:
        del self.open[question.id]
        self.by_key.pop(question.key, None)
        if answer.scope in ("run", "always"):
            self.remembered[question.key] = Remembered(answer.verdict == "allow", answered_by, answer.scope)
        question.answer.set_result((answer, answered_by))
        event = {
            "op": "answered",
            "id": question.id,
            "verdict": answer.verdict,
            "scope": answer.scope,
            "answered_by": answered_by,
            "saved_to": saved_to,
        }
        self._tell(event)
        return event

    def _tell(self, event: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception as exc:  # one broken channel must not stop the others or the request
                logger.debug("an approvals listener failed: %r", exc)

    def _answered_decision(self, decision: Decision, answer: Answer, answered_by: str) -> Decision:
        if answered_by == "timeout":
            reason = f"nobody answered within {self.timeout:g} s (--ask-timeout); the rule said: {decision.reason}"
            code = "ask_timeout"
        else:
            verb = "allowed" if answer.verdict == "allow" else "denied"
            reason = f"{verb} by a person ({answered_by}, {answer.scope})"
            code = f"asked_{answer.verdict}"
        return replace(
            decision,
            allow=answer.verdict == "allow",
            reason=reason,
            reason_code=code,
            asked=True,
            answered_by=answered_by,
        )

    @staticmethod
    def _remembered_decision(decision: Decision, remembered: Remembered) -> Decision:
        verb = "allowed" if remembered.allow else "denied"
        reason = f"{verb} by a person earlier ({remembered.answered_by}, {remembered.scope})"
        return replace(
            decision,
            allow=remembered.allow,
            reason=reason,
            reason_code="approved" if remembered.allow else "disapproved",
            answered_by=remembered.answered_by,
        )

    def close(self) -> None:
        """The run ends: every held request is denied."""
        for question in list(self.open.values()):
            self._settle(question, Answer(question.id, "deny", "once"), "timeout", None)
