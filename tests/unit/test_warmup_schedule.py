"""spec.warmup: the model's validation, and the day's cap from the ramp (pure, by tables)."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from mxgate.limits.warmup import daily_cap, utc_date, warmup_cap
from mxgate.policy import Warmup


def ramp(start: str = "2026-11-01", **steps: int) -> Warmup:
    """``ramp(d1=200, d2=500)`` -> a Warmup starting on ``start`` with those steps."""
    return Warmup.model_validate({"startDate": start, "schedule": [
        {"day": int(day[1:]), "messagesPerDay": volume} for day, volume in steps.items()]})


SPARSE = ramp(d1=200, d2=500, d4=2000, d8=10_000)


@pytest.mark.parametrize(("today", "cap"), [
    ("2026-10-01", 200),      # a month before the start: the first step's volume
    ("2026-10-31", 200),      # the day before
    ("2026-11-01", 200),      # day 1 = startDate
    ("2026-11-02", 500),      # day 2
    ("2026-11-03", 500),      # day 3: the day-2 step lasts until the next step
    ("2026-11-04", 2000),
    ("2026-11-07", 2000),
    ("2026-11-08", 10_000),   # day 8: the last step lasts its day only
    ("2026-11-09", None),     # day 9: the ramp is over
    ("2027-06-01", None),
])
def test_warmup_cap_by_day(today: str, cap: int | None) -> None:
    assert warmup_cap(SPARSE, date.fromisoformat(today)) == cap


@pytest.mark.parametrize(("warmup", "today", "cap"), [
    (ramp(d1=5), "2026-11-01", 5),                 # one step: one day of warm-up
    (ramp(d1=5), "2026-11-02", None),
    (ramp(d1=5, d2=5, d3=5), "2026-11-03", 5),     # a level may be held
    (ramp("2024-02-28", d1=1, d2=2, d3=3), "2024-02-29", 2),   # a leap day is a day
    (ramp("2024-02-28", d1=1, d2=2, d3=3), "2024-03-01", 3),
    (ramp("2026-12-31", d1=10, d2=20), "2027-01-01", 20),       # across the year
])
def test_warmup_cap_edges(warmup: Warmup, today: str, cap: int | None) -> None:
    assert warmup_cap(warmup, date.fromisoformat(today)) == cap


@pytest.mark.parametrize(("per_day", "warmup", "today", "cap"), [
    (None, None, "2026-11-01", None),          # no cap at all
    (1000, None, "2026-11-01", 1000),          # limits.messagesPerDay alone
    (None, SPARSE, "2026-11-02", 500),         # the ramp alone
    (1000, SPARSE, "2026-11-02", 500),         # the lower of the two
    (1000, SPARSE, "2026-11-08", 1000),        # the ceiling wins over a larger step
    (1000, SPARSE, "2026-11-09", 1000),        # after the ramp: limits.messagesPerDay again
])
def test_daily_cap(per_day: int | None, warmup: Warmup | None, today: str, cap: int | None) -> None:
    assert daily_cap(per_day, warmup, date.fromisoformat(today)) == cap


def test_utc_date_counts_days_like_redis() -> None:
    assert utc_date(0) == date(1970, 1, 1)
    assert utc_date(1_793_491_200 // 86400) == date(2026, 11, 1)   # 2026-11-01T00:00:00Z


@given(volumes=st.lists(st.integers(1, 10_000), min_size=1, max_size=20).map(sorted),
       gaps=st.lists(st.integers(1, 5), min_size=20, max_size=20), offset=st.integers(-30, 150))
def test_the_cap_never_decreases_and_ends_after_the_last_step(volumes: list[int], gaps: list[int],
                                                              offset: int) -> None:
    days = [1]
    for gap in gaps[:len(volumes) - 1]:
        days.append(days[-1] + gap)
    warmup = Warmup.model_validate({"startDate": "2026-11-01", "schedule": [
        {"day": d, "messagesPerDay": v} for d, v in zip(days, volumes, strict=True)]})
    today = date(2026, 11, 1) + timedelta(days=offset)
    cap, tomorrow = warmup_cap(warmup, today), warmup_cap(warmup, today + timedelta(days=1))
    if offset + 1 > days[-1]:
        assert cap is None
    else:
        assert cap is not None and volumes[0] <= cap <= volumes[-1]
        assert tomorrow is None or tomorrow >= cap


# -- validation: every message names the field -----------------------------------------------------------


def errors(document: dict[str, object]) -> list[str]:
    with pytest.raises(ValidationError) as info:
        Warmup.model_validate(document)
    return [".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in info.value.errors()]


def steps(*pairs: tuple[int, int]) -> list[dict[str, int]]:
    return [{"day": d, "messagesPerDay": v} for d, v in pairs]


@pytest.mark.parametrize(("document", "message"), [
    ({"startDate": "2026-11-01T00:00:00", "schedule": steps((1, 5))},
     "startDate: Value error, must be a calendar date written YYYY-MM-DD, e.g. 2026-11-01"),
    ({"startDate": 1793491200, "schedule": steps((1, 5))},
     "startDate: Value error, must be a calendar date written YYYY-MM-DD, e.g. 2026-11-01"),
    ({"startDate": "2026-02-30", "schedule": steps((1, 5))},
     "startDate: Input should be a valid date or datetime, day value is outside expected range"),
    ({"schedule": steps((1, 5))}, "startDate: Field required"),
    ({"startDate": "2026-11-01", "schedule": []}, "schedule: List should have at least 1 item after validation, not 0"),
    ({"startDate": "2026-11-01", "schedule": steps((2, 5))},
     "schedule: Value error, schedule[0].day must be 1 (the startDate), not 2"),
    ({"startDate": "2026-11-01", "schedule": steps((1, 5), (3, 6), (3, 7))},
     "schedule: Value error, schedule[2].day must be greater than schedule[1].day (3)"),
    ({"startDate": "2026-11-01", "schedule": steps((1, 5), (3, 6), (2, 7))},
     "schedule: Value error, schedule[2].day must be greater than schedule[1].day (3)"),
    ({"startDate": "2026-11-01", "schedule": steps((1, 50), (2, 40))},
     "schedule: Value error, schedule[1].messagesPerDay must not be less than schedule[0].messagesPerDay (50): "
     "a ramp goes up"),
    ({"startDate": "2026-11-01", "schedule": steps((1, 0))},
     "schedule.0.messagesPerDay: Input should be greater than or equal to 1"),
    ({"startDate": "2026-11-01", "schedule": steps((0, 5))},
     "schedule.0.day: Input should be greater than or equal to 1"),
    ({"startDate": "2026-11-01", "schedule": [{"day": 1, "messagesPerDay": 5, "volume": 9}]},
     "schedule.0.volume: Extra inputs are not permitted"),
])
def test_bad_warmups_name_the_field(document: dict[str, object], message: str) -> None:
    assert message in errors(document)


def test_a_yaml_date_and_a_string_are_the_same_start() -> None:
    assert ramp(d1=1).start_date == Warmup.model_validate(
        {"startDate": date(2026, 11, 1), "schedule": steps((1, 1))}).start_date == date(2026, 11, 1)


def test_the_readme_example_is_a_valid_warmup() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = readme.split("### Warm-up of a new sending IP\n\n```yaml\n")[1].split("```")[0]
    warmup = Warmup.model_validate(yaml.safe_load(block)["spec"]["warmup"])
    assert [warmup_cap(warmup, date(2026, 12, d)) for d in (1, 2, 3, 6, 7, 14, 15)] == [
        1000, 1000, 5000, 5000, 20000, 50000, None]     # as the comments in the example say
