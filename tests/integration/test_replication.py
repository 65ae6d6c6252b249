"""A 250 only once a replica has the message, and all or nothing for a message to several domains.

Real redis-server processes: a primary and a replica (``REPLICAOF``), or a lone server; a replica is stopped with
SIGSTOP to make replication hang, a small ``maxmemory`` makes Redis refuse writes half-way through a fan-out.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from mxgate import keys
from mxgate.embedded_redis import EmbeddedRedis
from mxgate.errors import SpoolError
from mxgate.redisconn import RedisConnection
from mxgate.spool.store import Spool, new_queue_id
from support.procs import eventually
from support.replication import job, spool_on


async def test_a_250_waits_for_the_replica_and_a_stopped_replica_means_451(
        pair: tuple[EmbeddedRedis, EmbeddedRedis], replicated: tuple[aioredis.Redis, aioredis.Redis]) -> None:
    primary, replica = pair
    p, r = replicated
    connection, spool = await spool_on(primary.url, replica_ack_timeout=0.5)
    try:
        qid = new_queue_id()
        await spool.enqueue([job("p", qid, 0)])
        # WAIT returned: the replica has the job now, not "soon".
        assert await r.exists(keys.job("p", f"{qid}.0")) == 1
        assert await connection.problems() == []

        assert replica.process is not None
        os.kill(replica.process.pid, signal.SIGSTOP)
        refused = new_queue_id()
        with pytest.raises(SpoolError, match="acknowledged by 0 of the 1 replica"):
            await spool.enqueue([job("p", refused, 0)])
        # Withdrawn before the 451: the client's retry will not make it a duplicate.
        assert await p.exists(keys.job("p", f"{refused}.0")) == 0
        assert await p.zscore(keys.queue("p"), f"{refused}.0") is None

        async def not_ready() -> bool:
            problems = await connection.problems()
            return bool(problems and "connected replica" in problems[0])

        # The replica's lag grows past 3 s: readiness says so long before the primary drops it (60 s).
        await eventually(not_ready, timeout=10, what="readiness to notice the stopped replica")
        os.kill(replica.process.pid, signal.SIGCONT)

        async def ready() -> bool:
            return await connection.problems() == []

        await eventually(ready, timeout=10, what="readiness to recover")
        await spool.enqueue([job("p", new_queue_id(), 0)])
    finally:
        await connection.aclose()


async def test_auto_needs_no_replica_on_a_lone_redis_and_a_demand_for_one_is_refused(
        redis_server: EmbeddedRedis, redis_client: aioredis.Redis) -> None:
    connection, spool = await spool_on(redis_server.url)
    try:
        await spool.enqueue([job("p", new_queue_id(), 0)])
        assert await connection.problems() == []
    finally:
        await connection.aclose()
    connection, spool = await spool_on(redis_server.url, replica_acks=1, replica_ack_timeout=0.2)
    try:
        with pytest.raises(SpoolError, match="acknowledged by 0 of the 1 replica"):
            await spool.enqueue([job("p", new_queue_id(), 0)])
        assert await connection.problems() == ["Redis has 0 connected replica(s); --replica-acks needs 1"]
    finally:
        await connection.aclose()


async def test_a_replica_seen_once_keeps_auto_at_one(
        pair: tuple[EmbeddedRedis, EmbeddedRedis], replicated: tuple[aioredis.Redis, aioredis.Redis]) -> None:
    primary, replica = pair
    p, r = replicated
    connection, spool = await spool_on(primary.url, replica_ack_timeout=0.3)
    try:
        await spool.enqueue([job("p", new_queue_id(), 0)])
        await r.replicaof("no", "one")      # the replica goes away: exactly when a failover would lose writes

        async def gone() -> bool:
            return bool((await p.info("replication"))["connected_slaves"] == 0)

        await eventually(gone, timeout=10, what="the primary to lose its replica")
        await asyncio.sleep(1.1)            # past the cached replica count
        with pytest.raises(SpoolError, match="replica"):
            await spool.enqueue([job("p", new_queue_id(), 0)])
    finally:
        await connection.aclose()


async def test_a_demoted_node_is_not_ready(
        pair: tuple[EmbeddedRedis, EmbeddedRedis], replicated: tuple[aioredis.Redis, aioredis.Redis]) -> None:
    primary, replica = pair
    connection, spool = await spool_on(replica.url)   # a plain URL that points at a replica
    try:
        problems = await connection.problems()
        assert problems == ["Redis is a slave, not a writable primary"]
        with pytest.raises(SpoolError):
            await spool.enqueue([job("p", new_queue_id(), 0)])
    finally:
        await connection.aclose()


# -- all or nothing ------------------------------------------------------------------------------------


async def test_a_fan_out_refused_half_way_leaves_nothing_to_deliver(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "small").start()
    client = aioredis.Redis.from_url(server.url)
    connection, spool = await spool_on(server.url)
    try:
        body = b"Subject: big\r\n\r\n" + b"x" * 20_000 + b"\r\n"
        used = int((await client.info("memory"))["used_memory"])
        # Room for about 150 of the 500 jobs: Redis refuses the rest (noeviction), as a full spool would.
        await client.config_set("maxmemory", used + 150 * 21_000)
        await client.config_set("maxmemory-policy", "noeviction")
        qid = new_queue_id()
        jobs = [job(f"domain:d{n}.test", qid, n, body=body) for n in range(500)]
        with pytest.raises(SpoolError):
            await spool.enqueue(jobs)
        stored = [n for n in range(500) if await client.exists(keys.job(f"domain:d{n}.test", f"{qid}.{n}"))]
        assert await client.exists(keys.commit("domain:d0.test", qid)) == 0
        claimable = 0
        await client.config_set("maxmemory", 0)
        await asyncio.sleep(0.7)             # past twice the staging time: anything left would be due now
        for n in range(500):
            claim = await spool.claim(f"domain:d{n}.test", limit=10, visibility_ms=30_000)
            claimable += len(claim.jobs)
        assert claimable == 0, f"{claimable} jobs of a refused message would be delivered"
        # Nothing is left behind either: withdrawn at once, or dropped by the claim that found it.
        left = [n for n in range(500) if await client.exists(keys.job(f"domain:d{n}.test", f"{qid}.{n}"))]
        assert left == [], f"{len(stored)} stored before the refusal, {len(left)} still there"

        # The client's retry (a new transaction, a new queue id) is then delivered once per domain.
        retry = new_queue_id()
        await spool.enqueue([job(f"domain:d{n}.test", retry, n, body=body) for n in range(500)])
        assert await client.exists(keys.commit("domain:d0.test", retry)) == 0   # promoted: no record left
        total = 0
        for n in range(500):
            claim = await spool.claim(f"domain:d{n}.test", limit=10, visibility_ms=30_000)
            assert [j.queue_id for j in claim.jobs] == [retry]
            assert not claim.jobs[0].commit
            total += len(claim.jobs)
        assert total == 500
    finally:
        await connection.aclose()
        await client.aclose()
        server.stop()


async def test_a_committed_message_whose_jobs_were_not_promoted_is_still_delivered(
        redis_connection: RedisConnection, redis_client: aioredis.Redis) -> None:
    """A gateway that died between the commit and the promotion: the claim asks the commit record."""
    spool = Spool(redis_connection, stage_ms=200)
    qid = new_queue_id()
    jobs = [job("domain:a.test", qid, 0), job("domain:b.test", qid, 1)]
    # Store staged, commit, but skip the promotion (what a kill -9 right after the commit leaves behind).
    await spool._store([replace(j, commit=keys.commit("domain:a.test", qid)) for j in jobs], stage_ms=200)
    await redis_client.set(keys.commit("domain:a.test", qid), "1")
    assert (await spool.claim("domain:b.test", limit=10, visibility_ms=30_000)).jobs == []   # still staged
    await asyncio.sleep(0.25)
    claimed = (await spool.claim("domain:b.test", limit=10, visibility_ms=30_000)).jobs
    assert [j.job_id for j in claimed] == [f"{qid}.1"] and claimed[0].commit == ""
    assert await redis_client.hexists(keys.job("domain:b.test", f"{qid}.1"), "commit") == 0
