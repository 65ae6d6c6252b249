"""The spool's Lua scripts against a real Redis: claim leases, tokens, expiry, defer, move."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from mxgate import keys
from mxgate.redisconn import RedisConnection
from mxgate.spool.store import NewJob, Spool, new_queue_id


def _job(provider: str = "p", n: int = 0, body: bytes = b"Subject: x\r\n\r\nhi\r\n") -> NewJob:
    qid = new_queue_id()
    return NewJob(
        provider=provider,
        job_id=f"{qid}.{n}",
        queue_id=qid,
        sender="a@example.com",
        recipients=["b@dest.test"],
        domain="dest.test",
        body=body,
    )


async def test_enqueue_claim_ack_roundtrip(
        redis_client: aioredis.Redis, redis_connection: RedisConnection) -> None:
    spool = Spool(redis_connection)
    body = b"Subject: x\r\n\r\n" + bytes(range(256)) + b"\r\n"
    await spool.enqueue([_job(body=body)])
    assert await redis_client.zscore(keys.due("p"), "p") is not None   # in the due index
    claim = await spool.claim("p", limit=10, visibility_ms=30_000)
    assert len(claim.jobs) == 1
    job = claim.jobs[0]
    assert job.body == body and job.recipients == ["b@dest.test"] and job.attempts == 0
    # Claimed: invisible to others until the lease expires.
    again = await spool.claim("p", limit=10, visibility_ms=30_000)
    assert again.jobs == [] and again.next_due_ms is not None and again.next_due_ms > again.now_ms + 29_000
    assert await spool.ack("p", [job]) == 1
    assert await spool.depth("p") == 0
    assert await redis_client.exists(keys.job("p", job.job_id)) == 0


async def test_expired_lease_makes_job_due_again_and_old_token_is_powerless(
        redis_client: aioredis.Redis, redis_connection: RedisConnection) -> None:
    spool = Spool(redis_connection)
    await spool.enqueue([_job()])
    first = (await spool.claim("p", limit=1, visibility_ms=50)).jobs[0]
    await asyncio.sleep(0.1)
    second = (await spool.claim("p", limit=1, visibility_ms=30_000)).jobs[0]
    assert second.job_id == first.job_id and second.token != first.token
    assert await spool.ack("p", [first]) == 0  # the dead worker's late ack changes nothing
    assert not await spool.defer(first, delay_ms=0)
    assert await spool.depth("p") == 1
    assert await spool.ack("p", [second]) == 1


async def test_defer_reschedules_with_server_time(
        redis_client: aioredis.Redis, redis_connection: RedisConnection) -> None:
    spool = Spool(redis_connection)
    await spool.enqueue([_job()])
    job = (await spool.claim("p", limit=1, visibility_ms=30_000)).jobs[0]
    assert await spool.defer(job, delay_ms=200, attempts=1, last_reply="451 4.7.500 Server busy")
    empty = await spool.claim("p", limit=1, visibility_ms=30_000)
    assert empty.jobs == [] and empty.next_due_ms is not None
    assert 100 <= empty.next_due_ms - empty.now_ms <= 200
    await asyncio.sleep(0.25)
    job2 = (await spool.claim("p", limit=1, visibility_ms=30_000)).jobs[0]
    assert job2.attempts == 1 and job2.last_reply == "451 4.7.500 Server busy"


async def test_extend_keeps_lease_alive(
        redis_client: aioredis.Redis, redis_connection: RedisConnection) -> None:
    spool = Spool(redis_connection)
    await spool.enqueue([_job()])
    job = (await spool.claim("p", limit=1, visibility_ms=100)).jobs[0]
    assert await spool.extend("p", [job], visibility_ms=30_000) == 1
    await asyncio.sleep(0.2)
    assert (await spool.claim("p", limit=1, visibility_ms=100)).jobs == []


async def test_claims_are_fifo_and_exclusive_under_concurrency(
        redis_client: aioredis.Redis, redis_connection: RedisConnection) -> None:
    spool = Spool(redis_connection)
    jobs = [_job(n=i) for i in range(300)]
    for chunk in range(0, 300, 50):
        await spool.enqueue(jobs[chunk : chunk + 50])

    async def worker() -> list[str]:
        got: list[str] = []
        while True:
            claim = await spool.claim("p", limit=7, visibility_ms=30_000)
            if not claim.jobs:
                return got
            got += [j.job_id for j in claim.jobs]
            await spool.ack("p", claim.jobs)

    results = await asyncio.gather(*(worker() for _ in range(8)))
    claimed = [jid for r in results for jid in r]
    assert sorted(claimed) == sorted(j.job_id for j in jobs)  # each exactly once
    assert await spool.depth("p") == 0


async def test_move_to_other_provider(
        redis_client: aioredis.Redis, redis_connection: RedisConnection) -> None:
    spool = Spool(redis_connection)
    await spool.enqueue([_job(provider="domain:dest.test")])
    job = (await spool.claim("domain:dest.test", limit=1, visibility_ms=30_000)).jobs[0]
    await spool.move(job, "microsoft")
    assert await spool.depth("domain:dest.test") == 0
    moved = (await spool.claim("microsoft", limit=1, visibility_ms=30_000)).jobs[0]
    assert moved.job_id == job.job_id and moved.body == job.body


async def test_keys_of_a_provider_share_one_hash_tag() -> None:
    assert keys.queue("microsoft").split("{")[1].split("}")[0] == "p:microsoft"
    assert keys.job("microsoft", "X.0").split("{")[1].split("}")[0] == "p:microsoft"


async def test_the_provider_index_of_mxgate_0_1_is_adopted(
        redis_client: aioredis.Redis, redis_connection: RedisConnection) -> None:
    await redis_client.sadd("mxg:providers", "microsoft", "domain:example.org")
    spool = Spool(redis_connection)
    assert await spool.adopt_old_provider_index() == 2
    assert await spool.providers() == {"microsoft", "domain:example.org"}
    assert await redis_client.exists("mxg:providers") == 0
    assert await spool.adopt_old_provider_index() == 0


async def test_ack_flushes_that_meet_ack_every_job_once(redis_connection: RedisConnection,
                                                        redis_client: aioredis.Redis) -> None:
    # The ack loop's flush and a full batch's can run at once (delivered jobs keep arriving while the first
    # waits on Redis); each must ack exactly what it took. Before the flushes were serialised, the second
    # removed jobs appended after its snapshot from the batch list without acking them: held for ever here,
    # then delivered again at shutdown.
    from types import SimpleNamespace

    from mxgate.egress.claimed import ClaimedJobs
    from mxgate.telemetry.metrics import Metrics

    spool = Spool(redis_connection)
    await spool.enqueue([NewJob(provider="p", job_id=f"q{i}.0", queue_id=f"q{i}", sender="a@example.com",
                                recipients=["u@p.test"], domain="p.test", body=b"x\r\n") for i in range(80)])
    claim = await spool.claim("p", limit=100, visibility_ms=60_000)
    assert len(claim.jobs) == 80
    jobs = ClaimedJobs(SimpleNamespace(spool=spool, metrics=Metrics()), "p")  # type: ignore[arg-type]
    jobs.held.update((job.job_id, job) for job in claim.jobs)
    jobs.acks.extend(claim.jobs[:10])
    first = asyncio.create_task(jobs._flush_acks())
    await asyncio.sleep(0)            # the first is on its way to Redis ...
    jobs.acks.extend(claim.jobs[10:64])
    second = asyncio.create_task(jobs._flush_acks())
    await asyncio.sleep(0)
    jobs.acks.extend(claim.jobs[64:])  # ... and more were delivered while both were in flight
    await asyncio.gather(first, second)
    await jobs._flush_acks()
    assert jobs.acks == [] and jobs.held == {}
    assert await redis_client.zcard(keys.queue("p")) == 0
