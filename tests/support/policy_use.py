"""What uses a ProviderPolicy in the gateway and in the operator, run on one policy; raises if any of it does.

Shared by the property tests (tests/unit/test_policy_properties.py) and the bad-file corpus
(tests/integration/test_policy_corpus.py): whatever the validator accepts must go through all of this.
Everything here is pure or in memory (the PolicyBook's Redis client is never connected).
"""

from __future__ import annotations

import math
from datetime import date, timedelta
from typing import Any

import redis.asyncio as aioredis

from mxgate.duration import parse_duration
from mxgate.egress.outcome import judge
from mxgate.egress.replies import DeferralClass, SmtpReply
from mxgate.egress.retry import next_delay
from mxgate.limits.effective import Effective
from mxgate.limits.fleet import default_burst
from mxgate.limits.warmup import daily_cap, utc_date
from mxgate.policy import DEFAULT_POLICY_NAME, ProviderPolicy, ProviderTable
from mxgate.policybook import PolicyBook
from mxgate_operator.adaptive import _state_from_redis, _state_to_redis
from mxgate_operator.conditions import Observation, invalid_status, policy_status
from mxgate_operator.core import ControlState, Window, decide, window_seconds

NOW = 1_796_000_000.0   # 2026-11-29: a "now" for the clock-free cores

#: Replies of every kind; each reply-rule pattern of the property tests matches at least one.
REPLIES = [
    SmtpReply(250, "2.0.0", "ok"),
    SmtpReply(421, "4.7.0", "[TSS04] Messages temporarily deferred due to unexpected volume"),
    SmtpReply(451, "4.7.652", "The mail server has exceeded the maximum number of connections"),
    SmtpReply(451, "4.7.650", "The mail server has been temporarily rate limited"),
    SmtpReply(452, "4.2.2", "mailbox full"),
    SmtpReply(421, None, "x y xy blocked"),
    SmtpReply(550, "5.7.1", "blocked, rate too high"),
    SmtpReply(554, None, ""),
]


def windows(state: ControlState, seconds: float) -> list[Window]:
    """Evaluation windows of every kind the loop meets, for a provider at ``state``."""
    used = int((state.rate or 100) * seconds)
    return [Window(seconds=0.0), Window(seconds=seconds),
            Window(seconds=seconds, delivered=used, peak_connections=state.connections),
            Window(seconds=seconds, delivered=10, deferred_connections=50, peak_connections=state.connections),
            Window(seconds=seconds, delivered=used // 2, deferred_rate=used, deferred_reputation=3),
            Window(seconds=seconds, delivered=0, deferred_rate=5),
            Window(seconds=seconds, delivered=1, deferred_connections=500, deferred_rate=2, connection_errors=9),
            Window(seconds=seconds, delivered=10**9, failed=3, deferred_other=7, peak_connections=10**6)]


def use_in_the_gateway(policy: ProviderPolicy) -> None:
    assert ProviderPolicy.from_json(policy.to_json()) == policy   # as the gateways read it from Redis
    book = PolicyBook(aioredis.Redis())   # never connected: these queries are answered from memory
    book.table = ProviderTable.of([policy])
    provider = policy.name if policy.name != DEFAULT_POLICY_NAME else "domain:example.org"
    schedule = book.retry(provider)
    rules = book.rules(provider)
    ceiling = book.ceiling(provider)
    assert book.limits(provider) == ceiling
    warmup = book.warmup(provider)
    max_age = parse_duration(policy.spec.retry.max_age)
    for attempts in (0, 1, 30, 5000):
        for age in (0.0, max_age / 2, max_age, 1e10):
            for rand in (0.0, 0.5, 0.999999):
                for reply in REPLIES:
                    verdict = judge({"a@x": reply, "b@x": REPLIES[0]}, attempts=attempts, age=age,
                                    schedule=schedule, rand=rand, rules=rules)
                    if verdict.deferred:
                        # The engine defers by int(delay * 1000) ms: it must be at least 1 ms and finite.
                        assert math.isfinite(verdict.retry_delay) and int(verdict.retry_delay * 1000) >= 1
                    if verdict.suspend_for is not None:   # the limiter suspends for int(seconds * 1000) ms
                        assert math.isfinite(verdict.suspend_for) and int(verdict.suspend_for * 1000) >= 1000
    for deferral in (None, *DeferralClass):   # a job deferred a million times: the cap, not an overflow
        assert math.isfinite(next_delay(schedule, attempts=10**6, deferral=deferral, rand=0.5))
    if ceiling.messages_per_second is not None:
        assert default_burst(ceiling.messages_per_second) >= 1 and 1000.0 / ceiling.messages_per_second > 0
    days = [utc_date(20_000), utc_date(20_500)]
    if warmup is not None:
        start = warmup.start_date
        days += [d for d in (start, *(_shifted(start, n) for n in (-1, 1, warmup.schedule[-1].day, 400)))
                 if d is not None]
    for day in days:
        cap = daily_cap(ceiling.messages_per_day, warmup, day)
        assert cap is None or cap >= 1


def _shifted(day: date, days: int) -> date | None:
    try:
        return day + timedelta(days=days)
    except OverflowError:    # past 9999-12-31: no such "today"
        return None


def use_in_the_operator(policy: ProviderPolicy) -> None:
    adaptive, ceiling = policy.spec.adaptive, policy.spec.limits
    seconds = window_seconds(adaptive)
    assert 1 <= seconds <= 600
    state = ControlState.at_ceiling(ceiling)
    previous: dict[str, Any] = {}
    for step in range(3):
        for window in windows(state, seconds):
            decision = decide(adaptive, ceiling, state, window, now=NOW + step * seconds)
            new = decision.state
            assert adaptive.floor.connections <= new.connections <= ceiling.max_connections or not adaptive.enabled
            # A live rate of 0 would read as "no limit" in the gateways (Effective.from_redis).
            assert new.rate is None or new.rate >= max(0.01, adaptive.floor.messages_per_second)
            if ceiling.messages_per_second is not None:
                assert new.rate is not None and new.rate <= ceiling.messages_per_second
            # Through the hash the loop writes and the gateways read.
            raw = {k.encode(): v.encode() for k, v in _state_to_redis(new, decision.reason).items()}
            state = _state_from_redis(raw, policy)
            effective = Effective.from_redis(raw, ceiling)
            assert effective.max_connections >= 1 and (effective.messages_per_second or 1) > 0
            effective.applied_to(ceiling)
            status = policy_status(generation=1, ceiling=ceiling, observation=Observation(
                effective=effective, window=window, queued=3, day_cap=daily_cap(ceiling.messages_per_day,
                                                                               policy.spec.warmup, utc_date(20_000)),
                warmup_day=1 if policy.spec.warmup else None,
                last_adjustment={"time": NOW, "signal": "rate", "limit": "rate", "old": 1.0, "new": None}),
                previous=previous, now=NOW)
            previous = status
    invalid_status(generation=2, message="x", previous=previous, now=NOW)
