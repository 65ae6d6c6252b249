"""Mail through mxgate installed by its chart on the real cluster (``kubenode.py``): the release, the provider
it delivers to (an in-cluster ``mxgate sim``), the ProviderPolicy routing the test domain there, senders in a
pod, and what arrived.

Counting is by Message-ID. Senders keep the Message-IDs of the messages that got a 250; the simulator writes
one JSON line per accepted message to its stdout (``--sink-log /dev/stdout``), read back as the pod's log.
A message accepted and never delivered is a loss, one delivered twice a duplicate (at-least-once allows those).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import kubernetes
from kubernetes.client import CoreV1Api

from support.chart import CHART
from support.kubenode import POD_CIDR, ImageArchives, KubeNode
from support.pods import restricted, wait_all_ready, wait_for
from support.procs import Sender

RELEASE = "mx"
GATEWAY_SERVICE = f"{RELEASE}-mxgate"     # the chart's fullname for release "mx"
SIM = "sim"
TEST_DOMAIN = "e2e.test"
GROUP, VERSION, PLURAL = "mxgate.io", "v1alpha1", "providerpolicies"


def release_values(*, mxgate_ref: str, redis_ref: str, pod_cidr: str,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The chart's defaults plus what this cluster needs: local images (``imagePullPolicy: Never``) and the
    pod network as the networks that may relay (clients in pods, and the host, which kube-proxy masquerades
    to the bridge address)."""
    repository, tag = mxgate_ref.rsplit(":", 1)
    redis_repository, redis_tag = redis_ref.rsplit(":", 1)
    values: dict[str, Any] = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "redis": {"image": {"repository": redis_repository, "tag": redis_tag, "pullPolicy": "Never"}},
        "gateway": {"allowedNetworks": [pod_cidr]},
    }
    for key, value in (extra or {}).items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return values


def install(node: KubeNode, namespace: str, values: Mapping[str, Any], *, redis_pods: int = 1) -> None:
    """``helm install`` (no ``--wait``: the tests wait for the pods themselves and say why they are not ready).
    The claims of the bundled Redis's ``redis_pods`` pods get host volumes first (no provisioner on this node)."""
    for ordinal in range(redis_pods):
        node.add_host_volume(f"{namespace}-redis-{ordinal}", claim_namespace=namespace,
                             claim_name=f"data-{GATEWAY_SERVICE}-redis-{ordinal}")
    node.helm("install", RELEASE, str(CHART), "--namespace", namespace, values=values)


def upgrade(node: KubeNode, namespace: str, values: Mapping[str, Any]) -> None:
    """``helm upgrade`` of the release with these values (no ``--wait``, as :func:`install`)."""
    node.helm("upgrade", RELEASE, str(CHART), "--namespace", namespace, values=values)


def sim_manifests(image: str, *, args: Sequence[str] = ()) -> list[dict[str, Any]]:
    """A one-replica ``mxgate sim`` Deployment (SMTP on 2525, its report on 8080) and its Service (25 -> 2525)."""
    labels = {"app": SIM}
    container = {
        "name": SIM, "image": image, "imagePullPolicy": "Never",
        "args": ["--log-format", "json", "sim", "--listen", "0.0.0.0:2525", "--http", "0.0.0.0:8080",
                 "--hostname", "sim.e2e.test", "--sink-log", "/dev/stdout", *args],
        "ports": [{"name": "smtp", "containerPort": 2525}, {"name": "http", "containerPort": 8080}],
        "readinessProbe": {"tcpSocket": {"port": "smtp"}, "periodSeconds": 1},
        "securityContext": restricted(10001),
    }
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": SIM, "labels": labels},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels},
                               "spec": {"automountServiceAccountToken": False, "containers": [container]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": SIM},
         "spec": {"selector": labels, "ports": [{"name": "smtp", "port": 25, "targetPort": "smtp"},
                                                {"name": "http", "port": 8080, "targetPort": "http"}]}},
    ]


def create_sim(api: kubernetes.client.ApiClient, namespace: str, image: str, *, args: Sequence[str] = ()) -> None:
    deployment, service = sim_manifests(image, args=args)
    kubernetes.client.AppsV1Api(api).create_namespaced_deployment(namespace, deployment)
    kubernetes.client.CoreV1Api(api).create_namespaced_service(namespace, service)


def provider_policy(namespace: str, *, limits: Mapping[str, Any], name: str = "e2e") -> dict[str, Any]:
    """A ProviderPolicy sending :data:`TEST_DOMAIN` to the simulator's Service."""
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ProviderPolicy", "metadata": {"name": name},
            "spec": {"match": {"domains": [TEST_DOMAIN]},
                     "route": {"hosts": [f"{SIM}.{namespace}.svc.cluster.local:25"]},
                     "limits": dict(limits)}}


def create_policy(api: kubernetes.client.ApiClient, namespace: str, policy: Mapping[str, Any]) -> None:
    kubernetes.client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                                            dict(policy))


def get_policy(api: kubernetes.client.ApiClient, namespace: str, name: str = "e2e") -> dict[str, Any]:
    obj: dict[str, Any] = kubernetes.client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name)
    return obj


def policy_table(api: kubernetes.client.ApiClient, namespace: str) -> dict[str, dict[str, Any]]:
    """What ``kubectl get pp`` prints: the server-side Table of the CRD's printer columns (row -> column -> cell)."""
    method, url, headers, body, _ = api.param_serialize(
        "GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}, auth_settings=["BearerToken"])
    reply = api.call_api(method, url, header_params=headers, body=body)
    reply.read()
    response = json.loads(reply.data)
    columns = [c["name"] for c in response["columnDefinitions"]]
    return {row["cells"][0]: dict(zip(columns, row["cells"], strict=True)) for row in response["rows"]}


def delivered(core: CoreV1Api, namespace: str) -> Counter[str]:
    """Message-ID -> times the simulator accepted it, from its pods' logs (a restarted container's too)."""
    counts: Counter[str] = Counter()
    for pod in core.list_namespaced_pod(namespace, label_selector=f"app={SIM}").items:
        restarted = any((s.restart_count or 0) > 0 for s in pod.status.container_statuses or [])
        logs = [core.read_namespaced_pod_log(pod.metadata.name, namespace)]
        if restarted:
            logs.append(core.read_namespaced_pod_log(pod.metadata.name, namespace, previous=True))
        for log in logs:
            for line in log.splitlines():
                if line.startswith('{"time"') and '"message_id"' in line:
                    record = json.loads(line)
                    counts[record["message_id"]] += 1
    return counts


# Sends COUNT messages over one connection to HOST:25; prints the Message-ID of each one that got a 250.
# A refused message is retried on a new connection (at most 20 times in all), as a submitting client would.
POD_SENDER = """
import smtplib, sys, time
host, count, tag, rcpt = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
retries = 0
smtp = None
number = 0
while number < count:
    message_id = f"<pod{number}.{tag}@example.com>"
    message = (f"From: app@example.com\\r\\nTo: {rcpt}\\r\\nSubject: from a pod {number}\\r\\n"
               f"Message-ID: {message_id}\\r\\n\\r\\nhello from a pod\\r\\n")
    try:
        if smtp is None:
            smtp = smtplib.SMTP(host, 25, timeout=30)
        smtp.sendmail("app@example.com", [rcpt], message)
    except (smtplib.SMTPException, OSError) as exc:
        retries += 1
        print("retry", number, repr(exc), flush=True)
        if retries > 20:
            raise
        smtp = None
        time.sleep(0.5)
        continue
    print("accepted", message_id, flush=True)
    number += 1
smtp.quit()
"""


def pod_sender(name: str, image: str, *, host: str, count: int, tag: str) -> dict[str, Any]:
    return {"metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                     "containers": [{"name": "sender", "image": image, "imagePullPolicy": "Never",
                                     "command": ["python3", "-c", POD_SENDER],
                                     "args": [host, str(count), tag, f"user@{TEST_DOMAIN}"],
                                     "securityContext": restricted(10001)}]}}


def accepted_by_pod_sender(log: str) -> set[str]:
    return {line.split()[1] for line in log.splitlines() if line.startswith("accepted ")}


# -- a release with its provider, for a test module ------------------------------------------------------


@dataclass
class Release:
    """mxgate installed in ``namespace`` beside the simulator, with the policy ``e2e`` routing to it."""

    node: KubeNode
    namespace: str
    image: str
    redis_ref: str
    service_ip: str
    pods: int          # how many pods the namespace runs when all is well (the simulator's included)

    def sender(self, count: int, *, tag: str, concurrency: int = 20, rate: float | None = None) -> Sender:
        """A client of the gateway Service's ClusterIP (from the host: kube-proxy's DNAT)."""
        return Sender(ports=[25], host=self.service_ip, count=count, concurrency=concurrency, rate=rate,
                      rcpt=f"user@{TEST_DOMAIN}", tag=tag)

    async def load_with_kill(self, pod: str, *, tag: str, count: int = 2000, after: int = 500,
                             rate: float | None = 200.0, timeout: float = 300) -> tuple[Sender, int, float]:
        """Send ``count`` messages; once ``after`` are accepted, delete ``pod`` with grace 0 (``kubectl delete
        --grace-period=0 --force``). The sender, how many it had accepted before the deletion, and the seconds
        from the deletion to the end of the load."""
        # Paced by default (2000 at 200/s: 10 s), so that the deletion lands while clients are still sending:
        # unpaced, the gateways took the last 1,377 of 2000 in 0.7 s, before the kubelet had stopped the pod. A
        # test that needs sessions in flight at the moment of the kill sends more, unpaced, instead.
        sender = self.sender(count, concurrency=20, rate=rate, tag=tag)
        load = asyncio.create_task(sender.run(timeout=timeout))
        while len(sender.accepted) < after and not load.done():
            await asyncio.sleep(0.05)
        accepted_before = len(sender.accepted)
        with self.node.api_client() as api:
            await asyncio.to_thread(CoreV1Api(api).delete_namespaced_pod, pod, self.namespace, grace_period_seconds=0,
                                    body={"gracePeriodSeconds": 0, "propagationPolicy": "Background"})
        killed_at = time.monotonic()
        await load
        assert accepted_before < count, f"the load finished before {pod} was deleted"
        assert len(sender.accepted) == count
        return sender, accepted_before, time.monotonic() - killed_at

    def wait_delivered(self, api: kubernetes.client.ApiClient, wanted: set[str], *, timeout: float) -> Counter[str]:
        """Wait until every Message-ID in ``wanted`` has reached the simulator; its delivery counts."""
        core = CoreV1Api(api)

        def all_there() -> Counter[str] | None:
            got = delivered(core, self.namespace)
            return got if wanted <= set(got) else None

        try:
            arrived: Counter[str] = wait_for(core, self.namespace, all_there, what=f"the {len(wanted)} accepted "
                                             "messages at the simulator", timeout=timeout)
        except AssertionError as exc:
            missing = wanted - set(delivered(core, self.namespace))
            raise AssertionError(f"{len(missing)} accepted messages never arrived, e.g. {sorted(missing)[:5]}\n"
                                 f"{exc}") from None
        return arrived


def tally(wanted: set[str], arrived: Mapping[str, int], sender: Sender | None = None) -> str:
    """One line for the log: accepted, delivered, lost, duplicated, and what the clients saw fail."""
    duplicates = sum(n - 1 for m, n in arrived.items() if m in wanted)
    failures = dict(sender.failures) if sender else {}
    return (f"accepted {len(wanted)}, delivered {len(wanted & set(arrived))}, lost {len(wanted - set(arrived))}, "
            f"duplicates {duplicates}, client failures {failures}")


@contextlib.contextmanager
def running_release(node: KubeNode, images: ImageArchives, *, name: str, pods: int, limits: Mapping[str, Any],
                    extra: Mapping[str, Any] | Callable[[str], Mapping[str, Any]] | None = None,
                    redis_pods: int = 1, sim_args: Sequence[str] = (),
                    before: Callable[[kubernetes.client.ApiClient, str], None] | None = None,
                    ) -> Iterator[Release]:
    """A namespace with the simulator, the chart installed (its defaults, the local images, ``extra`` values),
    all ``pods`` pods Ready and the policy ``e2e`` (``limits``) reconciled; the namespace is deleted after.
    ``extra`` may be a function of the namespace; ``before(api, namespace)`` runs before the install (say, to
    start an external Redis)."""
    namespace = f"{name}-{secrets.token_hex(3)}"
    with node.api_client() as api:
        core = CoreV1Api(api)
        core.create_namespace({"metadata": {"name": namespace}})
        try:
            create_sim(api, namespace, images.mxgate_ref, args=sim_args)
            if before is not None:
                before(api, namespace)
            began = time.monotonic()
            values = release_values(mxgate_ref=images.mxgate_ref, redis_ref=images.redis_ref, pod_cidr=POD_CIDR,
                                    extra=extra(namespace) if callable(extra) else extra)
            install(node, namespace, values, redis_pods=redis_pods)
            wait_all_ready(core, namespace, count=pods, timeout=240)
            print(f"\nhelm install ({name}): {pods} pods Ready in {time.monotonic() - began:.1f} s")
            create_policy(api, namespace, provider_policy(namespace, limits=limits))
            wait_for(core, namespace, lambda: get_policy(api, namespace).get("status", {}).get("effective"),
                     what="the operator to put the policy's live limits in its status", timeout=90)
            service_ip = core.read_namespaced_service(GATEWAY_SERVICE, namespace).spec.cluster_ip
            yield Release(node, namespace, images.mxgate_ref, images.redis_ref, service_ip, pods)
        finally:
            with contextlib.suppress(kubernetes.client.ApiException):
                core.delete_namespace(namespace, grace_period_seconds=0)
