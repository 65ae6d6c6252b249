"""The retry schedule: two capped exponential ladders with jitter, and the queue lifetime."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxgate.egress.replies import DeferralClass
from mxgate.egress.retry import RetrySchedule, is_expired, next_delay

DEFAULT = RetrySchedule()
NO_JITTER = RetrySchedule(jitter=0.0)
ORDINARY: list[DeferralClass | None] = [DeferralClass.REPUTATION, DeferralClass.OTHER, None]
THROTTLED: list[DeferralClass | None] = [DeferralClass.CONNECTIONS, DeferralClass.RATE]
ALL_CLASSES: list[DeferralClass | None] = [*ORDINARY, *THROTTLED]


@pytest.mark.parametrize(
    ("deferral", "attempts", "low", "high"),
    [
        # ordinary ladder: 60, 120, 240, ... capped at 3600, +-20 %
        *[(d, 1, 48.0, 72.0) for d in ORDINARY],
        (DeferralClass.OTHER, 2, 96.0, 144.0),
        (DeferralClass.OTHER, 3, 192.0, 288.0),
        (DeferralClass.OTHER, 6, 1536.0, 2304.0),
        (DeferralClass.OTHER, 7, 2880.0, 4320.0),  # 3840 capped to 3600
        (DeferralClass.REPUTATION, 50, 2880.0, 4320.0),
        (None, 10_000, 2880.0, 4320.0),  # far past the point where 2.0 ** n overflows a float
        # throttled ladder: 5, 10, 20, ... capped at 300
        *[(d, 1, 4.0, 6.0) for d in THROTTLED],
        (DeferralClass.RATE, 2, 8.0, 12.0),
        (DeferralClass.CONNECTIONS, 4, 32.0, 48.0),
        (DeferralClass.CONNECTIONS, 7, 240.0, 360.0),  # 320 capped to 300
        (DeferralClass.RATE, 10_000, 240.0, 360.0),
    ],
)
def test_delay_bounds(deferral: DeferralClass | None, attempts: int, low: float, high: float) -> None:
    delays = [next_delay(DEFAULT, attempts=attempts, deferral=deferral, rand=r) for r in (0.0, 0.5, 0.999999)]
    assert delays[0] == pytest.approx(low)
    assert delays[1] == pytest.approx((low + high) / 2)
    assert low <= delays[2] < high
    assert delays == sorted(delays)  # a larger draw never gives a shorter wait


@pytest.mark.parametrize("deferral", ALL_CLASSES)
def test_without_jitter_monotone_and_capped(deferral: DeferralClass | None) -> None:
    delays = [next_delay(NO_JITTER, attempts=n, deferral=deferral, rand=0.3) for n in range(1, 40)]
    assert all(a <= b for a, b in itertools.pairwise(delays))
    cap = NO_JITTER.throttled_max_delay if deferral in THROTTLED else NO_JITTER.max_delay
    assert delays[-1] == cap


def test_multiplier_one_is_a_constant_delay() -> None:
    flat = RetrySchedule(multiplier=1.0, jitter=0.0)
    assert {next_delay(flat, attempts=n, deferral=None, rand=0.0) for n in range(1, 20)} == {60.0}


@given(
    attempts=st.integers(min_value=1, max_value=5000),
    deferral=st.sampled_from(ALL_CLASSES),
    rand=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    initial=st.floats(min_value=0.001, max_value=1e5),
    multiplier=st.floats(min_value=1.0, max_value=10.0),
    spread=st.floats(min_value=1.0, max_value=1e3),
    jitter=st.floats(min_value=0.0, max_value=0.99),
)
def test_delay_within_jittered_base(
    attempts: int,
    deferral: DeferralClass | None,
    rand: float,
    initial: float,
    multiplier: float,
    spread: float,
    jitter: float,
) -> None:
    schedule = RetrySchedule(
        initial_delay=initial,
        max_delay=initial * spread,
        throttled_delay=initial / 2,
        throttled_max_delay=initial * spread / 2,
        multiplier=multiplier,
        jitter=jitter,
    )
    if deferral in THROTTLED:
        first, cap = schedule.throttled_delay, schedule.throttled_max_delay
    else:
        first, cap = schedule.initial_delay, schedule.max_delay
    base = (
        cap
        if (attempts - 1) * math.log(multiplier) > math.log(cap / first)
        else first * multiplier ** (attempts - 1)
    )
    base = min(base, cap)
    delay = next_delay(schedule, attempts=attempts, deferral=deferral, rand=rand)
    slack = 1e-9 * base
    assert base * (1 - jitter) - slack <= delay <= base * (1 + jitter) + slack
    assert delay <= cap * (1 + jitter) + slack
    assert delay > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attempts": 0, "rand": 0.5}, "attempts"),
        ({"attempts": -3, "rand": 0.5}, "attempts"),
        ({"attempts": 1, "rand": 1.0}, "rand"),
        ({"attempts": 1, "rand": -0.1}, "rand"),
        ({"attempts": 1, "rand": math.nan}, "rand"),
    ],
)
def test_next_delay_rejects_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        next_delay(DEFAULT, deferral=None, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial_delay": 0.0}, "initial_delay"),
        ({"initial_delay": -1.0}, "initial_delay"),
        ({"max_delay": math.inf}, "max_delay"),
        ({"throttled_delay": math.nan}, "throttled_delay"),
        ({"throttled_max_delay": 0.0}, "throttled_max_delay"),
        ({"max_age": 0.0}, "max_age"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"multiplier": math.nan}, "multiplier"),
        ({"jitter": -0.1}, "jitter"),
        ({"jitter": 1.0}, "jitter"),
        ({"jitter": math.nan}, "jitter"),
        ({"initial_delay": 100.0, "max_delay": 50.0}, "max_delay"),
        ({"throttled_delay": 10.0, "throttled_max_delay": 5.0}, "throttled_max_delay"),
    ],
)
def test_schedule_rejects_bad_settings(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetrySchedule(**kwargs)


def test_schedule_is_frozen_and_keyword_only() -> None:
    with pytest.raises(AttributeError):
        DEFAULT.max_age = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        RetrySchedule(60.0)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("age", "expired"),
    [
        (-5.0, False),  # clock skew between nodes: fresh
        (0.0, False),
        (5 * 86400.0 - 0.001, False),
        (5 * 86400.0, True),
        (30 * 86400.0, True),
        (math.inf, True),
    ],
)
def test_is_expired(age: float, expired: bool) -> None:
    assert is_expired(DEFAULT, age=age) is expired


def test_is_expired_rejects_nan() -> None:
    with pytest.raises(ValueError, match="age"):
        is_expired(DEFAULT, age=math.nan)
