"""A connection refused for too many connections sets the fleet's live limit at once to the connections
open then (refused.lua), and the adaptive loop neither undoes that cut nor counts the refusals before it."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from mxgate import keys
from mxgate.embedded_redis import EmbeddedRedis
from mxgate.limits.fleet import FleetLimiter
from mxgate_operator.adaptive import AdaptiveLoop
from mxgate_operator.core import ControlState, Decision
from support.gateway import policy


async def test_a_refusal_brings_the_limit_down_to_the_connections_open(redis_server: EmbeddedRedis,
                                                                        redis_client: aioredis.Redis) -> None:
    limiter = FleetLimiter(aioredis.Redis.from_url(redis_server.url))
    try:
        leases = [await limiter.acquire("ms", limit=10) for _ in range(5)]
        # The fifth was refused while four others were open: the provider allows four.
        assert await limiter.connection_refused(leases[4], limit=10, floor=1, reply="451 4.7.652 too many") == 4
        raw = await redis_client.hgetall(keys.limits("ms"))
        assert raw[b"maxConnections"] == b"4" and raw[b"connectionsBad"] == b"5" and raw[b"refusedAt"]
        assert limiter.limits_now["ms"] == 4
        (entry,) = [json.loads(e) for e in await redis_client.lrange(keys.adjustments("ms"), 0, -1)]
        assert (entry["signal"], entry["old"], entry["new"]) == ("refused", 10, 4)
        assert "while 4 others were open: 451 4.7.652" in entry["reason"]
        # Never up: a refusal with more open (a slow release elsewhere) changes nothing.
        assert await limiter.connection_refused(leases[4], limit=4, floor=1, reply="451 4.7.652") is None
        # The floor holds; a refusal with nobody else open says nothing about a number.
        for lease in leases[1:]:
            await limiter.release(lease)
        assert await limiter.connection_refused(leases[0], limit=4, floor=2, reply="451 4.7.652") is None
        assert (await redis_client.hget(keys.limits("ms"), "maxConnections")) == b"4"
    finally:
        await limiter.close()


async def test_the_loop_does_not_undo_a_refusal_cut_made_after_it_read(redis_server: EmbeddedRedis,
                                                                      redis_client: aioredis.Redis) -> None:
    p = policy("ms", domains=["outlook.test"], maxConnections=10)
    loop = AdaptiveLoop(redis_client, lambda: {"ms": p})
    await redis_client.hset(keys.limits("ms"), mapping={"maxConnections": "8", "refusedAt": "1000"})
    decision = Decision(ControlState(connections=9, rate=None), (), "calm")
    assert not await loop._write("ms", decision, now=2.0, refused_at="999")   # a cut came after the read
    assert await redis_client.hget(keys.limits("ms"), "maxConnections") == b"8"
    assert await loop._write("ms", decision, now=2.0, refused_at="1000")      # nothing since: written
    assert await redis_client.hget(keys.limits("ms"), "maxConnections") == b"9"


async def test_the_loop_leaves_out_the_seconds_before_a_refusal_cut(redis_server: EmbeddedRedis,
                                                                    redis_client: aioredis.Redis) -> None:
    p = policy("ms", domains=["outlook.test"], maxConnections=10)
    now = 1_000_000.0
    # Refusals in every second of the window, all before the cut at now - 2.5 s: nothing left to weigh.
    for second in range(int(now) - 8, int(now) - 2):
        await redis_client.hset(keys.telemetry("ms", second), mapping={"delivered": 5, "deferred_connections": 20})
    await redis_client.hset(keys.limits("ms"), mapping={"maxConnections": "4",
                                                        "refusedAt": str(int((now - 2.5) * 1000))})
    loop = AdaptiveLoop(redis_client, lambda: {"ms": p}, clock=lambda: now)
    evaluation = await loop.evaluate("ms", p, now=now, seconds=5)
    assert evaluation.window.outcomes == 0 and not evaluation.decision.changed
    assert await redis_client.hget(keys.limits("ms"), "maxConnections") == b"4"
