"""What to do with a job after one delivery attempt: a pure decision over the recipients' replies.

Each recipient ends in one of three piles: delivered (2xx), failed (5xx, or 4xx past the maximum age:
a delivery status notification goes to the sender), or deferred (4xx: the job is rescheduled with only
these recipients). The deferral class of the first deferred reply drives the retry delay and the
local reflex towards the provider.

A policy's ``spec.responses`` rules are tried first, in order, on every reply that is not 2xx:
``TightenConnections`` / ``TightenRate`` make a 4xx a connection or rate signal, ``Retry`` an
ordinary deferral, ``Bounce`` a permanent failure, and ``Suspend`` a deferral that also suspends the
provider for the rule's duration (``Verdict.suspend_for``). Replies no rule matches are classified by
the built-in table (``replies.classify``).

``judge_plainly`` is the verdict when ``judge`` itself cannot be applied (a provider's retry schedule
that raises: a policy the validator should have refused, or a defect of ours): the basic reply code
alone decides, with a fixed backoff and the built-in queue lifetime. It calls nothing that could raise,
so a delivered message is still acknowledged and a refused one still bounced.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from mxgate.duration import parse_duration
from mxgate.egress.replies import Classification, DeferralClass, Outcome, SmtpReply, classify
from mxgate.egress.retry import RetrySchedule, is_expired, next_delay
from mxgate.policy import REPLY_MATCH_FLAGS, ResponseRule

EXPIRED_STATUS = "4.4.7"

PLAIN_FIRST_DELAY = 300.0
"""``judge_plainly``: seconds before the first retry (Postfix's ``minimal_backoff_time``); doubled per
deferral up to ``PLAIN_MAX_DELAY``."""
PLAIN_MAX_DELAY = 3600.0
"""``judge_plainly``: the longest wait between retries (the built-in ``RetrySchedule.max_delay``)."""
PLAIN_MAX_AGE = 5 * 86400.0
"""``judge_plainly``: the queue lifetime (the built-in ``RetrySchedule.max_age``)."""


@dataclass(slots=True)
class Verdict:
    delivered: list[str] = field(default_factory=list)
    failed: list[tuple[str, SmtpReply]] = field(default_factory=list)
    deferred: list[tuple[str, SmtpReply]] = field(default_factory=list)
    deferral: DeferralClass | None = None
    retry_delay: float = 0.0
    expired: bool = False
    suspend_for: float | None = None   # seconds, when a Suspend rule matched


@dataclass(frozen=True, slots=True)
class CompiledRule:
    pattern: re.Pattern[str]
    action: str
    seconds: float | None

    def matches(self, reply: SmtpReply) -> bool:
        return self.pattern.search(str(reply)) is not None


def compile_rules(rules: Sequence[ResponseRule]) -> tuple[CompiledRule, ...]:
    return tuple(CompiledRule(re.compile(r.match, REPLY_MATCH_FLAGS), r.action,
                              parse_duration(r.duration) if r.duration else None) for r in rules)


_ACTION_CLASS = {"TightenConnections": DeferralClass.CONNECTIONS, "TightenRate": DeferralClass.RATE,
                 "Retry": DeferralClass.OTHER, "Suspend": DeferralClass.REPUTATION}


def classify_with(reply: SmtpReply, rules: Sequence[CompiledRule]) -> tuple[Classification, CompiledRule | None]:
    """The policy's rules first (on non-2xx replies), then the built-in table."""
    if not 200 <= reply.code < 300:
        for rule in rules:
            if rule.matches(reply):
                if rule.action == "Bounce":
                    return Classification(outcome=Outcome.FAILED, deferral=None), rule
                if reply.code >= 500:
                    break  # a permanent reply stays permanent: rules only decide what a deferral means
                return Classification(outcome=Outcome.DEFERRED, deferral=_ACTION_CLASS[rule.action]), rule
    return classify(reply), None


def judge(replies: dict[str, SmtpReply], *, attempts: int, age: float, schedule: RetrySchedule,
          rand: float, rules: Sequence[CompiledRule] = ()) -> Verdict:
    """``attempts``: deferrals before this attempt; ``age``: seconds since the message was queued."""
    verdict = Verdict()
    for rcpt, reply in replies.items():
        outcome, rule = classify_with(reply, rules)
        if rule is not None and rule.action == "Suspend" and rule.seconds is not None:
            verdict.suspend_for = max(verdict.suspend_for or 0.0, rule.seconds)
        if outcome.outcome is Outcome.DELIVERED:
            verdict.delivered.append(rcpt)
        elif outcome.outcome is Outcome.FAILED:
            verdict.failed.append((rcpt, reply))
        else:
            verdict.deferred.append((rcpt, reply))
            if verdict.deferral is None:
                verdict.deferral = outcome.deferral
    if verdict.deferred:
        if is_expired(schedule, age=age):
            verdict.expired = True
            verdict.failed += verdict.deferred
            verdict.deferred = []
        else:
            verdict.retry_delay = next_delay(schedule, attempts=attempts + 1, deferral=verdict.deferral, rand=rand)
    return verdict


def judge_plainly(replies: dict[str, SmtpReply], *, attempts: int, age: float, rand: float) -> Verdict:
    """The verdict by the basic reply code alone (2xx delivered, 5xx failed, anything else deferred), for when
    ``judge`` raised. No policy rule, no retry schedule: ``PLAIN_FIRST_DELAY`` doubling to ``PLAIN_MAX_DELAY``
    with +-20 % jitter, and deferred recipients fail once ``age`` reaches ``PLAIN_MAX_AGE``."""
    verdict = Verdict()
    for rcpt, reply in replies.items():
        if 200 <= reply.code < 300:
            verdict.delivered.append(rcpt)
        elif 500 <= reply.code < 600:
            verdict.failed.append((rcpt, reply))
        else:
            verdict.deferred.append((rcpt, reply))
    if verdict.deferred:
        if age >= PLAIN_MAX_AGE:  # a NaN age compares False: retried, never dropped
            verdict.expired = True
            verdict.failed += verdict.deferred
            verdict.deferred = []
        else:
            verdict.deferral = DeferralClass.OTHER
            base = min(PLAIN_MAX_DELAY, PLAIN_FIRST_DELAY * 2 ** min(max(attempts, 0), 16))
            draw = rand if 0.0 <= rand < 1.0 else 0.5  # also a NaN
            verdict.retry_delay = base * (1 + 0.2 * (2 * draw - 1))
    return verdict
