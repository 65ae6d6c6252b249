"""The duration syntax (Go's time.ParseDuration plus days) and every duration field's bounds."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxgate.duration import DURATION_PATTERN, MAX_DURATION_LENGTH, DurationRange, parse_duration, parse_duration_ns
from mxgate.errors import PolicyError
from mxgate.policy import API_VERSION, KIND, parse_policy

S = 10**9
MS = 10**6


@pytest.mark.parametrize(("text", "ns"), [
    ("500ms", 500 * MS),
    ("30s", 30 * S),
    ("1m30s", 90 * S),
    ("2h45m", (2 * 3600 + 45 * 60) * S),
    ("1.5h", 5400 * S),
    ("1h0m0s", 3600 * S),          # as Go's Duration.String() writes an hour
    ("1m1m", 120 * S),              # Go adds repeated units up
    ("30s1m", 90 * S),              # in any order
    (".5s", 500 * MS),              # Go takes a fraction without the leading 0 ...
    ("1.s", S),                     # ... and a trailing dot
    ("1.5ns", 1),                   # truncated to whole nanoseconds, as Go does
    ("1.999999999s", 2 * S - 1),
    ("0.123456789ms", 123456),
    ("1500us", 1500 * 1000),
    ("250ns", 250),
    ("5d", 5 * 86400 * S),
    ("1d12h", 36 * 3600 * S),
    ("0d90m", 5400 * S),
    ("1.5d", 36 * 3600 * S),         # days with a fraction, as policies always could write them
    ("0.25d6h", 12 * 3600 * S),
    ("1.12345678d", 86400 * S + 12345678 * 86400 * S // 10**8),   # 8 decimals: truncated to whole ns
    ("007s", 7 * S),
    ("0s", 0),                      # valid syntax; every field's minimum refuses it
    ("9" * 62 + "ms", int("9" * 62) * MS),   # 64 characters: syntax fine, far over any field's maximum
])
def test_go_syntax_and_days(text: str, ns: int) -> None:
    assert parse_duration_ns(text) == ns
    assert parse_duration(text) == ns / 1e9


@pytest.mark.parametrize("text", [
    "", "5", "60", "0", "1.5",          # a bare number: seconds or minutes?
    "s", "ms", "d", ".s", "1..5s",
    "-5s", "+5s",                         # no sign: negative durations mean nothing here
    "1h1d", "1d1d", ".5d", "1.d",         # days: first, once, with digits on both sides of a point
    "1.123456789d",                       # ... and at most 8 decimals
    "1.0000000001s", ".0000000001s",      # other numbers at most 9 (nanoseconds)
    "5 s", " 5s", "5s ", "1m 30s", "5s\n",
    "5S", "5H", "5sec", "5min", "5hours", "5 days", "1w", "1y",
    "1e3s", "0x10s", "1_000s", "Infinity", "NaN", "inf", "5µs", "5μs",
    "٥s", "５s",                           # non-ASCII digits (Python's \d would take them)
    "9" * 63 + "s" + "s",                 # 65 characters
])
def test_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration_ns(text)


def test_length_limit_is_checked_before_anything_else() -> None:
    with pytest.raises(ValueError, match=f"longer than {MAX_DURATION_LENGTH} characters"):
        parse_duration_ns("9" * 400 + "s")


@given(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["ns", "us", "ms", "s", "m", "h"])),
                min_size=1, max_size=4))
def test_parts_add_up(parts: list[tuple[int, str]]) -> None:
    unit_ns = {"ns": 1, "us": 10**3, "ms": 10**6, "s": S, "m": 60 * S, "h": 3600 * S}
    text = "".join(f"{n}{u}" for n, u in parts)
    if len(text) <= MAX_DURATION_LENGTH:
        assert parse_duration_ns(text) == sum(n * unit_ns[u] for n, u in parts)


def test_pattern_is_the_parsers_syntax_and_ascii() -> None:
    # The CRD's pattern is the same text: RE2 in the API server, a CEL string literal in the rules.
    assert DURATION_PATTERN.isascii() and "\\" not in DURATION_PATTERN and "'" not in DURATION_PATTERN


@pytest.mark.parametrize(("minimum", "maximum"), [("0s", "1s"), ("2s", "1s")])
def test_duration_range_needs_a_positive_minimum_below_the_maximum(minimum: str, maximum: str) -> None:
    with pytest.raises(ValueError, match="need 0 < minimum <= maximum"):
        DurationRange(minimum, maximum)


# -- the fields -------------------------------------------------------------------------------------------

#: (field path, minimum, maximum) of every duration field. A new duration field must be added here.
FIELDS = [
    ("retry.initialDelay", "100ms", "24h"),
    ("retry.maxDelay", "100ms", "24h"),
    ("retry.throttledDelay", "100ms", "24h"),
    ("retry.throttledMaxDelay", "100ms", "24h"),
    ("retry.maxAge", "1s", "30d"),
    ("adaptive.evaluationWindow", "1s", "10m"),
    ("responses[].duration", "1s", "24h"),
]


def spec_with(path: str, value: Any) -> dict[str, Any]:
    """A spec with ``value`` at ``path``; the other delays kept where the order rules do not interfere."""
    if path == "responses[].duration":
        return {"responses": [{"match": "TSS04", "action": "Suspend", "duration": value}]}
    section, name = path.split(".")
    fields: dict[str, Any] = {name: value}
    if section == "retry" and name in ("initialDelay", "maxDelay"):
        fields |= {"initialDelay": value, "maxDelay": value}
    if section == "retry" and name in ("throttledDelay", "throttledMaxDelay"):
        fields |= {"throttledDelay": value, "throttledMaxDelay": value}
    return {section: fields}


def validate(spec: dict[str, Any]) -> None:
    parse_policy({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "p"}, "spec": spec}, source="t")


def error_at(path: str) -> str:
    return "spec." + path.replace("[]", ".0")


def just_below(text: str) -> str:
    return f"{parse_duration_ns(text) // MS - 1}ms"


def just_above(text: str) -> str:
    return f"{parse_duration_ns(text) // MS + 1}ms"


@pytest.mark.parametrize(("path", "minimum", "maximum"), FIELDS)
def test_every_duration_field_accepts_its_bounds(path: str, minimum: str, maximum: str) -> None:
    # 0.9 ms over the maximum counts as the maximum: bounds are checked in whole milliseconds, as in CEL.
    for value in (minimum, maximum, just_above(minimum), just_below(maximum), f"{maximum}0.9ms"):
        validate(spec_with(path, value))


@pytest.mark.parametrize(("path", "minimum", "maximum"), FIELDS)
@pytest.mark.parametrize(("value", "message"), [
    ("0s", "is out of range: must be from {minimum} to {maximum}"),
    ("0ms", "is out of range"),
    ("0d", "is out of range"),
    ("below", "is out of range: must be from {minimum} to {maximum}"),
    ("above", "is out of range: must be from {minimum} to {maximum}"),
    ("400d", "is out of range"),
    ("9" * 60 + "h", "is out of range"),
    ("9" * 400 + "s", "not a duration: longer than 64 characters"),
    ("forever", "is not a duration: write numbers with units"),
    ("5 days", "is not a duration"),
    ("-1s", "is not a duration"),
    (300, "300 is a bare number: a duration needs a unit"),
    (1.5, "1.5 is a bare number"),
    (True, "Input should be a valid string"),
    (["5s"], "Input should be a valid string"),
])
def test_every_duration_field_refuses_zero_huge_and_garbage(path: str, minimum: str, maximum: str, value: Any,
                                                             message: str) -> None:
    value = just_below(minimum) if value == "below" else just_above(maximum) if value == "above" else value
    with pytest.raises(PolicyError) as refused:
        validate(spec_with(path, value))
    assert f"t: {error_at(path)}: " in str(refused.value)
    assert message.format(minimum=minimum, maximum=maximum) in str(refused.value)


@pytest.mark.parametrize(("retry", "message"), [
    ({"initialDelay": "2h"}, "spec.retry.maxDelay: maxDelay (1h) must not be shorter than initialDelay (2h)"),
    ({"initialDelay": "10m", "maxDelay": "9m59s"},
     "spec.retry.maxDelay: maxDelay (9m59s) must not be shorter than initialDelay (10m)"),
    ({"throttledDelay": "6m"},
     "spec.retry.throttledMaxDelay: throttledMaxDelay (5m) must not be shorter than throttledDelay (6m)"),
])
def test_retry_caps_not_below_the_first_delays(retry: dict[str, str], message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate({"retry": retry})


def test_retry_order_equal_and_in_other_units_is_fine() -> None:
    validate({"retry": {"initialDelay": "1h", "maxDelay": "60m", "throttledDelay": "300s", "throttledMaxDelay": "5m"}})
