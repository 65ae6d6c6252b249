"""Mail deferred for throttling goes again as soon as the pacer lets it, not after a backoff (issue 11):
the throttling was ours to respect, not the message's fault. After ``PACED_RETRIES`` such attempts at one
claim, or when anything else happened in the attempt, the spool's retry ladder takes over as before."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from mxgate import keys
from mxgate.egress.claimed import PACED_RETRIES
from mxgate.embedded_redis import EmbeddedRedis
from mxgate.policy import parse_policy
from support.gateway import publish, running_gateway
from support.procs import eventually
from support.sink import Sink, SinkHandler

RATE_LIMITED = "451 4.7.650 The mail server [127.0.0.1] has been temporarily rate limited due to IP reputation."


@dataclass
class RefusesFirst(SinkHandler):
    """Answers RCPT for ``refusals`` times with ``reply``, then accepts."""

    refusals: int = 0
    reply: str = RATE_LIMITED
    refused: int = 0

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        if self.refused < self.refusals:
            self.refused += 1
            return self.reply
        return await super().handle_RCPT(server, session, envelope, address, options)


def ms_policy(port: int) -> object:
    # A throttled retry from Redis would wait an hour: only a paced retry delivers within the test.
    return parse_policy({"apiVersion": "mxgate.io/v1alpha1", "kind": "ProviderPolicy", "metadata": {"name": "ms"},
                         "spec": {"match": {"domains": ["outlook.test"]}, "route": {"hosts": [f"127.0.0.1:{port}"]},
                                  "retry": {"throttledDelay": "1h", "throttledMaxDelay": "2h"}}}, source="test:ms")


async def deferred_in_redis(redis_client: Any) -> bool:
    """Whether the job is back in Redis after a deferral: attempts 1 (the queue also holds claimed jobs, so
    being in it says nothing)."""
    ids = await redis_client.zrange(keys.queue("ms"), 0, -1)
    return bool(ids) and await redis_client.hget(keys.job("ms", ids[0].decode()), "attempts") == b"1"


async def send(port: int, rcpts: list[str]) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as smtp:
        await smtp.sendmail("app@example.com", rcpts, b"Subject: paced\r\nMessage-ID: <p@example.com>\r\n\r\nx\r\n")


async def test_a_rate_limited_message_goes_again_at_the_pacers_pace(redis_server: EmbeddedRedis,
                                                                    redis_client) -> None:
    handler = RefusesFirst(refusals=3)
    sink = await Sink(handler).start()
    try:
        await publish(redis_server.url, [ms_policy(sink.port)])
        async with running_gateway(redis_server.url) as gw:
            await send(gw.port, ["u@outlook.test"])
            await sink.wait_for(1, timeout=30)
        assert handler.refused == 3 and len(handler.messages) == 1
        assert await redis_client.zcard(keys.queue("ms")) == 0
    finally:
        await sink.stop()


async def test_past_the_paced_retries_the_retry_ladder_takes_over(redis_server: EmbeddedRedis, redis_client) -> None:
    handler = RefusesFirst(refusals=1000)
    sink = await Sink(handler).start()
    try:
        await publish(redis_server.url, [ms_policy(sink.port)])
        async with running_gateway(redis_server.url) as gw:
            await send(gw.port, ["u@outlook.test"])

            await eventually(lambda: deferred_in_redis(redis_client), timeout=60, what="the job deferred in Redis")
            assert handler.refused == 1 + PACED_RETRIES      # the attempt, then the paced retries
            job_id = (await redis_client.zrange(keys.queue("ms"), 0, -1))[0].decode()
            job = await redis_client.hgetall(keys.job("ms", job_id))
            assert job[b"attempts"] == b"1" and job[b"last"].startswith(b"451 4.7.650")
            due_ms = int(await redis_client.zscore(keys.queue("ms"), job_id))
            now_s, _ = await redis_client.time()
            assert due_ms / 1000 - now_s > 2400   # the throttled ladder's hour (less jitter), from Redis
    finally:
        await sink.stop()


async def test_a_partly_delivered_message_is_deferred_in_redis(redis_server: EmbeddedRedis, redis_client) -> None:
    # The first recipient is refused, the second accepted: the job in Redis must now name only the first,
    # so it is deferred there (the ladder), never queued again here with both.
    handler = RefusesFirst(refusals=1)
    sink = await Sink(handler).start()
    try:
        await publish(redis_server.url, [ms_policy(sink.port)])
        async with running_gateway(redis_server.url) as gw:
            await send(gw.port, ["a@outlook.test", "b@outlook.test"])
            await sink.wait_for(1, timeout=30)

            await eventually(lambda: deferred_in_redis(redis_client), timeout=30,
                             what="the refused recipient deferred in Redis")
        assert handler.messages[0].rcpt_tos == ["b@outlook.test"] and handler.refused == 1
    finally:
        await sink.stop()


async def test_a_refused_only_connection_is_not_replaced_at_once(redis_server: EmbeddedRedis, redis_client) -> None:
    # A next hop refusing every connection for too many connections: the pod's only connection is refused.
    # No connection of this pod is left to take the job, so it is not queued again here (which reconnected
    # six times in 20 ms), and the reflex opens no replacement during its backoff: one connection, then the
    # retry ladder in Redis.
    sink = await Sink(greeting_reply="421 4.7.652 The mail server [127.0.0.1] has exceeded the maximum number "
                                     "of connections.").start()
    try:
        await publish(redis_server.url, [parse_policy({
            "apiVersion": "mxgate.io/v1alpha1", "kind": "ProviderPolicy", "metadata": {"name": "ms"},
            "spec": {"match": {"domains": ["outlook.test"]}, "route": {"hosts": [f"127.0.0.1:{sink.port}"]}}},
            source="test:ms")])
        async with running_gateway(redis_server.url) as gw:
            await send(gw.port, ["u@outlook.test"])

            await eventually(lambda: deferred_in_redis(redis_client), timeout=20, what="the job deferred in Redis")
            await asyncio.sleep(1.0)
            assert sink.connections == 1
    finally:
        await sink.stop()
