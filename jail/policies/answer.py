"""The one parser of rule answers, shared by every engine.

Grammar (httpjail's, made fail-closed):
    true | false
    {"allow": true|false}
    {"deny_message": "..."}                 deny with that message
    {"allow": {"max_tx_bytes": N}}          allow, cap the upload at N bytes
    {"ask": true}                           ask a person (jail/approvals); deny_message is the reason
    anything else                           deny, the text is the reason
As in httpjail, `deny_message` is the reason when the answer denies and is ignored when it allows, so
`{allow: r.host === 'x', deny_message: 'only x'}` works for both outcomes. Unlike httpjail, `{}`,
unknown keys and wrong types deny with a reason naming the mistake.
"""

from __future__ import annotations

import json
from typing import Any

from jail.model import Decision

ANSWER_KEYS = ("allow", "deny_message", "ask")


def _mistake(message: str) -> Decision:
    return Decision.denied(f"rule answer rejected: {message}", "bad_answer")


def _parse_object(answer: dict[str, Any]) -> Decision:
    if not answer:
        return _mistake("empty object {} (answer true, false, {allow: ...} or {deny_message: ...})")
    unknown = sorted(set(answer) - set(ANSWER_KEYS))
    if unknown:
        return _mistake(f"unknown key {unknown[0]!r} (known keys: allow, deny_message, ask)")
    message = answer.get("deny_message")
    if message is not None and not isinstance(message, str):
        return _mistake("deny_message must be a string")
    ask = answer.get("ask", False)
    if not isinstance(ask, bool):
        return _mistake(f"ask must be true or false, not {json.dumps(ask)}")
    if ask:
        if answer.get("allow", False) is not False:
            return _mistake("ask: true with an allow: ask, or allow, not both")
        return Decision.asking(message or "")
    allow = answer.get("allow", False if "deny_message" in answer or "ask" in answer else None)
    if isinstance(allow, bool):
        return Decision.allowed() if allow else Decision.denied(message or "denied by rule")
    if isinstance(allow, dict):
        return _parse_allow_options(allow)
    return _mistake(f"allow must be true, false or {{max_tx_bytes: N}}, not {json.dumps(allow)}")


def _parse_allow_options(options: dict[str, Any]) -> Decision:
    unknown = sorted(set(options) - {"max_tx_bytes"})
    if unknown or "max_tx_bytes" not in options:
        name = unknown[0] if unknown else "max_tx_bytes"
        return _mistake(f"allow object needs exactly max_tx_bytes (problem: {name!r})")
    limit = options["max_tx_bytes"]
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        return _mistake(f"max_tx_bytes must be a non-negative integer, not {json.dumps(limit)}")
    return Decision.allowed(max_tx_bytes=limit)


def parse_value(answer: Any) -> Decision:
    """Judge an already-decoded answer (a JS value, a JSON document)."""
    if isinstance(answer, bool):
        return Decision.allowed() if answer else Decision.denied("denied by rule")
    if isinstance(answer, dict):
        return _parse_object(answer)
    if isinstance(answer, str):
        return parse_text(answer)
    if answer is None:
        return _mistake("the rule returned nothing (null/undefined)")
    return _mistake(f"unsupported answer {json.dumps(answer)}")


def parse_text(text: str) -> Decision:
    """Judge an answer given as text (a line from a program, a script's output)."""
    text = text.strip()
    if not text:
        return _mistake("empty answer")
    if text in ("true", "false"):
        return parse_value(text == "true")
    if text.startswith("{"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            return Decision.denied(text)
        return parse_value(document)
    return Decision.denied(text)
