"""mxgate installed by ``helm install`` of deploy/helm/mxgate with its default values (plus the local images)
on the real cluster, delivering to an in-cluster ``mxgate sim`` that allows one connection per client address.

One release serves the tests of this module, in order (installing takes most of a minute on 2 cores):

1. every pod Ready; mail through the gateway Service from the host (ClusterIP) and from a pod (DNS name)
   arrives, counted by Message-ID; ``kubectl get pp`` shows the live limits, tightened under the ceiling by
   the simulator's connection refusals;
2. a gateway pod deleted with grace 0 (``kubectl delete --grace-period=0 --force``) during a load of 2,000
   messages: every acknowledged message is delivered.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import kubernetes
import pytest
from kubernetes.client import CoreV1Api

from support.clustermail import (
    GATEWAY_SERVICE,
    TEST_DOMAIN,
    accepted_by_pod_sender,
    create_policy,
    create_sim,
    delivered,
    get_policy,
    install,
    pod_sender,
    policy_table,
    provider_policy,
    release_values,
)
from support.kubenode import POD_CIDR, ImageArchives, KubeNode
from support.pods import ready_pods, run_to_completion, wait_all_ready, wait_for
from support.procs import Sender

# Gateways 2, operators 2, Redis 1 (the chart's defaults), and the simulator.
PODS = 6
CEILING = 8
GATEWAYS = "app.kubernetes.io/component=gateway"
#: A gateway's claimed jobs come back after the claim lease (the chart's gateway.visibilitySeconds, 60 s).
REDELIVERY_TIMEOUT = 150.0


@dataclass
class Release:
    node: KubeNode
    namespace: str
    image: str
    service_ip: str

    def wait_delivered(self, api: kubernetes.client.ApiClient, wanted: set[str], *, timeout: float) -> Any:
        """Wait until every Message-ID in ``wanted`` has reached the simulator; its delivery counts."""
        core = CoreV1Api(api)

        def all_there() -> Any:
            got = delivered(core, self.namespace)
            return got if wanted <= set(got) else None

        try:
            return wait_for(core, self.namespace, all_there, what=f"the {len(wanted)} accepted messages at the "
                            "simulator", timeout=timeout)
        except AssertionError as exc:
            missing = wanted - set(delivered(core, self.namespace))
            raise AssertionError(f"{len(missing)} accepted messages never arrived, e.g. {sorted(missing)[:5]}\n"
                                 f"{exc}") from None


@pytest.fixture(scope="module")
def release(cluster: KubeNode, mxgate_image: ImageArchives) -> Iterator[Release]:
    namespace = f"chart-{secrets.token_hex(3)}"
    image = mxgate_image.mxgate_ref
    with cluster.api_client() as api:
        core = CoreV1Api(api)
        core.create_namespace({"metadata": {"name": namespace}})
        # One connection per client address, and a little latency so that the gateways want more than that.
        create_sim(api, namespace, image, args=["--max-connections", "1", "--latency", "0.02"])
        began = time.monotonic()
        install(cluster, namespace, release_values(mxgate_ref=image, redis_ref=mxgate_image.redis_ref,
                                                   pod_cidr=POD_CIDR))
        wait_all_ready(core, namespace, count=PODS, timeout=180)
        print(f"\nhelm install: {PODS} pods Ready in {time.monotonic() - began:.1f} s")
        create_policy(api, namespace, provider_policy(namespace, limits={
            "maxConnections": CEILING, "maxMessagesPerConnection": 50}))
        wait_for(core, namespace, lambda: get_policy(api, namespace).get("status", {}).get("effective"),
                 what="the operator to put the policy's live limits in its status", timeout=60)
        service_ip = core.read_namespaced_service(GATEWAY_SERVICE, namespace).spec.cluster_ip
    yield Release(cluster, namespace, image, service_ip)
    with cluster.api_client() as api:
        CoreV1Api(api).delete_namespace(namespace, grace_period_seconds=0)


def _tally(wanted: set[str], arrived: Any, sender: Sender | None = None) -> str:
    duplicates = sum(n - 1 for m, n in arrived.items() if m in wanted)
    failures = dict(sender.failures) if sender else {}
    return (f"accepted {len(wanted)}, delivered {len(wanted & set(arrived))}, lost {len(wanted - set(arrived))}, "
            f"duplicates {duplicates}, client failures {failures}")


async def test_helm_install_relays_mail_through_the_service(release: Release) -> None:
    namespace = release.namespace
    with release.node.api_client() as api:
        core = CoreV1Api(api)
        # From the host, through the Service's ClusterIP (kube-proxy's DNAT).
        sender = Sender(ports=[25], host=release.service_ip, count=300, concurrency=8, rcpt=f"user@{TEST_DOMAIN}",
                        tag=".install")
        began = time.monotonic()
        await sender.run(timeout=120)
        print(f"300 messages accepted through {release.service_ip}:25 in {time.monotonic() - began:.1f} s")
        assert len(sender.accepted) == 300, sender.failures

        # From a pod, by the Service's DNS name.
        log = run_to_completion(core, namespace, pod_sender(
            "app", release.image, host=f"{GATEWAY_SERVICE}.{namespace}.svc.cluster.local", count=50, tag=namespace))
        from_pod = accepted_by_pod_sender(log)
        assert len(from_pod) == 50, log

        wanted = sender.accepted_message_ids | from_pod
        arrived = release.wait_delivered(api, wanted, timeout=120)
        print(_tally(wanted, arrived, sender))
        assert wanted <= set(arrived)
        assert set(arrived) <= wanted, f"unexpected messages: {sorted(set(arrived) - wanted)[:5]}"

        # `kubectl get pp`: the live limits, under the ceiling once the simulator refused extra connections.
        table = policy_table(api, namespace)
        status = get_policy(api, namespace)["status"]
        print(f"kubectl get pp: {table}\nstatus: {status}")
        row = table["e2e"]
        assert row["Max"] == CEILING
        assert row["Conns"] == status["effective"]["maxConnections"] < CEILING
        assert row["State"] == status["state"] == "Throttled"
        assert status["lastAdjustment"]["signal"] == "connections", status["lastAdjustment"]


async def test_gateway_pod_force_deleted_under_load_loses_nothing(release: Release) -> None:
    namespace = release.namespace
    with release.node.api_client() as api:
        core = CoreV1Api(api)
        wait_all_ready(core, namespace, count=PODS, timeout=60)
        victim = ready_pods(core, namespace, GATEWAYS)[0].metadata.name
        sender = Sender(ports=[25], host=release.service_ip, count=2000, concurrency=20,
                        rcpt=f"user@{TEST_DOMAIN}", tag=".kill")
        load = asyncio.create_task(sender.run(timeout=240))
        while len(sender.accepted) < 500 and not load.done():
            await asyncio.sleep(0.05)
        accepted_before = len(sender.accepted)
        # kubectl delete pod --grace-period=0 --force
        core.delete_namespaced_pod(victim, namespace, grace_period_seconds=0,
                                   body={"gracePeriodSeconds": 0, "propagationPolicy": "Background"})
        killed_at = time.monotonic()
        await load
        print(f"deleted {victim} (grace 0) after {accepted_before} of 2000 accepted; the load finished "
              f"{time.monotonic() - killed_at:.1f} s later")
        assert accepted_before < 2000, "the load finished before the pod was deleted"
        assert sender.failures, "no client saw the pod go: the deletion did not strike during the load"
        assert len(sender.accepted) == 2000

        wanted = sender.accepted_message_ids
        began = time.monotonic()
        arrived = release.wait_delivered(api, wanted, timeout=REDELIVERY_TIMEOUT)
        print(_tally(wanted, arrived, sender) + f"; the last arrived {time.monotonic() - began:.1f} s after the load")
        assert wanted <= set(arrived)
        # The Deployment replaced the pod.
        wait_for(core, namespace, lambda: len(ready_pods(core, namespace, GATEWAYS)) == 2 or None,
                 what="two gateway pods Ready again", timeout=90)

