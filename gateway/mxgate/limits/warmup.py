"""Warm-up: a provider's daily cap on a given UTC day, from its policy. Pure.

A new sending IP earns its reputation by volume that grows day by day (``spec.warmup``: a start date
and steps ``{day, messagesPerDay}``). On day N of the ramp (day 1 is the start date) the day's cap is
the volume of the last step that has begun, never above ``limits.messagesPerDay``; before the start
date the first step's volume applies (an IP that starts early still starts slowly); after the last
step's day the ramp is over and only ``limits.messagesPerDay`` caps the day.

Which clock says what "today" is: the Redis server's. The daily counter the cap is checked against
is keyed by the day number of Redis time (``gcra.lua``), so the cap must be computed for that same
day, or a pod whose clock runs a minute ahead would apply tomorrow's larger volume to today's count.
``FleetLimiter`` (``message`` and ``check_caps``) guesses the day from the pod's clock, computes the cap
for it, and the script refuses a wrong guess and names the right day; the cap is then computed again
for that day. Every pod therefore agrees on the day, and on the cap, at midnight UTC.
"""

from __future__ import annotations

from datetime import date, timedelta

from mxgate.policy import Warmup

_EPOCH = date(1970, 1, 1)


def warmup_cap(warmup: Warmup, today: date) -> int | None:
    """The warm-up's volume for ``today`` (a UTC date); None once the ramp is over."""
    day = (today - warmup.start_date).days + 1
    steps = warmup.schedule
    if day > steps[-1].day:
        return None
    cap = steps[0].messages_per_day      # also before the start date (day < 1)
    for step in steps:
        if step.day > day:
            break
        cap = step.messages_per_day
    return cap


def daily_cap(messages_per_day: int | None, warmup: Warmup | None, today: date) -> int | None:
    """The day's cap in force: ``limits.messagesPerDay`` and the warm-up's volume, whichever is lower."""
    ramp = warmup_cap(warmup, today) if warmup is not None else None
    if ramp is None:
        return messages_per_day
    return ramp if messages_per_day is None else min(ramp, messages_per_day)


def utc_date(day_number: int) -> date:
    """The UTC calendar date of a day number (days since 1970-01-01, as ``gcra.lua`` counts them)."""
    return _EPOCH + timedelta(days=day_number)
