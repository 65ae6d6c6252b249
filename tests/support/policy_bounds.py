"""The bounds of every number in a ProviderPolicy, as a table: the unit tests check the model against it
(tests/unit/test_policy_numbers.py), the cluster tests the API server (tests/cluster/test_crd_cluster.py)."""

from __future__ import annotations

from typing import Any

START = "2026-12-01"

#: The fields of type integer (the rest are numbers): 5 and 5.0, not 5.5, true or "5", as in the CRD.
INTEGERS = {"limits.maxConnections", "limits.maxMessagesPerConnection", "limits.burst", "limits.messagesPerHour",
            "limits.messagesPerDay", "adaptive.floor.connections", "adaptive.increaseStep.connections",
            "adaptive.calmWindows", "warmup.schedule[].day", "warmup.schedule[].messagesPerDay"}

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
