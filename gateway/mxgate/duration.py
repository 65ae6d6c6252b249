"""Durations in ProviderPolicy fields: the syntax, the parser and each field's bounds. Pure.

The syntax is Go's ``time.ParseDuration``, the way Kubernetes objects write durations: one or more
``<number><unit>`` parts, ``500ms``, ``30s``, ``1m30s``, ``2h45m``, ``1.5h``, ``.5s``; units ``ns``,
``us``, ``ms``, ``s``, ``m``, ``h``; parts add up, in any order. One extension: days, first, ``5d``,
``1.5d`` or ``1d12h``, because a queue lifetime reads best in days and policies always could write them
(a day's fraction has at most ``MAX_DAY_DECIMALS`` digits, which is finer than a millisecond). Not
accepted: a sign, spaces, days anywhere but first, more than 9 decimals (nanoseconds), Go's ``µs``
spelling (write ``us``: the pattern stays ASCII), more than 64 characters, and a bare number -- ``60``
does not say seconds or minutes (Go takes a bare ``0`` only, and zero is meaningless for every duration
here).

Each field has bounds of its own (``DurationRange``): zero is never one of them (a zero retry delay is a
hot retry loop, a zero evaluation window evaluates every tick), and the maximum keeps the value where
the code that uses it works (an evaluation window longer than the telemetry is kept reads missing
seconds; a 400-digit delay used to become ``inf`` and make every retry decision raise).

The CRD (``mxgate_operator.crd``) is generated from the same ``DurationRange`` objects: the syntax as
the ``pattern``, the bounds as a CEL rule, so the API server refuses what ``mxgate policy validate``
refuses. Values are parsed as Go parses them (to whole nanoseconds, fractions truncated) and compared
in whole milliseconds, as the CEL rule can (``getMilliseconds()``: CEL has no nanosecond accessor), so
both sides agree at the bounds too: ``24h0.5ms`` counts as 24h on both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

__all__ = ["DURATION_PATTERN", "MAX_DAY_DECIMALS", "MAX_DURATION_LENGTH", "MS", "DurationRange", "parse_duration",
           "parse_duration_ms", "parse_duration_ns"]

MS = 10**6   # nanoseconds in a millisecond
#: Decimals a number of days may have: 8 resolve 0.864 ms, and keep the CRD's integer arithmetic in int64.
MAX_DAY_DECIMALS = 8
#: Longest duration text accepted (bounds the CEL rule's cost in the API server, too).
MAX_DURATION_LENGTH = 64

_NS = {"ns": 1, "us": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9,
       "h": 3600 * 10**9, "d": 86400 * 10**9}
# "[.]" rather than "\." and "[0-9]" rather than "\d": the same text is a Python, an RE2 (API server) and a
# CEL string literal, and Python's \d would also match non-ASCII digits.
# At most 9 decimals (nanoseconds): beyond them Go drops digits and rounds through a float, and the API
# server (Go) could then read a value at a bound differently from the model.
_NUMBER = r"(?:[0-9]+(?:[.][0-9]{0,9})?|[.][0-9]{1,9})"
_UNIT = r"(?:ns|us|ms|s|m|h)"     # "ms" before "m" and "s": the longest unit wins, as in Go
#: The syntax, as a regular expression (also the CRD's ``pattern``).
DURATION_PATTERN = rf"^(?:[0-9]+(?:[.][0-9]{{1,{MAX_DAY_DECIMALS}}})?d(?:{_NUMBER}{_UNIT})*|(?:{_NUMBER}{_UNIT})+)$"
_SYNTAX = re.compile(DURATION_PATTERN)
_PART = re.compile(rf"({_NUMBER})({_UNIT}|d)")


def parse_duration_ns(text: str) -> int:
    """``"1m30s"`` -> 90_000_000_000: whole nanoseconds, fractions truncated (as Go). ValueError if not a duration."""
    if len(text) > MAX_DURATION_LENGTH:
        raise ValueError(f"not a duration: longer than {MAX_DURATION_LENGTH} characters")
    if not _SYNTAX.fullmatch(text):
        raise ValueError(f"{text!r} is not a duration: write numbers with units, e.g. 500ms, 30s, 1m30s, 2h or 5d "
                         "(units ns, us, ms, s, m, h, and days d first)")
    total = 0
    for number, unit in _PART.findall(text):
        whole, _, fraction = number.partition(".")
        scale = _NS[unit]
        total += int(whole or "0") * scale
        if fraction:
            total += int(fraction) * scale // 10 ** len(fraction)
    return total


def parse_duration(text: str) -> float:
    """``"250ms"``, ``"1m30s"``, ``"5d"`` -> seconds. ValueError if not a duration."""
    return parse_duration_ns(text) / 1e9


def parse_duration_ms(text: str) -> int:
    """Whole milliseconds (truncated): what bounds and order are checked on, here and in the CRD."""
    return parse_duration_ns(text) // MS


@dataclass(frozen=True, slots=True)
class DurationRange:
    """A duration field's bounds, both inclusive; use as ``Annotated[str, DurationRange("1s", "10m")]``.

    The field keeps the text as written (it round-trips through Redis and Kubernetes unchanged); the
    check runs on validation. The JSON schema (and so the CRD) gets the pattern, the length limit and
    ``x-duration-range`` (``[min_ns, max_ns]``, turned into a CEL rule by the CRD generator).
    """

    minimum: str
    maximum: str
    minimum_ns: int = field(init=False)
    maximum_ns: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "minimum_ns", parse_duration_ns(self.minimum))
        object.__setattr__(self, "maximum_ns", parse_duration_ns(self.maximum))
        if not 0 < self.minimum_ns <= self.maximum_ns:
            raise ValueError(f"DurationRange({self.minimum!r}, {self.maximum!r}): need 0 < minimum <= maximum")

    @property
    def bounds_text(self) -> str:
        return f"from {self.minimum} to {self.maximum}"

    def check(self, value: object) -> object:
        """Before the str schema: numbers get a message that says what is missing (the unit)."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise PydanticCustomError(
                "duration_unit", "{value} is a bare number: a duration needs a unit, e.g. 30s, 5m or 2h",
                {"value": value})
        return value

    def check_text(self, value: str) -> str:
        try:
            ns = parse_duration_ns(value)
        except ValueError as exc:
            raise PydanticCustomError("duration", str(exc)) from exc
        if not self.minimum_ns // MS <= ns // MS <= self.maximum_ns // MS:
            raise PydanticCustomError("duration_range", "{value} is out of range: must be {bounds}",
                                      {"value": repr(value), "bounds": self.bounds_text})
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_before_validator_function(
            self.check, core_schema.no_info_after_validator_function(self.check_text, handler(source)))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        out = handler(schema)
        out.update({"pattern": DURATION_PATTERN, "maxLength": MAX_DURATION_LENGTH,
                    "x-duration-range": [self.minimum_ns, self.maximum_ns, self.bounds_text]})
        return out
