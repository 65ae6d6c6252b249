"""The ProviderPolicy status document (pure): state, conditions, observed traffic, lastAdjustment."""

from __future__ import annotations

import pytest

from mxgate.limits.effective import Effective
from mxgate.policy import Limits
from mxgate_operator.conditions import Observation, changed, invalid_status, policy_status, rfc3339
from mxgate_operator.core import Window

NOW = 1_800_000_000.0
CEILING = Limits(maxConnections=20, messagesPerSecond=200)


def status_for(effective: Effective, *, window: Window | None = None, previous: dict | None = None,
               last: dict | None = None, now: float = NOW) -> dict:
    return policy_status(generation=3, ceiling=CEILING, observation=Observation(effective, window, 7, last),
                         previous=previous or {}, now=now)


def conditions(status: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


@pytest.mark.parametrize(("effective", "state", "expected"), [
    (Effective(20, 200.0), "Ready",
     {"Ready": ("True", "InForce"), "Throttled": ("False", "AtCeiling"), "Suspended": ("False", "NotSuspended")}),
    (Effective(5, 200.0), "Throttled",
     {"Ready": ("True", "InForce"), "Throttled": ("True", "BelowCeiling"), "Suspended": ("False", "NotSuspended")}),
    (Effective(20, 48.5), "Throttled",
     {"Ready": ("True", "InForce"), "Throttled": ("True", "BelowCeiling"), "Suspended": ("False", "NotSuspended")}),
    (Effective(20, 200.0, int((NOW + 600) * 1000)), "Suspended",
     {"Ready": ("True", "InForce"), "Throttled": ("False", "AtCeiling"), "Suspended": ("True", "Suspended")}),
    (Effective(20, 200.0, int((NOW - 1) * 1000)), "Ready",   # a suspension that has expired
     {"Ready": ("True", "InForce"), "Throttled": ("False", "AtCeiling"), "Suspended": ("False", "NotSuspended")}),
])
def test_state_and_conditions(effective: Effective, state: str, expected: dict) -> None:
    status = status_for(effective)
    assert status["state"] == state
    assert conditions(status) == expected
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])
    assert status["observedGeneration"] == 3


def test_throttled_message_names_the_limits_below_the_ceiling() -> None:
    status = status_for(Effective(4, 37.2, 0, "40/400 outcomes deferred for too many connections"))
    message = next(c["message"] for c in status["conditions"] if c["type"] == "Throttled")
    assert "connections 4/20" in message and "rate 37.2/200 msg/s" in message and "40/400" in message


def test_suspension_is_shown_with_its_end_and_cleared_when_over() -> None:
    until = int((NOW + 600) * 1000)
    status = status_for(Effective(20, 200.0, until))
    assert status["effective"]["suspendedUntil"] == rfc3339(until / 1000)
    later = status_for(Effective(20, 200.0, until), previous=status, now=NOW + 700)
    # None deletes the field in the merge patch the operator sends.
    assert later["effective"]["suspendedUntil"] is None


def test_observed_traffic_per_minute_and_deferral_percent() -> None:
    window = Window(seconds=5.0, attempts=250, delivered=240, deferred_connections=8, deferred_rate=2)
    status = status_for(Effective(5, 50.0), window=window)
    assert status["observed"] == {"attemptsPerMinute": 3000.0, "deliveriesPerMinute": 2880.0,
                                  "deferralPercent": 4.0, "queued": 7}
    assert status["deferralPercent"] == "4.0%"


def test_observed_traffic_is_kept_until_the_next_window() -> None:
    first = status_for(Effective(5, 50.0), window=Window(seconds=5.0, attempts=10, delivered=10))
    again = status_for(Effective(5, 50.0), previous=first)
    assert again["observed"] == first["observed"] and again["deferralPercent"] == "0.0%"


def test_last_adjustment_from_the_adjustments_list() -> None:
    entry = {"time": NOW - 3, "signal": "connections", "limit": "connections", "old": 20, "new": 14,
             "reason": "30/300 outcomes deferred for too many connections"}
    status = status_for(Effective(14, 200.0), last=entry)
    assert status["lastAdjustment"] == {"time": rfc3339(NOW - 3), "signal": "connections", "limit": "connections",
                                        "from": "20", "to": "14", "reason": entry["reason"]}
    unlimited = status_for(Effective(14, None), last={**entry, "limit": "rate", "old": 12.5, "new": None})
    assert unlimited["lastAdjustment"]["to"] == "none"


def test_transition_time_changes_only_when_the_status_does() -> None:
    first = status_for(Effective(20, 200.0), now=NOW)
    steady = status_for(Effective(20, 200.0), previous=first, now=NOW + 60)
    assert steady["conditions"] == first["conditions"]
    assert not changed(first, steady)
    throttled = status_for(Effective(10, 200.0), previous=steady, now=NOW + 120)
    times = {c["type"]: c["lastTransitionTime"] for c in throttled["conditions"]}
    assert times["Throttled"] == rfc3339(NOW + 120)
    assert times["Ready"] == rfc3339(NOW)
    assert changed(steady, throttled)


def test_invalid_spec_keeps_the_rest_of_the_status() -> None:
    good = status_for(Effective(5, 50.0))
    bad = invalid_status(generation=4, message="spec.responses.0.match: not a valid regular expression",
                         previous=good, now=NOW + 5)
    assert bad["state"] == "Invalid"
    assert conditions(bad)["Ready"] == ("False", "InvalidSpec")
    ready = next(c for c in bad["conditions"] if c["type"] == "Ready")
    assert ready["observedGeneration"] == 4 and "spec.responses.0.match" in ready["message"]
    assert bad["effective"] == good["effective"]   # the last good version is still in force
    assert conditions(bad)["Throttled"] == ("True", "BelowCeiling")


def test_a_status_read_back_after_the_merge_patch_is_unchanged() -> None:
    status = status_for(Effective(5, None))
    stored = {k: v for k, v in status.items()}
    stored["effective"] = {k: v for k, v in status["effective"].items() if v is not None}  # what the server keeps
    assert not changed(stored, status_for(Effective(5, None), previous=stored))


def test_daily_cap_and_warmup_day() -> None:
    status = policy_status(generation=1, ceiling=CEILING, previous={}, now=NOW,
                           observation=Observation(Effective(20, 200.0), day_cap=500, sent_today=120, warmup_day=3))
    assert status["daily"] == {"messagesPerDay": 500, "sentToday": 120, "warmupDay": 3}
    assert status["state"] == "Ready"


@pytest.mark.parametrize(("effective", "state"), [
    (Effective(20, 200.0), "Capped"),
    (Effective(5, 200.0), "Capped"),                                  # capped outranks throttled
    (Effective(20, 200.0, int((NOW + 60) * 1000)), "Suspended"),     # suspended outranks capped
])
def test_a_used_up_day_is_capped(effective: Effective, state: str) -> None:
    observation = Observation(effective, day_cap=500, sent_today=500, warmup_day=None)
    assert policy_status(generation=1, ceiling=CEILING, observation=observation, previous={}, now=NOW
                         )["state"] == state


def test_the_daily_field_goes_when_the_cap_does() -> None:
    before = policy_status(generation=1, ceiling=CEILING, previous={}, now=NOW,
                           observation=Observation(Effective(20, 200.0), day_cap=500, sent_today=1))
    after = policy_status(generation=2, ceiling=CEILING, previous=before, now=NOW,
                          observation=Observation(Effective(20, 200.0)))
    assert after["daily"] is None    # deleted by the merge patch
    assert "daily" not in policy_status(generation=2, ceiling=CEILING, previous={}, now=NOW,
                                        observation=Observation(Effective(20, 200.0)))
