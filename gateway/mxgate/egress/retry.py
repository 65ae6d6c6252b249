"""When to retry a deferred job, and when to give up on it.

Two ladders share one shape, exponential backoff with jitter and a cap:

* the **ordinary** ladder (60 s, 2 min, 4 min, ... capped at 1 h) for reputation trouble and ordinary
  transient failures: the remote side needs time, and asking again sooner only adds load;
* the **throttled** ladder (5 s, 10 s, 20 s, ... capped at 5 min) for CONNECTIONS and RATE deferrals: the
  provider is healthy but we pushed too hard. The limiter already paces the retry (a connection lease, a
  rate slot), so the schedule only has to avoid stranding the mail for minutes behind a limit that frees up
  in seconds. Postfix's single ladder (300 s minimum) is what turns a throttling provider into a 90 %
  deferral rate with the mail waiting minutes between tries.

Jitter multiplies the capped delay by a factor in ``[1 - jitter, 1 + jitter)``; it is applied after the cap
on purpose, so a burst of jobs that all reached the cap still spreads out instead of returning as one wave.
The random draw is a parameter (``rand``), like redis-py's ``backoff.compute``: the function stays pure and
the tests need no seeded generator.

A job older than ``max_age`` bounces with 5.4.7 "delivery time expired" (RFC 3463), as Postfix does after
its 5-day queue lifetime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mxgate.egress.replies import DeferralClass

__all__ = ["THROTTLED", "RetrySchedule", "is_expired", "next_delay"]

THROTTLED = frozenset({DeferralClass.CONNECTIONS, DeferralClass.RATE})
"""The deferral classes that say we pushed too hard, not that the message or the provider has trouble."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RetrySchedule:
    """The backoff ladders and the queue lifetime; all durations in seconds."""

    initial_delay: float = 60.0
    """Delay before the first retry of an ordinary deferral (REPUTATION, OTHER, or unknown)."""
    multiplier: float = 2.0
    """Growth factor from one retry to the next; 1.0 means a constant delay."""
    max_delay: float = 3600.0
    """Cap of the ordinary ladder, before jitter."""
    jitter: float = 0.2
    """Relative spread (0.2 = +-20 %): keeps a burst of deferrals from retrying as a wave."""
    throttled_delay: float = 5.0
    """Delay before the first retry after a throttling deferral (CONNECTIONS, RATE): the limiter paces the
    retry, the schedule must not strand the mail for minutes."""
    throttled_max_delay: float = 300.0
    """Cap of the throttled ladder, before jitter."""
    max_age: float = 5 * 86400.0
    """Queue lifetime: a job this old bounces (5.4.7 "delivery time expired")."""

    def __post_init__(self) -> None:
        for name in ("initial_delay", "max_delay", "throttled_delay", "throttled_max_delay", "max_age"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"RetrySchedule.{name} must be a finite number of seconds > 0, got {value!r}"
                )
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1):
            raise ValueError(
                f"RetrySchedule.multiplier must be >= 1 (delays never shrink), got {self.multiplier!r}"
            )
        # Below 1 so the lowest possible delay stays positive: a zero delay would be a hot retry loop.
        if not 0 <= self.jitter < 1:
            raise ValueError(f"RetrySchedule.jitter must be in [0, 1), got {self.jitter!r}")
        if self.max_delay < self.initial_delay:
            raise ValueError(
                f"RetrySchedule.max_delay ({self.max_delay!r}) must be >= initial_delay ({self.initial_delay!r})"
            )
        if self.throttled_max_delay < self.throttled_delay:
            raise ValueError(
                f"RetrySchedule.throttled_max_delay ({self.throttled_max_delay!r}) must be >= "
                f"throttled_delay ({self.throttled_delay!r})"
            )


def next_delay(
    schedule: RetrySchedule, *, attempts: int, deferral: DeferralClass | None, rand: float
) -> float:
    """Seconds to wait before the next attempt.

    ``attempts`` counts the deferrals so far including the one just received (1 after the first); ``rand``
    is a uniform draw from [0, 1). The result lies in ``[base * (1 - jitter), base * (1 + jitter))`` where
    ``base = min(first * multiplier ** (attempts - 1), cap)`` on the ladder ``deferral`` selects.
    """
    if attempts < 1:
        raise ValueError(f"attempts counts deferrals including this one and must be >= 1, got {attempts!r}")
    if not 0 <= rand < 1:  # also rejects NaN
        raise ValueError(f"rand must be a uniform draw from [0, 1), got {rand!r}")
    if deferral in THROTTLED:
        first, cap = schedule.throttled_delay, schedule.throttled_max_delay
    else:
        first, cap = schedule.initial_delay, schedule.max_delay
    try:
        base = min(first * schedule.multiplier ** (attempts - 1), cap)
    except OverflowError:
        # float ** int raises rather than returning inf, once a job has been deferred ~1000 times.
        base = cap
    return base * (1 + schedule.jitter * (2 * rand - 1))


def is_expired(schedule: RetrySchedule, *, age: float) -> bool:
    """True once a job of ``age`` seconds (since it was accepted) has outlived the queue lifetime.

    A slightly negative age (the accepting node's clock ahead of ours) counts as fresh.
    """
    if math.isnan(age):
        raise ValueError("age must be a number of seconds, got NaN")
    return age >= schedule.max_age
