"""The simulator's pure limits: token bucket and concurrency tracker, on an injected clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxgate.sim.limits import ConcurrencyTracker, TokenBucket


def takes(bucket: TokenBucket, times: list[float]) -> list[bool]:
    return [bucket.take(t) for t in times]


def test_bucket_allows_the_burst_at_once_then_the_steady_rate() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert takes(bucket, [0.0] * 6) == [True] * 5 + [False]
    # Refilled at 10/s: one token every 0.1 s, never more.
    assert takes(bucket, [0.05, 0.1, 0.1, 0.2, 0.25, 0.3]) == [False, True, False, True, False, True]


def test_bucket_never_holds_more_than_burst_however_long_the_pause() -> None:
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert takes(bucket, [0.0] * 3) == [True] * 3
    assert bucket.tokens(3600.0) == 3
    assert takes(bucket, [3600.0] * 4) == [True, True, True, False]


def test_bucket_with_a_rate_below_one_per_second() -> None:
    bucket = TokenBucket(rate=0.5, burst=1, now=0.0)
    assert takes(bucket, [0.0, 1.0, 1.99, 2.0, 2.0]) == [True, False, False, True, False]


def test_a_clock_stepping_back_does_not_drain_or_refill_the_bucket() -> None:
    bucket = TokenBucket(rate=1, burst=2, now=10.0)
    assert bucket.take(10.0)
    assert bucket.take(5.0)          # the token left, not a refund of 5 s nor a negative refill
    assert not bucket.take(5.0)
    assert bucket.take(11.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0.5)])
def test_bucket_rejects_parameters_that_would_never_pass_a_message(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=rate, burst=burst, now=0.0)


@given(rate=st.floats(0.1, 1000), burst=st.integers(1, 50),
       gaps=st.lists(st.floats(0, 2), min_size=1, max_size=200))
def test_bucket_never_passes_more_than_burst_plus_rate_times_elapsed(rate: float, burst: int,
                                                                     gaps: list[float]) -> None:
    bucket = TokenBucket(rate=rate, burst=burst, now=0.0)
    now, passed = 0.0, 0
    for gap in gaps:
        now += gap
        passed += bucket.take(now)
        assert passed <= burst + rate * now + 1e-6


def test_tracker_observes_maxima_overall_and_per_ip() -> None:
    tracker = ConcurrencyTracker(limit=0)
    for ip in ["10.0.0.1", "10.0.0.1", "10.0.0.2"]:
        tracker.opened(ip)
    tracker.closed("10.0.0.1", admitted=True)
    tracker.opened("10.0.0.2")
    assert tracker.open_total == 3 and tracker.max_total == 3
    assert tracker.open_by_ip == {"10.0.0.1": 1, "10.0.0.2": 2}
    assert tracker.max_by_ip == {"10.0.0.1": 2, "10.0.0.2": 2}
    tracker.closed("10.0.0.1", admitted=True)
    assert "10.0.0.1" not in tracker.open_by_ip


def test_tracker_without_a_limit_admits_everyone() -> None:
    tracker = ConcurrencyTracker(limit=0)
    assert all(tracker.admit("10.0.0.1") for _ in range(1000))


def test_tracker_gives_limit_slots_per_ip_and_frees_them_on_close() -> None:
    tracker = ConcurrencyTracker(limit=2)
    for _ in range(3):
        tracker.opened("10.0.0.1")
    tracker.opened("10.0.0.2")
    assert [tracker.admit("10.0.0.1") for _ in range(3)] == [True, True, False]
    assert tracker.admit("10.0.0.2")                     # slots are per client IP
    tracker.closed("10.0.0.1", admitted=False)           # the refused one leaving frees nothing
    assert not tracker.admit("10.0.0.1")
    tracker.closed("10.0.0.1", admitted=True)
    assert tracker.admitted("10.0.0.1") == 1
    assert tracker.admit("10.0.0.1")


def test_tracker_reset_keeps_open_connections_as_the_new_maxima() -> None:
    tracker = ConcurrencyTracker(limit=1)
    for _ in range(3):
        tracker.opened("10.0.0.1")
    tracker.closed("10.0.0.1", admitted=False)
    tracker.reset_observed()
    assert tracker.max_total == 2 and tracker.max_by_ip == {"10.0.0.1": 2}
    tracker.closed("10.0.0.1", admitted=False)
    tracker.closed("10.0.0.1", admitted=False)
    tracker.reset_observed()
    assert tracker.max_total == 0 and tracker.max_by_ip == {}
