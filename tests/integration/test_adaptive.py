"""The adaptive loop against a real Redis, and closed with real gateways and a throttling simulator."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import redis.asyncio as aioredis

from mxgate import keys
from mxgate.embedded_redis import EmbeddedRedis
from mxgate.sim.config import SimConfig
from mxgate.sim.server import ProviderSimulator
from mxgate_operator.adaptive import AdaptiveLoop, adjustments_key
from mxgate_operator.filemode import FileController
from mxgate_operator.publish import publish_policies
from support.gateway import policy, policy_yaml, running_gateway


def adaptive_policy(name: str = "ms", **limits: object):
    base = policy(name, domains=["outlook.test"], **limits)
    adaptive = base.spec.adaptive.model_copy(update={"evaluation_window": "1s", "calm_windows": 2})
    return base.model_copy(update={"spec": base.spec.model_copy(update={"adaptive": adaptive})})


async def test_deferrals_in_telemetry_tighten_the_live_limit(redis_client: aioredis.Redis) -> None:
    p = adaptive_policy(maxConnections=20, messagesPerSecond=200)
    await publish_policies(redis_client, [p])
    now = time.time()
    for second in range(int(now) - 4, int(now) - 1):
        await redis_client.hset(keys.telemetry("ms", second), mapping={"delivered": 30, "deferred_connections": 10})
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(keys.EVENTS)
    loop = AdaptiveLoop(redis_client, lambda: {"ms": p}, clock=lambda: now)
    evaluation = await loop.evaluate("ms", p, now=now, seconds=3)
    assert evaluation.window.deferred_connections == 30 and evaluation.window.delivered == 90
    assert evaluation.decision.state.connections == 14
    raw = await redis_client.hgetall(keys.limits("ms"))
    assert raw[b"maxConnections"] == b"14" and b"too many connections" in raw[b"reason"]
    entry = json.loads((await redis_client.lrange(adjustments_key("ms"), 0, 0))[0])
    assert (entry["signal"], entry["old"], entry["new"]) == ("connections", 20, 14)
    messages = []
    for _ in range(20):
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message:
            messages.append(message["data"])
    assert b"limits ms" in messages
    await pubsub.aclose()
    # The next evaluation starts from what Redis holds now, not from the ceiling.
    later = await loop.evaluate("ms", p, now=now + 1, seconds=3)
    assert later.decision.state.connections == 9


async def test_a_tick_leaves_out_the_seconds_before_the_last_change(redis_client: aioredis.Redis) -> None:
    p = adaptive_policy(maxConnections=20, messagesPerSecond=200)
    adaptive = p.spec.adaptive.model_copy(update={"evaluation_window": "3s"})
    p = p.model_copy(update={"spec": p.spec.model_copy(update={"adaptive": adaptive})})
    await publish_policies(redis_client, [p])
    now = time.time()
    n = int(now)
    clock = [now]
    loop = AdaptiveLoop(redis_client, lambda: {"ms": p}, clock=lambda: clock[0])

    async def refusals(*seconds: int) -> None:
        for second in seconds:
            await redis_client.hset(keys.telemetry("ms", second), mapping={"delivered": 30, "deferred_connections": 10})

    assert await loop.tick() == []                      # the first window only collects evidence
    await refusals(n - 1, n, n + 1)
    clock[0] = now + 3                                  # reads seconds n-1 .. n+1
    (first,) = await loop.tick()
    assert first.decision.state.connections == 14
    # Refusals in the seconds up to the change were drawn by the old limit (the window lags by
    # FLUSH_LAG): the next window leaves them out instead of cutting 14 -> 9 on them.
    await refusals(n + 2, n + 3)
    clock[0] = now + 6
    (sooner,) = await loop.tick()
    assert sooner.window.deferred_connections == 0 and sooner.decision.state.connections == 14
    # Fresh refusals after the change do cut again.
    await refusals(n + 5, n + 6, n + 7)
    clock[0] = now + 9
    (later,) = await loop.tick()
    assert later.window.deferred_connections == 30 and later.decision.state.connections == 9


async def test_known_good_levels_live_in_redis_between_windows(redis_client: aioredis.Redis) -> None:
    p = adaptive_policy(maxConnections=20, messagesPerSecond=200)
    await publish_policies(redis_client, [p])
    await redis_client.hset(keys.limits("ms"), mapping={"maxConnections": 5, "messagesPerSecond": 30,
                                                        "connectionsGood": 8, "rateGood": 50})
    now = time.time()
    for second in range(int(now) - 4, int(now) - 1):
        await redis_client.hset(keys.telemetry("ms", second), mapping={"delivered": 30})
    loop = AdaptiveLoop(redis_client, lambda: {"ms": p}, clock=lambda: now)
    evaluation = await loop.evaluate("ms", p, now=now, seconds=3)
    # one calm window that used both limits: halfway back to the known-good levels
    assert (evaluation.decision.state.connections, evaluation.decision.state.rate) == (7, 40.0)
    raw = await redis_client.hgetall(keys.limits("ms"))
    assert (raw[b"maxConnections"], raw[b"messagesPerSecond"]) == (b"7", b"40")
    assert (raw[b"connectionsGood"], raw[b"rateGood"]) == (b"8", b"50")


async def test_closed_loop_finds_a_providers_connection_limit(redis_server: EmbeddedRedis, redis_client,
                                                              tmp_path: Path) -> None:
    async with ProviderSimulator(SimConfig(profile="outlook", max_connections=4, latency=0.1)) as sim:
        p = adaptive_policy(maxConnections=16, route=[f"127.0.0.1:{sim.port}"])
        retry = p.spec.retry.model_copy(update={"throttled_delay": "500ms"})
        p = p.model_copy(update={"spec": p.spec.model_copy(update={"retry": retry})})
        (tmp_path / "ms.yaml").write_text(policy_yaml(p))
        controller = FileController(redis_client, tmp_path, poll_interval=0.5)
        await controller.publish()
        control = asyncio.create_task(controller.run())
        try:
            async with running_gateway(redis_server.url) as gw:
                import aiosmtplib

                async def client(i: int) -> None:
                    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port) as smtp:
                        for n in range(80):
                            msg = f"Subject: {i}/{n}\r\nMessage-ID: <a{i}.{n}@example.com>\r\n\r\nx\r\n".encode()
                            await smtp.sendmail("app@example.com", ["u@outlook.test"], msg)

                await asyncio.gather(*(client(i) for i in range(10)))
                deadline = time.monotonic() + 90
                while sim.report()["accepted"]["messages"] < 800 and time.monotonic() < deadline:
                    await asyncio.sleep(0.25)
                live = gw.book.limits("ms").max_connections
        finally:
            control.cancel()
            await asyncio.gather(control, return_exceptions=True)
        report = sim.report()
    assert report["accepted"]["messages"] == 800 and report["duplicates"]["messages"] == 0
    assert report["deferrals"]["connections"] > 0          # the ceiling (16) was too high at first ...
    assert live <= 5, live                                  # ... and the fleet brought the limit down to it
    history = [json.loads(h) for h in await redis_client.lrange(adjustments_key("ms"), 0, -1)]
    # The first refusal told the fleet how many connections the provider allows (the others open then), at
    # once, rather than the loop cutting x0.7 per window: 16 -> at most 15, then down with each refusal.
    refused = [h for h in reversed(history) if h["signal"] == "refused"]
    assert refused and refused[0]["old"] == 16 and min(h["new"] for h in refused) <= 5, history
