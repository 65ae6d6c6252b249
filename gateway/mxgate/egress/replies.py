"""SMTP replies from a next hop: parsing, and what each one means for the job and the provider.

Two questions are answered here, both as pure functions over plain data:

* **What happened to the message?** The basic reply code decides alone (RFC 5321 §4.2.1): 2xx delivered,
  5xx failed for good, 4xx deferred. An enhanced status code (RFC 3463) whose class digit disagrees with the
  basic code (``451 5.7.1``) is kept as the server sent it but never overrides the basic code: a server that
  says "4" has promised the message may succeed later, and dropping it on the strength of a contradictory
  detail would lose mail.
* **Why was it deferred?** The deferral class tells the limiter how to react. ``CONNECTIONS`` and ``RATE``
  are throttling signals (open fewer connections / send slower, retry soon); ``REPUTATION`` means the
  provider distrusts us right now (back off hard, suspend); ``OTHER`` is an ordinary transient failure
  (retry with backoff, change nothing else).

The deferral class comes from :data:`DEFERRAL_RULES`, one ordered table of regular expressions over
``str(reply)`` = ``"<code> <enhanced> <text>"`` (KumoMTA's traffic-shaping rules match the same string), so
the operator's configurable ``responses`` rules can reuse :class:`DeferralRule` and be placed in front of the
built-in ones. First match wins; provider-specific enhanced codes come before generic wording because a
code is a stronger promise than prose.

Replies outside 2xx/4xx/5xx (a 1xx, a 3xx where a final reply was due, a number out of range) are protocol
oddities, not verdicts on the message: they are classified DEFERRED/OTHER so the job is retried, in line
with :class:`mxgate.errors.DeliveryError` ("spoke nonsense: deferred").
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "DEFERRAL_RULES",
    "Classification",
    "DeferralClass",
    "DeferralRule",
    "Outcome",
    "SmtpReply",
    "classify",
]

# RFC 3463 §2: class "." subject "." detail; subject and detail are 1-3 digits. It must be followed by
# white space or end the line, so "4.7.6520" or "2.0.0.1" are text, not a code.
_ENHANCED_CODE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=[ \t]|$)")


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """One complete (possibly multi-line) reply from an SMTP server."""

    code: int
    """The basic reply code, e.g. 250 or 451."""
    enhanced: str | None
    """The RFC 3463 enhanced status code of the first line, e.g. ``"4.7.652"``, or None if the server sent none."""
    text: str
    """The rest of the reply; the lines of a multi-line reply joined with single spaces."""

    @classmethod
    def parse(cls, code: int, message: str) -> SmtpReply:
        """Build a reply from the ``(code, message)`` pair aiosmtplib returns.

        aiosmtplib strips the ``"451-"``/``"451 "`` prefix of every line and joins the lines with ``"\\n"``.
        The enhanced code is taken from the first line; continuation lines that repeat it (Gmail writes
        ``4.2.1`` at the head of every line) have the repetition removed so the text reads as one sentence.
        """
        enhanced: str | None = None
        parts: list[str] = []
        for index, raw_line in enumerate(message.splitlines()):
            line = raw_line.strip()
            match = _ENHANCED_CODE.match(line)
            if match is not None and (index == 0 or match.group(0) == enhanced):
                if index == 0:
                    enhanced = match.group(0)
                line = line[match.end() :].lstrip()
            if line:
                parts.append(line)
        return cls(code=code, enhanced=enhanced, text=" ".join(parts))

    def __str__(self) -> str:
        """``"<code> <enhanced> <text>"``, leaving out what is absent: the string the deferral rules match."""
        return " ".join(part for part in (str(self.code), self.enhanced, self.text) if part)


class Outcome(enum.StrEnum):
    """What a final reply means for the message to this recipient."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


class DeferralClass(enum.StrEnum):
    """Why a next hop deferred: decides how the limiter and the retry schedule react."""

    CONNECTIONS = "connections"
    """Too many concurrent connections from us: open fewer, fleet-wide; retry soon."""
    RATE = "rate"
    """Messages arrive too fast: send slower; retry soon, the limiter paces the retry."""
    REPUTATION = "reputation"
    """The provider distrusts our IP or volume right now: back off hard or suspend the provider."""
    OTHER = "other"
    """An ordinary transient failure (busy, shutting down, greylisting): retry with backoff."""


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one reply."""

    outcome: Outcome
    """Delivered, deferred (retry later) or failed (bounce)."""
    deferral: DeferralClass | None
    """Why it was deferred; set exactly when ``outcome`` is DEFERRED."""

    def __post_init__(self) -> None:
        if (self.outcome is Outcome.DEFERRED) != (self.deferral is not None):
            raise ValueError(
                f"deferral must be set exactly when the outcome is deferred "
                f"(outcome={self.outcome.value}, deferral={self.deferral})"
            )


@dataclass(frozen=True, slots=True)
class DeferralRule:
    """One row of a deferral table: a regex over ``str(reply)`` and the class it implies."""

    pattern: re.Pattern[str]
    """Searched (not anchored unless the regex says so) in ``"<code> <enhanced> <text>"``."""
    deferral: DeferralClass
    """The class of a 4xx reply the pattern matches."""
    reason: str
    """Why the rule exists: which provider sends it and what it means; shown in logs and docs."""

    @classmethod
    def of(cls, regex: str, deferral: DeferralClass, reason: str) -> DeferralRule:
        """Compile ``regex`` case-insensitively: providers vary the case of their wording over time."""
        return cls(pattern=re.compile(regex, re.IGNORECASE), deferral=deferral, reason=reason)

    def matches(self, reply: SmtpReply) -> bool:
        """True if the rule's pattern occurs in ``str(reply)``."""
        return self.pattern.search(str(reply)) is not None


# An enhanced code sits right after the basic code in str(reply); anchoring there keeps a code quoted in
# the prose (or an IP address such as 10.4.7.28) from matching.
def _code(enhanced_regex: str) -> str:
    return rf"^\d{{3}} {enhanced_regex}(?=\s|$)"


DEFERRAL_RULES: tuple[DeferralRule, ...] = (
    # --- provider-specific enhanced codes: the strongest evidence, checked first -------------------------
    DeferralRule.of(
        _code(r"4\.7\.65[01]"),
        DeferralClass.RATE,
        "Microsoft: 'has been temporarily rate limited due to IP reputation': a rate limit, whose level the "
        "IP's reputation sets (typical during IP warm-up). The reaction is a rate one: the fleet's rate "
        "comes down to what the provider accepted and the deferred mail goes again at that pace (the "
        "message is not at fault), rather than waiting out the ordinary ladder while the rate is right.",
    ),
    DeferralRule.of(
        _code(r"4\.7\.652"),
        DeferralClass.CONNECTIONS,
        "Microsoft: 'has exceeded the maximum number of connections': too many concurrent connections.",
    ),
    DeferralRule.of(
        _code(r"4\.7\.28"),
        DeferralClass.RATE,
        "Gmail: 'unusual rate of unsolicited mail': the IP is rate limited; lower the message rate.",
    ),
    DeferralRule.of(
        r"\[TSS04\]",
        DeferralClass.REPUTATION,
        "Yahoo/AOL: 'temporarily deferred due to unexpected volume or user complaints': suspend the "
        "provider for a while (KumoMTA's default is 2 hours); retrying sooner prolongs the block.",
    ),
    DeferralRule.of(
        r"^421 4\.4\.5(?=\s|$)",
        DeferralClass.CONNECTIONS,
        "Generic: '421 4.4.5 Too many connections from your host' (4.4.5 is 'system congestion'; with 421 "
        "the server is refusing this connection).",
    ),
    # --- generic wording ---------------------------------------------------------------------------------
    DeferralRule.of(
        r"\breputation\b",
        DeferralClass.REPUTATION,
        "Any provider naming reputation (e.g. Gmail 'very low reputation of the sending IP'). Checked "
        "before the rate wording so 'rate limited due to IP reputation' without a code stays REPUTATION.",
    ),
    DeferralRule.of(
        r"\btoo many (?:(?:concurrent|simultaneous)\b|connections\b)",
        DeferralClass.CONNECTIONS,
        "'too many connections' / 'too many concurrent sessions'. Not 'too many recipients' (4.5.3), "
        "which is about one transaction and says nothing about load.",
    ),
    DeferralRule.of(
        r"\breceiving mail (?:too fast|at a rate)\b",
        DeferralClass.RATE,
        "Gmail '450 4.2.1 ... is receiving mail too fast': a PER-RECIPIENT rate. Only that recipient "
        "should wait; the provider-wide limits must not be lowered because one mailbox is popular.",
    ),
    DeferralRule.of(
        r"\brate[- ]?limit|\b(?:message|sending|send|mail|connection) rate\b|\btoo fast\b",
        DeferralClass.RATE,
        "Explicit rate wording ('rate limited', 'sending rate exceeded', 'you are sending too fast'). "
        "Deliberately not 'try again later', which every kind of 4xx says.",
    ),
)
"""The built-in deferral rules, in match order (first match wins)."""


def classify(reply: SmtpReply, *, rules: Sequence[DeferralRule] = DEFERRAL_RULES) -> Classification:
    """Classify a final reply. ``rules`` lets a caller put operator-configured rules in front of the defaults."""
    family = reply.code // 100 if 200 <= reply.code <= 599 else None
    if family == 2:
        return Classification(outcome=Outcome.DELIVERED, deferral=None)
    if family == 5:
        return Classification(outcome=Outcome.FAILED, deferral=None)
    if family == 4:
        for rule in rules:
            if rule.matches(reply):
                return Classification(outcome=Outcome.DEFERRED, deferral=rule.deferral)
    # 4xx with no matching rule, or a protocol oddity (1xx, 3xx, out of range): retry, change nothing else.
    return Classification(outcome=Outcome.DEFERRED, deferral=DeferralClass.OTHER)
