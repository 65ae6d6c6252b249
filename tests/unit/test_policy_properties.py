"""Whatever the policy model accepts, the gateway and the operator use without raising.

The defect this guards against: ``retry.throttledDelay: 0s`` validated, and the gateway's retry schedule
then raised on every delivery outcome (delivered mail was never acked). Policies are generated broadly --
durations and numbers at, inside and past their bounds, reply rules, warm-up ramps -- and every one the
model accepts is run through what uses it:

- the gateway: the JSON round trip through Redis (``to_json`` / ``from_json``), PolicyBook's ``retry()``,
  ``rules()``, ``ceiling()``, ``limits()`` and ``warmup()``, ``judge()`` on replies of every kind with
  the compiled rules and schedule (and the delays the engine turns into milliseconds), the day's cap,
  the limiter's burst;
- the operator: ``core.decide`` over a run of evaluation windows (feeding its state back, through the
  Redis hash the loop writes), the live limits the gateways read back (``Effective``), and the status
  (``conditions``).

A second property: policies generated within the documented bounds are all accepted (the bounds in the
docs are the model's). A third: the YAML file of a generated document loads exactly as the document.
"""

from __future__ import annotations

import math
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mxgate.errors import PolicyError
from mxgate.policy import API_VERSION, DEFAULT_POLICY_NAME, KIND, ProviderPolicy, parse_policy
from mxgate.policy_files import load_policy_file
from support.policy_use import use_in_the_gateway, use_in_the_operator

# -- generators -------------------------------------------------------------------------------------------

_UNITS = ["ns", "us", "ms", "s", "m", "h"]


def _compound() -> st.SearchStrategy[str]:
    number = st.one_of(st.integers(0, 100_000).map(str),
                       st.tuples(st.integers(0, 999), st.integers(0, 99_999)).map(lambda p: f"{p[0]}.{p[1]}"))
    parts = st.lists(st.tuples(number, st.sampled_from(_UNITS)).map("".join), min_size=1, max_size=3).map("".join)
    days = st.one_of(st.just(""), st.integers(0, 40).map(lambda d: f"{d}d"))
    return st.tuples(days, parts).map("".join)


#: Values at and around every duration field's bounds, and the garbage of the defect reports.
_EDGE_DURATIONS = ["0s", "0ms", "0d", "1ns", "99ms", "100ms", "999ms", "1s", "5s", "1m", "10m", "10m1ms",
                   "1h", "24h", "24h0.9ms", "24h1ms", "1d", "2d", "5d", "30d", "30d1ms", "31d", "1d12h", "1.5h",
                   "1m30s", "2h45m", ".5s", "9" * 62 + "ms", "9" * 400 + "s", "99999999999999999999d",
                   "1.5d", "0.5d12h", "29.99999999d", "30.00000001d", "30.0000001d", "1.123456789d", "5",
                   "-5s", "5 days", "forever", ""]

durations_wide = st.one_of(st.sampled_from(_EDGE_DURATIONS), _compound(), st.integers(-1, 1000),
                           st.floats(allow_nan=True, allow_infinity=True), st.none())


def numbers_wide(low: float, high: float, *, integer: bool) -> st.SearchStrategy[Any]:
    """At, inside and past [low, high], NaN, infinities and integers too large for a float."""
    edges = [low, high, low - 1, high + 1, 0, -1, int("9" * 400), -int("9" * 400)]
    inside = st.integers(int(math.ceil(low)), int(high)) if integer else st.floats(low, high)
    return st.one_of(inside, st.sampled_from(edges), st.floats(allow_nan=True, allow_infinity=True),
                     st.integers(), st.just("5"), st.booleans())


_REPLY_RULES = [r"\[TSS04\]", r"4\.7\.65[02]", "blocked", "rate", ".*", "^$", "(?:x|y)+", "a{0,1000}",
                "(" * 50 + "x" + ")" * 50, "(" * 51 + ")" * 51, "(" * 512 + ")" * 512, "[", "(?P<x", "*",
                "a{4294967296}"]

def rules_wide() -> st.SearchStrategy[list[dict[str, Any]]]:
    action = st.sampled_from(["TightenConnections", "TightenRate", "Suspend", "Bounce", "Retry", "Drop"])
    rule = st.fixed_dictionaries({"match": st.sampled_from(_REPLY_RULES), "action": action},
                                 optional={"duration": durations_wide})
    return st.lists(rule, max_size=4)


def warmup_wide() -> st.SearchStrategy[dict[str, Any]]:
    step = st.fixed_dictionaries({"day": numbers_wide(1, 366, integer=True),
                                  "messagesPerDay": numbers_wide(1, 100_000_000, integer=True)})
    start = st.one_of(st.dates().map(date.isoformat), st.sampled_from(["2026-11-31", "2026-12-01T00:00:00Z", ""]))
    return st.fixed_dictionaries({"startDate": start, "schedule": st.lists(step, max_size=4)})


def spec_wide() -> st.SearchStrategy[dict[str, Any]]:
    limits = st.fixed_dictionaries({}, optional={
        "maxConnections": numbers_wide(1, 10_000, integer=True),
        "maxMessagesPerConnection": numbers_wide(1, 1_000_000, integer=True),
        "messagesPerSecond": numbers_wide(0.01, 1_000_000, integer=False),
        "burst": numbers_wide(1, 1_000_000, integer=True),
        "messagesPerHour": numbers_wide(1, 1_000_000_000, integer=True),
        "messagesPerDay": numbers_wide(1, 1_000_000_000, integer=True),
        "idleTimeoutSeconds": numbers_wide(0.001, 3600, integer=False)})
    retry = st.fixed_dictionaries({}, optional={name: durations_wide for name in (
        "initialDelay", "maxDelay", "throttledDelay", "throttledMaxDelay", "maxAge")})
    pair = st.fixed_dictionaries({}, optional={"connections": numbers_wide(1, 10_000, integer=True),
                                               "messagesPerSecond": numbers_wide(0.01, 1_000_000, integer=False)})
    adaptive = st.fixed_dictionaries({}, optional={
        "enabled": st.one_of(st.booleans(), st.just("yes")), "floor": pair, "increaseStep": pair,
        "decreaseFactor": numbers_wide(0, 1, integer=False), "evaluationWindow": durations_wide,
        "deferralThreshold": numbers_wide(0, 1, integer=False), "calmWindows": numbers_wide(1, 1000, integer=True)})
    return st.fixed_dictionaries({}, optional={"limits": limits, "retry": retry, "adaptive": adaptive,
                                               "responses": rules_wide(), "warmup": warmup_wide()})


def document(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}


documents_wide = st.builds(document, st.sampled_from(["microsoft", DEFAULT_POLICY_NAME]), spec_wide())


# Within the documented bounds (README "Durations and bounds", the field descriptions) and consistent
# across fields: every one must be accepted.

def _within(low_ms: int, high_ms: int) -> st.SearchStrategy[str]:
    def text(ms: int) -> st.SearchStrategy[str]:
        forms = [st.just(f"{ms}ms")]
        if ms % 1000 == 0:
            forms.append(st.just(f"{ms // 1000}s"))
        if ms % 60_000 == 0 and ms >= 60_000:
            forms.append(st.just(f"{ms // 60_000 // 60}h{ms // 60_000 % 60}m"))
        if ms % 86_400_000 == 0:
            forms.append(st.just(f"{ms // 86_400_000}d"))
        if ms >= 86_400_000:
            forms.append(st.just(f"{ms // 86_400_000}d{ms % 86_400_000}ms"))
        return st.one_of(forms)
    return st.one_of(st.sampled_from([low_ms, high_ms]), st.integers(low_ms, high_ms)).flatmap(text)


@st.composite
def documents_within(draw: st.DrawFn) -> dict[str, Any]:
    day_ms = 86_400_000
    first = draw(st.integers(100, day_ms))
    throttled = draw(st.integers(100, day_ms))
    conns = draw(st.integers(1, 10_000))
    rate = draw(st.one_of(st.none(), st.floats(0.01, 1_000_000)))
    floor_rate = draw(st.floats(0.01, rate if rate is not None else 1_000_000))
    steps, day, volume = [], 1, draw(st.integers(1, 1000))
    for _ in range(draw(st.integers(1, 5))):
        steps.append({"day": day, "messagesPerDay": volume})
        day, volume = day + draw(st.integers(1, 60)), min(100_000_000, volume * draw(st.integers(1, 10)))
        if day > 366:
            break
    spec: dict[str, Any] = {
        "limits": {"maxConnections": conns, "maxMessagesPerConnection": draw(st.integers(1, 1_000_000)),
                   "burst": draw(st.integers(1, 1_000_000)), "idleTimeoutSeconds": draw(st.floats(0.001, 3600)),
                   "messagesPerHour": draw(st.integers(1, 1_000_000_000)),
                   "messagesPerDay": draw(st.integers(1, 1_000_000_000))},
        "retry": {"initialDelay": draw(_within(first, first)), "maxDelay": draw(_within(first, day_ms)),
                  "throttledDelay": draw(_within(throttled, throttled)),
                  "throttledMaxDelay": draw(_within(throttled, day_ms)), "maxAge": draw(_within(1000, 30 * day_ms))},
        "adaptive": {"enabled": draw(st.booleans()), "evaluationWindow": draw(_within(1000, 600_000)),
                     "floor": {"connections": draw(st.integers(1, conns)), "messagesPerSecond": floor_rate},
                     "increaseStep": {"connections": draw(st.integers(1, 10_000)),
                                      "messagesPerSecond": draw(st.floats(0.01, 1_000_000))},
                     "decreaseFactor": draw(st.floats(0.0001, 0.9999)), "deferralThreshold": draw(st.floats(0, 1)),
                     "calmWindows": draw(st.integers(1, 1000))},
        "responses": [{"match": m, "action": "Suspend", "duration": draw(_within(1000, day_ms))}
                      for m in draw(st.lists(st.sampled_from(_REPLY_RULES[:9]), max_size=3))],
        "warmup": {"startDate": draw(st.dates()).isoformat(), "schedule": steps},
    }
    if rate is not None:
        spec["limits"]["messagesPerSecond"] = rate
    return document("microsoft", spec)


#: Where a wide value may replace a valid one: a bad (or edge) value in an otherwise valid policy is where a
#: value the model should refuse would slip through.
_MUTATIONS: list[tuple[tuple[str, ...], st.SearchStrategy[Any]]] = [
    *((("retry", name), durations_wide)
      for name in ("initialDelay", "maxDelay", "throttledDelay", "throttledMaxDelay", "maxAge")),
    (("adaptive", "evaluationWindow"), durations_wide),
    (("responses",), rules_wide()),
    (("warmup",), warmup_wide()),
    (("limits", "maxConnections"), numbers_wide(1, 10_000, integer=True)),
    (("limits", "maxMessagesPerConnection"), numbers_wide(1, 1_000_000, integer=True)),
    (("limits", "messagesPerSecond"), numbers_wide(0.01, 1_000_000, integer=False)),
    (("limits", "burst"), numbers_wide(1, 1_000_000, integer=True)),
    (("limits", "messagesPerHour"), numbers_wide(1, 1_000_000_000, integer=True)),
    (("limits", "messagesPerDay"), numbers_wide(1, 1_000_000_000, integer=True)),
    (("limits", "idleTimeoutSeconds"), numbers_wide(0.001, 3600, integer=False)),
    (("adaptive", "floor", "connections"), numbers_wide(1, 10_000, integer=True)),
    (("adaptive", "floor", "messagesPerSecond"), numbers_wide(0.01, 1_000_000, integer=False)),
    (("adaptive", "increaseStep", "connections"), numbers_wide(1, 10_000, integer=True)),
    (("adaptive", "increaseStep", "messagesPerSecond"), numbers_wide(0.01, 1_000_000, integer=False)),
    (("adaptive", "decreaseFactor"), numbers_wide(0, 1, integer=False)),
    (("adaptive", "deferralThreshold"), numbers_wide(0, 1, integer=False)),
    (("adaptive", "calmWindows"), numbers_wide(1, 1000, integer=True)),
]


@st.composite
def documents_mutated(draw: st.DrawFn) -> dict[str, Any]:
    doc = draw(documents_within())
    for index in draw(st.lists(st.integers(0, len(_MUTATIONS) - 1), max_size=3)):
        path, values = _MUTATIONS[index]
        node = doc["spec"]
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = draw(values)
    if draw(st.booleans()):
        doc["metadata"]["name"] = DEFAULT_POLICY_NAME
        doc["spec"].pop("match", None)
    return doc


# -- the properties ---------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(documents_wide, documents_mutated()))
def test_whatever_the_model_accepts_the_gateway_and_the_operator_use(doc: dict[str, Any]) -> None:
    try:
        policy = parse_policy(doc, source="generated")
    except PolicyError:
        event("refused")
        return
    event("accepted")
    use_in_the_gateway(policy)
    use_in_the_operator(policy)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents_within())
def test_policies_within_the_documented_bounds_are_accepted_and_used(doc: dict[str, Any]) -> None:
    policy = parse_policy(doc, source="generated")
    use_in_the_gateway(policy)
    use_in_the_operator(policy)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(documents_wide, documents_mutated()))
def test_a_file_of_a_document_loads_as_the_document(doc: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "policy.yaml"
        path.write_text(yaml.safe_dump(doc))
        try:
            expected: ProviderPolicy | str = parse_policy(doc, source=str(path))
        except PolicyError as exc:
            expected = str(exc)
        try:
            loaded: list[ProviderPolicy] | str = load_policy_file(path)
        except PolicyError as exc:
            loaded = str(exc)
        assert loaded == (expected if isinstance(expected, str) else [expected])
