"""Redis that fails under load: a 250 is never lost on a Sentinel or Cluster failover.

Real processes throughout: a Sentinel set (a primary, two replicas, three sentinels) or a six-node Redis Cluster
(``support.redistopo``), two ``mxgate gateway`` processes, a recording SMTP sink, a client that retries every
refused message (on the other gateway) until it gets ``250``. Each scenario counts the messages that got ``250``
against what the sink received (by queue id): every acknowledged message must arrive; duplicates are allowed
(at-least-once) and reported, with the 451s the client saw and how long ingest stopped.

The scenarios are the ones that lose mail without replica acknowledgements (measured before this existed: all
300 messages acknowledged during a partition were gone after it healed; 256 of 300 acknowledged 100 KB messages
were lost when a lagging replica was promoted).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from mxgate.embedded_redis import free_port
from support.gateway import policy, policy_yaml
from support.procs import (
    LOOPBACK,
    MxgateProcess,
    Processes,
    Sender,
    SlowSinkHandler,
    duplicate_count,
    wait_for_queue_ids,
    wait_until,
)
from support.redistopo import ClusterSet, RedisProcesses, SentinelSet
from support.sink import Sink

pytestmark = pytest.mark.slow

RecordProperty = Callable[[str, object], None]
RCPT = "u@failover.test"


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    # A next hop slower than the clients (50 ms a message, and the policies below allow few connections): a
    # backlog builds up, as in production, so acknowledged mail is still queued when Redis fails. (With a
    # fast sink every message is delivered within milliseconds and no failover could lose one.)
    sink = await Sink(SlowSinkHandler(hold=0.05)).start()
    yield sink
    await sink.stop()


def sentinel_url(topology: SentinelSet) -> str:
    return "redis+sentinel://" + ",".join(f"{h}:{p}" for h, p in topology.sentinel_addresses) + \
        f"/{topology.master_name}"


def cluster_url(topology: ClusterSet) -> str:
    return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in topology.startup_nodes)


class Fleet:
    """A controller run once and two gateways against one Redis URL, all delivering to ``sink``."""

    def __init__(self, procs: Processes, tmp_path: Path, url: str, sink: Sink, *, password: str | None,
                 connections: int) -> None:
        self.procs, self.url = procs, url
        self.auth: list[str] = []
        if password:
            secret = tmp_path / "redis-password"
            secret.write_text(password + "\n")
            self.auth = ["--redis-password-file", str(secret)]
        self.policies = tmp_path / "policies"
        self.policies.mkdir()
        (self.policies / "default.yaml").write_text(policy_yaml(policy(
            "default", route=[f"{LOOPBACK}:{sink.port}"], maxConnections=connections)))
        self.ports: list[int] = []
        self.gateways: list[MxgateProcess] = []

    async def start(self) -> Fleet:
        controller = self.procs.mxgate("controller", "controller", "--redis-url", self.url, *self.auth,
                                       "--policies", str(self.policies), "--once")
        assert await controller.wait_exit(timeout=60) == 0, controller.log_tail()
        for index in range(2):
            port, metrics = free_port(), free_port()
            gateway = self.procs.mxgate(
                f"gateway-{index}", "gateway", "--redis-url", self.url, *self.auth, "--listen", f"{LOOPBACK}:{port}",
                "--metrics-listen", f"{LOOPBACK}:{metrics}", "--hostname", "mxgate.test", "--visibility", "5",
                "--connection-lease", "3", "--replica-ack-timeout", "1")
            self.ports.append(port)
            self.gateways.append(gateway)
            await gateway.wait_ready(metrics)
        return self

    def alive(self) -> None:
        for gateway in self.gateways:
            assert gateway.returncode is None, f"{gateway.name} exited:\n{gateway.log_tail(40)}"


async def send_through(fleet: Fleet, sender: Sender, strike: Callable[[], object], *, after: int,
                       timeout: float = 240) -> float:
    """Send with ``sender`` through the fleet; once ``after`` messages got 250, call ``strike`` (sync or async).
    Returns the monotonic time of the strike."""
    sending = asyncio.create_task(sender.run(timeout=timeout))
    try:
        await wait_until(lambda: len(sender.accepted) >= after or sending.done(), timeout=120,
                         what=f"{after} messages accepted")
        assert not sending.done(), "all was sent before the strike: the test proved nothing"
        struck_at = time.monotonic()
        outcome = strike()
        if asyncio.iscoroutine(outcome):
            await outcome
        await sending
    finally:
        sending.cancel()
    fleet.alive()
    return struck_at


def ingest_gap(sender: Sender, since: float) -> float:
    """How long ingest stopped after ``since``: the longest time between two 250s (or from ``since`` to the
    first) in the minute after it."""
    times = sorted(a.at for a in sender.accepted.values() if since < a.at < since + 60)
    if not times:
        return float("inf")
    return round(max(b - a for a, b in zip([since, *times], times, strict=False)), 2)


async def all_arrive(sink: Sink, sender: Sender, record_property: RecordProperty, **figures: object) -> None:
    assert len(sender.accepted) == sender.count
    await wait_for_queue_ids(sink, sender.queue_ids, timeout=180)
    numbers = {"accepted": len(sender.accepted), "duplicates": duplicate_count(sink),
               "client_failures": dict(sender.failures), **figures}
    for name, value in numbers.items():
        record_property(name, value)
    print(" ".join(f"{k}={v}" for k, v in numbers.items()))


# -- Sentinel --------------------------------------------------------------------------------------------


async def test_sentinel_primary_killed_under_load_loses_nothing_and_ingest_resumes(
        tmp_path: Path, procs: Processes, redis_topologies: RedisProcesses, sink: Sink,
        record_property: RecordProperty) -> None:
    topology = redis_topologies.sentinel_set(password="s3cret:with@odd/chars")
    fleet = await Fleet(procs, tmp_path, sentinel_url(topology), sink, password=topology.password,
                        connections=2).start()
    sender = Sender(fleet.ports, 2000, concurrency=20, rate=150, rcpt=RCPT)
    old: list[tuple[str, int]] = []

    async def kill_primary() -> None:
        old.append(topology.kill9_primary())
        await topology.wait_for_failover(old[0], timeout=60)

    killed_at = await send_through(fleet, sender, kill_primary, after=600)
    gap = ingest_gap(sender, killed_at)
    await all_arrive(sink, sender, record_property, ingest_stopped_s=gap)
    assert gap < 30, f"ingest stopped for {gap} s after the primary was killed"
    for gateway in fleet.gateways:
        assert "s3cret" not in gateway.log(), "the Redis password was printed"


async def test_sentinel_partitioned_primary_gets_no_250_that_its_demotion_would_discard(
        tmp_path: Path, procs: Processes, redis_topologies: RedisProcesses, sink: Sink,
        record_property: RecordProperty) -> None:
    topology = redis_topologies.sentinel_set()
    fleet = await Fleet(procs, tmp_path, sentinel_url(topology), sink, password=None, connections=2).start()
    sender = Sender(fleet.ports, 1500, concurrency=20, rate=120, rcpt=RCPT)

    async def partition_then_heal() -> None:
        old = topology.partition_primary()          # the gateways still reach it; its replicas and sentinels not
        new = await topology.wait_for_failover(old, timeout=60)
        await asyncio.sleep(3)                      # the gateways go on writing meanwhile: to whom?
        topology.heal()
        old_node = topology.node_at(old)
        await wait_until(lambda: _role(old_node) == "slave", timeout=60,
                         what=f"the old primary to become a replica of {new}")

    struck_at = await send_through(fleet, sender, partition_then_heal, after=300)
    gap = ingest_gap(sender, struck_at)
    await all_arrive(sink, sender, record_property, ingest_stopped_s=gap)
    assert gap < 30, f"ingest stopped for {gap} s after the partition"


async def test_sentinel_replica_stopped_then_primary_killed_loses_nothing(
        tmp_path: Path, procs: Processes, redis_topologies: RedisProcesses, sink: Sink,
        record_property: RecordProperty) -> None:
    topology = redis_topologies.sentinel_set()
    fleet = await Fleet(procs, tmp_path, sentinel_url(topology), sink, password=None, connections=2).start()
    sender = Sender(fleet.ports, 1500, concurrency=20, rate=120, rcpt=RCPT)

    async def stop_replica_then_kill_primary() -> None:
        topology.stop_replica(0)
        await asyncio.sleep(2)                      # 250s go on: the other replica acknowledges them
        old = topology.kill9_primary()
        await topology.wait_for_failover(old, timeout=60)
        topology.cont_replica(0)

    struck_at = await send_through(fleet, sender, stop_replica_then_kill_primary, after=300)
    await all_arrive(sink, sender, record_property, ingest_stopped_s=ingest_gap(sender, struck_at + 2))


# -- Cluster ---------------------------------------------------------------------------------------------


def _rcpts(providers: Sequence[str]) -> list[str]:
    return [f"u@{provider.removeprefix('domain:')}" for provider in providers]


async def test_cluster_primary_killed_mid_load_loses_nothing(
        tmp_path: Path, procs: Processes, redis_topologies: RedisProcesses, sink: Sink,
        record_property: RecordProperty) -> None:
    topology = redis_topologies.cluster_set()
    providers = topology.providers_on_distinct_shards(3)
    fleet = await Fleet(procs, tmp_path, cluster_url(topology), sink, password=None, connections=1).start()
    sender = Sender(fleet.ports, 900, concurrency=15, rate=100, rcpts=_rcpts(providers))
    victim = topology.node_for_key(f"mxg:{{p:{providers[0]}}}:q")

    async def kill() -> None:
        await topology.kill9_primary(victim, timeout=60)

    killed_at = await send_through(fleet, sender, kill, after=300)
    await all_arrive(sink, sender, record_property, ingest_stopped_s=ingest_gap(sender, killed_at),
                     shards=len({topology.keyslot(f"mxg:{{p:{p}}}:q") for p in providers}))
    received = {rcpt.partition("@")[2] for m in sink.handler.messages for rcpt in m.rcpt_tos}
    assert received == {r.partition("@")[2] for r in _rcpts(providers)}


async def test_cluster_replica_stopped_then_its_primary_killed_loses_nothing(
        tmp_path: Path, procs: Processes, redis_topologies: RedisProcesses, sink: Sink,
        record_property: RecordProperty) -> None:
    # A stopped replica would refuse to take over with data older than 10 node timeouts (15 s): this test
    # wants the worst case, the stale replica promoted, to prove that it holds every acknowledged message.
    topology = redis_topologies.cluster_set(config={"cluster-replica-validity-factor": "0"})
    providers = topology.providers_on_distinct_shards(3)
    fleet = await Fleet(procs, tmp_path, cluster_url(topology), sink, password=None, connections=1).start()
    sender = Sender(fleet.ports, 900, concurrency=15, rate=100, rcpts=_rcpts(providers))
    victim = topology.node_for_key(f"mxg:{{p:{providers[0]}}}:q")

    async def stop_replica_then_kill_primary() -> None:
        replica = topology.stop_replica(victim)
        await asyncio.sleep(3)                      # its shard's messages get 451 now; the others flow
        victim.kill9()
        await asyncio.sleep(2)
        replica.cont()
        await wait_until(lambda: _role(replica) == "master", timeout=60, what=f"{replica.name} to take over")

    struck_at = await send_through(fleet, sender, stop_replica_then_kill_primary, after=300)
    await all_arrive(sink, sender, record_property, ingest_stopped_s=ingest_gap(sender, struck_at))


def _role(node: object) -> str | None:
    try:
        return str(node.info("replication")["role"])  # type: ignore[attr-defined]
    except Exception:
        return None
