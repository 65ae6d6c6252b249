"""The chart's other ways to run, each installed on the real cluster and relaying to the in-cluster simulator,
counted by Message-ID:

- ``operator.mode: sidecar``: no operator Deployment, an operator container in every gateway pod (they peer);
- ``redis.external.url``: a Redis the user runs (here a Deployment of the Redis image beside the release, with
  its password in a Secret named by ``redis.external.existingSecret``), no bundled Redis;
- ``redis.mode: replicated``: a primary, two replicas and three sentinels; the primary's pod deleted with
  grace 0 during a load of 2,000 messages: the sentinels promote a replica and the gateways follow it (or the
  StatefulSet's new pod is back before the sentinels' down-after and stays the primary); every acknowledged
  message is delivered.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import kubernetes
import redis
from kubernetes.client import CoreV1Api

from support.clustermail import GATEWAY_SERVICE, Release, get_policy, running_release, tally
from support.kubenode import ImageArchives, KubeNode
from support.pods import ready_pods, restricted, wait_all_ready, wait_for

GATEWAYS = "app.kubernetes.io/component=gateway"
REDIS_PODS = "app.kubernetes.io/component=redis"
LIMITS = {"maxConnections": 4, "maxMessagesPerConnection": 50}
#: A killed Redis primary: sentinel's down-after (the chart's 10 s), the election, the gateways reconnecting,
#: then the claims the failover interrupted come back after the visibility lease (60 s).
REDELIVERY_TIMEOUT = 180.0


async def _relay(release: Release, count: int, tag: str) -> None:
    with release.node.api_client() as api:
        sender = release.sender(count, concurrency=8, tag=tag)
        await sender.run(timeout=120)
        assert len(sender.accepted) == count, sender.failures
        wanted = sender.accepted_message_ids
        arrived = await asyncio.to_thread(release.wait_delivered, api, wanted, timeout=120)
        print(tally(wanted, arrived, sender))
        assert wanted <= set(arrived)


async def test_sidecar_mode_installs_and_relays(cluster: KubeNode, mxgate_image: ImageArchives) -> None:
    # Gateways 2 (each with the operator beside it), Redis 1, the simulator.
    with running_release(cluster, mxgate_image, name="sidecar", pods=4, limits=LIMITS,
                         extra={"operator": {"mode": "sidecar"}}) as release:
        with cluster.api_client() as api:
            core = CoreV1Api(api)
            gateways = ready_pods(core, release.namespace, GATEWAYS)
            assert sorted(c.name for c in gateways[0].spec.containers) == ["gateway", "operator"]
            deployments = kubernetes.client.AppsV1Api(api).list_namespaced_deployment(release.namespace).items
            assert sorted(d.metadata.name for d in deployments) == [f"{GATEWAY_SERVICE}-gateway", "sim"]
            assert get_policy(api, release.namespace)["status"]["state"] in ("Ready", "Throttled")
        await _relay(release, 200, ".sidecar")


EXTERNAL_REDIS = "ext-redis"
EXTERNAL_PASSWORD = "e2e-external-redis-password"


def _external_redis(image: str) -> Any:
    """Before the install: a Redis Deployment and Service named ``ext-redis`` (append-only, noeviction, a
    password from the Secret ``ext-redis``), as a user's own Redis would be."""
    labels = {"app": EXTERNAL_REDIS}

    def create(api: kubernetes.client.ApiClient, namespace: str) -> None:
        core = CoreV1Api(api)
        core.create_namespaced_secret(namespace, {
            "metadata": {"name": EXTERNAL_REDIS},
            "data": {"password": base64.b64encode(EXTERNAL_PASSWORD.encode()).decode()}})
        container = {
            "name": "redis", "image": image, "imagePullPolicy": "Never",
            "command": ["redis-server"],
            "args": ["--port", "6379", "--dir", "/data", "--appendonly", "yes", "--maxmemory-policy", "noeviction",
                     "--save", "", "--requirepass", "$(REDIS_PASSWORD)"],
            "env": [{"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": EXTERNAL_REDIS,
                                                                               "key": "password"}}}],
            "ports": [{"name": "redis", "containerPort": 6379}],
            "readinessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 1},
            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            "securityContext": restricted(999),
        }
        kubernetes.client.AppsV1Api(api).create_namespaced_deployment(namespace, {
            "metadata": {"name": EXTERNAL_REDIS, "labels": labels},
            "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"automountServiceAccountToken": False, "containers": [container],
                                           "volumes": [{"name": "data", "emptyDir": {}}]}}}})
        core.create_namespaced_service(namespace, {
            "metadata": {"name": EXTERNAL_REDIS},
            "spec": {"selector": labels, "ports": [{"name": "redis", "port": 6379, "targetPort": "redis"}]}})

    return create


async def test_external_redis_mode_installs_and_relays(cluster: KubeNode, mxgate_image: ImageArchives) -> None:
    # Gateways 2, operators 2, the external Redis, the simulator; no bundled Redis.
    def values(namespace: str) -> dict[str, Any]:
        url = f"redis://{EXTERNAL_REDIS}.{namespace}.svc.cluster.local:6379"
        return {"redis": {"external": {"url": url, "existingSecret": EXTERNAL_REDIS}}}

    with running_release(cluster, mxgate_image, name="external", pods=6, limits=LIMITS, extra=values,
                         redis_pods=0, before=_external_redis(mxgate_image.redis_ref)) as release:
        with cluster.api_client() as api:
            core = CoreV1Api(api)
            assert not core.list_namespaced_pod(release.namespace, label_selector=REDIS_PODS).items
            assert not core.list_namespaced_secret(release.namespace, field_selector=f"metadata.name="
                                                   f"{GATEWAY_SERVICE}-redis").items
        await _relay(release, 200, ".external")
        # The spool is in the external Redis: the gateways' keys are there.
        with cluster.api_client() as api:
            pod = ready_pods(CoreV1Api(api), release.namespace, f"app={EXTERNAL_REDIS}")[0]
        client = redis.Redis(host=pod.status.pod_ip, port=6379, password=EXTERNAL_PASSWORD, socket_timeout=5)
        try:
            assert client.dbsize() > 0
        finally:
            client.close()


def _redis_roles(core: CoreV1Api, namespace: str) -> dict[str, str]:
    """Pod name -> ``role`` of its Redis (``INFO replication``), asked from the host at the pod's address."""
    secret = core.read_namespaced_secret(f"{GATEWAY_SERVICE}-redis", namespace)
    password = base64.b64decode(secret.data["password"]).decode()
    roles = {}
    for pod in ready_pods(core, namespace, REDIS_PODS):
        client = redis.Redis(host=pod.status.pod_ip, port=6379, password=password, socket_timeout=3)
        try:
            roles[pod.metadata.name] = str(client.info("replication")["role"])
        except redis.RedisError as exc:
            roles[pod.metadata.name] = f"unreachable ({exc})"
        finally:
            client.close()
    return roles


async def test_replicated_redis_primary_killed_under_load_loses_nothing(cluster: KubeNode,
                                                                        mxgate_image: ImageArchives) -> None:
    # Gateways 2, operators 2, Redis 3 (each with its sentinel), the simulator.
    with running_release(cluster, mxgate_image, name="replicated", pods=8, limits=LIMITS, redis_pods=3,
                         extra={"redis": {"mode": "replicated"}}) as release:
        namespace = release.namespace
        with cluster.api_client() as api:
            core = CoreV1Api(api)
            roles = _redis_roles(core, namespace)
            primaries = [name for name, role in roles.items() if role == "master"]
            assert len(primaries) == 1 and list(roles.values()).count("slave") == 2, roles
            primary = primaries[0]

            sender, accepted_before, took = await release.load_with_kill(primary, tag=".failover")
            print(f"deleted the Redis primary {primary} (grace 0) after {accepted_before} of 2000 accepted; the "
                  f"load finished {took:.1f} s later")

            wanted = sender.accepted_message_ids
            began = time.monotonic()
            arrived = await asyncio.to_thread(release.wait_delivered, api, wanted, timeout=REDELIVERY_TIMEOUT)
            print(tally(wanted, arrived, sender) + f"; the last arrived {time.monotonic() - began:.1f} s after "
                  "the load")
            assert wanted <= set(arrived)

            # Either the sentinels promoted a replica (the old primary's pod was away longer than their
            # down-after) and the StatefulSet's new pod follows it, or the new pod came back sooner and, asked
            # at start-up, the sentinels still named it the primary (its AOF holds every acknowledged write: a
            # killed process loses nothing) and the replicas resynchronised from it. Both end with one primary
            # and two replicas.
            await asyncio.to_thread(wait_all_ready, core, namespace, count=release.pods, timeout=120)

            def settled() -> dict[str, str] | None:
                now = _redis_roles(core, namespace)
                return now if sorted(now.values()) == ["master", "slave", "slave"] else None

            roles_after = await asyncio.to_thread(wait_for, core, namespace, settled,
                                                  what="one Redis primary and two replicas", timeout=120)
            new_primary = next(name for name, role in roles_after.items() if role == "master")
            outcome = (f"failed over to {new_primary}" if new_primary != primary else
                       f"{primary}'s new pod came back before the sentinels' down-after and stayed the primary")
            print(f"Redis roles before {roles}, after {roles_after}: {outcome}")
