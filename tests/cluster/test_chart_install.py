"""``helm install`` of ``deploy/helm/mxgate`` into a real kube-apiserver, and what its ServiceAccounts may do.

The API server validates every object (the ProviderPolicy CRD's schema and CEL rules included) and RBAC
answers ``kubectl auth can-i --as=system:serviceaccount:...`` as in a real cluster. No kubelet runs, so the
pods are never scheduled: the process side is covered by test_operator.py and the integration tests.
"""

from __future__ import annotations

import base64
import json
import secrets

import pytest

from support.chart import CHART, FULLNAME, RELEASE
from support.kubeapi import KubeAPI

GATEWAY = f"{FULLNAME}-gateway"
OPERATOR = f"{FULLNAME}-operator"
REDIS = f"{FULLNAME}-redis"


def install(kube: KubeAPI, namespace: str, *settings: str) -> str:
    """helm install the chart into the namespace; the output, NOTES included."""
    sets = [arg for setting in settings for arg in ("--set", setting)]
    return kube.helm("install", RELEASE, str(CHART), "--namespace", namespace, *sets).stdout


def names(kube: KubeAPI, namespace: str, resource: str) -> set[str]:
    out = kube.kubectl("get", resource, "--namespace", namespace, "-o", "json").stdout
    return {item["metadata"]["name"] for item in json.loads(out)["items"]}


def test_helm_install_creates_every_object(kube: KubeAPI, namespace: str) -> None:
    notes = install(kube, namespace, "defaultPolicies.enabled=true",
                    "defaultPolicies.names={microsoft,yahoo,gmail,default}")
    assert f"kubectl -n {namespace} port-forward svc/{FULLNAME} 2525:25" in notes
    assert f"kubectl -n {namespace} get pp -w" in notes
    status = json.loads(kube.helm("status", RELEASE, "--namespace", namespace, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"

    assert names(kube, namespace, "deployments.apps") == {GATEWAY, OPERATOR}
    assert names(kube, namespace, "statefulsets.apps") == {REDIS}
    assert names(kube, namespace, "services") == {FULLNAME, f"{FULLNAME}-metrics", REDIS, f"{REDIS}-headless"}
    assert names(kube, namespace, "poddisruptionbudgets.policy") == {GATEWAY}
    assert names(kube, namespace, "networkpolicies.networking.k8s.io") == {GATEWAY, OPERATOR, REDIS}
    assert {GATEWAY, OPERATOR} <= names(kube, namespace, "serviceaccounts")
    assert names(kube, namespace, "roles.rbac.authorization.k8s.io") == {OPERATOR}
    assert names(kube, namespace, "rolebindings.rbac.authorization.k8s.io") == {OPERATOR}
    assert REDIS in names(kube, namespace, "secrets")
    assert {REDIS, f"{FULLNAME}-dashboard"} <= names(kube, namespace, "configmaps")
    assert names(kube, namespace, "kopfpeerings.kopf.dev") == {FULLNAME}
    # The example policies pass the CRD's schema and CEL rules.
    assert names(kube, namespace, "providerpolicies.mxgate.io") == {"microsoft", "yahoo", "gmail", "default"}
    printed = kube.kubectl("get", "pp", "--namespace", namespace).stdout
    assert printed.split()[:7] == ["NAME", "CONNS", "MAX", "RATE", "DEFER%", "STATE", "AGE"]

    # No kubelet: the pods exist only as the Deployments' intent.
    deployment = json.loads(kube.kubectl("get", "deployment", GATEWAY, "--namespace", namespace,
                                         "-o", "json").stdout)
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


def test_helm_upgrade_keeps_the_redis_password(kube: KubeAPI, namespace: str) -> None:
    install(kube, namespace)

    def password() -> str:
        out = kube.kubectl("get", "secret", REDIS, "--namespace", namespace, "-o", "jsonpath={.data.password}").stdout
        return base64.b64decode(out).decode()

    before = password()
    assert len(before) == 32 and before.isalnum()
    kube.helm("upgrade", RELEASE, str(CHART), "--namespace", namespace, "--set", "gateway.replicas=3")
    assert password() == before
    replicas = kube.kubectl("get", "deployment", GATEWAY, "--namespace", namespace,
                            "-o", "jsonpath={.spec.replicas}").stdout
    assert replicas == "3"


def test_helm_install_sidecar_mode(kube: KubeAPI, namespace: str) -> None:
    install(kube, namespace, "operator.mode=sidecar", "gateway.autoscaling.enabled=true")
    assert names(kube, namespace, "deployments.apps") == {GATEWAY}
    assert names(kube, namespace, "horizontalpodautoscalers.autoscaling") == {GATEWAY}
    assert names(kube, namespace, "kopfpeerings.kopf.dev") == {FULLNAME}
    pod = json.loads(kube.kubectl("get", "deployment", GATEWAY, "--namespace", namespace, "-o", "json").stdout)
    spec = pod["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["gateway", "operator"]
    assert spec["serviceAccountName"] == OPERATOR


def test_helm_install_with_external_redis(kube: KubeAPI, namespace: str) -> None:
    kube.kubectl("create", "secret", "generic", "corp-redis", "--namespace", namespace,
                 f"--from-literal=password={secrets.token_hex(8)}")
    install(kube, namespace, "redis.external.url=redis://redis.corp.example:6379/0",
            "redis.external.existingSecret=corp-redis")
    assert names(kube, namespace, "statefulsets.apps") == set()
    assert names(kube, namespace, "services") == {FULLNAME, f"{FULLNAME}-metrics"}


# ---- RBAC: what the ServiceAccounts may do ----

def can_i(kube: KubeAPI, account: str, namespace: str, *request: str) -> bool:
    """``kubectl auth can-i`` as the ServiceAccount; REQUEST is e.g. ("patch", "providerpolicies.mxgate.io")."""
    result = kube.kubectl("auth", "can-i", *request, f"--as=system:serviceaccount:{namespace}:{account}",
                          *([] if "--all-namespaces" in request or "--namespace" in request
                            else ["--namespace", namespace]), check=False)
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), result.stdout + result.stderr
    return answer == "yes"


OPERATOR_MAY = [
    ("get", "providerpolicies.mxgate.io"),
    ("list", "providerpolicies.mxgate.io"),
    ("watch", "providerpolicies.mxgate.io"),
    ("patch", "providerpolicies.mxgate.io"),
    ("patch", "providerpolicies.mxgate.io", "--subresource=status"),
    ("get", "providerpolicies.mxgate.io", "--subresource=status"),
    ("create", "events"),
    ("list", "kopfpeerings.kopf.dev"),
    ("watch", "kopfpeerings.kopf.dev"),
    ("get", f"kopfpeerings.kopf.dev/{FULLNAME}"),
    ("patch", f"kopfpeerings.kopf.dev/{FULLNAME}"),
]

OPERATOR_MAY_NOT = [
    ("get", "secrets"),
    ("list", "secrets"),
    ("get", "configmaps"),
    ("create", "pods"),
    ("delete", "providerpolicies.mxgate.io"),
    ("create", "providerpolicies.mxgate.io"),
    ("update", "providerpolicies.mxgate.io"),
    ("update", "providerpolicies.mxgate.io", "--subresource=status"),
    ("patch", "kopfpeerings.kopf.dev/someone-elses-peering"),
    ("delete", f"kopfpeerings.kopf.dev/{FULLNAME}"),
    ("create", "kopfpeerings.kopf.dev"),
    ("create", "events.events.k8s.io"),
    ("update", "events"),
    ("list", "providerpolicies.mxgate.io", "--namespace", "default"),
    ("list", "providerpolicies.mxgate.io", "--all-namespaces"),
    ("create", "events", "--namespace", "default"),
    ("list", "customresourcedefinitions.apiextensions.k8s.io"),
    ("list", "namespaces"),
    ("list", "clusterkopfpeerings.kopf.dev"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
]


@pytest.fixture
def installed(kube: KubeAPI, namespace: str) -> str:
    install(kube, namespace)
    return namespace


def test_operator_service_account_may_do_what_kopf_needs(kube: KubeAPI, installed: str) -> None:
    refused = [r for r in OPERATOR_MAY if not can_i(kube, OPERATOR, installed, *r)]
    assert not refused, f"the operator may not: {refused}"


def test_operator_service_account_may_do_nothing_more(kube: KubeAPI, installed: str) -> None:
    allowed = [r for r in OPERATOR_MAY_NOT if can_i(kube, OPERATOR, installed, *r)]
    assert not allowed, f"the operator may: {allowed}"


def rules(kube: KubeAPI, namespace: str, account: str) -> set[str]:
    """The account's rules in the namespace, as ``kubectl auth can-i --list`` prints them (one per line)."""
    out = kube.kubectl("auth", "can-i", "--list", "--namespace", namespace,
                       f"--as=system:serviceaccount:{namespace}:{account}").stdout
    return {" ".join(line.split()) for line in out.splitlines()[1:]}


def test_operator_rules_are_exactly_the_role(kube: KubeAPI, installed: str) -> None:
    # Beyond what every authenticated account may do (discovery, self-reviews): the Role's five rules.
    extra = rules(kube, installed, OPERATOR) - rules(kube, installed, "no-such-account")
    assert extra == {
        "providerpolicies.mxgate.io [] [] [get list watch patch]",
        "providerpolicies.mxgate.io/status [] [] [get patch]",
        "kopfpeerings.kopf.dev [] [] [list watch]",
        f"kopfpeerings.kopf.dev [] [{FULLNAME}] [get patch]",
        "events [] [] [create]",
    }


def test_gateway_service_account_may_do_nothing(kube: KubeAPI, installed: str) -> None:
    allowed = [r for r in OPERATOR_MAY + OPERATOR_MAY_NOT if can_i(kube, GATEWAY, installed, *r)]
    assert not allowed, f"the gateway may: {allowed}"
    # Its rules are the ones every authenticated account has, and no more.
    assert rules(kube, installed, GATEWAY) == rules(kube, installed, "no-such-account")
