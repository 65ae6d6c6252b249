"""Review of issue 9 (durability under Redis failures): tests that demonstrate defects.

Real redis-server processes (a primary and a replica, REPLICAOF); a replica is stopped with SIGSTOP (it stays
"online" to the primary for a while, as a partitioned or hung replica does).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable

import pytest
import redis.asyncio as aioredis

from mxgate import keys
from mxgate.embedded_redis import EmbeddedRedis
from mxgate.errors import SpoolError
from mxgate.spool.store import new_queue_id
from support.procs import eventually
from support.replication import job, spool_on


async def test_a_single_job_refused_with_451_is_not_delivered(
        pair: tuple[EmbeddedRedis, EmbeddedRedis], replicated: tuple[aioredis.Redis, aioredis.Redis]) -> None:
    """A single-domain job is due (and announced) the moment it is stored, before its WAIT returns: a dispatcher
    claims it during the WAIT, the withdraw then finds it claimed and leaves it, so a message answered 451 is
    delivered, and the client's retry (451 again while the replica is down) is delivered again, and again."""
    primary, replica = pair
    p, _ = replicated
    connection, spool = await spool_on(primary.url, replica_ack_timeout=0.5)
    try:
        await spool.enqueue([job("p", new_queue_id())])
        await spool.ack("p", (await spool.claim("p", limit=10, visibility_ms=30_000)).jobs)
        assert replica.process is not None
        os.kill(replica.process.pid, signal.SIGSTOP)
        delivered: list[str] = []
        refused: list[str] = []

        async def dispatcher() -> None:          # what egress does: claim whatever is due, deliver, ack
            while True:
                claim = await spool.claim("p", limit=10, visibility_ms=30_000)
                delivered.extend(j.queue_id for j in claim.jobs)
                await spool.ack("p", claim.jobs)
                await asyncio.sleep(0.01)

        worker = asyncio.create_task(dispatcher())
        try:
            for _ in range(3):                    # the client retries a 451 three times
                qid = new_queue_id()
                try:
                    await spool.enqueue([job("p", qid)])
                except SpoolError:
                    refused.append(qid)
            await asyncio.sleep(0.2)
        finally:
            worker.cancel()
        assert refused, "expected 451s: the replica is stopped"
        assert not set(refused) & set(delivered), \
            f"{len(set(refused) & set(delivered))} of {len(refused)} messages answered 451 were delivered"
    finally:
        await connection.aclose()


async def test_a_fan_out_refused_by_the_enqueue_timeout_is_not_delivered(
        pair: tuple[EmbeddedRedis, EmbeddedRedis], replicated: tuple[aioredis.Redis, aioredis.Redis],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The enqueue's overall timeout (ENQUEUE_TIMEOUT: 20 s; 1 s here) fires while the commit record's WAIT is
    still waiting (here: --replica-ack-timeout 3 s and the replica stalls just then; in production any mix of
    slow steps, socket timeouts and retries past 20 s). The cancellation skips ``_take_back`` (which runs on
    SpoolError and Redis errors only), so the commit record written on the primary stays: the client got 451 and
    the whole message is delivered anyway (and once more from the client's retry). docs/architecture.md: a
    refused message "has no commit record: its jobs are withdrawn at once"."""
    from mxgate.spool import store

    primary, replica = pair
    monkeypatch.setattr(store, "ENQUEUE_TIMEOUT", 1.0)
    connection, spool = await spool_on(primary.url, replica_ack_timeout=3.0)
    assert replica.process is not None
    pid = replica.process.pid
    real_durable = connection.durable

    async def durable_with_a_stall(key: str, calls: object, **options: object) -> object:
        if key.endswith(f":commit:{qid}"):   # the replica stalls just as the commit record is written
            os.kill(pid, signal.SIGSTOP)
        return await real_durable(key, calls, **options)  # type: ignore[arg-type]

    qid = new_queue_id()
    monkeypatch.setattr(connection, "durable", durable_with_a_stall)
    try:
        warm = new_queue_id()         # a fan-out that goes through: the replica is seen, the scripts are loaded
        await spool.enqueue([job("domain:a.test", warm, 0), job("domain:b.test", warm, 1)])
        with pytest.raises(SpoolError, match="longer than"):
            await spool.enqueue([job("domain:a.test", qid, 0), job("domain:b.test", qid, 1)])
        os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(0.4)     # past the 300 ms staging time
        delivered = []
        for provider in ("domain:a.test", "domain:b.test"):
            claim = await spool.claim(provider, limit=10, visibility_ms=30_000)
            delivered += [j.job_id for j in claim.jobs if j.queue_id == qid]
        assert delivered == [], f"a message answered 451 is delivered: {delivered}"
    finally:
        os.kill(pid, signal.SIGCONT)
        await connection.aclose()


# -- a WAIT cut off and retried: the replayed write still waits for the original (Redis moves a connection's
# wait point on every EVALSHA, even one that writes nothing); checked here because mxgate relies on it.


async def _kill_waiting_clients(p: aioredis.Redis) -> int:
    """CLIENT KILL every connection blocked in WAIT (a network cut of the gateway's connection)."""
    killed = 0
    for client in await p.client_list():
        if client.get("cmd") == "wait":
            await p.client_kill_filter(_id=client["id"])
            killed += 1
    return killed


async def _lost_on_failover(pair: tuple[EmbeddedRedis, EmbeddedRedis], job_key: str) -> bool:
    """Kill -9 the primary while the replica is stopped, then promote the replica: is ``job_key`` gone?"""
    primary, replica = pair
    assert primary.process is not None and replica.process is not None
    primary.stop(kill=True)
    os.kill(replica.process.pid, signal.SIGCONT)
    r = aioredis.Redis.from_url(replica.url)
    try:
        await r.replicaof("no", "one")
        return bool(await r.exists(job_key) == 0)
    finally:
        await r.aclose()


async def _not_lost_if_acknowledged(pair: tuple[EmbeddedRedis, EmbeddedRedis], enqueue: Awaitable[None],
                                    qid: str) -> None:
    """Await ``enqueue``; if it was acknowledged (no SpoolError: a 250), the job must survive a failover."""
    try:
        await enqueue
    except SpoolError:
        return
    assert not await _lost_on_failover(pair, keys.job("p", f"{qid}.0")), \
        "answered 250, but the replica never had the job: lost on failover"


async def test_a_wait_cut_off_and_retried_does_not_count_a_stalled_replica(
        pair: tuple[EmbeddedRedis, EmbeddedRedis], replicated: tuple[aioredis.Redis, aioredis.Redis]) -> None:
    """Defaults (--replica-acks auto, 1 s): the enqueue ran, its WAIT is cut off, redis-py retries the pipeline on a
    fresh connection; the replayed enqueue writes nothing (the job exists), so WAIT on the new connection has no
    offset to wait for and counts the stalled replica at once. The message gets 250 and is lost on failover."""
    primary, replica = pair
    p, _ = replicated
    connection, spool = await spool_on(primary.url, replica_ack_timeout=1.0)
    try:
        await spool.enqueue([job("p", new_queue_id())])       # the replica is seen: auto requires 1
        assert replica.process is not None
        os.kill(replica.process.pid, signal.SIGSTOP)          # hung / partitioned: still "online" for a while
        qid = new_queue_id()
        enqueue = asyncio.create_task(spool.enqueue([job("p", qid)]))
        await eventually(lambda: _kill_waiting_clients(p), timeout=5, what="the enqueue's WAIT")
        await _not_lost_if_acknowledged(pair, enqueue, qid)
    finally:
        await connection.aclose()


async def test_a_replica_ack_timeout_above_the_socket_timeout_gives_250_without_a_replica(
        pair: tuple[EmbeddedRedis, EmbeddedRedis], replicated: tuple[aioredis.Redis, aioredis.Redis]) -> None:
    """--replica-ack-timeout 6 with the 5 s socket timeout (here 1.5 s against 1 s, to be quick): the WAIT of a
    stalled replica outlasts the socket, redis-py retries the pipeline, and the retry's WAIT counts the replica."""
    primary, replica = pair
    connection, spool = await spool_on(primary.url, replica_ack_timeout=1.5, socket_timeout=1.0)
    try:
        await spool.enqueue([job("p", new_queue_id())])
        assert replica.process is not None
        os.kill(replica.process.pid, signal.SIGSTOP)
        qid = new_queue_id()
        await _not_lost_if_acknowledged(pair, spool.enqueue([job("p", qid)]), qid)
    finally:
        await connection.aclose()


