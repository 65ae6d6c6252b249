"""SmtpReply parsing and the delivered / deferred (and why) / failed classification."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxgate.egress.replies import (
    DEFERRAL_RULES,
    Classification,
    DeferralClass,
    DeferralRule,
    Outcome,
    SmtpReply,
    classify,
)

CONNECTIONS, RATE, REPUTATION, OTHER = (
    DeferralClass.CONNECTIONS,
    DeferralClass.RATE,
    DeferralClass.REPUTATION,
    DeferralClass.OTHER,
)

# (code, message as aiosmtplib returns it, enhanced, outcome, deferral)
# The first seven rows are reference.md section 1, in its order.
REPLIES: list[tuple[int, str, str | None, Outcome, DeferralClass | None]] = [
    (
        451,
        "4.7.652 The mail server [192.0.2.1] has exceeded the maximum number of connections.",
        "4.7.652",
        Outcome.DEFERRED,
        CONNECTIONS,
    ),
    (421, "4.4.5 Too many connections from your host.", "4.4.5", Outcome.DEFERRED, CONNECTIONS),
    (
        451,
        "4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.",
        "4.7.650",
        Outcome.DEFERRED,
        RATE,
    ),
    (451, "4.7.500 Server busy", "4.7.500", Outcome.DEFERRED, OTHER),
    (
        421,
        (
            "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user "
            "complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes"
        ),
        "4.7.0",
        Outcome.DEFERRED,
        REPUTATION,
    ),
    (
        421,
        (
            "4.7.28 Our system has detected an unusual rate of unsolicited mail originating from your IP\n"
            "4.7.28 address. To protect our users from spam, mail sent from your IP address has been\n"
            "4.7.28 temporarily rate limited."
        ),
        "4.7.28",
        Outcome.DEFERRED,
        RATE,
    ),
    (
        450,
        "4.2.1 The user you are trying to contact is receiving mail too fast. Please try\n4.2.1 again later.",
        "4.2.1",
        Outcome.DEFERRED,
        RATE,
    ),
    # --- the rest of the Microsoft reputation pair, and other wording of the same signals ---
    (
        451,
        "4.7.651 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.",
        "4.7.651",
        Outcome.DEFERRED,
        RATE,
    ),
    (421, "Too many concurrent SMTP connections from this IP address", None, Outcome.DEFERRED, CONNECTIONS),
    (421, "4.7.0 too many connections", "4.7.0", Outcome.DEFERRED, CONNECTIONS),
    (450, "4.7.1 Too many simultaneous connections", "4.7.1", Outcome.DEFERRED, CONNECTIONS),
    (421, "4.7.0 Rate limit exceeded, please slow down", "4.7.0", Outcome.DEFERRED, RATE),
    (421, "4.7.0 You are sending too fast", "4.7.0", Outcome.DEFERRED, RATE),
    (451, "4.7.1 Sending rate exceeded for this account", "4.7.1", Outcome.DEFERRED, RATE),
    (
        450,
        (
            "4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional "
            "messages from being delivered."
        ),
        "4.2.1",
        Outcome.DEFERRED,
        RATE,
    ),
    (
        421,
        "4.7.0 This message is suspicious due to the very low reputation of the sending IP address.",
        "4.7.0",
        Outcome.DEFERRED,
        REPUTATION,
    ),
    # rate limited *because of* reputation, without Microsoft's code: reputation still wins
    (451, "rate limited due to IP reputation", None, Outcome.DEFERRED, REPUTATION),
    # --- ordinary deferrals: must not be mistaken for throttling ---
    (421, "4.3.2 Service shutting down and closing transmission channel", "4.3.2", Outcome.DEFERRED, OTHER),
    (451, "4.7.500 Server busy. Please try again later.", "4.7.500", Outcome.DEFERRED, OTHER),
    (421, "4.7.0 Try again later, closing connection. (EHLO)", "4.7.0", Outcome.DEFERRED, OTHER),
    (451, "4.7.1 Greylisted, please try again in 300 seconds", "4.7.1", Outcome.DEFERRED, OTHER),
    (452, "4.5.3 Too many recipients", "4.5.3", Outcome.DEFERRED, OTHER),
    (452, "4.2.2 The email account that you tried to reach is over quota.", "4.2.2", Outcome.DEFERRED, OTHER),
    (
        451,
        "4.4.5 Insufficient system storage",
        "4.4.5",
        Outcome.DEFERRED,
        OTHER,
    ),  # 4.4.5 only counts with 421
    (451, "Temporary local problem - please try later", None, Outcome.DEFERRED, OTHER),
    (421, "", None, Outcome.DEFERRED, OTHER),
    # --- delivered and failed: the basic code decides, whatever the text says ---
    (250, "2.0.0 OK  1700000000 abc.123 - gsmtp", "2.0.0", Outcome.DELIVERED, None),
    (250, "Ok: queued as 4Tx1", None, Outcome.DELIVERED, None),
    (251, "2.1.5 User not local; will forward", "2.1.5", Outcome.DELIVERED, None),
    (550, "5.1.1 The email account that you tried to reach does not exist.", "5.1.1", Outcome.FAILED, None),
    (
        554,
        "5.7.1 Service unavailable; client host blocked using reputation list",
        "5.7.1",
        Outcome.FAILED,
        None,
    ),
    (550, "5.7.1 Too many connections", "5.7.1", Outcome.FAILED, None),
    # --- enhanced class digit disagrees with the basic code: the basic code wins ---
    (451, "5.7.1 Please try later", "5.7.1", Outcome.DEFERRED, OTHER),
    (550, "4.7.652 has exceeded the maximum number of connections", "4.7.652", Outcome.FAILED, None),
    (250, "5.0.0 odd but accepted", "5.0.0", Outcome.DELIVERED, None),
    # --- protocol oddities are retried, never bounced ---
    (354, "End data with <CR><LF>.<CR><LF>", None, Outcome.DEFERRED, OTHER),
    (334, "VXNlcm5hbWU6", None, Outcome.DEFERRED, OTHER),
    (150, "what", None, Outcome.DEFERRED, OTHER),
    (699, "6.0.0 nonsense", None, Outcome.DEFERRED, OTHER),
    (-1, "Malformed SMTP response line: xyz", None, Outcome.DEFERRED, OTHER),
]


@pytest.mark.parametrize(("code", "message", "enhanced", "outcome", "deferral"), REPLIES)
def test_parse_and_classify(
    code: int, message: str, enhanced: str | None, outcome: Outcome, deferral: DeferralClass | None
) -> None:
    reply = SmtpReply.parse(code, message)
    assert reply.code == code
    assert reply.enhanced == enhanced
    assert classify(reply) == Classification(outcome=outcome, deferral=deferral)


@pytest.mark.parametrize(("code", "message", "enhanced", "outcome", "deferral"), REPLIES)
def test_lower_and_upper_case_classify_the_same(
    code: int, message: str, enhanced: str | None, outcome: Outcome, deferral: DeferralClass | None
) -> None:
    for variant in (message.lower(), message.upper()):
        assert classify(SmtpReply.parse(code, variant)) == Classification(outcome=outcome, deferral=deferral)


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (250, "2.0.0 OK", SmtpReply(250, "2.0.0", "OK")),
        (250, "OK", SmtpReply(250, None, "OK")),
        (421, "", SmtpReply(421, None, "")),
        (421, "4.4.5", SmtpReply(421, "4.4.5", "")),
        (451, "  4.7.500   Server busy  ", SmtpReply(451, "4.7.500", "Server busy")),
        # Gmail repeats the code on every line: the repetition goes, the sentence stays whole
        (450, "4.2.1 receiving mail\n4.2.1 too fast.", SmtpReply(450, "4.2.1", "receiving mail too fast.")),
        # a different code on a continuation line is text, not a second code
        (451, "4.7.1 first\n4.7.2 second", SmtpReply(451, "4.7.1", "first 4.7.2 second")),
        # continuation lines without the code; CRLF tolerated; empty lines dropped
        (
            250,
            "mx.example.com Hello\r\nPIPELINING\r\n\r\n8BITMIME",
            SmtpReply(250, None, "mx.example.com Hello PIPELINING 8BITMIME"),
        ),
        # only the first line can carry the reply's enhanced code
        (451, "Busy\n4.7.500 try later", SmtpReply(451, None, "Busy 4.7.500 try later")),
        # not an enhanced code: wrong class digit, too many digits, not followed by white space
        (451, "3.1.1 odd", SmtpReply(451, None, "3.1.1 odd")),
        (451, "4.7.6520 odd", SmtpReply(451, None, "4.7.6520 odd")),
        (451, "4.7.652. odd", SmtpReply(451, None, "4.7.652. odd")),
        (451, "4.7 odd", SmtpReply(451, None, "4.7 odd")),
        (451, "4.7.0\tTab", SmtpReply(451, "4.7.0", "Tab")),
    ],
)
def test_parse(code: int, message: str, expected: SmtpReply) -> None:
    assert SmtpReply.parse(code, message) == expected


@pytest.mark.parametrize(
    ("reply", "text"),
    [
        (SmtpReply(451, "4.7.652", "The mail server"), "451 4.7.652 The mail server"),
        (SmtpReply(250, None, "OK"), "250 OK"),
        (SmtpReply(421, "4.4.5", ""), "421 4.4.5"),
        (SmtpReply(421, None, ""), "421"),
    ],
)
def test_str_is_what_rules_match(reply: SmtpReply, text: str) -> None:
    assert str(reply) == text


def test_enhanced_code_must_sit_in_its_place_to_count() -> None:
    # a code quoted in prose, or an IP address that looks like one, is not Microsoft's 4.7.652 / Gmail's 4.7.28
    assert classify(SmtpReply(451, None, "see 4.7.652 in the docs")).deferral is OTHER
    assert classify(SmtpReply(451, "4.7.0", "from 10.4.7.28 greylisted")).deferral is OTHER


def test_classification_invariant() -> None:
    with pytest.raises(ValueError, match="deferral must be set exactly"):
        Classification(outcome=Outcome.DEFERRED, deferral=None)
    with pytest.raises(ValueError, match="deferral must be set exactly"):
        Classification(outcome=Outcome.FAILED, deferral=DeferralClass.RATE)


def test_rules_are_one_ordered_table_reusable_by_operator_rules() -> None:
    assert all(isinstance(rule, DeferralRule) for rule in DEFERRAL_RULES)
    assert all(rule.pattern.flags & re.IGNORECASE and rule.reason for rule in DEFERRAL_RULES)
    # an operator rule placed first overrides the built-in table (first match wins)
    custom = (DeferralRule.of(r"Server busy", DeferralClass.CONNECTIONS, "our MX says busy when full"),)
    reply = SmtpReply.parse(451, "4.7.500 Server busy")
    assert classify(reply) == Classification(outcome=Outcome.DEFERRED, deferral=OTHER)
    assert classify(reply, rules=custom + DEFERRAL_RULES).deferral is DeferralClass.CONNECTIONS
    # rules never turn a 2xx or 5xx into a deferral
    assert classify(SmtpReply(550, None, "Server busy"), rules=custom).outcome is Outcome.FAILED


def test_first_match_wins_in_table_order() -> None:
    # without its code, matches both the reputation wording and the rate wording; the earlier row decides
    reply = SmtpReply(451, "4.7.1", "temporarily rate limited due to IP reputation")
    matching = [rule.deferral for rule in DEFERRAL_RULES if rule.matches(reply)]
    assert matching[0] is REPUTATION and RATE in matching
    assert classify(reply).deferral is REPUTATION
    # with Microsoft's code, the provider-specific row comes first: a rate limit (see DEFERRAL_RULES)
    assert classify(SmtpReply(451, "4.7.650", "temporarily rate limited due to IP reputation")).deferral is RATE


@given(code=st.integers(min_value=-1000, max_value=1000), message=st.text(max_size=300))
def test_every_reply_classifies_consistently(code: int, message: str) -> None:
    reply = SmtpReply.parse(code, message)
    verdict = classify(reply)
    if 200 <= code <= 299:
        assert verdict.outcome is Outcome.DELIVERED
    elif 500 <= code <= 599:
        assert verdict.outcome is Outcome.FAILED
    else:
        assert verdict.outcome is Outcome.DEFERRED and verdict.deferral is not None
    assert "\n" not in reply.text and "\r" not in str(reply)
