"""``helm install`` of deploy/helm/mxgate with its default values (plus the local images) on the real cluster:
every pod Ready, mail relayed through the gateway Service from the host and from a pod to an in-cluster
``mxgate sim``, every accepted message delivered (by Message-ID), and the ProviderPolicy's live limits shown
as ``kubectl get pp`` shows them, tightened against the simulator's connection limit."""

from __future__ import annotations

import os
import time

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
from support.pods import run_to_completion, wait_all_ready, wait_for
from support.procs import Sender

# Gateways 2, operators 2, Redis 1 (the chart's defaults), and the simulator.
PODS = 6
CEILING = 8


async def test_helm_install_relays_mail_through_the_service(cluster: KubeNode, mxgate_image: ImageArchives,
                                                            namespace: str) -> None:
    image = mxgate_image.mxgate_ref
    with cluster.api_client() as api:
        core = CoreV1Api(api)
        # One connection per client address, and a little latency so that the gateways want more than that.
        create_sim(api, namespace, image, args=["--max-connections", "1", "--latency", "0.02"])
        install(cluster, namespace, release_values(mxgate_ref=image, redis_ref=mxgate_image.redis_ref,
                                                   pod_cidr=POD_CIDR))
        began = time.monotonic()
        wait_all_ready(core, namespace, count=PODS, timeout=180)
        print(f"helm install: {PODS} pods Ready in {time.monotonic() - began:.1f} s")
        create_policy(api, namespace, provider_policy(namespace, limits={
            "maxConnections": CEILING, "maxMessagesPerConnection": 50}))
        wait_for(core, namespace, lambda: get_policy(api, namespace).get("status", {}).get("effective"),
                 what="the operator to put the policy's live limits in its status", timeout=60)

        # From the host, through the Service's ClusterIP (kube-proxy's DNAT).
        service_ip = core.read_namespaced_service(GATEWAY_SERVICE, namespace).spec.cluster_ip
        sender = Sender(ports=[25], host=service_ip, count=300, concurrency=8, rcpt=f"user@{TEST_DOMAIN}")
        began = time.monotonic()
        await sender.run(timeout=120)
        print(f"300 messages accepted through {service_ip}:25 in {time.monotonic() - began:.1f} s")
        accepted = {f"<d{n}.{os.getpid()}@example.com>" for n in sender.accepted}
        assert len(accepted) == 300, sender.failures

        # From a pod, by the Service's DNS name.
        log = run_to_completion(core, namespace, pod_sender(
            "app", image, host=f"{GATEWAY_SERVICE}.{namespace}.svc.cluster.local", count=50, tag=namespace))
        from_pod = accepted_by_pod_sender(log)
        assert len(from_pod) == 50, log

        wanted = accepted | from_pod
        arrived = wait_for(core, namespace, lambda: (lambda got: got if wanted <= set(got) else None)(
            delivered(core, namespace)), what="every accepted message at the simulator", timeout=120)
        lost = wanted - set(arrived)
        duplicates = sum(n - 1 for n in arrived.values())
        print(f"accepted {len(wanted)}, delivered {len(set(arrived) & wanted)}, lost {len(lost)}, "
              f"duplicates {duplicates}, client failures {dict(sender.failures)}")
        assert not lost
        assert set(arrived) <= wanted, f"unexpected messages: {sorted(set(arrived) - wanted)[:5]}"

        # `kubectl get pp`: the live limits, under the ceiling once the simulator refused extra connections.
        table = policy_table(api, namespace)
        status = get_policy(api, namespace)["status"]
        print(f"kubectl get pp: {table}")
        print(f"status: {status}")
        row = table["e2e"]
        assert row["Max"] == CEILING
        assert row["Conns"] == status["effective"]["maxConnections"] < CEILING
        assert row["State"] == status["state"] == "Throttled"
        assert status["lastAdjustment"]["signal"] == "connections", status["lastAdjustment"]
