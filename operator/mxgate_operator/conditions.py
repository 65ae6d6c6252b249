"""A ProviderPolicy's ``status``: what the operator observed and put in force, as Kubernetes shows it.

Pure: the operator reads Redis and the object, this module turns that into the status document that
``kubectl get pp`` and ``kubectl describe pp`` show, and the operator patches it through the status
subresource. Conditions follow the Kubernetes API conventions:

    Ready       True: the policy is valid and in force on the fleet   False: InvalidSpec
    Throttled   True: a live limit is below the policy's ceiling      False: AtCeiling
    Suspended   True: no deliveries before effective.suspendedUntil   False: NotSuspended

``state`` sums them up: Suspended, else Capped (the day's cap -- ``limits.messagesPerDay`` or the
warm-up's volume -- is used up; the rest waits for the next UTC day), else Throttled, else Ready.

Each condition carries ``observedGeneration``; ``lastTransitionTime`` changes only when its status
does, so a steady provider does not churn its conditions every window.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mxgate.limits.effective import Effective
from mxgate.policy import Limits
from mxgate_operator.core import Window


def rfc3339(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Observation:
    """What the operator read for one provider."""

    effective: Effective
    window: Window | None = None          # the last evaluation window; None before the first one
    queued: int | None = None
    last_adjustment: Mapping[str, Any] | None = None   # newest entry of the adjustments list
    day_cap: int | None = None            # today's cap (messagesPerDay or the warm-up's volume); None: none
    sent_today: int = 0                   # messages counted against it today (Redis's UTC day)
    warmup_day: int | None = None         # day N of the warm-up ramp (1 = startDate); None: no warm-up


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def _condition(kind: str, holds: bool, reason: str, message: str, *, generation: int | None,
               previous: Sequence[Mapping[str, Any]], now: float) -> dict[str, Any]:
    status = "True" if holds else "False"
    before = next((c for c in previous if c.get("type") == kind), None)
    since = before.get("lastTransitionTime") if before and before.get("status") == status else None
    condition: dict[str, Any] = {"type": kind, "status": status, "reason": reason, "message": message,
                                 "lastTransitionTime": since or rfc3339(now)}
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def policy_status(*, generation: int | None, ceiling: Limits, observation: Observation,
                  previous: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The status of a valid policy that is in force."""
    eff = observation.effective
    old_conditions = previous.get("conditions") or []
    suspended = eff.suspended_until_ms / 1000 > now
    shown = {"connections": f"connections {eff.max_connections}/{ceiling.max_connections}",
             "rate": f"rate {_number(eff.messages_per_second)}/{_number(ceiling.messages_per_second)} msg/s"}
    below = [shown[limit] for limit in eff.below(ceiling)]
    reason_text = f" ({eff.reason})" if eff.reason else ""
    conditions = [
        _condition("Ready", True, "InForce", "the policy's limits are in force on the fleet",
                   generation=generation, previous=old_conditions, now=now),
        _condition("Throttled", bool(below), "BelowCeiling" if below else "AtCeiling",
                   ("live limits below the ceiling: " + ", ".join(below) + reason_text) if below
                   else "live limits at the policy's ceiling", generation=generation, previous=old_conditions,
                   now=now),
        _condition("Suspended", suspended, "Suspended" if suspended else "NotSuspended",
                   f"no deliveries before {rfc3339(eff.suspended_until_ms / 1000)}" if suspended
                   else "deliveries allowed", generation=generation, previous=old_conditions, now=now),
    ]
    # None removes a field: the operator sends the status as a JSON merge patch.
    effective: dict[str, Any] = {
        "maxConnections": eff.max_connections, "messagesPerSecond": eff.messages_per_second,
        "suspendedUntil": rfc3339(eff.suspended_until_ms / 1000) if suspended else None}
    capped = observation.day_cap is not None and observation.sent_today >= observation.day_cap
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "state": "Suspended" if suspended else "Capped" if capped else "Throttled" if below else "Ready",
        "effective": effective,
        "conditions": conditions,
    }
    window = observation.window
    if window is not None and window.seconds > 0:
        per_minute = 60.0 / window.seconds
        percent = 100.0 * window.deferred / window.outcomes if window.outcomes else 0.0
        status["observed"] = {"attemptsPerMinute": round(window.attempts * per_minute, 1),
                              "deliveriesPerMinute": round(window.delivered * per_minute, 1),
                              "deferralPercent": round(percent, 2)}
        if observation.queued is not None:
            status["observed"]["queued"] = observation.queued
        status["deferralPercent"] = f"{percent:.1f}%"
    elif "observed" in previous:
        status["observed"] = dict(previous["observed"])
        status["deferralPercent"] = previous.get("deferralPercent")
    if observation.day_cap is not None or observation.warmup_day is not None:
        status["daily"] = {"messagesPerDay": observation.day_cap, "sentToday": observation.sent_today,
                           "warmupDay": observation.warmup_day}
    elif previous.get("daily"):
        status["daily"] = None   # the cap was removed from the policy: drop the field
    last = observation.last_adjustment
    if last:
        status["lastAdjustment"] = {"time": rfc3339(float(last["time"])), "signal": str(last["signal"]),
                                    "limit": str(last["limit"]), "from": _number(last.get("old")),
                                    "to": _number(last.get("new")), "reason": str(last.get("reason", ""))}
    # None deletes a field in the merge patch: keep it only for fields the object has.
    return {k: v for k, v in status.items() if v is not None or k in previous}


def invalid_status(*, generation: int | None, message: str, previous: Mapping[str, Any],
                   now: float) -> dict[str, Any]:
    """The status of a policy the operator refused (the last good version, if any, stays in force)."""
    old_conditions = previous.get("conditions") or []
    status = dict(previous)
    status.update({
        "observedGeneration": generation,
        "state": "Invalid",
        "conditions": [
            _condition("Ready", False, "InvalidSpec", message, generation=generation, previous=old_conditions,
                       now=now),
            *[c for c in old_conditions if c.get("type") != "Ready"],
        ],
    })
    return {k: v for k, v in status.items() if v is not None}


def _pruned(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _pruned(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether merging ``new`` into ``old`` would change anything (None in ``new`` deletes a field)."""
    return any(_pruned(old.get(k)) != _pruned(v) for k, v in new.items())
