"""The committed CRD is exactly what the policy model generates, and it teaches every field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mxgate.duration import DURATION_PATTERN, MAX_DURATION_LENGTH
from mxgate_operator.crd import crd, render

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "providerpolicies.mxgate.io.yaml"


def test_committed_crd_is_generated_from_the_model() -> None:
    assert CRD_FILE.read_text() == render(), "run: python -m mxgate_operator.crd > " + str(CRD_FILE.relative_to(ROOT))


def _fields(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, prop in node.get("properties", {}).items():
        out.append((f"{path}.{name}", prop))
        out += _fields(prop, f"{path}.{name}")
    if "items" in node:
        out += _fields(node["items"], f"{path}[]")
    return out


def test_every_spec_and_status_field_has_a_description() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    missing = [path for path, prop in _fields(schema["properties"]["spec"], "spec")
               + _fields(schema["properties"]["status"], "status") if not prop.get("description")]
    assert missing == []


def test_structural_schema_shape() -> None:
    document = crd()
    version = document["spec"]["versions"][0]
    text = yaml.safe_dump(document)
    assert "$ref" not in text and "anyOf" not in text and "title:" not in text and "additionalProperties" not in text
    assert document["spec"]["names"]["shortNames"] == ["pp"] and document["spec"]["scope"] == "Namespaced"
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Conns", "Max", "Rate", "Defer%", "State",
                                                                        "Age"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["adaptive"]["default"] == {}          # nested defaults apply
    assert spec["properties"]["limits"]["properties"]["maxConnections"]["default"] == 10
    assert {r["fieldPath"] for r in spec["x-kubernetes-validations"]} == {
        ".adaptive.floor.connections", ".adaptive.floor.messagesPerSecond", ".warmup.schedule", ".retry.maxDelay",
        ".retry.throttledMaxDelay"}
    rule_fields = [r["fieldPath"] for r in spec["properties"]["responses"]["items"]["x-kubernetes-validations"]]
    assert rule_fields == [".duration"]        # on the item: the error names spec.responses[i].duration
    warmup = spec["properties"]["warmup"]
    assert "default" not in warmup and warmup["required"] == ["startDate", "schedule"]   # absent: no ramp
    assert warmup["properties"]["startDate"] == {
        "description": warmup["properties"]["startDate"]["description"], "format": "date", "type": "string"}


def test_the_helm_charts_copy_is_the_same_file() -> None:
    # tests/cluster/test_chart.py checks it too; this one runs without the cluster binaries.
    chart_copy = ROOT / "deploy" / "helm" / "mxgate" / "crds" / CRD_FILE.name
    assert chart_copy.read_text() == CRD_FILE.read_text(), f"cp {CRD_FILE.relative_to(ROOT)} {chart_copy.parent}/"


def test_every_duration_field_has_the_models_syntax_and_bounds() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    durations = {path: prop for path, prop in _fields(schema, "spec") if prop.get("pattern") == DURATION_PATTERN}
    assert set(durations) == {"spec.retry.initialDelay", "spec.retry.maxDelay", "spec.retry.throttledDelay",
                              "spec.retry.throttledMaxDelay", "spec.retry.maxAge", "spec.adaptive.evaluationWindow",
                              "spec.responses[].duration", *(f"spec.timeouts.{stage}" for stage in (
                                  "connect", "greeting", "helo", "mail", "rcpt", "dataInit", "dataDone"))}
    for path, prop in durations.items():
        assert prop["type"] == "string" and prop["maxLength"] == MAX_DURATION_LENGTH
        (rule,) = prop["x-kubernetes-validations"]
        assert rule["message"].startswith("out of range: must be from "), path
        assert rule["message"].split("must be ")[1] in prop["description"].lower(), path   # the docs say the bounds


def test_fractional_minimums_are_cel_rules_too() -> None:
    # The API server checks an integer against "minimum: 0.01" as if it were 0 (measured on v1.37).
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    fractional = {path: prop for path, prop in _fields(schema, "spec")
                  if prop.get("type") == "number" and prop.get("minimum", 0) != int(prop.get("minimum", 0))}
    assert set(fractional) == {"spec.limits.messagesPerSecond", "spec.adaptive.floor.messagesPerSecond",
                               "spec.adaptive.increaseStep.messagesPerSecond"}
    for prop in fractional.values():
        assert prop["x-kubernetes-validations"] == [{"rule": "self >= 0.01",
                                                     "message": "should be greater than or equal to 0.01"}]


_SCHEMA_KEYWORDS = {"type", "properties", "items", "description", "default", "minimum", "maximum", "exclusiveMinimum",
                    "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "pattern", "enum", "format",
                    "required", "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys"}


def test_only_keywords_the_api_server_knows() -> None:
    # pydantic writes some constraints under its own names (an Optional[Annotated[int, validator, ge=1]] gave
    # "ge: 1"): the API server would refuse the CRD, or ignore the bound.
    def keywords(node: Any) -> set[str]:
        if not isinstance(node, dict):
            return set()
        found = set(node)
        for key, child in node.items():
            if key == "properties":
                for prop in child.values():
                    found |= keywords(prop)
            elif key == "items":
                found |= keywords(child)
        return found

    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert keywords(schema["properties"]["spec"]) - _SCHEMA_KEYWORDS == set()
