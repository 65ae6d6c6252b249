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
from support.policy_bounds import INTEGERS, NUMBERS, START, put


def validate(spec: dict[str, Any]) -> None:
    parse_policy({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "p"}, "spec": spec}, source="t")


def error_at(path: str) -> str:
    return "t: spec." + path.replace("[]", ".0") + ": "


@pytest.mark.parametrize(("path", "lowest", "highest", "below", "above", "extra"), NUMBERS,
                         ids=[n[0] for n in NUMBERS])
def test_numbers_at_their_bounds_are_accepted(path: str, lowest: float, highest: float, below: float,
                                              above: float, extra: dict[str, Any]) -> None:
    # A number takes an integer, an integer an integral number (5.0), as the API server does.
    for value in (lowest, highest, float(lowest) if path in INTEGERS else int(highest) if highest == int(highest)
                  else highest):
        validate(put(copy.deepcopy(extra), path, value))


@pytest.mark.parametrize(("path", "lowest", "highest", "below", "above", "extra"), NUMBERS,
                         ids=[n[0] for n in NUMBERS])
def test_numbers_past_their_bounds_are_refused_naming_the_field(path: str, lowest: float, highest: float,
                                                                below: float, above: float,
                                                                extra: dict[str, Any]) -> None:
    huge = int("9" * 400)
    # Types as the CRD has them: no booleans or strings for numbers, no fraction for an integer.
    wrong_types = [True, False, str(lowest), *([lowest + 0.5] if path in INTEGERS else [])]
    for value in (below, above, huge, -huge, math.inf, -math.inf, math.nan, "ten", None if "[]" in path else [],
                  *wrong_types):
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
