"""Cost follows the mail: once every queue is empty, a gateway that has delivered to many providers goes quiet.

A gateway (with its in-process policy controller) delivers one message to each of 300 distinct domains, every
one its own ``domain:*`` provider under the ``default`` policy, to a real SMTP sink. Afterwards the due index is
empty (providers with empty queues leave it) and, over a window of seconds, the whole fleet sends Redis only a
few commands a second (``INFO commandstats``, server-side): nothing polls per provider. Before the due index,
the same run left ~1,000 commands a second behind (the issue's figures); the bench in bench/ measures the
idle cost against 10 / 1,000 / 10,000 providers.
"""

from __future__ import annotations

import asyncio
import time

import aiosmtplib
import redis.asyncio as aioredis

from mxgate import keys
from mxgate.embedded_redis import EmbeddedRedis
from support.gateway import policy, publish, running_gateway
from support.procs import eventually
from support.sink import Sink

DOMAINS = 300
#: Server-side commands per second the idle fleet (one gateway with its controller) may send: its due watcher
#: (one script per shard every few seconds), telemetry and policy refreshes. Measured: see the test's output.
IDLE_COMMANDS_PER_SECOND = 5.0


async def _commands(client: aioredis.Redis) -> dict[str, int]:
    """Commands the server has run, by command (this call's INFO included)."""
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}


async def test_an_idle_gateway_is_idle_after_mail_to_many_providers(
        redis_server: EmbeddedRedis, redis_client: aioredis.Redis) -> None:
    sink = await Sink().start()
    try:
        await publish(redis_server.url, [policy("default", route=[f"127.0.0.1:{sink.port}"])])
        async with running_gateway(redis_server.url) as gw:
            async def send(batch: range) -> None:
                async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port) as smtp:
                    for n in batch:
                        rcpt = f"user@d{n}.idle.test"
                        await smtp.sendmail("app@example.com", [rcpt],
                                            f"To: {rcpt}\r\nSubject: {n}\r\n\r\nbody {n}\r\n".encode())

            await asyncio.gather(*(send(range(i, DOMAINS, 10)) for i in range(10)))   # none refused
            await sink.wait_for(DOMAINS, timeout=60)

            async def index_empty() -> bool:
                return [await redis_client.zcard(shard) for shard in keys.due_shards()] == [0] * keys.DUE_SHARDS
            await eventually(index_empty, timeout=30, what="every provider gone from the due index")
            queues = [key async for key in redis_client.scan_iter(match=f"{keys.PREFIX}:{{p:domain:*}}:q")]
            assert queues == []

            # Let the dispatchers that delivered stop (they hold nothing and find nothing due).
            await eventually(lambda: not [d for d in gw.engine.dispatchers.values() if not d.done], timeout=30,
                             what="every dispatcher stopped")
            before, began = await _commands(redis_client), time.monotonic()
            await asyncio.sleep(10)
            after, took = await _commands(redis_client), time.monotonic() - began
    finally:
        await sink.stop()
    counts = {name: n - before.get(name, 0) for name, n in after.items() if n > before.get(name, 0)}
    counts["info"] -= 1
    total = sum(counts.values())
    rate = total / took
    print(f"idle after {DOMAINS} providers: {rate:.2f} Redis commands/s ({total} in {took:.1f} s: {counts})")
    assert rate <= IDLE_COMMANDS_PER_SECOND
