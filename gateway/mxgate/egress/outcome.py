"""What to do with a job after one delivery attempt: a pure decision over the recipients' replies.

Each recipient ends in one of three piles: delivered (2xx), failed (5xx, or 4xx past the maximum age:
a delivery status notification goes to the sender), or deferred (4xx: the job is rescheduled with only
these recipients). The deferral class of the first deferred reply drives the retry delay and the
local reflex towards the provider.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mxgate.egress.replies import DeferralClass, Outcome, SmtpReply, classify
from mxgate.egress.retry import RetrySchedule, is_expired, next_delay

EXPIRED_STATUS = "4.4.7"


@dataclass(slots=True)
class Verdict:
    delivered: list[str] = field(default_factory=list)
    failed: list[tuple[str, SmtpReply]] = field(default_factory=list)
    deferred: list[tuple[str, SmtpReply]] = field(default_factory=list)
    deferral: DeferralClass | None = None
    retry_delay: float = 0.0
    expired: bool = False


def judge(replies: dict[str, SmtpReply], *, attempts: int, age: float, schedule: RetrySchedule,
          rand: float) -> Verdict:
    """``attempts``: deferrals before this attempt; ``age``: seconds since the message was queued."""
    verdict = Verdict()
    for rcpt, reply in replies.items():
        outcome = classify(reply)
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
