"""The ProviderPolicy CRD in a real kube-apiserver, driven with the machine's kubectl.

What a user meets: the CRD is accepted and Established; the example policies apply as they are; what the
schema or a CEL rule refuses is refused with a message naming the field, and the policy model refuses it
too; ``kubectl get pp`` shows the printer columns; ``kubectl explain`` teaches every field; and the server
fills in exactly the defaults the model would.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiException, CustomObjectsApi
from pydantic import ValidationError

from mxgate.duration import DURATION_PATTERN
from mxgate.errors import PolicyError
from mxgate.policy import API_VERSION, KIND, ProviderPolicy, ProviderPolicySpec
from mxgate.policy_files import load_policy_file
from mxgate_operator.crd import GROUP, PLURAL, VERSION, crd
from support.kubeapi import REPO_ROOT, KubeAPI
from support.policy_bounds import INTEGERS, NUMBERS, put
from support.policy_corpus import REFUSALS, bad_files, good_files

pytestmark = pytest.mark.usefixtures("crds_installed")

CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILE = REPO_ROOT / "crds" / f"{CRD_NAME}.yaml"
EXAMPLES = sorted([*(REPO_ROOT / "examples" / "policies").glob("*.yaml"),
                   *(REPO_ROOT / "examples" / "local").glob("*.yaml")])


def document(spec: dict[str, Any], *, name: str = "p") -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}


def create(kube: KubeAPI, namespace: str, spec: dict[str, Any], *args: str, name: str = "p",
           check: bool = False) -> subprocess.CompletedProcess[str]:
    return kube.kubectl("create", "-n", namespace, "-f", "-", *args, check=check,
                        input=json.dumps(document(spec, name=name)))


def get_policy(kube: KubeAPI, namespace: str, name: str = "p") -> dict[str, Any]:
    return json.loads(kube.kubectl("get", "-n", namespace, "providerpolicy", name, "-o", "json").stdout)


def leaves(node: Any, path: str = "") -> dict[str, Any]:
    """Flatten to {"a.b": value}; empty lists and objects vanish (the server stores an unset list as absent)."""
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in leaves(child, f"{path}.{key}").items()}
    if isinstance(node, list):
        return {k: v for i, child in enumerate(node) for k, v in leaves(child, f"{path}[{i}]").items()}
    return {path: node}


def squash(text: str) -> str:
    return " ".join(text.split())


def table(output: str) -> list[dict[str, str]]:
    """Rows of kubectl's table output by column name; a CRD column with no value prints as blank."""
    header, *rows = output.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [{name: row[a:b].strip() for name, (a, b) in zip(names, bounds, strict=True)} for row in rows]


# -- the CRD ---------------------------------------------------------------------------------------------


def test_crd_is_established_and_served_as_written(kube: KubeAPI, crds_installed: list[str]) -> None:
    assert CRD_NAME in crds_installed
    served = json.loads(kube.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in served["status"]["conditions"]}
    assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"
    assert served["status"]["acceptedNames"]["shortNames"] == ["pp"]
    assert served["status"]["acceptedNames"]["categories"] == ["mxgate"]
    # The server kept the schema exactly as generated (nothing pruned or rewritten).
    written = yaml.safe_load(CRD_FILE.read_text())
    assert served["spec"]["versions"][0]["schema"] == written["spec"]["versions"][0]["schema"]

    resources = kube.kubectl("api-resources", f"--api-group={GROUP}").stdout.splitlines()
    assert resources[0].split() == ["NAME", "SHORTNAMES", "APIVERSION", "NAMESPACED", "KIND"]
    assert resources[1].split() == [PLURAL, "pp", f"{GROUP}/{VERSION}", "true", KIND]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_policy_applies_and_means_the_same_in_the_cluster(kube: KubeAPI, namespace: str,
                                                                   path: Path) -> None:
    (expected,) = load_policy_file(path)
    assert kube.kubectl("apply", "-n", namespace, "-f", str(path)).stdout.strip() == \
        f"providerpolicy.{GROUP}/{expected.name} created"
    stored = get_policy(kube, namespace, expected.name)
    in_cluster = ProviderPolicy.model_validate(document(stored["spec"], name=expected.name))
    assert in_cluster == expected


@pytest.mark.parametrize("spec", [
    {},
    {"adaptive": {"increaseStep": {"connections": 2}}},
    {"limits": {"maxConnections": 3, "messagesPerSecond": 50}, "retry": {"maxAge": "2d"}},
    {"route": {"hosts": ["mx.example.net:2525"]}, "responses": [{"match": "TSS04", "action": "Suspend",
                                                                 "duration": "2h"}]},
], ids=["empty", "partial-increase-step", "limits-and-retry", "route-and-responses"])
def test_the_server_fills_in_exactly_the_models_defaults(kube: KubeAPI, namespace: str,
                                                        spec: dict[str, Any]) -> None:
    create(kube, namespace, spec, check=True)
    stored = get_policy(kube, namespace)["spec"]
    model = ProviderPolicySpec.model_validate(spec).model_dump(by_alias=True, exclude_none=True, mode="json")
    assert leaves(stored) == leaves(model)


def test_defaults_of_a_minimal_policy(kube: KubeAPI, namespace: str) -> None:
    create(kube, namespace, {}, check=True)
    spec = get_policy(kube, namespace)["spec"]
    assert "route" not in spec                  # unset: DNS MX
    assert spec["limits"] == {"maxConnections": 10, "maxMessagesPerConnection": 100, "idleTimeoutSeconds": 5}
    assert spec["retry"] == {"initialDelay": "1m", "maxDelay": "1h", "throttledDelay": "5s",
                             "throttledMaxDelay": "5m", "maxAge": "5d"}
    assert spec["adaptive"]["floor"] == {"connections": 1, "messagesPerSecond": 1}
    assert spec["adaptive"]["increaseStep"] == {"connections": 1, "messagesPerSecond": 5}
    assert spec["adaptive"]["enabled"] is True and spec["adaptive"]["evaluationWindow"] == "5s"


# -- refusals --------------------------------------------------------------------------------------------

SCHEMA_REFUSALS = [
    pytest.param({"limits": {"maxConnections": -1}},
                 ["spec.limits.maxConnections", "should be greater than or equal to 1"], id="negative-connections"),
    pytest.param({"limits": {"maxConnections": 10_001}},
                 ["spec.limits.maxConnections", "should be less than or equal to 10000"], id="connections-over-max"),
    pytest.param({"limits": {"maxConnections": "ten"}},
                 ["spec.limits.maxConnections", "must be of type integer"], id="string-for-integer"),
    pytest.param({"limits": {"messagesPerSecond": 0}},
                 ["spec.limits.messagesPerSecond", "should be greater than or equal to 0.01"], id="zero-rate"),
    pytest.param({"limits": {"burst": -5}},
                 ["spec.limits.burst", "should be greater than or equal to 1"], id="negative-burst"),
    pytest.param({"limits": {"idleTimeoutSeconds": -1.5}},
                 ["spec.limits.idleTimeoutSeconds", "should be greater than 0"], id="negative-idle-timeout"),
    pytest.param({"adaptive": {"decreaseFactor": 1}},
                 ["spec.adaptive.decreaseFactor", "should be less than 1"], id="decrease-factor-one"),
    pytest.param({"adaptive": {"deferralThreshold": 1.5}},
                 ["spec.adaptive.deferralThreshold", "should be less than or equal to 1"], id="threshold-over-1"),
    pytest.param({"adaptive": {"floor": {"connections": 0}}},
                 ["spec.adaptive.floor.connections", "should be greater than or equal to 1"], id="zero-floor"),
    pytest.param({"retry": {"maxAge": "5 days"}},
                 ["spec.retry.maxAge", "should match"], id="bad-duration"),
    pytest.param({"adaptive": {"evaluationWindow": "5"}},
                 ["spec.adaptive.evaluationWindow", "should match"], id="duration-without-unit"),
    pytest.param({"adaptive": {"enabled": "yes"}},
                 ["spec.adaptive.enabled", "must be of type boolean"], id="string-for-boolean"),
    pytest.param({"match": {"domains": "gmail.com"}},
                 ["spec.match.domains", "must be of type array"], id="domains-not-a-list"),
    pytest.param({"route": {}}, ["spec.route.hosts", "Required value"], id="route-without-hosts"),
    pytest.param({"route": {"hosts": []}},
                 ["spec.route.hosts", "should have at least 1 items"], id="route-empty-hosts"),
    pytest.param({"route": {"hosts": [f"mx{i}.example.net" for i in range(17)]}},
                 ["spec.route.hosts", "must have at most 16 items"], id="route-too-many-hosts"),
    pytest.param({"responses": [{"match": "x", "action": "Drop"}]},
                 ["spec.responses[0].action", "Unsupported value", '"Drop"', '"TightenConnections"'], id="bad-enum"),
    pytest.param({"responses": [{"match": "x"}]},
                 ["spec.responses[0].action", "Required value"], id="rule-without-action"),
    pytest.param({"responses": [{"match": "", "action": "Retry"}]},
                 ["spec.responses[0].match", "should be at least 1 chars long"], id="empty-match"),
    pytest.param({"responses": [{"match": "x", "action": "Suspend", "duration": "forever"}]},
                 ["spec.responses[0].duration", "should match"], id="bad-suspend-duration"),
    pytest.param({"warmup": {"startDate": "2026-11-31", "schedule": [{"day": 1, "messagesPerDay": 100}]}},
                 ["spec.warmup.startDate", "must be of type date"], id="warmup-no-such-date"),
    pytest.param({"warmup": {"startDate": "2026-11-30T00:00:00Z", "schedule": [{"day": 1, "messagesPerDay": 1}]}},
                 ["spec.warmup.startDate", "must be of type date"], id="warmup-date-time"),
    pytest.param({"warmup": {"startDate": "2026-11-30", "schedule": []}},
                 ["spec.warmup.schedule", "should have at least 1 items"], id="warmup-empty-schedule"),
    pytest.param({"warmup": {"schedule": [{"day": 1, "messagesPerDay": 100}]}},
                 ["spec.warmup.startDate", "Required value"], id="warmup-without-start"),
    pytest.param({"warmup": {"startDate": "2026-11-30", "schedule": [{"day": 1, "messagesPerDay": 0}]}},
                 ["spec.warmup.schedule[0].messagesPerDay", "should be greater than or equal to 1"],
                 id="warmup-zero-volume"),
]

CEL_REFUSALS = [
    pytest.param({"limits": {"maxConnections": 2}, "adaptive": {"floor": {"connections": 3}}},
                 ["spec.adaptive.floor.connections",
                  "adaptive.floor.connections must not exceed limits.maxConnections"],
                 id="connection-floor-above-ceiling"),
    pytest.param({"limits": {"messagesPerSecond": 5}, "adaptive": {"floor": {"messagesPerSecond": 10}}},
                 ["spec.adaptive.floor.messagesPerSecond",
                  "adaptive.floor.messagesPerSecond must not exceed limits.messagesPerSecond"],
                 id="rate-floor-above-ceiling"),
    # The rule sees the defaults: the default rate floor (1/s) is above a ceiling of 0.5/s.
    pytest.param({"limits": {"messagesPerSecond": 0.5}},
                 ["spec.adaptive.floor.messagesPerSecond", "must not exceed limits.messagesPerSecond"],
                 id="default-rate-floor-above-ceiling"),
    pytest.param({"responses": [{"match": "TSS04", "action": "Suspend"}]},
                 ["spec.responses[0].duration", "duration is required for action Suspend"],
                 id="suspend-without-duration"),
    pytest.param({"responses": [{"match": "x", "action": "Retry"}, {"match": "y", "action": "Bounce",
                                                                    "duration": "1h"}]},
                 ["spec.responses[1].duration", "duration is required for action Suspend and only allowed there"],
                 id="duration-on-bounce"),
    pytest.param({"warmup": {"startDate": "2026-11-30", "schedule": [{"day": 2, "messagesPerDay": 100}]}},
                 ["spec.warmup.schedule", "warmup.schedule[0].day must be 1"], id="warmup-not-starting-on-day-1"),
    pytest.param({"warmup": {"startDate": "2026-11-30", "schedule": [
        {"day": 1, "messagesPerDay": 100}, {"day": 3, "messagesPerDay": 200}, {"day": 2, "messagesPerDay": 300}]}},
                 ["spec.warmup.schedule", "warmup.schedule[].day must increase"], id="warmup-days-out-of-order"),
    pytest.param({"warmup": {"startDate": "2026-11-30", "schedule": [
        {"day": 1, "messagesPerDay": 100}, {"day": 1, "messagesPerDay": 200}]}},
                 ["spec.warmup.schedule", "warmup.schedule[].day must increase"], id="warmup-day-twice"),
    pytest.param({"warmup": {"startDate": "2026-11-30", "schedule": [
        {"day": 1, "messagesPerDay": 500}, {"day": 2, "messagesPerDay": 200}]}},
                 ["spec.warmup.schedule", "messagesPerDay must not decrease"], id="warmup-volume-falls"),
]


@pytest.mark.parametrize(("spec", "expected"), SCHEMA_REFUSALS + CEL_REFUSALS)
def test_invalid_policy_is_refused_naming_the_field(kube: KubeAPI, namespace: str, spec: dict[str, Any],
                                                    expected: list[str]) -> None:
    result = create(kube, namespace, spec)
    assert result.returncode != 0, result.stdout
    assert f'The {KIND} "p" is invalid' in result.stderr
    for fragment in expected:
        assert fragment in result.stderr
    with pytest.raises(ValidationError):        # the validator (mxgate policy validate) agrees
        ProviderPolicy.model_validate(document(spec))


def test_cel_rules_hold_on_update_too(kube: KubeAPI, namespace: str) -> None:
    create(kube, namespace, {"limits": {"maxConnections": 5}}, check=True)
    raise_floor = {"spec": {"adaptive": {"floor": {"connections": 6}}}}
    result = kube.kubectl("patch", "-n", namespace, "pp", "p", "--type=merge", "-p", json.dumps(raise_floor),
                          check=False)
    assert result.returncode != 0
    assert "spec.adaptive.floor.connections" in result.stderr
    assert "must not exceed limits.maxConnections" in result.stderr
    stored = get_policy(kube, namespace)
    assert stored["metadata"]["generation"] == 1 and stored["spec"]["adaptive"]["floor"]["connections"] == 1


def test_unknown_field_is_refused_with_strict_validation(kube: KubeAPI, namespace: str) -> None:
    typo = {"limits": {"maxConnection": 5}}
    result = create(kube, namespace, typo, "--validate=strict")
    assert result.returncode != 0
    assert 'unknown field "spec.limits.maxConnection"' in result.stderr
    # The same check made by the server for any client (fieldValidation=Strict), not by kubectl.
    with kube.api_client() as api, pytest.raises(ApiException) as refused:
        CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                              document(typo), field_validation="Strict")
    reason = json.loads(refused.value.body)
    assert refused.value.status == 400 and reason["reason"] == "BadRequest"
    assert 'unknown field "spec.limits.maxConnection"' in reason["message"]
    with pytest.raises(ValidationError, match="maxConnection"):
        ProviderPolicy.model_validate(document(typo))


def test_without_strict_validation_an_unknown_field_is_pruned(kube: KubeAPI, namespace: str) -> None:
    # Why the tests and docs say --validate=strict: otherwise a typo is silently dropped by the server.
    create(kube, namespace, {"limits": {"maxConnection": 5}}, "--validate=ignore", check=True)
    assert get_policy(kube, namespace)["spec"]["limits"] == {"maxConnections": 10, "maxMessagesPerConnection": 100,
                                                             "idleTimeoutSeconds": 5}


# -- kubectl get, status ---------------------------------------------------------------------------------


def test_kubectl_get_shows_the_printer_columns_from_spec_and_status(kube: KubeAPI, namespace: str) -> None:
    kube.kubectl("apply", "-n", namespace, "-f", str(REPO_ROOT / "examples" / "policies" / "microsoft.yaml"))
    output = kube.kubectl("get", "pp", "-n", namespace).stdout
    assert output.splitlines()[0].split() == ["NAME", "CONNS", "MAX", "RATE", "DEFER%", "STATE", "AGE"]
    (row,) = table(output)
    assert row | {"AGE": ""} == {"NAME": "microsoft", "CONNS": "", "MAX": "20", "RATE": "", "DEFER%": "",
                                 "STATE": "", "AGE": ""}

    status = {"status": {"observedGeneration": 1, "state": "Throttled", "deferralPercent": "3.2%",
                         "effective": {"maxConnections": 7, "messagesPerSecond": 12.5},
                         "conditions": [{"type": "Ready", "status": "True", "reason": "Published",
                                         "lastTransitionTime": "2026-11-22T08:00:00Z"}]}}
    kube.kubectl("patch", "-n", namespace, "pp", "microsoft", "--subresource=status", "--type=merge",
                 "-p", json.dumps(status))
    (row,) = table(kube.kubectl("get", "pp", "-n", namespace).stdout)
    assert row | {"AGE": ""} == {"NAME": "microsoft", "CONNS": "7", "MAX": "20", "RATE": "12.5", "DEFER%": "3.2%",
                                 "STATE": "Throttled", "AGE": ""}
    assert re.fullmatch(r"\d+s", row["AGE"])

    # The status subresource: a write to the main resource leaves the status alone ...
    kube.kubectl("patch", "-n", namespace, "pp", "microsoft", "--type=merge",
                 "-p", json.dumps({"status": {"state": "Bogus"}}))
    assert get_policy(kube, namespace, "microsoft")["status"]["state"] == "Throttled"
    # ... and the status has a schema of its own.
    bad = {"status": {"conditions": [{"type": "Ready", "status": "Maybe"}]}}
    result = kube.kubectl("patch", "-n", namespace, "pp", "microsoft", "--subresource=status", "--type=merge",
                          "-p", json.dumps(bad), check=False)
    assert result.returncode != 0 and "status.conditions[0].status" in result.stderr
    assert 'Unsupported value: "Maybe"' in result.stderr

    # The category: `kubectl get mxgate` lists the policies too.
    assert "microsoft" in kube.kubectl("get", "mxgate", "-n", namespace).stdout


# -- kubectl explain -------------------------------------------------------------------------------------


def _schema_at(path: str) -> dict[str, Any]:
    node: dict[str, Any] = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in path.split(".")[1:]:
        node = node.get("items", node)["properties"][part]
    return node


@pytest.mark.parametrize("path", [
    "providerpolicy.spec",
    "providerpolicy.spec.adaptive",
    "providerpolicy.spec.adaptive.floor",
    "pp.spec.limits",
    "pp.spec.responses",
    "providerpolicies.status.conditions",
])
def test_kubectl_explain_prints_the_descriptions(kube: KubeAPI, path: str) -> None:
    explained = squash(kube.kubectl("explain", path).stdout)
    assert f"KIND: {KIND}" in explained and f"VERSION: {VERSION}" in explained
    node = _schema_at(path)
    assert squash(node["description"]) in explained
    fields = node.get("items", node)["properties"]
    for name, prop in fields.items():
        assert name in explained
        assert squash(prop["description"]) in explained, f"{path}.{name}"


def test_kubectl_explain_recursive_lists_every_field(kube: KubeAPI) -> None:
    explained = kube.kubectl("explain", "providerpolicy", "--recursive").stdout
    names = set(re.findall(r"^\s+(\w+)\s+<", explained, re.MULTILINE))
    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert set(field_names(spec)) <= names


def field_names(node: dict[str, Any]) -> list[str]:
    out = []
    for name, prop in node.get("items", node).get("properties", {}).items():
        out += [name, *field_names(prop)]
    return out


# -- durations and the policy-file corpus: the API server refuses what the validator refuses -----------------

#: Values for every duration field, at, inside and past its bounds and in every spelling; the server and the
#: model must agree on each (the bounds are in mxgate.duration's DurationRange and crd.py's CEL rules).
DURATION_VALUES = ["0s", "0ms", "0d", "1ns", "99ms", "99.9ms", "100ms", "100.5ms", "999ms", "1s", "1000ms", ".5s",
                   "1.s", "1m", "1m30s", "30s1m", "1m1m", "10m", "10m0.9ms", "10m1ms", "1h", "1.5h", "1h0m0s",
                   "2h45m", "24h", "24h0.9ms", "24h1ms", "1440m", "86400s", "1d", "1d0s", "1d12h", "2d",
                   "0d90m", "5d", "29d23h59m59s999ms", "30d", "30d0.9ms", "30d1ms", "720h", "720h1ms", "31d",
                   "400d", "99999999999h", "99999999999999999999d", "9" * 62 + "ms", "9" * 65 + "s", "1.5d",
                   "0.5d", "0.25d6h", ".5d", "1.d", "1.12345678d", "1.123456789d", "0.00000001d", "0.00001157d",
                   "0.00001158d", "29.99999999d", "30.00000001d", "30.0000001d", "0.99999999d", "0.99999999d1ms",
                   "0.099999999s", "0.0999999999s", "99.999999999ms", "99.9999999999ms", "1.999999999h",
                   "12h1d", "5", "-1s", "+1s", "5 days", "5S", "1m500us", "1500000us", "1e3s", ""]
DURATION_FIELDS = [("retry", "initialDelay"), ("retry", "maxAge"), ("retry", "throttledMaxDelay"),
                   ("adaptive", "evaluationWindow"), ("responses", "duration")]


def _duration_spec(section: str, name: str, value: str) -> dict[str, Any]:
    if section == "responses":
        return {"responses": [{"match": "TSS04", "action": "Suspend", "duration": value}]}
    if name == "initialDelay":
        return {"retry": {"initialDelay": value, "maxDelay": "24h"}}
    if name == "throttledMaxDelay":
        return {"retry": {"throttledDelay": "100ms", "throttledMaxDelay": value}}
    return {section: {name: value}}


def _server_accepts(kube: KubeAPI, namespace: str, name: str, body: dict[str, Any]) -> tuple[bool, str]:
    with kube.api_client() as api:
        try:
            CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body,
                                                                  field_validation="Strict")
        except ApiException as refused:
            return False, json.loads(refused.body).get("message", "")
    return True, ""


def _model_accepts(body: dict[str, Any]) -> bool:
    try:
        ProviderPolicy.model_validate(body)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize(("section", "name"), DURATION_FIELDS, ids=[f"{s}.{n}" for s, n in DURATION_FIELDS])
def test_server_and_model_agree_on_every_duration(kube: KubeAPI, namespace: str, section: str, name: str) -> None:
    disagreements = []
    for i, value in enumerate(DURATION_VALUES):
        body = document(_duration_spec(section, name, value), name=f"d{i}")
        model = _model_accepts(body)
        server, message = _server_accepts(kube, namespace, f"d{i}", body)
        if model != server:
            disagreements.append(f"{value!r}: model {'accepts' if model else 'refuses'}, server "
                                 f"{'accepts' if server else 'refuses: ' + message}")
        elif not server and re.fullmatch(DURATION_PATTERN, value) and len(value) <= 64:
            # A value of the right syntax out of range: the CEL rule's message, naming the field.
            assert "out of range: must be from" in message or "evaluation" in message, message
    assert disagreements == []


def test_server_and_model_agree_on_the_retry_order(kube: KubeAPI, namespace: str) -> None:
    cases = [({"initialDelay": "2h"}, False), ({"initialDelay": "1h"}, True), ({"initialDelay": "60m1ms"}, False),
             ({"initialDelay": "1d", "maxDelay": "24h"}, True), ({"initialDelay": "1d", "maxDelay": "23h"}, False),
             ({"throttledDelay": "5m0.9ms"}, True), ({"throttledDelay": "5m1ms"}, False),
             ({"throttledDelay": "1s", "throttledMaxDelay": "999ms"}, False)]
    for i, (retry, ok) in enumerate(cases):
        body = document({"retry": retry}, name=f"r{i}")
        server, message = _server_accepts(kube, namespace, f"r{i}", body)
        assert (_model_accepts(body), server) == (ok, ok), (retry, message)
        if not ok:
            assert "must not be shorter than" in message and "spec.retry." in message, message


@pytest.mark.parametrize("path", [p for p in bad_files() if REFUSALS[p.name].kind != "file"], ids=lambda p: p.name)
def test_the_server_refuses_the_corpus_files_the_validator_refuses(kube: KubeAPI, namespace: str,
                                                                    path: Path) -> None:
    refusal = REFUSALS[path.name]
    with pytest.raises(PolicyError):
        load_policy_file(path)
    result = kube.kubectl("create", "-n", namespace, "-f", str(path), check=False)
    if refusal.kind == "python":
        # What only Python can check: stored, and the operator reports InvalidSpec (test_operator.py).
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode != 0, result.stdout
    if refusal.kind == "model":
        assert refusal.field is not None and refusal.field in result.stderr, result.stderr


@pytest.mark.parametrize("path", good_files(), ids=lambda p: p.name)
def test_good_corpus_files_apply_and_mean_the_same_in_the_cluster(kube: KubeAPI, namespace: str,
                                                                  path: Path) -> None:
    expected = load_policy_file(path)
    kube.kubectl("apply", "-n", namespace, "-f", str(path))
    for policy in expected:
        stored = get_policy(kube, namespace, policy.name)
        assert ProviderPolicy.model_validate(document(stored["spec"], name=policy.name)) == policy


#: Integer fields the CRD's CEL rules read (crd.SPEC_RULES).
CEL_INTEGERS = {"limits.maxConnections", "adaptive.floor.connections", "warmup.schedule[].day",
                "warmup.schedule[].messagesPerDay"}


def test_server_and_model_agree_on_every_number_at_its_bounds(kube: KubeAPI, namespace: str) -> None:
    disagreements = []
    n = 0
    for path, lowest, highest, below, above, extra in NUMBERS:
        # Integers where a number is integral: the API server once let an integer 0 past "minimum: 0.01".
        values: list[Any] = [lowest, highest, below, above, 0, -1, int(below) if below == int(below) else below]
        values += [float(lowest), lowest + 0.5, True, str(lowest)] if path in INTEGERS else [True, str(lowest)]
        values += [int(highest)] if path not in INTEGERS and highest == int(highest) else []
        for value in {repr(v): v for v in values}.values():   # by repr: True and 1 are one key in a set
            spec = put(copy.deepcopy(extra), path, value)
            if "floor.messagesPerSecond" in path or "increaseStep" in path:
                spec = put(spec, "limits.messagesPerSecond", 1_000_000)
            body = document(spec, name=f"n{n}")
            n += 1
            model = _model_accepts(body)
            server, message = _server_accepts(kube, namespace, body["metadata"]["name"], body)
            if model and not server and isinstance(value, float) and path in CEL_INTEGERS and "expected int" in message:
                # The one way the server is stricter: it takes 5.0 for an integer, except in a field a CEL rule
                # reads (an evaluation error). Never the other way round: what the model refuses, it refuses.
                continue
            if model != server:
                disagreements.append(f"{path}={value!r}: model {'accepts' if model else 'refuses'}, server "
                                     f"{'accepts' if server else 'refuses: ' + message}")
    assert disagreements == []
