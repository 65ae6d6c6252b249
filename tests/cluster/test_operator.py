"""``mxgate operator`` as a real process against a real kube-apiserver and a real Redis.

Reconciles ProviderPolicies into Redis, keeps their status and conditions, posts Events, tightens limits
when the fleet's telemetry in Redis shows deferrals (written here in the gateways' format: one hash per
provider and second, the leases the fleet holds as a sorted set) and recovers them, cleans Redis on delete,
and with peering only one of two replicas works.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from mxgate import keys
from mxgate.embedded_redis import EmbeddedRedis, free_port
from mxgate_operator.kube import PEERING_LIFETIME
from support.kubeapi import KubeAPI
from support.procs import MxgateProcess, Processes, eventually

pytestmark = pytest.mark.usefixtures("crds_installed")


@pytest.fixture
def redis(redis_client: aioredis.Redis) -> aioredis.Redis:
    """The session's Redis (flushed before each test), which the operator processes use too."""
    return redis_client


def policy(name: str, *, max_connections: int = 20, rate: float = 200, extra: dict[str, Any] | None = None
           ) -> str:
    spec: dict[str, Any] = {
        "match": {"domains": [f"{name}.example"]},
        "limits": {"maxConnections": max_connections, "messagesPerSecond": rate},
        "adaptive": {"evaluationWindow": "1s", "calmWindows": 1, "floor": {"connections": 1,
                                                                             "messagesPerSecond": 1}},
        **(extra or {}),
    }
    return yaml.safe_dump({"apiVersion": "mxgate.io/v1alpha1", "kind": "ProviderPolicy",
                           "metadata": {"name": name}, "spec": spec})


def start_operator(procs: Processes, kube: KubeAPI, redis_server: EmbeddedRedis, namespace: str, name: str,
                   *args: str) -> MxgateProcess:
    return procs.mxgate(name, "--log-level", "debug", "operator", "--redis-url", redis_server.url,
                        "--namespace", namespace, "--health-listen", f"127.0.0.1:{free_port()}", *args,
                        env={"KUBECONFIG": str(kube.kubeconfig)})


def get(kube: KubeAPI, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(kube.kubectl("get", "providerpolicy", name, "-n", namespace, "-o", "json").stdout)


def events(kube: KubeAPI, namespace: str, name: str) -> list[dict[str, Any]]:
    found = json.loads(kube.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    return [e for e in found if e["involvedObject"].get("name") == name]


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)


@contextlib.asynccontextmanager
async def fleet_traffic(redis: aioredis.Redis, provider: str, counts: dict[str, int], *, leases: int
                        ) -> AsyncIterator[None]:
    """Write, every 0.3 s, what gateways would: per-second counters and ``leases`` live connection leases."""
    async def write() -> None:
        while True:
            now = time.time()
            pipe = redis.pipeline(transaction=False)
            for second in range(int(now) - 4, int(now) + 1):
                key = keys.telemetry(provider, second)
                pipe.delete(key)
                pipe.hset(key, mapping=counts)
                pipe.expire(key, 60)
            pipe.delete(keys.leases(provider))
            if leases:
                pipe.zadd(keys.leases(provider), {f"test-{i}": int((now + 5) * 1000) for i in range(leases)})
            await pipe.execute()
            await asyncio.sleep(0.3)

    task = asyncio.get_running_loop().create_task(write())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await redis.delete(keys.leases(provider))


async def test_reconcile_status_tighten_recover_and_delete(kube: KubeAPI, namespace: str, procs: Processes,
                                                           redis_server: EmbeddedRedis, redis: aioredis.Redis
                                                           ) -> None:
    operator = start_operator(procs, kube, redis_server, namespace, "operator", "--standalone")
    ops = (operator,)
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=policy("ms"))

    # Reconciled: in the table, live limits at the ceiling, status Ready with the generation, a finalizer.
    async def published() -> bool:
        # The table first, then the live limits (both within the one reconcile).
        return await redis.hexists(keys.POLICIES, "ms") and await redis.hget(keys.limits("ms"), "maxConnections")
    assert await eventually(published, timeout=30, what="the policy and its limits in Redis", processes=ops) == b"20"
    obj = await eventually(lambda: (o := get(kube, namespace, "ms")).get("status", {}).get("conditions") and o,
                           timeout=30, what="status conditions", processes=ops)
    assert condition(obj, "Ready")["status"] == "True"
    assert condition(obj, "Ready")["observedGeneration"] == obj["metadata"]["generation"] == 1
    assert obj["status"]["state"] == "Ready"
    assert obj["status"]["effective"] == {"maxConnections": 20, "messagesPerSecond": 200}
    assert "mxgate.io/redis-state" in obj["metadata"]["finalizers"]
    # kopf's bookkeeping lives in annotations, never in our status schema.
    assert set(obj["status"]) <= {"observedGeneration", "state", "effective", "conditions", "observed",
                                  "deferralPercent", "lastAdjustment"}
    assert "Patching failed with inconsistencies" not in operator.log()

    # A spec change: the new ceiling is in force at once, with the generation it was computed for.
    kube.kubectl("patch", "providerpolicy", "ms", "-n", namespace, "--type=merge",
                 "-p", json.dumps({"spec": {"limits": {"maxConnections": 16}}}))
    obj = await eventually(lambda: (o := get(kube, namespace, "ms"))["status"].get("observedGeneration") == 2 and o,
                           timeout=30, what="observedGeneration 2", processes=ops)
    assert obj["status"]["effective"]["maxConnections"] == 16
    assert (await redis.hgetall(keys.limits("ms")))[b"maxConnections"] == b"16"

    # Deferrals for too many connections in the fleet's telemetry: connections are cut, status and Events say so.
    async with fleet_traffic(redis, "ms", {"attempts": 100, "delivered": 60, "deferred_connections": 40},
                             leases=16):
        obj = await eventually(lambda: (o := get(kube, namespace, "ms"))["status"].get("state") == "Throttled" and o,
                               timeout=30, what="Throttled", processes=ops)
    assert obj["status"]["effective"]["maxConnections"] < 16
    assert condition(obj, "Throttled")["status"] == "True"
    assert condition(obj, "Throttled")["reason"] == "BelowCeiling"
    assert obj["status"]["lastAdjustment"]["signal"] == "connections"
    assert float(obj["status"]["observed"]["deferralPercent"]) > 0
    tightened = await eventually(lambda: [e for e in events(kube, namespace, "ms") if e["reason"] == "Tightened"],
                                 timeout=30, what="a Tightened event", processes=ops)
    assert tightened[0]["type"] == "Warning" and "connections 16 ->" in tightened[0]["message"]

    # Calm traffic that uses every connection it has: the limit climbs back to the ceiling.
    lowest = int((await redis.hgetall(keys.limits("ms")))[b"maxConnections"])
    async with fleet_traffic(redis, "ms", {"attempts": 100, "delivered": 100}, leases=16):
        obj = await eventually(lambda: (o := get(kube, namespace, "ms"))["status"].get("state") == "Ready" and o,
                               timeout=90, what="recovery to the ceiling", processes=ops)
    assert obj["status"]["effective"]["maxConnections"] == 16 > lowest
    assert condition(obj, "Throttled")["status"] == "False"
    recovered = [e for e in events(kube, namespace, "ms") if e["reason"] == "Recovered"]
    assert recovered and all(e["type"] == "Normal" for e in recovered)

    # Deleted: the finalizer holds the object until Redis is clean; queued mail stays queued.
    await redis.zadd(keys.queue("ms"), {"job-1": 0})
    kube.kubectl("delete", "providerpolicy", "ms", "-n", namespace, "--wait=true", "--timeout=60s")
    assert not await redis.hexists(keys.POLICIES, "ms")
    assert not await redis.exists(keys.limits("ms"))
    assert await redis.zcard(keys.queue("ms")) == 1
    assert "Traceback" not in operator.log(), operator.log_tail(60)
    assert "Patching failed with inconsistencies" not in operator.log()


async def test_invalid_spec_is_reported_and_the_last_good_version_stays(kube: KubeAPI, namespace: str,
                                                                         procs: Processes,
                                                                         redis_server: EmbeddedRedis,
                                                                         redis: aioredis.Redis) -> None:
    operator = start_operator(procs, kube, redis_server, namespace, "operator", "--standalone")
    ops = (operator,)
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=policy("yahoo", max_connections=7))
    await eventually(lambda: get(kube, namespace, "yahoo").get("status", {}).get("state") == "Ready",
                     timeout=30, what="Ready", processes=ops)
    # The schema cannot tell that this regex does not compile; the operator's model can.
    bad = {"responses": [{"match": "^421 4\\.7\\.0 \\[TSS04(", "action": "Suspend", "duration": "1h"}]}
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=policy("yahoo", max_connections=3, extra=bad))
    obj = await eventually(lambda: (o := get(kube, namespace, "yahoo"))["status"].get("state") == "Invalid" and o,
                           timeout=30, what="state Invalid", processes=ops)
    ready = condition(obj, "Ready")
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("False", "InvalidSpec", 2)
    assert "responses.0.match" in ready["message"]
    warning = await eventually(lambda: [e for e in events(kube, namespace, "yahoo") if e["reason"] == "InvalidSpec"],
                               timeout=30, what="an InvalidSpec event", processes=ops)
    assert warning[0]["type"] == "Warning"
    published = json.loads(await redis.hget(keys.POLICIES, "yahoo"))
    assert published["spec"]["limits"]["maxConnections"] == 7   # the last good version is still in force

    kube.kubectl("apply", "-n", namespace, "-f", "-", input=policy("yahoo", max_connections=3))
    obj = await eventually(lambda: (o := get(kube, namespace, "yahoo"))["status"].get("state") == "Ready" and o,
                           timeout=30, what="Ready again", processes=ops)
    assert condition(obj, "Ready")["observedGeneration"] == 3
    assert json.loads(await redis.hget(keys.POLICIES, "yahoo"))["spec"]["limits"]["maxConnections"] == 3


def peers(kube: KubeAPI, namespace: str) -> dict[str, Any]:
    return json.loads(kube.kubectl("get", "kopfpeering", "mxgate", "-n", namespace, "-o", "json").stdout
                      ).get("status") or {}


async def start_peers(procs: Processes, kube: KubeAPI, redis_server: EmbeddedRedis, namespace: str
                      ) -> tuple[MxgateProcess, MxgateProcess]:
    """Two replicas, the higher priority one first (as after a rollout). Started at the same instant, the
    lower one may handle the objects once before it sees the other's keep-alive and pauses (kopf's
    start-up window; every handler here is idempotent), which is not what these tests are about."""
    high = start_operator(procs, kube, redis_server, namespace, "operator-high", "--priority", "200")
    await eventually(lambda: len(peers(kube, namespace)) == 1, timeout=60, what="the first replica's keep-alive",
                     processes=(high,))
    low = start_operator(procs, kube, redis_server, namespace, "operator-low", "--priority", "100")
    await eventually(lambda: len(peers(kube, namespace)) == 2, timeout=60,
                     what="both replicas in the peering object", processes=(high, low))
    return high, low


async def test_two_replicas_with_peering_have_one_active(kube: KubeAPI, namespace: str, procs: Processes,
                                                          redis_server: EmbeddedRedis, redis: aioredis.Redis) -> None:
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "mxgate"}}))
    high, low = await start_peers(procs, kube, redis_server, namespace)
    ops = (high, low)
    assert sorted(p["priority"] for p in peers(kube, namespace).values()) == [100, 200]

    kube.kubectl("apply", "-n", namespace, "-f", "-", input=policy("gmail"))
    await eventually(lambda: get(kube, namespace, "gmail").get("status", {}).get("state") == "Ready",
                     timeout=60, what="gmail reconciled", processes=ops)
    await asyncio.sleep(2)  # a few timer ticks: the standby must stay idle through them
    assert "reconcile" in high.log() and "reconcile" not in low.log(), low.log_tail(40)
    assert "Pausing the watch-stream for providerpolicies" in low.log()

    # The active replica goes away: the standby takes over.
    high.send_signal(15)
    await high.wait_exit(timeout=60)
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=policy("aol"))
    await eventually(lambda: get(kube, namespace, "aol").get("status", {}).get("state") == "Ready",
                     timeout=90, what="aol reconciled by the standby", processes=(low,))
    assert "reconcile" in low.log()
    assert await redis.hexists(keys.POLICIES, "aol") and await redis.hexists(keys.POLICIES, "gmail")


async def test_an_empty_namespace_still_gets_a_policy_table(kube: KubeAPI, namespace: str, procs: Processes,
                                                            redis_server: EmbeddedRedis, redis: aioredis.Redis
                                                            ) -> None:
    """Gateways are ready only once a table exists; with no ProviderPolicy yet, the table is empty."""
    operator = start_operator(procs, kube, redis_server, namespace, "operator", "--standalone")

    async def table_revision() -> bytes | None:
        return await redis.hget(keys.CONTROL, "rev")
    await eventually(table_revision, timeout=30, what="a published (empty) table", processes=(operator,))
    assert await redis.hlen(keys.POLICIES) == 0


async def test_warmup_day_and_a_used_up_day_in_the_status(kube: KubeAPI, namespace: str, procs: Processes,
                                                          redis_server: EmbeddedRedis, redis: aioredis.Redis
                                                          ) -> None:
    seconds, _ = await redis.time()
    day = int(seconds) // 86400
    start = datetime.date(1970, 1, 1) + datetime.timedelta(days=day - 2)     # today is day 3 of the ramp
    warmup = {"warmup": {"startDate": start.isoformat(), "schedule": [
        {"day": 1, "messagesPerDay": 100}, {"day": 3, "messagesPerDay": 300}, {"day": 10, "messagesPerDay": 5000}]}}
    operator = start_operator(procs, kube, redis_server, namespace, "operator", "--standalone")
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=policy("gmail", extra=warmup))
    obj = await eventually(lambda: (o := get(kube, namespace, "gmail")).get("status", {}).get("daily") and o,
                           timeout=30, what="status.daily", processes=(operator,))
    assert obj["status"]["daily"] == {"messagesPerDay": 300, "sentToday": 0, "warmupDay": 3}
    assert obj["status"]["state"] == "Ready"

    await redis.set(keys.day_count("gmail", day), 300)      # what the gateways count as they send
    obj = await eventually(lambda: (o := get(kube, namespace, "gmail"))["status"].get("state") == "Capped" and o,
                           timeout=30, what="state Capped", processes=(operator,))
    assert obj["status"]["daily"]["sentToday"] == 300


async def test_a_killed_active_replica_is_replaced_within_the_peering_lifetime(
        kube: KubeAPI, namespace: str, procs: Processes, redis_server: EmbeddedRedis, redis: aioredis.Redis) -> None:
    """kill -9 leaves no goodbye in the peering object: the standby waits out the dead one's entry."""
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "mxgate"}}))
    high, low = await start_peers(procs, kube, redis_server, namespace)
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=policy("gmail"))
    await eventually(lambda: get(kube, namespace, "gmail").get("status", {}).get("state") == "Ready",
                     timeout=60, what="gmail reconciled", processes=(high, low))
    assert "reconcile" not in low.log()

    high.kill_group()
    killed_at = time.monotonic()
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=policy("aol"))
    await eventually(lambda: get(kube, namespace, "aol").get("status", {}).get("state") == "Ready",
                     timeout=PEERING_LIFETIME + 30, what="aol reconciled by the standby", processes=(low,))
    log_line = f"standby took over {time.monotonic() - killed_at:.1f}s after the kill (lifetime {PEERING_LIFETIME}s)"
    print(log_line)
    assert await redis.hexists(keys.POLICIES, "aol")
