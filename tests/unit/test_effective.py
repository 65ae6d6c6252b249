"""Effective limits against the policy's ceiling (pure): which live limits are below it."""

from __future__ import annotations

import pytest

from mxgate.limits.effective import Effective
from mxgate.policy import Limits


@pytest.mark.parametrize(("ceiling", "effective", "below"), [
    (Limits(maxConnections=20, messagesPerSecond=200), Effective(20, 200.0), ()),
    (Limits(maxConnections=20, messagesPerSecond=200), Effective(5, 200.0), ("connections",)),
    (Limits(maxConnections=20, messagesPerSecond=200), Effective(20, 50.0), ("rate",)),
    (Limits(maxConnections=20, messagesPerSecond=200), Effective(5, 50.0), ("connections", "rate")),
    (Limits(maxConnections=20), Effective(20, None), ()),
    # The controller imposed a rate on a provider whose policy has none: that is throttling too
    # (`mxgate status` called it "ok" while the operator's condition said Throttled).
    (Limits(maxConnections=20), Effective(20, 12.5), ("rate",)),
])
def test_below(ceiling: Limits, effective: Effective, below: tuple[str, ...]) -> None:
    assert effective.below(ceiling) == below


@pytest.mark.parametrize(("rate", "text"), [
    (40.0, "40"), (0.01, "0.01"), (12.5, "12.5"), (1_000_000.0, "1e+06"),
    # six significant digits were all :g kept; the hash must give back the rate exactly
    (100000.5, "100000.5"), (1234.5678, "1234.5678"), (0.015, "0.015"),
])
def test_rates_are_stored_short_and_exact(rate: float, text: str) -> None:
    stored = Effective(5, rate).to_redis()["messagesPerSecond"]
    assert stored == text and float(stored) == rate
    raw = {k.encode(): v.encode() for k, v in Effective(5, rate).to_redis().items()}
    assert Effective.from_redis(raw, Limits(maxConnections=5)).messages_per_second == rate
