"""Fleet-wide leases and GCRA against a real Redis, driven by many concurrent clients.

Each "pod" is a FleetLimiter with its own Redis connection pool, as separate gateway processes would
have. The invariants: never more leases than the limit, a crashed holder's lease comes back after the
lease length, waiters are served first come first served, and the rate never exceeds rate x time + burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxgate import keys
from mxgate.embedded_redis import EmbeddedRedis
from mxgate.limits.fleet import CapReached, FleetLimiter
from mxgate.policy import Warmup


async def pods(url: str, n: int, **kwargs: int) -> list[FleetLimiter]:
    return [FleetLimiter(aioredis.Redis.from_url(url), **kwargs) for _ in range(n)]


@contextlib.asynccontextmanager
async def wake_on_release(url: str, limiters: list[FleetLimiter]) -> AsyncIterator[None]:
    """What each gateway's PolicyBook does: hand "free <provider>" announcements to the limiter."""
    listener = aioredis.Redis.from_url(url)
    pubsub = listener.pubsub()
    await pubsub.subscribe(keys.EVENTS)

    async def relay() -> None:
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            kind, _, provider = message["data"].decode().partition(" ")
            if kind == keys.EVENT_FREE:
                for limiter in limiters:
                    limiter.released(provider)
            elif kind == keys.EVENT_WANT:
                for limiter in limiters:
                    limiter.wanted(provider)

    task = asyncio.create_task(relay())
    try:
        yield
    finally:
        task.cancel()
        await pubsub.aclose()
        await listener.aclose()


async def close(limiters: list[FleetLimiter]) -> None:
    for limiter in limiters:
        await limiter.close()
        await limiter.redis.aclose()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.integers(1, 5), clients=st.integers(2, 10), rounds=st.integers(2, 6),
       holds=st.lists(st.floats(0.0, 0.01), min_size=1, max_size=8))
async def test_never_more_leases_than_the_limit(redis_server: EmbeddedRedis, limit: int, clients: int,
                                                rounds: int, holds: list[float]) -> None:
    provider = f"p{time.monotonic_ns()}"
    limiters = await pods(redis_server.url, clients)
    held = 0
    peak = 0
    granted = 0

    async def client(i: int) -> None:
        nonlocal held, peak, granted
        limiter = limiters[i]
        for r in range(rounds):
            async with limiter.connection(provider, limit=limit):
                held += 1
                granted += 1
                peak = max(peak, held)
                assert held <= limit
                await asyncio.sleep(holds[(i + r) % len(holds)])
                held -= 1

    try:
        async with wake_on_release(redis_server.url, limiters):
            await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(clients))), timeout=60)
    finally:
        await close(limiters)
    assert peak <= limit
    assert granted == clients * rounds


async def test_a_crashed_holders_lease_expires(redis_server: EmbeddedRedis) -> None:
    crashed, survivor = await pods(redis_server.url, 2, lease_ms=600)
    try:
        await crashed.acquire("crash", limit=1)
        await crashed.close()               # the pod dies: no renewal, no release
        started = time.monotonic()
        lease = await asyncio.wait_for(survivor.acquire("crash", limit=1), timeout=5)
        waited = time.monotonic() - started
        assert 0.3 < waited < 3.0, waited  # about the lease length, not before, not forever
        await survivor.release(lease)
    finally:
        await close([crashed, survivor])


async def test_renewal_keeps_a_lease_beyond_its_length(redis_server: EmbeddedRedis, redis_client) -> None:
    a, b = await pods(redis_server.url, 2, lease_ms=300)
    try:
        lease = await a.acquire("renew", limit=1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(b.acquire("renew", limit=1), timeout=1.0)  # ~3 lease lengths
        assert not lease.lost
        await a.release(lease)
        assert await redis_client.zcard(keys.waiters("renew")) == 0  # the timed-out waiter left the queue
    finally:
        await close([a, b])


async def test_waiters_are_served_in_arrival_order_across_pods(redis_server: EmbeddedRedis) -> None:
    limiters = await pods(redis_server.url, 4)
    order: list[int] = []
    try:
        async with wake_on_release(redis_server.url, limiters):
            first = await limiters[0].acquire("fifo", limit=1)

            async def wait_then_record(i: int) -> None:
                async with limiters[i].connection("fifo", limit=1):
                    order.append(i)
                    await asyncio.sleep(0.02)

            tasks = []
            for i in (1, 2, 3):
                tasks.append(asyncio.create_task(wait_then_record(i)))
                await asyncio.sleep(0.1)   # arrive in order 1, 2, 3
            # A greedy pod that keeps asking does not jump the queue.
            greedy = asyncio.create_task(wait_then_record(0))
            await asyncio.sleep(0.05)
            await limiters[0].release(first)
            await asyncio.wait_for(asyncio.gather(*tasks, greedy), timeout=10)
            assert order == [1, 2, 3, 0]
    finally:
        await close(limiters)


async def test_release_wakes_waiters_promptly(redis_server: EmbeddedRedis) -> None:
    # Without the pub/sub wake-up a waiter would sleep until its heartbeat (half the staleness).
    a, b = await pods(redis_server.url, 2, waiter_stale_ms=20_000)
    try:
        async with wake_on_release(redis_server.url, [b]):
            lease = await a.acquire("wake", limit=1)
            waiter = asyncio.create_task(b.acquire("wake", limit=1))
            await asyncio.sleep(0.2)
            started = time.monotonic()
            await a.release(lease)
            got = await asyncio.wait_for(waiter, timeout=5)
            assert time.monotonic() - started < 2.0   # far below the 10 s heartbeat
            await b.release(got)
    finally:
        await close([a, b])


async def test_lowered_limit_marks_surplus_leases_idle_ones_first(redis_server: EmbeddedRedis,
                                                                    redis_client) -> None:
    a, b = await pods(redis_server.url, 2)
    try:
        leases = [await a.acquire("shrink", limit=4) for _ in range(2)] + \
                 [await b.acquire("shrink", limit=4) for _ in range(2)]
        leases[1].idle = True
        a.set_limit("shrink", 1)
        b.set_limit("shrink", 1)
        await a.renew("shrink")
        await b.renew("shrink")          # renewing at the same time: the excess (3) is closed once, not twice
        assert leases[1].surplus                                   # A's idle connection goes first
        assert sum(lease.surplus for lease in leases) == 3
        # Surplus leases stay taken until their connections close: nobody can open one in between.
        assert await redis_client.zcard(keys.leases("shrink")) == 4
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(b.acquire("shrink", limit=1), timeout=0.5)
        for lease in leases:
            if lease.surplus:
                await (a if lease in leases[:2] else b).release(lease)
        assert await redis_client.zcard(keys.leases("shrink")) == 1
        assert await redis_client.scard(keys.closing("shrink")) == 0
        kept = [lease for lease in leases if not lease.surplus]
        await (a if kept[0] in leases[:2] else b).renew("shrink")
        assert not kept[0].surplus and not kept[0].lost
    finally:
        await close([a, b])


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rate=st.sampled_from([20.0, 50.0, 200.0]), burst=st.integers(1, 10), clients=st.integers(1, 4))
async def test_gcra_never_exceeds_rate_times_time_plus_burst(redis_server: EmbeddedRedis, rate: float,
                                                              burst: int, clients: int) -> None:
    provider = f"rate{time.monotonic_ns()}"
    limiters = await pods(redis_server.url, clients)
    grants = 0
    duration = 0.6
    started = time.monotonic()

    async def client(limiter: FleetLimiter) -> None:
        nonlocal grants
        while True:
            await limiter.message(provider, rate=rate, burst=burst)
            if time.monotonic() - started > duration:
                return
            grants += 1

    try:
        await asyncio.gather(*(client(limiter) for limiter in limiters))
    finally:
        await close(limiters)
    elapsed = time.monotonic() - started
    assert grants <= rate * elapsed + burst + 1
    assert grants >= 1


async def test_hourly_cap(redis_server: EmbeddedRedis) -> None:
    (pod,) = await pods(redis_server.url, 1)
    try:
        for _ in range(3):
            await pod.message("cap", rate=None, burst=None, per_hour=3)
        with pytest.raises(CapReached) as refused:
            await pod.message("cap", rate=None, burst=None, per_hour=3)
        assert refused.value.cap == "hour" and 0 < refused.value.retry_after <= 3600
    finally:
        await close([pod])


def _ramp(today: date, *, today_is: int, **volumes: int) -> Warmup:
    """A warm-up on which ``today`` is day ``today_is``; day N's step has volume ``volumes["d<N>"]``."""
    start = today - timedelta(days=today_is - 1)
    return Warmup.model_validate({"startDate": start.isoformat(), "schedule": [
        {"day": int(k[1:]), "messagesPerDay": v} for k, v in volumes.items()]})


async def _redis_today(client: aioredis.Redis) -> date:
    seconds, _ = await client.time()
    return datetime.fromtimestamp(seconds, UTC).date()


async def test_the_warmup_volume_caps_the_day_fleet_wide(redis_server: EmbeddedRedis, redis_client) -> None:
    today = await _redis_today(redis_client)
    # Today is day 3: 5 messages. Day 4 holds the level, so a run across midnight UTC still sees 5.
    warmup = _ramp(today, today_is=3, d1=2, d3=5, d5=50)
    limiters = await pods(redis_server.url, 3)
    try:
        for i in range(5):
            await limiters[i % 3].message("warm", rate=None, burst=None, warmup=warmup)
        for pod in limiters:
            with pytest.raises(CapReached) as refused:
                await pod.message("warm", rate=None, burst=None, warmup=warmup)
            assert refused.value.cap == "day" and 0 < refused.value.retry_after <= 86400
        # Looking before connecting takes nothing; the sixth asks in vain.
        with pytest.raises(CapReached):
            await limiters[0].check_caps("warm", warmup=warmup)
        # limits.messagesPerDay below the day's volume wins.
        await limiters[0].message("warm-ceiling", rate=None, burst=None, per_day=1, warmup=warmup)
        with pytest.raises(CapReached):
            await limiters[0].message("warm-ceiling", rate=None, burst=None, per_day=1, warmup=warmup)
    finally:
        await close(limiters)


async def test_looking_at_the_caps_counts_nothing(redis_server: EmbeddedRedis, redis_client) -> None:
    (pod,) = await pods(redis_server.url, 1)
    try:
        await pod.message("look", rate=None, burst=None, per_day=2)
        for _ in range(5):
            await pod.check_caps("look", per_day=2)
        day = int((await redis_client.time())[0]) // 86400
        assert await redis_client.get(keys.day_count("look", day)) == b"1"
        await pod.message("look", rate=None, burst=None, per_day=2)
        with pytest.raises(CapReached):
            await pod.check_caps("look", per_day=2)
    finally:
        await close([pod])


async def test_redis_time_decides_the_warmup_day_not_the_pods_clock(redis_server: EmbeddedRedis,
                                                                     redis_client) -> None:
    today = await _redis_today(redis_client)
    warmup = _ramp(today, today_is=2, d1=1, d2=2, d3=1000, d4=1000)
    # Pods whose clocks are a day ahead and a day behind: tomorrow would allow 1000, yesterday 1.
    ahead, behind = (FleetLimiter(aioredis.Redis.from_url(redis_server.url), clock=lambda d=d: time.time() + d)
                     for d in (86400.0, -86400.0))
    try:
        await ahead.message("skew", rate=None, burst=None, warmup=warmup)
        await behind.message("skew", rate=None, burst=None, warmup=warmup)   # today's 2, not yesterday's 1
        for pod in (ahead, behind):
            with pytest.raises(CapReached):
                await pod.message("skew", rate=None, burst=None, warmup=warmup)
        day = int((await redis_client.time())[0]) // 86400
        assert await redis_client.get(keys.day_count("skew", day)) == b"2"
    finally:
        await close([ahead, behind])


async def test_after_the_ramp_no_day_is_capped(redis_server: EmbeddedRedis, redis_client) -> None:
    today = await _redis_today(redis_client)
    over = _ramp(today, today_is=10, d1=1, d2=2)
    (pod,) = await pods(redis_server.url, 1)
    try:
        for _ in range(20):
            await pod.message("ramped", rate=None, burst=None, warmup=over)
        assert [k async for k in redis_client.scan_iter(match=keys.day_count("ramped", 0)[:-1] + "*")] == []
    finally:
        await close([pod])


async def test_an_idle_connection_hands_its_lease_to_a_waiter_elsewhere(redis_server: EmbeddedRedis) -> None:
    # Pod a's connection idles (its queue is empty) holding the only lease; pod b has mail waiting: a's
    # connection is told to close (must_close) rather than sitting out its idle timeout. A busy one is not.
    a, b = await pods(redis_server.url, 2)
    try:
        async with wake_on_release(redis_server.url, [a, b]):
            busy = await a.acquire("p", limit=2)
            idle = await a.acquire("p", limit=2)
            idle.idle = True
            waiting = asyncio.create_task(b.acquire("p", limit=2))
            deadline = time.monotonic() + 5
            while not idle.must_close and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert idle.must_close and not busy.must_close and not waiting.done()
            await a.release(idle)       # what the connection does once it sees must_close
            lease = await asyncio.wait_for(waiting, 5)
            await b.release(lease)
            await a.release(busy)
    finally:
        await close([a, b])
