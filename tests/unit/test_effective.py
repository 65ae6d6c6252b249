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
