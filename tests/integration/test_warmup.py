"""spec.warmup end to end: SMTP client -> gateway -> Redis -> SMTP sink, with a day's volume of 5.

The day is Redis's (as for the gateway): the policy's startDate is chosen so that today is day 3.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, date, datetime, timedelta

import aiosmtplib
import pytest
import redis.asyncio as aioredis

from mxgate import keys
from mxgate.embedded_redis import EmbeddedRedis, free_port
from mxgate.policy import ProviderPolicy, parse_policy
from support.gateway import publish, running_gateway
from support.sink import Sink


@pytest.fixture
async def sink() -> Sink:
    s = await Sink().start()
    yield s
    await s.stop()


async def redis_today(client: aioredis.Redis) -> date:
    seconds, _ = await client.time()
    return datetime.fromtimestamp(seconds, UTC).date()


def warm_policy(hop: str, today: date, *, day3_volume: int) -> ProviderPolicy:
    # Today is day 3; day 4 holds the level, so a test that runs across midnight UTC sees the same volume.
    return parse_policy({"apiVersion": "mxgate.io/v1alpha1", "kind": "ProviderPolicy", "metadata": {"name": "warm"},
                         "spec": {"match": {"domains": ["warm.test"]}, "route": {"hosts": [hop]},
                                  "limits": {"maxConnections": 3},
                                  "warmup": {"startDate": (today - timedelta(days=2)).isoformat(), "schedule": [
                                      {"day": 1, "messagesPerDay": 2}, {"day": 3, "messagesPerDay": day3_volume},
                                      {"day": 5, "messagesPerDay": 1000}]}}}, source="test")


async def test_a_warmup_day_delivers_its_volume_and_keeps_the_rest_queued(redis_server: EmbeddedRedis, redis_client,
                                                                          sink: Sink) -> None:
    today = await redis_today(redis_client)
    await publish(redis_server.url, [warm_policy(f"127.0.0.1:{sink.port}", today, day3_volume=5)])
    day = int((await redis_client.time())[0]) // 86400
    async with running_gateway(redis_server.url) as gw:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port) as smtp:
            for n in range(12):
                await smtp.sendmail("app@example.com", [f"u{n}@warm.test"],
                                    f"Subject: {n}\r\nMessage-ID: <w{n}@example.com>\r\n\r\nx\r\n".encode())
        await sink.wait_for(5)
        await asyncio.sleep(2.0)        # room for a sixth, were the day's volume not enforced
        assert len(sink.handler.messages) == 5
        assert await redis_client.zcard(keys.queue("warm")) == 7          # the rest waits in Redis
        assert await redis_client.get(keys.day_count("warm", day)) == b"5"
        assert sink.open == 0           # no connection kept open (idle) while the day is used up

        # Today's step raised in the policy: the queue moves again at once, up to the new volume.
        await publish(redis_server.url, [warm_policy(f"127.0.0.1:{sink.port}", today, day3_volume=9)])
        await sink.wait_for(9, timeout=10)
        await asyncio.sleep(1.0)
        assert len(sink.handler.messages) == 9
        assert await redis_client.zcard(keys.queue("warm")) == 3
    # After shutdown the three are still queued, for tomorrow (or another gateway).
    assert await redis_client.zcard(keys.queue("warm")) == 3
    assert len(set(sink.handler.message_ids())) == 9


async def test_an_unreachable_next_hop_uses_none_of_the_days_volume(redis_server: EmbeddedRedis,
                                                                     redis_client) -> None:
    today = await redis_today(redis_client)
    await publish(redis_server.url, [warm_policy(f"127.0.0.1:{free_port()}", today, day3_volume=5)])
    day = int((await redis_client.time())[0]) // 86400
    async with running_gateway(redis_server.url) as gw:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port) as smtp:
            for n in range(8):
                await smtp.sendmail("app@example.com", [f"u{n}@warm.test"], b"Subject: x\r\n\r\nx\r\n")
        for _ in range(100):             # until every job was tried once and deferred
            if await redis_client.zcount(keys.queue("warm"), f"({int(time.time() * 1000) + 10_000}", "+inf") == 8:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the jobs were not all deferred")
    assert await redis_client.get(keys.day_count("warm", day)) is None
