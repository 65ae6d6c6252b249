"""Several gateways against one Redis share one set of limits towards a provider."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiosmtplib

from mxgate.embedded_redis import EmbeddedRedis
from mxgate.limits.effective import Effective
from mxgate_operator.publish import publish_effective_limits
from support.gateway import policy, publish, running_gateway
from support.sink import Sink, SinkHandler


def message(n: int) -> bytes:
    return f"Subject: fleet {n}\r\nMessage-ID: <f{n}@example.com>\r\n\r\nbody {n}\r\n".encode()


async def send_all(ports: list[int], count: int, *, concurrency: int = 10) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(count):
        queue.put_nowait(n)

    async def client(i: int) -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=ports[i % len(ports)]) as smtp:
            while not queue.empty():
                n = queue.get_nowait()
                await smtp.sendmail("app@example.com", ["u@outlook.test"], message(n))

    await asyncio.gather(*(client(i) for i in range(concurrency)))


async def test_two_gateways_never_exceed_the_connection_limit(redis_server: EmbeddedRedis, redis_client) -> None:
    sink = await Sink(SinkHandler(delay=0.02)).start()
    try:
        await publish(redis_server.url, [policy("ms", domains=["outlook.test"], route=[f"127.0.0.1:{sink.port}"],
                                                maxConnections=3, maxMessagesPerConnection=7)])
        async with running_gateway(redis_server.url) as a, running_gateway(redis_server.url) as b:
            await send_all([a.port, b.port], 200)
            await sink.wait_for(200, timeout=60)
        assert sink.max_open <= 3
        assert sink.max_open == 3     # and the fleet does use what it is allowed
        ids = sink.handler.message_ids()
        assert len(ids) == 200 and set(ids.values()) == {1}
    finally:
        await sink.stop()


async def test_a_lowered_limit_takes_effect_fleet_wide_within_a_second(redis_server: EmbeddedRedis,
                                                                       redis_client) -> None:
    sink = await Sink(SinkHandler(delay=0.05)).start()
    try:
        await publish(redis_server.url, [policy("ms", domains=["outlook.test"], route=[f"127.0.0.1:{sink.port}"],
                                                maxConnections=6, maxMessagesPerConnection=1000)])
        async with running_gateway(redis_server.url) as a, running_gateway(redis_server.url) as b:
            sender = asyncio.create_task(send_all([a.port, b.port], 600, concurrency=12))
            for _ in range(200):
                if sink.open >= 5:
                    break
                await asyncio.sleep(0.05)
            assert sink.open >= 5
            await publish_effective_limits(redis_client, "ms", Effective(2, None, reason="test"))
            await asyncio.sleep(1.0 + 0.05 * 2)  # within 1 s, plus one message in flight per connection
            sink.max_open = sink.open
            samples = []
            for _ in range(30):
                samples.append(sink.open)
                sink.max_open = max(sink.max_open, sink.open)
                await asyncio.sleep(0.05)
            assert max(samples) <= 2 and sink.max_open <= 2, samples
            assert a.book.limits("ms").max_connections == 2 == b.book.limits("ms").max_connections
            # Raising it again is also live.
            await publish_effective_limits(redis_client, "ms", Effective(5, None, reason="test"))
            await asyncio.sleep(1.0)
            assert a.book.limits("ms").max_connections == 5
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiosmtplib.SMTPException):
                await sender
    finally:
        await sink.stop()


async def test_the_rate_limit_holds_across_gateways(redis_server: EmbeddedRedis, redis_client) -> None:
    sink = await Sink().start()
    try:
        await publish(redis_server.url, [policy("ms", domains=["outlook.test"], route=[f"127.0.0.1:{sink.port}"],
                                                maxConnections=4, messagesPerSecond=40, burst=2)])
        async with running_gateway(redis_server.url) as a, running_gateway(redis_server.url) as b:
            await send_all([a.port, b.port], 120)
            started = time.monotonic()
            first = len(sink.handler.messages)
            await sink.wait_for(120, timeout=60)
            elapsed = time.monotonic() - started
        # 40/s with a burst of 2: the messages after the first ones cannot arrive faster than that.
        assert elapsed >= (120 - first - 2) / 40 * 0.95, (elapsed, first)
    finally:
        await sink.stop()


async def test_telemetry_reaches_redis(redis_server: EmbeddedRedis, redis_client) -> None:
    from mxgate.telemetry.fleet import read_window
    sink = await Sink().start()
    try:
        await publish(redis_server.url, [policy("ms", domains=["outlook.test"], route=[f"127.0.0.1:{sink.port}"])])
        started = int(time.time())
        async with running_gateway(redis_server.url) as a:
            await send_all([a.port], 30, concurrency=3)
            await sink.wait_for(30)
        totals = (await read_window(redis_client, ["ms"], start=started - 1, end=int(time.time()) + 2))["ms"]
        assert totals["delivered"] == 30
        assert totals["attempts"] == 30
        assert totals["deferred_connections"] == 0
    finally:
        await sink.stop()
