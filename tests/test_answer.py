"""The answer grammar every engine shares (jail/policies/answer.py): fail closed on any doubt."""

from __future__ import annotations

import json

import pytest

from jail.model import Decision
from jail.policies.answer import parse_text, parse_value

REJECTED = "rule answer rejected: "


def assert_allowed(decision: Decision, max_tx_bytes: int | None = None) -> None:
    assert decision.allow is True, decision
    assert decision.reason_code == "rule_allow"
    assert decision.max_tx_bytes == max_tx_bytes


def assert_denied(decision: Decision, reason: str, reason_code: str = "rule_deny") -> None:
    assert decision.allow is False, decision
    assert decision.reason == reason
    assert decision.reason_code == reason_code
    assert decision.max_tx_bytes is None


def assert_mistake(decision: Decision, *words: str) -> None:
    """A malformed answer denies, says it was rejected, and names what was wrong."""
    assert decision.allow is False, decision
    assert decision.reason_code == "bad_answer", decision
    assert decision.reason.startswith(REJECTED), decision.reason
    for word in words:
        assert word in decision.reason, (word, decision.reason)


# --- true / false -------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["true", " true", "true\n", "\t true \r\n"])
def test_true_allows(text):
    assert_allowed(parse_text(text))


@pytest.mark.parametrize("text", ["false", "false\n", "  false  "])
def test_false_denies(text):
    assert_denied(parse_text(text), "denied by rule")


def test_python_booleans_as_values():
    assert_allowed(parse_value(True))
    assert_denied(parse_value(False), "denied by rule")


@pytest.mark.parametrize("text", ["True", "TRUE", "yes", "1", "allow", "true true", "truefalse"])
def test_near_misses_of_true_deny_with_the_text(text):
    # Only the exact word allows; anything else is a deny reason, never a guess.
    assert_denied(parse_text(text), text)


# --- {allow: bool} ------------------------------------------------------------------------


def test_allow_true_object_allows():
    assert_allowed(parse_text('{"allow": true}'))
    assert_allowed(parse_value({"allow": True}))


def test_allow_false_object_denies():
    assert_denied(parse_text('{"allow": false}'), "denied by rule")
    assert_denied(parse_value({"allow": False}), "denied by rule")


def test_allow_object_with_surrounding_whitespace():
    assert_allowed(parse_text('  {"allow": true}  \n'))


# --- {deny_message: "..."} ----------------------------------------------------------------


def test_deny_message_denies_with_that_message():
    assert_denied(parse_text('{"deny_message": "not on the list"}'), "not on the list")
    assert_denied(parse_value({"deny_message": "blocked: tracker"}), "blocked: tracker")


def test_deny_message_with_allow_false_denies_with_that_message():
    assert_denied(parse_text('{"allow": false, "deny_message": "nope"}'), "nope")


def test_deny_message_keeps_unicode_and_inner_spaces():
    message = "  zugriff verweigert \u2013 \u00fcberpr\u00fcfe  "
    assert_denied(parse_value({"deny_message": message}), message)


def test_empty_deny_message_still_denies_with_a_reason():
    decision = parse_value({"deny_message": ""})
    assert decision.allow is False
    assert decision.reason  # never an empty reason


def test_null_deny_message_denies():
    decision = parse_text('{"deny_message": null}')
    assert decision.allow is False
    assert decision.reason


@pytest.mark.parametrize("message", [5, True, ["a"], {"a": 1}])
def test_non_string_deny_message_is_a_mistake(message):
    assert_mistake(parse_value({"deny_message": message}), "deny_message must be a string")


# --- {allow: {max_tx_bytes: N}} -----------------------------------------------------------


@pytest.mark.parametrize("limit", [0, 1, 10, 1024, 10**12])
def test_allow_with_upload_cap(limit):
    assert_allowed(parse_text(json.dumps({"allow": {"max_tx_bytes": limit}})), max_tx_bytes=limit)


def test_allow_with_upload_cap_as_value():
    assert_allowed(parse_value({"allow": {"max_tx_bytes": 7}}), max_tx_bytes=7)


def test_plain_allow_has_no_cap():
    assert parse_text("true").max_tx_bytes is None
    assert parse_text('{"allow": true}').max_tx_bytes is None


@pytest.mark.parametrize(
    ("limit", "shown"),
    [(-1, "-1"), (-1024, "-1024"), ("10", '"10"'), (True, "true"), (False, "false"), (1.5, "1.5"), (10.0, "10.0")],
)
def test_bad_max_tx_bytes_is_a_mistake(limit, shown):
    decision = parse_value({"allow": {"max_tx_bytes": limit}})
    assert_mistake(decision, "max_tx_bytes must be a non-negative integer", shown)


@pytest.mark.parametrize("limit", [None, [], {}])
def test_max_tx_bytes_of_the_wrong_type_is_a_mistake(limit):
    assert_mistake(parse_text(json.dumps({"allow": {"max_tx_bytes": limit}})), "max_tx_bytes")


def test_allow_object_without_max_tx_bytes_is_a_mistake():
    assert_mistake(parse_text('{"allow": {}}'), "max_tx_bytes")


def test_allow_object_with_an_unknown_option_names_it():
    assert_mistake(parse_text('{"allow": {"max_tx_bytes": 10, "max_rx_bytes": 5}}'), "'max_rx_bytes'")
    assert_mistake(parse_text('{"allow": {"max_bytes": 10}}'), "'max_bytes'")


# --- anything else is a deny with the text as reason ---------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "blocked by policy",
        "no",
        "null",
        "[true]",
        '"true"',
        "42",
        "denied: {not json}",
        "zugriff verweigert \u2013 \u00fcberpr\u00fcfe",
    ],
)
def test_other_text_denies_with_that_text(text):
    assert_denied(parse_text(text), text)


def test_text_reason_is_stripped():
    assert_denied(parse_text("  go away \n"), "go away")


def test_multiline_text_denies_with_the_whole_text():
    assert_denied(parse_text("first line\nsecond line"), "first line\nsecond line")


@pytest.mark.parametrize("text", ["{allow: true}", "{not json", '{"allow": true', "{'allow': true}"])
def test_text_that_looks_like_json_but_is_not_denies_with_the_text(text):
    # A JS-style object literal is not JSON: it must not be read as an allow.
    assert_denied(parse_text(text), text)


def test_string_value_is_judged_as_text():
    assert_denied(parse_value("not today"), "not today")
    assert_allowed(parse_value("true"))
    assert_mistake(parse_value(""), "empty answer")


# --- mistakes -----------------------------------------------------------------------------


def test_empty_object_denies_naming_the_mistake():
    assert_mistake(parse_text("{}"), "empty object")
    assert_mistake(parse_value({}), "empty object")


def test_empty_object_with_whitespace_inside():
    assert_mistake(parse_text("{ }"), "empty object")


@pytest.mark.parametrize("key", ["alow", "Allow", "deny", "message", "id", "max_tx_bytes"])
def test_unknown_key_denies_naming_the_key(key):
    assert_mistake(parse_value({key: True}), f"'{key}'")


def test_unknown_key_next_to_a_valid_allow_still_denies():
    # `{"allow": true, "typo": 1}` must not allow: the rule author made a mistake somewhere.
    assert_mistake(parse_text('{"allow": true, "typo": 1}'), "'typo'")


def test_several_unknown_keys_name_one_of_them():
    decision = parse_value({"zeta": 1, "beta": 2})
    assert_mistake(decision)
    assert "'beta'" in decision.reason or "'zeta'" in decision.reason


def test_allow_true_ignores_deny_message_as_httpjail_does():
    # The natural rule `({allow: r.host === 'x', deny_message: 'only x'})` must work for both outcomes.
    assert parse_text('{"allow": true, "deny_message": "x"}') == Decision.allowed()
    assert_denied(parse_text('{"allow": false, "deny_message": "only x"}'), "only x")


def test_allow_with_cap_ignores_deny_message():
    assert parse_value({"allow": {"max_tx_bytes": 5}, "deny_message": "x"}) == Decision.allowed(max_tx_bytes=5)


def test_allow_with_cap_and_deny_message_still_checks_the_cap():
    assert_mistake(parse_value({"allow": {"max_tx_bytes": -1}, "deny_message": "x"}), "max_tx_bytes")


def test_wrongly_typed_deny_message_is_a_mistake_even_when_allowed():
    assert_mistake(parse_value({"allow": True, "deny_message": 3}), "deny_message must be a string")


@pytest.mark.parametrize("value", ["yes", 1, 0, None, [True], "true"])
def test_allow_of_the_wrong_type_is_a_mistake(value):
    assert_mistake(parse_value({"allow": value}), "allow must be")


def test_allow_null_with_deny_message_still_denies():
    assert parse_value({"allow": None, "deny_message": "x"}).allow is False


@pytest.mark.parametrize("text", ["", " ", "\n", "\t\r\n  "])
def test_empty_answer_denies_naming_the_mistake(text):
    assert_mistake(parse_text(text), "empty answer")


def test_null_value_denies_naming_the_mistake():
    assert_mistake(parse_value(None), "nothing")


@pytest.mark.parametrize("value", [1, 0, 1.5, [True], [], ["allow"]])
def test_value_that_is_not_an_object_denies(value):
    assert_mistake(parse_value(value), "unsupported answer", json.dumps(value))


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        '{"allow": "true"}',
        '{"allow": 1}',
        '{"allow": {"max_tx_bytes": -5}}',
        '{"allow": true, "extra": 1}',
        '{"deny_message": 1}',
        "",
    ],
)
def test_no_malformed_answer_ever_allows(text):
    assert parse_text(text).allow is False


def test_decision_fields_are_fresh_and_unstamped():
    decision = parse_text("true")
    assert decision.engine == ""
    assert decision.rule_us == 0
    assert decision.reason == ""
