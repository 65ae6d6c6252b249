"""mxgate installed by ``helm install`` of deploy/helm/mxgate with its default values (plus the local images)
on the real cluster, delivering to an in-cluster ``mxgate sim`` that allows one connection per client address.

One release serves the tests of this module, in order (installing takes most of a minute on 2 cores):

1. every pod Ready; mail through the gateway Service from the host (ClusterIP) and from a pod (DNS name)
   arrives, counted by Message-ID; ``kubectl get pp`` shows the live limits, tightened under the ceiling by
   the simulator's connection refusals;
2. a gateway pod deleted with grace 0 (``kubectl delete --grace-period=0 --force``) during a load of 2,000
   messages: every acknowledged message is delivered;
3. ``helm upgrade`` to a new image tag during a steady load of 2,000 messages: the gateways roll over one by
   one, clients see at most retriable 4xx replies, every acknowledged message is delivered;
4. the active operator pod deleted with grace 0: the standby takes over (kopf peering) and reconciles a
   policy changed right after; mail still flows.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
from kubernetes.client import CoreV1Api

from support.clustermail import (
    GATEWAY_SERVICE,
    GROUP,
    PLURAL,
    VERSION,
    Release,
    accepted_by_pod_sender,
    get_policy,
    pod_sender,
    policy_table,
    release_values,
    running_release,
    tally,
    upgrade,
)
from support.kubenode import POD_CIDR, ImageArchives, KubeNode
from support.pods import ready_pods, run_to_completion, wait_all_ready, wait_for

# Gateways 2, operators 2, Redis 1 (the chart's defaults), and the simulator.
PODS = 6
CEILING = 8
GATEWAYS = "app.kubernetes.io/component=gateway"
OPERATORS = "app.kubernetes.io/component=operator"
PEERING = "mx-mxgate"    # the chart's default: the release's full name
#: A gateway's claimed jobs come back after the claim lease (the chart's gateway.visibilitySeconds, 60 s).
REDELIVERY_TIMEOUT = 240.0   # 8,000 after a gateway kill: the last arrived 115 s after the load (2026-12-06)


@pytest.fixture(scope="module")
def release(cluster: KubeNode, mxgate_image: ImageArchives) -> Iterator[Release]:
    # One connection per client address, and a little latency so that the gateways want more than that.
    with running_release(cluster, mxgate_image, name="chart", pods=PODS, sim_args=[
            "--max-connections", "1", "--latency", "0.02"],
            limits={"maxConnections": CEILING, "maxMessagesPerConnection": 50}) as release:
        yield release


async def test_helm_install_relays_mail_through_the_service(release: Release) -> None:
    namespace = release.namespace
    with release.node.api_client() as api:
        core = CoreV1Api(api)
        # From the host, through the Service's ClusterIP (kube-proxy's DNAT).
        sender = release.sender(300, concurrency=8, tag=".install")
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
        print(tally(wanted, arrived, sender))
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
        # A refusal sets the limit at once ("refused"), the adaptive loop cuts on a window ("connections").
        assert status["lastAdjustment"]["signal"] in ("refused", "connections"), status["lastAdjustment"]


async def test_gateway_pod_force_deleted_under_load_loses_nothing(release: Release) -> None:
    namespace = release.namespace
    with release.node.api_client() as api:
        core = CoreV1Api(api)
        wait_all_ready(core, namespace, count=PODS, timeout=60)
        victim = ready_pods(core, namespace, GATEWAYS)[0].metadata.name
        # Unpaced, 20 sessions always in flight, and long enough (~2,000/s) to outlast the kubelet's kill: some
        # client sessions are cut. (Paced at 200/s, a session lasts milliseconds and none was open at the kill.)
        sender, accepted_before, took = await release.load_with_kill(victim, tag=".kill", count=8000, rate=None)
        print(f"deleted {victim} (grace 0) after {accepted_before} of 8000 accepted; the load finished "
              f"{took:.1f} s later")
        assert sender.failures, "no client saw the pod go: the deletion did not strike during the load"

        wanted = sender.accepted_message_ids
        began = time.monotonic()
        arrived = release.wait_delivered(api, wanted, timeout=REDELIVERY_TIMEOUT)
        print(tally(wanted, arrived, sender) + f"; the last arrived {time.monotonic() - began:.1f} s after the load")
        assert wanted <= set(arrived)
        # The Deployment replaced the pod.
        wait_for(core, namespace, lambda: len(ready_pods(core, namespace, GATEWAYS)) == 2 or None,
                 what="two gateway pods Ready again", timeout=90)



async def test_helm_upgrade_to_a_new_tag_under_load_loses_nothing(release: Release) -> None:
    namespace = release.namespace
    repository = release.image.rsplit(":", 1)[0]
    new_tag = f"upgrade-{secrets.token_hex(3)}"
    release.node.tag_image(release.image, f"{repository}:{new_tag}")
    with release.node.api_client() as api:
        core = CoreV1Api(api)
        wait_all_ready(core, namespace, count=PODS, timeout=90)
        old_gateways = {p.metadata.name for p in ready_pods(core, namespace, GATEWAYS)}
        # A steady 50 messages a second (40 s in all): the rollout happens in the middle of it.
        sender = release.sender(2000, concurrency=10, rate=50.0, tag=".upgrade")
        load = asyncio.create_task(sender.run(timeout=240))
        while len(sender.accepted) < 300 and not load.done():
            await asyncio.sleep(0.05)
        accepted_before = len(sender.accepted)
        began = time.monotonic()
        await asyncio.to_thread(upgrade, release.node, namespace, release_values(
            mxgate_ref=f"{repository}:{new_tag}", redis_ref=release.redis_ref, pod_cidr=POD_CIDR))

        def rolled_out() -> bool | None:
            pods = [p for p in core.list_namespaced_pod(namespace, label_selector=GATEWAYS).items
                    if p.status.phase not in ("Succeeded", "Failed")]
            ready = ready_pods(core, namespace, GATEWAYS)
            new = [p for p in ready if p.spec.containers[0].image.endswith(f":{new_tag}")]
            return (len(pods) == len(new) == 2) or None

        await asyncio.to_thread(wait_for, core, namespace, rolled_out,
                                what="both gateway pods replaced by Ready ones of the new tag", timeout=180)
        rollout = time.monotonic() - began
        accepted_during = len(sender.accepted) - accepted_before
        await load
        print(f"helm upgrade to :{new_tag} after {accepted_before} of 2000 accepted: gateways rolled out in "
              f"{rollout:.1f} s, {accepted_during} messages accepted meanwhile")
        assert accepted_before < 2000 and accepted_during > 0, "the rollout did not happen during the load"
        assert not old_gateways & {p.metadata.name for p in ready_pods(core, namespace, GATEWAYS)}
        assert len(sender.accepted) == 2000
        # What a client may see of a rollout: a retriable 4xx reply, nothing else (no 5xx, no reset).
        assert all(kind[0] == "4" for kind in sender.failures), dict(sender.failures)

        wanted = sender.accepted_message_ids
        arrived = release.wait_delivered(api, wanted, timeout=REDELIVERY_TIMEOUT)
        print(tally(wanted, arrived, sender))
        assert wanted <= set(arrived)


def _active_operator(api: kubernetes.client.ApiClient, namespace: str) -> tuple[str, int]:
    """The operator pod kopf lets work (the highest priority of the live peers in the KopfPeering's status),
    and its priority."""
    core = CoreV1Api(api)
    peering = kubernetes.client.CustomObjectsApi(api).get_namespaced_custom_object(
        "kopf.dev", "v1", namespace, "kopfpeerings", PEERING)
    peers = peering.get("status") or {}
    running = {p.metadata.name for p in ready_pods(core, namespace, OPERATORS)}
    live = {(name, peer["priority"]) for peer_id, peer in peers.items() for name in running if name in peer_id}
    assert len(live) == len(running), f"peers {peers} are not the operator pods {running}"
    return max(live, key=lambda pair: pair[1])


async def _change_ceiling(api: kubernetes.client.ApiClient, namespace: str, ceiling: int) -> dict[str, Any]:
    """Patch the policy's connection ceiling; wait until an operator has reconciled that generation."""
    patched = await asyncio.to_thread(
        kubernetes.client.CustomObjectsApi(api).patch_namespaced_custom_object,
        GROUP, VERSION, namespace, PLURAL, "e2e", {"spec": {"limits": {"maxConnections": ceiling}}})
    generation = patched["metadata"]["generation"]

    def reconciled() -> dict[str, Any] | None:
        status = get_policy(api, namespace).get("status") or {}
        return status if status.get("observedGeneration", 0) >= generation else None

    result: dict[str, Any] = await asyncio.to_thread(
        wait_for, CoreV1Api(api), namespace, reconciled, what=f"an operator to reconcile generation {generation}",
        timeout=120)
    return result


async def test_the_active_operator_killed_the_standby_takes_over(release: Release) -> None:
    namespace = release.namespace
    with release.node.api_client() as api:
        core = CoreV1Api(api)
        wait_all_ready(core, namespace, count=PODS, timeout=90)
        active, priority = _active_operator(api, namespace)
        container = core.read_namespaced_pod(active, namespace).status.container_statuses[0].container_id
        core.delete_namespaced_pod(active, namespace, grace_period_seconds=0,
                                   body={"gracePeriodSeconds": 0, "propagationPolicy": "Background"})
        killed_at = time.monotonic()
        # Only once its process is gone can a reconciliation be the standby's.
        await asyncio.to_thread(release.node.wait_container_gone, container)
        # A spec change only an active operator acts on: a lower ceiling for the live limit.
        status = await _change_ceiling(api, namespace, CEILING - 2)
        took = time.monotonic() - killed_at
        print(f"deleted the active operator {active} (priority {priority}, grace 0); the changed policy was "
              f"reconciled {took:.1f} s later: {status['effective']}")
        assert status["effective"]["maxConnections"] <= CEILING - 2
        # The Deployment replaced the pod; with the new peer in the peering, one of the two still works.
        await asyncio.to_thread(wait_all_ready, core, namespace, count=PODS, timeout=90)
        began = time.monotonic()
        status = await _change_ceiling(api, namespace, CEILING)
        print(f"with the replacement operator up, the next change was reconciled in {time.monotonic() - began:.1f} s")

        # Mail still flows under the new ceiling.
        sender = release.sender(100, concurrency=5, tag=".operator")
        await sender.run(timeout=120)
        wanted = sender.accepted_message_ids
        arrived = release.wait_delivered(api, wanted, timeout=120)
        assert len(wanted) == 100 and wanted <= set(arrived)
