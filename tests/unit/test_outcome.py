"""The verdict over one attempt's replies when the provider's own schedule cannot be applied (judge_plainly)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxgate.egress.outcome import PLAIN_FIRST_DELAY, PLAIN_MAX_AGE, PLAIN_MAX_DELAY, judge, judge_plainly
from mxgate.egress.replies import DeferralClass, SmtpReply
from mxgate.egress.retry import RetrySchedule

OK = SmtpReply(250, "2.0.0", "Ok: delivered")
UNKNOWN = SmtpReply(550, "5.1.1", "User unknown")
BUSY = SmtpReply(451, "4.7.500", "Server busy")
ODD = SmtpReply(354, None, "go ahead")            # a protocol oddity: retried, like judge does


def test_the_basic_code_alone_decides() -> None:
    verdict = judge_plainly({"a@x.test": OK, "b@x.test": UNKNOWN, "c@x.test": BUSY, "d@x.test": ODD},
                            attempts=0, age=10.0, rand=0.5)
    assert verdict.delivered == ["a@x.test"]
    assert verdict.failed == [("b@x.test", UNKNOWN)]
    assert verdict.deferred == [("c@x.test", BUSY), ("d@x.test", ODD)]
    assert verdict.deferral is DeferralClass.OTHER and not verdict.expired and verdict.suspend_for is None
    assert verdict.retry_delay == PLAIN_FIRST_DELAY


def test_a_rate_reply_is_not_a_throttling_signal_without_the_table() -> None:
    # No rules, no reflex: the plain verdict must never tighten or suspend anything.
    verdict = judge_plainly({"a@x.test": SmtpReply(421, "4.7.28", "rate limited")}, attempts=0, age=0.0, rand=0.5)
    assert verdict.deferral is DeferralClass.OTHER and verdict.suspend_for is None


@pytest.mark.parametrize(("attempts", "base"), [
    (0, 300.0), (1, 600.0), (2, 1200.0), (3, 2400.0), (4, 3600.0), (5, 3600.0), (10**6, 3600.0), (-3, 300.0)])
def test_delay_doubles_up_to_the_cap(attempts: int, base: float) -> None:
    verdict = judge_plainly({"a@x.test": BUSY}, attempts=attempts, age=0.0, rand=0.5)
    assert verdict.retry_delay == base


@given(st.integers(min_value=-10, max_value=10**9),
       st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=0, max_value=1)))
def test_delay_is_finite_and_within_the_jittered_ladder(attempts: int, rand: float) -> None:
    delay = judge_plainly({"a@x.test": BUSY}, attempts=attempts, age=0.0, rand=rand).retry_delay
    assert math.isfinite(delay) and PLAIN_FIRST_DELAY * 0.8 <= delay <= PLAIN_MAX_DELAY * 1.2


def test_deferred_recipients_fail_past_the_built_in_max_age() -> None:
    verdict = judge_plainly({"a@x.test": OK, "c@x.test": BUSY}, attempts=40, age=PLAIN_MAX_AGE, rand=0.5)
    assert verdict.expired and verdict.deferred == [] and verdict.failed == [("c@x.test", BUSY)]
    assert verdict.delivered == ["a@x.test"]


def test_a_nan_age_is_retried_never_dropped() -> None:
    verdict = judge_plainly({"a@x.test": BUSY}, attempts=0, age=math.nan, rand=0.5)
    assert verdict.deferred and not verdict.expired


def test_the_plain_constants_are_the_built_in_schedules() -> None:
    builtin = RetrySchedule()
    assert (PLAIN_MAX_DELAY, PLAIN_MAX_AGE) == (builtin.max_delay, builtin.max_age)


def test_our_own_internal_error_reply_is_an_ordinary_deferral() -> None:
    # The engine judges an internal error with judge() and no policy rules: it must land on the ordinary
    # ladder, never be taken for a throttling signal.
    internal = SmtpReply(451, "4.3.0", "internal error: ValueError")
    verdict = judge({"a@x.test": internal}, attempts=0, age=0.0, schedule=RetrySchedule(), rand=0.5)
    assert verdict.deferral is DeferralClass.OTHER and verdict.retry_delay == 60.0
