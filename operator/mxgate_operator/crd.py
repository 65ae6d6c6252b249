"""The ProviderPolicy CustomResourceDefinition, generated from the one policy model.

``python -m mxgate_operator.crd > crds/providerpolicies.mxgate.io.yaml`` writes it; a test checks the
committed file (and the Helm chart's copy) is exactly what this module generates, so the CRD, the
validator (``mxgate policy validate``), the gateway and the operator never disagree about a field.

The spec schema is pydantic's JSON schema turned into a Kubernetes structural schema: references
inlined, ``Optional`` fields made plain optional properties, ``exclusiveMinimum``/``exclusiveMaximum`` in
OpenAPI v3.0 form, titles dropped, every property given a description (``kubectl explain`` teaches from
them). An object field the model builds with a ``default_factory`` defaults to what the factory builds
(written as its difference from the class defaults, usually ``{}``), so the API server fills in exactly the
model's defaults; an optional object (default ``None``, e.g. ``route``) stays absent when unset.
A duration field (``mxgate.duration.DurationRange``) gets the syntax as its ``pattern`` and its bounds as
a CEL rule (``cel_milliseconds``: CEL's ``duration()`` is Go's parser, without days), so the API server
refuses the zero, huge and garbage durations the model refuses, with the same bounds in the message.
Checks that span fields are CEL rules (``x-kubernetes-validations``); checks the model makes in Python
that CEL cannot (regular expressions that must compile) are reported by the operator as the
``Ready=False / InvalidSpec`` condition.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from mxgate.duration import DURATION_PATTERN, MAX_DAY_DECIMALS, MS
from mxgate.policy import ProviderPolicySpec

GROUP = "mxgate.io"
VERSION = "v1alpha1"
PLURAL = "providerpolicies"
KIND = "ProviderPolicy"



def cel_milliseconds(text: str) -> str:
    """CEL for the duration in the string ``text`` (a CEL expression), in whole milliseconds.

    CEL's ``duration()`` is Go's ``time.ParseDuration``, which has no days: the days (``1.5d12h``, only
    ever first, at most ``MAX_DAY_DECIMALS`` decimals) are counted with ints, their fraction divided by
    the power of ten its length says. Built from ints and ``getMilliseconds()`` rather than by writing
    the days as hours into a new string: the API server's cost estimate counts a string built with ``+``
    as unbounded and refuses the CRD. Milliseconds, not nanoseconds (CEL has no accessor for those), so
    the model compares whole milliseconds too (``mxgate.duration``); truncating the day's fraction to
    milliseconds here gives what truncating it to nanoseconds and then to milliseconds gives there.
    Values too large for CEL's int or Go's duration are an evaluation error, and the API server refuses
    the object, as the model refuses anything that large.
    """
    day_ms = 86400 * 1000
    days, rest = f"{text}.split('d')[0]", f"{text}.split('d')[1]"
    whole, fraction = f"{days}.split('.')[0]", f"{days}.split('.')[1]"
    powers = "[" + ", ".join(str(10**n) for n in range(MAX_DAY_DECIMALS + 1)) + "]"
    fraction_ms = f"({days}.contains('.') ? int({fraction}) * {day_ms} / {powers}[size({fraction})] : 0)"
    return (f"({text}.contains('d') ? int({whole}) * {day_ms} + {fraction_ms} + "
            f"({rest} == '' ? 0 : duration({rest}).getMilliseconds()) : duration({text}).getMilliseconds())")


def _is_duration(text: str) -> str:
    return f"{text}.matches('{DURATION_PATTERN}')"


def _duration_range_rule(minimum_ns: int, maximum_ns: int, bounds: str) -> dict[str, str]:
    # Only on text of the right syntax (the pattern reports the rest), so a typo gets one error, not two.
    value = cel_milliseconds("self")
    return {"rule": f"!{_is_duration('self')} || ({value} >= {minimum_ns // MS} && {value} <= {maximum_ns // MS})",
            "message": f"out of range: must be {bounds}"}


def _not_shorter_rule(cap: str, first: str) -> dict[str, str]:
    # On the spec, not on spec.retry: the API server checks a rule against the field's default too, and
    # retry's default ({}) has no delays in it (nested defaults are applied to objects, not to defaults).
    cap_text, first_text = f"self.retry.{cap}", f"self.retry.{first}"
    return {"rule": f"!{_is_duration(first_text)} || !{_is_duration(cap_text)} || "
                    f"{cel_milliseconds(cap_text)} >= {cel_milliseconds(first_text)}",
            "fieldPath": f".retry.{cap}", "message": f"retry.{cap} must not be shorter than retry.{first}"}


# Cross-field rules, evaluated by the API server on every create and update (defaults applied first).
SPEC_RULES = [
    {"rule": "self.adaptive.floor.connections <= self.limits.maxConnections",
     "fieldPath": ".adaptive.floor.connections",
     "message": "adaptive.floor.connections must not exceed limits.maxConnections"},
    {"rule": "!has(self.limits.messagesPerSecond) || "
             "self.adaptive.floor.messagesPerSecond <= self.limits.messagesPerSecond",
     "fieldPath": ".adaptive.floor.messagesPerSecond",
     "message": "adaptive.floor.messagesPerSecond must not exceed limits.messagesPerSecond"},
    # The warm-up ramp's order, as the model checks it. CEL's all() has no index, so "days strictly
    # increase" is: the day numbers are sorted and each occurs once.
    {"rule": "!has(self.warmup) || size(self.warmup.schedule) == 0 || self.warmup.schedule[0].day == 1",
     "fieldPath": ".warmup.schedule",
     "message": "warmup.schedule[0].day must be 1 (the startDate)"},
    {"rule": "!has(self.warmup) || (self.warmup.schedule.map(s, s.day).isSorted() && "
             "self.warmup.schedule.all(a, self.warmup.schedule.exists_one(b, b.day == a.day)))",
     "fieldPath": ".warmup.schedule",
     "message": "warmup.schedule[].day must increase from one step to the next"},
    {"rule": "!has(self.warmup) || self.warmup.schedule.map(s, s.messagesPerDay).isSorted()",
     "fieldPath": ".warmup.schedule",
     "message": "warmup.schedule[].messagesPerDay must not decrease from one step to the next: a ramp goes up"},
    # The retry ladders' order.
    _not_shorter_rule("maxDelay", "initialDelay"),
    _not_shorter_rule("throttledMaxDelay", "throttledDelay"),
]
# On each reply rule rather than on the list, so the error names the rule: spec.responses[2].duration.
RESPONSE_RULES = [
    {"rule": "(self.action == 'Suspend') == has(self.duration)",
     "fieldPath": ".duration",
     "message": "duration is required for action Suspend and only allowed there"},
]


class _WithFactoryDefaults(GenerateJsonSchema):
    """pydantic leaves ``default_factory`` defaults out of the schema. Without them the API server would
    fill a nested object from its class defaults, not from the factory (``adaptive.increaseStep``'s
    factory sets messagesPerSecond 5, the class default is 1)."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            value = factory()  # type: ignore[call-arg]
            if isinstance(value, BaseModel):
                return value.model_dump(by_alias=True, exclude_defaults=True, mode="json")
        return super().get_default_value(schema)


def _spec_schema() -> dict[str, Any]:
    raw = ProviderPolicySpec.model_json_schema(by_alias=True, schema_generator=_WithFactoryDefaults)
    defs = raw.pop("$defs", {})
    return _structural(raw, defs)


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = copy.deepcopy(node)
    description = node.get("description")
    default = node.get("default", ...)
    if "$ref" in node:
        target = _structural(defs[node["$ref"].rsplit("/", 1)[1]], defs)
        node = {**target, **{k: v for k, v in node.items() if k not in ("$ref", "title")}}
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express {node['anyOf']} in a structural schema")
        inner = _structural(options[0], defs)
        node = {**inner, **{k: v for k, v in node.items() if k not in ("anyOf", "title")}}
    node.pop("title", None)
    node.pop("additionalProperties", None)   # structural schemas prune unknown fields instead
    if default is None or node.get("default", ...) is None:
        node.pop("default", None)            # "unset" is the absence of the field
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if exclusive in node and not isinstance(node[exclusive], bool):
            node[bound] = node.pop(exclusive)
            node[exclusive] = True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "x-duration-range" in node:   # mxgate.duration.DurationRange: the bounds become a CEL rule
        node["x-kubernetes-validations"] = [_duration_range_rule(*node.pop("x-duration-range"))]
    minimum = node.get("minimum")
    if node.get("type") == "number" and minimum is not None and minimum != int(minimum):
        # The API server checks an integer against a fractional minimum as if the minimum were an integer
        # too (0 passes "minimum: 0.01"); CEL compares numbers as doubles.
        node["x-kubernetes-validations"] = [{"rule": f"self >= {minimum!r}",
                                             "message": f"should be greater than or equal to {minimum!r}"}]
    if description:
        node["description"] = description
    if node.get("type") == "object" and "properties" in node:
        node["properties"] = {name: _structural(prop, defs) for name, prop in node["properties"].items()}
    if node.get("type") == "array" and "items" in node:
        node["items"] = _structural(node["items"], defs)
    return node


STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "What the operator observes and has put in force; written by the operator only.",
    "properties": {
        "observedGeneration": {"type": "integer", "description": "The spec generation this status is about."},
        "state": {"type": "string", "description": "Ready, Throttled (live limits under the ceiling), Capped "
                  "(the day's cap is used up), Suspended or Invalid."},
        "daily": {"type": "object", "description": "The day's cap (limits.messagesPerDay or the warm-up's "
                  "volume, whichever is lower) on Redis's UTC day.", "properties": {
                      "messagesPerDay": {"type": "integer", "description": "Today's cap (absent: none)."},
                      "sentToday": {"type": "integer", "description": "Messages counted against it today."},
                      "warmupDay": {"type": "integer", "description": "Day N of the warm-up (1 = startDate; "
                                    "0 or less: before it; past the last step: the ramp is over)."},
                  }},
        "effective": {"type": "object", "description": "The live limits in force now.", "properties": {
            "maxConnections": {"type": "integer", "description": "Connections fleet-wide now."},
            "messagesPerSecond": {"type": "number", "description": "Message rate fleet-wide now (absent: none)."},
            "suspendedUntil": {"type": "string", "format": "date-time",
                               "description": "No deliveries before this time."},
        }},
        "observed": {"type": "object", "description": "Traffic in the last evaluation window, fleet-wide.",
                     "properties": {
                         "attemptsPerMinute": {"type": "number", "description": "Delivery attempts per minute."},
                         "deliveriesPerMinute": {"type": "number", "description": "Recipients delivered per minute."},
                         "deferralPercent": {"type": "number",
                                             "description": "Deferred recipients as a percentage of outcomes."},
                         "queued": {"type": "integer", "description": "Jobs in the provider's queue."},
                     }},
        "deferralPercent": {"type": "string", "description": "Deferral percentage, formatted for kubectl."},
        "lastAdjustment": {"type": "object", "description": "The last change the controller made.", "properties": {
            "time": {"type": "string", "format": "date-time", "description": "When."},
            "signal": {"type": "string", "description": "connections, rate or recovery (the adaptive loop), "
                       "refused (a gateway set the connection limit after a refusal) or policy."},
            "limit": {"type": "string", "description": "Which limit: connections or rate."},
            "from": {"type": "string", "description": "The value before."},
            "to": {"type": "string", "description": "The value after."},
            "reason": {"type": "string", "description": "The evidence, e.g. the deferral counts."},
        }},
        "conditions": {"type": "array", "description": "Ready, Throttled and Suspended, as Kubernetes conditions.",
                       "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"],
                       "items": {"type": "object", "required": ["type", "status"], "properties": {
                           "type": {"type": "string", "description": "Ready, Throttled or Suspended."},
                           "status": {"type": "string", "enum": ["True", "False", "Unknown"],
                                      "description": "Whether the condition holds."},
                           "reason": {"type": "string", "description": "One word, CamelCase."},
                           "message": {"type": "string", "description": "For people."},
                           "lastTransitionTime": {"type": "string", "format": "date-time",
                                                  "description": "When the status last changed."},
                           "observedGeneration": {"type": "integer",
                                                  "description": "The spec generation it was computed for."},
                       }}},
    },
}


def crd() -> dict[str, Any]:
    spec = _spec_schema()
    spec["x-kubernetes-validations"] = SPEC_RULES
    spec["properties"]["responses"]["items"]["x-kubernetes-validations"] = RESPONSE_RULES
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": PLURAL, "singular": "providerpolicy", "kind": KIND, "shortNames": ["pp"],
                      "categories": ["mxgate"]},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Conns", "type": "integer", "jsonPath": ".status.effective.maxConnections",
                     "description": "Connections in force now"},
                    {"name": "Max", "type": "integer", "jsonPath": ".spec.limits.maxConnections",
                     "description": "Connection ceiling"},
                    {"name": "Rate", "type": "number", "jsonPath": ".status.effective.messagesPerSecond",
                     "description": "Messages per second in force now"},
                    {"name": "Defer%", "type": "string", "jsonPath": ".status.deferralPercent",
                     "description": "Deferred share of outcomes in the last window"},
                    {"name": "State", "type": "string", "jsonPath": ".status.state"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "Which recipient domains form one mailbox provider, and the connection and rate "
                                   "limits the whole mxgate fleet keeps towards it.",
                    "properties": {
                        "apiVersion": {"type": "string", "description": "mxgate.io/v1alpha1"},
                        "kind": {"type": "string", "description": "ProviderPolicy"},
                        "metadata": {"type": "object"},
                        "spec": spec,
                        "status": STATUS_SCHEMA,
                    },
                }},
            }],
        },
    }


def render() -> str:
    header = "# Generated by `python -m mxgate_operator.crd` from mxgate.policy: edit the model, not this file.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=110)


if __name__ == "__main__":
    sys.stdout.write(render())
