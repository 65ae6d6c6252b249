"""Every number in a ProviderPolicy: accepted at its bounds, refused past them, naming the field.

What the model accepts must work where it is used (the property tests in test_policy_properties.py run
the gateway and the operator on it); these tables pin the bounds themselves, documented in the field
descriptions (``kubectl explain``) and README.md.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

from mxgate.errors import PolicyError
from mxgate.policy import API_VERSION, KIND, MAX_MATCH_NESTING, parse_policy

START = "2026-12-01"

#: (field path, lowest accepted, highest accepted, a value just below, one just above, extra spec).
NUMBERS: list[tuple[str, float, float, float, float, dict[str, Any]]] = [
    ("limits.maxConnections", 1, 10_000, 0, 10_001, {}),
    ("limits.maxMessagesPerConnection", 1, 1_000_000, 0, 1_000_001, {}),
    ("limits.messagesPerSecond", 0.01, 1_000_000, 0.0099, 1_000_000.5,
     {"adaptive": {"floor": {"messagesPerSecond": 0.01}}}),
    ("limits.burst", 1, 1_000_000, 0, 1_000_001, {}),
    ("limits.messagesPerHour", 1, 1_000_000_000, 0, 1_000_000_001, {}),
    ("limits.messagesPerDay", 1, 1_000_000_000, 0, 1_000_000_001, {}),
    ("limits.idleTimeoutSeconds", 0.001, 3600, 0, 3600.5, {}),
    ("adaptive.floor.connections", 1, 10_000, 0, 10_001, {"limits": {"maxConnections": 10_000}}),
    ("adaptive.floor.messagesPerSecond", 0.01, 1_000_000, 0.0099, 1_000_000.5, {}),
    ("adaptive.increaseStep.connections", 1, 10_000, 0, 10_001, {}),
    ("adaptive.increaseStep.messagesPerSecond", 0.01, 1_000_000, 0.0099, 1_000_000.5, {}),
    ("adaptive.decreaseFactor", 0.0001, 0.9999, 0, 1, {}),
    ("adaptive.deferralThreshold", 0, 1, -0.01, 1.01, {}),
    ("adaptive.calmWindows", 1, 1000, 0, 1001, {}),
    ("warmup.schedule[].day", 1, 1, 0, 367, {}),   # the first step is day 1; later ones up to 366: below
    ("warmup.schedule[].messagesPerDay", 1, 100_000_000, 0, 100_000_001, {}),
]


def put(spec: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    if path.startswith("warmup.schedule[]."):
        step = {"day": 1, "messagesPerDay": 100} | {path.rsplit(".", 1)[1]: value}
        return spec | {"warmup": {"startDate": START, "schedule": [step]}}
    node = spec
    *parents, name = path.split(".")
    for parent in parents:
        node = node.setdefault(parent, {})
    node[name] = value
    return spec


def validate(spec: dict[str, Any]) -> None:
    parse_policy({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "p"}, "spec": spec}, source="t")


def error_at(path: str) -> str:
    return "t: spec." + path.replace("[]", ".0") + ": "


@pytest.mark.parametrize(("path", "lowest", "highest", "below", "above", "extra"), NUMBERS,
                         ids=[n[0] for n in NUMBERS])
def test_numbers_at_their_bounds_are_accepted(path: str, lowest: float, highest: float, below: float,
                                              above: float, extra: dict[str, Any]) -> None:
    for value in (lowest, highest):
        validate(put(copy.deepcopy(extra), path, value))


@pytest.mark.parametrize(("path", "lowest", "highest", "below", "above", "extra"), NUMBERS,
                         ids=[n[0] for n in NUMBERS])
def test_numbers_past_their_bounds_are_refused_naming_the_field(path: str, lowest: float, highest: float,
                                                                below: float, above: float,
                                                                extra: dict[str, Any]) -> None:
    huge = int("9" * 400)
    for value in (below, above, huge, -huge, math.inf, -math.inf, math.nan, "ten", None if "[]" in path else []):
        with pytest.raises(PolicyError) as refused:
            validate(put(copy.deepcopy(extra), path, value))
        assert error_at(path) in str(refused.value), (value, str(refused.value))


def test_warmup_days_after_the_first_go_up_to_366() -> None:
    validate({"warmup": {"startDate": START, "schedule": [{"day": 1, "messagesPerDay": 1},
                                                         {"day": 366, "messagesPerDay": 2}]}})
    with pytest.raises(PolicyError, match=r"spec\.warmup\.schedule\.1\.day: Input should be less than or equal to 366"):
        validate({"warmup": {"startDate": START, "schedule": [{"day": 1, "messagesPerDay": 1},
                                                             {"day": 367, "messagesPerDay": 2}]}})


@pytest.mark.parametrize("start", ["0001-01-01", "9999-12-31", "2026-02-28", "2024-02-29"])
def test_warmup_start_dates_at_the_ends_of_the_calendar(start: str) -> None:
    validate({"warmup": {"startDate": start, "schedule": [{"day": 1, "messagesPerDay": 1}]}})


def test_reply_patterns_nest_at_most_so_deep() -> None:
    nested = "(" * MAX_MATCH_NESTING + "x" + ")" * MAX_MATCH_NESTING
    validate({"responses": [{"match": nested, "action": "Retry"}]})
    # Escaped and bracketed parentheses are not groups: they do not count.
    validate({"responses": [{"match": r"\(" * 200 + "[(]" * 200, "action": "Retry"}]})
    for pattern in ("(" * (MAX_MATCH_NESTING + 1) + ")" * (MAX_MATCH_NESTING + 1),
                    "(" * 512 + ")" * 512):     # 1024 characters, the longest match: a RecursionError once
        with pytest.raises(PolicyError, match=r"spec\.responses\.0\.match: Value error, not a usable regular "
                                              f"expression: groups nested deeper than {MAX_MATCH_NESTING}"):
            validate({"responses": [{"match": pattern, "action": "Retry"}]})
