"""``helm install`` of ``deploy/helm/mxgate`` into a real kube-apiserver, and what its ServiceAccounts may do.

The API server validates every object (the ProviderPolicy CRD's schema and CEL rules included) and RBAC
answers ``kubectl auth can-i --as=system:serviceaccount:...`` as in a real cluster. No kubelet runs, so the
pods are never scheduled: the process side is covered by test_operator.py and the integration tests.
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from mxgate import keys
from mxgate.embedded_redis import EmbeddedRedis, free_port
from support.chart import CHART, FULLNAME, RELEASE
from support.kubeapi import KubeAPI
from support.procs import Processes, eventually

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


def get(kube: KubeAPI, namespace: str, resource: str, name: str) -> dict[str, Any]:
    out = kube.kubectl("get", resource, name, "--namespace", namespace, "-o", "json").stdout
    return json.loads(out)  # type: ignore[no-any-return]


def test_helm_install_replicated_redis(kube: KubeAPI, namespace: str) -> None:
    notes = install(kube, namespace, "redis.mode=replicated", "redis.replicated.minReplicasToWrite=1")
    assert "primary + 2 replicas, a sentinel in each pod" in notes
    assert names(kube, namespace, "statefulsets.apps") == {REDIS}
    assert names(kube, namespace, "services") == {FULLNAME, f"{FULLNAME}-metrics", f"{REDIS}-headless"}
    assert names(kube, namespace, "poddisruptionbudgets.policy") == {GATEWAY, REDIS}
    assert names(kube, namespace, "networkpolicies.networking.k8s.io") == {GATEWAY, OPERATOR, REDIS}
    statefulset = get(kube, namespace, "statefulset", REDIS)
    assert statefulset["spec"]["replicas"] == 3
    assert [c["name"] for c in statefulset["spec"]["template"]["spec"]["containers"]] == ["redis", "sentinel"]
    service = get(kube, namespace, "service", f"{REDIS}-headless")
    assert {p["port"] for p in service["spec"]["ports"]} == {6379, 26379}
    gateway = get(kube, namespace, "deployment", GATEWAY)["spec"]["template"]["spec"]["containers"][0]
    url = {e["name"]: e.get("value") for e in gateway["env"]}["MXGATE_REDIS_URL"]
    assert url.startswith(f"redis+sentinel://{REDIS}-0.{REDIS}-headless.{namespace}.svc.cluster.local:26379,")
    assert url.endswith("/mxgate/0")


def test_helm_upgrade_from_standalone_to_replicated(kube: KubeAPI, namespace: str) -> None:
    # The API server refuses changes to a StatefulSet's immutable fields (serviceName, podManagementPolicy, the
    # claim templates, the selector): switching modes keeps them, so pod 0 keeps its claim and its data.
    install(kube, namespace)
    before = get(kube, namespace, "statefulset", REDIS)["spec"]
    password = get(kube, namespace, "secret", REDIS)["data"]["password"]
    kube.helm("upgrade", RELEASE, str(CHART), "--namespace", namespace, "--reuse-values",
              "--set", "redis.mode=replicated")
    after = get(kube, namespace, "statefulset", REDIS)["spec"]
    assert (before["replicas"], after["replicas"]) == (1, 3)
    for field in ("serviceName", "podManagementPolicy", "selector", "volumeClaimTemplates"):
        assert after[field] == before[field], field
    assert get(kube, namespace, "secret", REDIS)["data"]["password"] == password
    assert REDIS not in names(kube, namespace, "services")


def test_helm_install_with_external_sentinel(kube: KubeAPI, namespace: str) -> None:
    kube.kubectl("create", "secret", "generic", "corp-redis", "--namespace", namespace,
                 f"--from-literal=password={secrets.token_hex(8)}")
    # --set splits on commas: the URL's list of sentinels needs them escaped (a values file does not).
    install(kube, namespace, r"redis.external.url=redis+sentinel://s1.corp.example:26379\,s2.corp.example:26379/corp",
            "redis.external.existingSecret=corp-redis")
    assert names(kube, namespace, "statefulsets.apps") == set()
    gateway = get(kube, namespace, "deployment", GATEWAY)["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    assert env["MXGATE_REDIS_URL"] == "redis+sentinel://s1.corp.example:26379,s2.corp.example:26379/corp"
    policy = get(kube, namespace, "networkpolicy", GATEWAY)
    ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
    assert {26379, 6379} <= ports


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


# ---- the real operator with nothing but the chart's ServiceAccount ----

def service_account_kubeconfig(kube: KubeAPI, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount with a token from the TokenRequest API, as the
    kubelet mounts it into the pod."""
    token = kube.kubectl("create", "token", account, "--namespace", namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(kube.kubeconfig.read_text())
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": account, "preferences": {},
        "clusters": admin["clusters"],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": admin["clusters"][0]["name"], "user": account,
                                                   "namespace": namespace}}],
    }))
    path.chmod(0o600)
    return path


async def test_operator_works_with_only_the_charts_service_account(
        kube: KubeAPI, namespace: str, procs: Processes, tmp_path: Path, redis_server: EmbeddedRedis,
        redis_client: aioredis.Redis) -> None:
    # The chart's objects (Role, RoleBinding, KopfPeering) and one of its default policies; then the real
    # `mxgate operator`, run as the chart runs it but as a local process, authenticated as the operator's
    # ServiceAccount: whatever it needs beyond the Role shows up as a 403.
    install(kube, namespace, "defaultPolicies.enabled=true", "defaultPolicies.names={gmail}")
    kubeconfig = service_account_kubeconfig(kube, namespace, OPERATOR, tmp_path / "operator.kubeconfig")
    operator = procs.mxgate("operator", "--log-level", "debug", "operator", "--redis-url", redis_server.url,
                            "--namespace", namespace, "--peering", FULLNAME,
                            "--health-listen", f"127.0.0.1:{free_port()}", env={"KUBECONFIG": str(kubeconfig)})

    def policy() -> dict[str, Any]:
        out = kube.kubectl("get", "providerpolicy", "gmail", "--namespace", namespace, "-o", "json").stdout
        return json.loads(out)  # type: ignore[no-any-return]

    async def published() -> bool:
        return bool(await redis_client.hexists(keys.POLICIES, "gmail"))

    await eventually(published, timeout=60, what="the policy in Redis", processes=(operator,))
    ready = await eventually(lambda: (p := policy()).get("status", {}).get("state") == "Ready" and p,
                             timeout=60, what="status Ready", processes=(operator,))
    assert "mxgate.io/redis-state" in ready["metadata"]["finalizers"]
    peering = json.loads(kube.kubectl("get", "kopfpeering", FULLNAME, "--namespace", namespace,
                                      "-o", "json").stdout)
    assert peering.get("status"), "the operator's heartbeat is not in the KopfPeering"

    # An invalid spec (a regex only the operator's model rejects): a Warning Event and the status say so.
    bad = {"spec": {"responses": [{"match": "^421 [TSS04(", "action": "Suspend", "duration": "1h"}]}}
    kube.kubectl("patch", "providerpolicy", "gmail", "--namespace", namespace, "--type=merge", "-p", json.dumps(bad))

    def invalid_spec_events() -> list[dict[str, Any]]:
        out = kube.kubectl("get", "events", "--namespace", namespace, "-o", "json").stdout
        return [e for e in json.loads(out)["items"] if e["reason"] == "InvalidSpec"]

    [event] = await eventually(invalid_spec_events, timeout=60, what="an InvalidSpec Event", processes=(operator,))
    assert event["type"] == "Warning" and event["involvedObject"]["name"] == "gmail"

    # Delete: the operator cleans Redis and removes its finalizer (a patch), so the object goes.
    kube.kubectl("delete", "providerpolicy", "gmail", "--namespace", namespace, "--wait=true", "--timeout=60s")
    assert not await redis_client.hexists(keys.POLICIES, "gmail")
    log = operator.log()
    # A refusal's forms (the API server's Status, aiohttp's error, kopf's warning); not a bare "403", which log
    # timestamps (…T22:18:11.403Z) and resourceVersions contain by chance.
    for refusal in ("Forbidden", "forbidden", "Not enough permissions", "'code': 403", "403, message="):
        assert refusal not in log, f"the operator was refused something ({refusal!r}):\n{operator.log_tail(60)}"
    assert "Traceback" not in log, operator.log_tail(60)
