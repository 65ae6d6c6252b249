"""Suspensions that begin while a delivery waits, and the adaptive window right after a change.

Regression tests for defects a review found (each failed before its fix). Real parts only: a real
redis-server, a real gateway (ingress + delivery engine) and a real SMTP sink, or the adaptive loop
against a real Redis with only the clock faked.

1. A suspension that begins while a connection waits for its permit (the rate reflex's pause, or the
   fleet GCRA's rate wait) ends the wait: the connection closes with its job queued again, and nothing
   is sent to the suspended provider, not after the rate wait and not on shutdown.
2. A connection that gets its lease while the provider is suspended does not connect at all.
3. An idle connection closes when the provider is suspended (not at idleTimeoutSeconds).
4. The adaptive loop leaves out the seconds up to the last change even when no complete second after
   it exists yet (an empty window, no decision): with a 1 s evaluationWindow after every cut, and after
   a policy change shortly before a due tick, the old limits' refusals never cut the new limits again.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiosmtplib
import redis.asyncio as aioredis

from mxgate import keys
from mxgate.embedded_redis import EmbeddedRedis
from mxgate.limits.fleet import FleetLimiter
from mxgate.policy import ProviderPolicy, parse_policy
from mxgate_operator.adaptive import AdaptiveLoop
from mxgate_operator.publish import publish_policies
from support.gateway import policy, publish, running_gateway
from support.procs import wait_until
from support.sink import Sink, SinkHandler

RATE_REPLY = "451 4.7.28 Our system has detected an unusual rate of unsolicited mail: rate limited"


class RecordingHandler(SinkHandler):
    """A sink handler that notes when it answered the rate deferral (the gateway pauses from then on)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rate_answered = asyncio.Event()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        reply = await super().handle_RCPT(server, session, envelope, address, options)
        if reply == RATE_REPLY:
            self.rate_answered.set()
        return reply


async def _suspend_from_another_gateway(redis_client: aioredis.Redis, gw: Any, *, seconds: int,
                                       other_pod: FleetLimiter | None = None) -> None:
    """Another gateway suspends yahoo (the real suspend script, as a Suspend rule would); wait until ours knows."""
    other_pod = other_pod or FleetLimiter(redis_client)
    await other_pod.suspend("yahoo", seconds=seconds, reason="Suspend rule: 421 4.7.0 [TSS04] (another gateway)")
    await wait_until(lambda: gw.book.suspended_until_ms("yahoo") > time.time() * 1000, timeout=5,
                     what="the gateway to see the suspension", interval=0.02)


async def _paused_connection_then_suspended(redis_client: aioredis.Redis, sink: Sink, gw: Any) -> None:
    """Queue two jobs behind one connection; the first draws a rate deferral (the pod pauses 0.5 s); during
    that pause another gateway suspends the provider (the real suspend script, as a Suspend rule would)."""
    other_pod = FleetLimiter(redis_client)
    handler = sink.handler
    assert isinstance(handler, RecordingHandler)
    # Hold the only connection lease while both jobs are queued, so one connection gets both, in order.
    async with other_pod.connection("yahoo", limit=1):
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port) as smtp:
            await smtp.sendmail("app@example.com", ["slow@yahoo.test"], b"Subject: 1\r\n\r\nx\r\n")
            await asyncio.sleep(0.2)
            await smtp.sendmail("app@example.com", ["b@yahoo.test"], b"Subject: 2\r\n\r\nx\r\n")
        await asyncio.sleep(0.5)
    await asyncio.wait_for(handler.rate_answered.wait(), timeout=10)
    await asyncio.sleep(0.1)          # the gateway is now in its 0.5 s rate pause, waiting to send job 2
    await _suspend_from_another_gateway(redis_client, gw, seconds=60, other_pod=other_pod)
    await other_pod.close()


async def test_a_connection_paused_when_the_suspension_begins_does_not_sit_it_out_open(
        redis_server: EmbeddedRedis, redis_client: aioredis.Redis) -> None:
    # Was: _permit looked at the suspension only before _wait_while_paused, which then waited the suspension
    # out with the connection, its lease and the job held.
    sink = await Sink(RecordingHandler(rcpt_replies={"slow@yahoo.test": RATE_REPLY})).start()
    try:
        await publish(redis_server.url, [policy("yahoo", domains=["yahoo.test"], route=[f"127.0.0.1:{sink.port}"],
                                                maxConnections=1)])
        async with running_gateway(redis_server.url) as gw:
            await _paused_connection_then_suspended(redis_client, sink, gw)
            await asyncio.sleep(2.0)     # the pause ended 1.5 s ago; a suspended provider gets no open connection
            open_during_suspension = sink.open
            leases = await redis_client.zcount(keys.leases("yahoo"), int(time.time() * 1000), "+inf")
            assert sink.handler.messages == []
            assert await redis_client.zcard(keys.queue("yahoo")) == 2    # nothing lost either way
            assert (open_during_suspension, leases) == (0, 0), (
                f"{open_during_suspension} connection(s) and {leases} lease(s) held open through the suspension")
    finally:
        await sink.stop()


async def test_a_shutdown_during_a_suspension_sends_nothing_to_the_suspended_provider(
        redis_server: EmbeddedRedis, redis_client: aioredis.Redis) -> None:
    # Same start; then the gateway shuts down. Was: _wait_while_paused returned as soon as `stopping` was set
    # and _permit went on to take the rate permit and send, though the provider was suspended.
    sink = await Sink(RecordingHandler(rcpt_replies={"slow@yahoo.test": RATE_REPLY})).start()
    try:
        await publish(redis_server.url, [policy("yahoo", domains=["yahoo.test"], route=[f"127.0.0.1:{sink.port}"],
                                                maxConnections=1)])
        async with running_gateway(redis_server.url) as gw:
            await _paused_connection_then_suspended(redis_client, sink, gw)
            await asyncio.sleep(1.0)
            assert sink.handler.messages == []
        until = int(await redis_client.hget(keys.limits("yahoo"), "suspendedUntil"))
        assert until > time.time() * 1000 + 50_000          # still suspended for most of the minute
        sent = [m.rcpt_tos for m in sink.handler.messages]
        assert sent == [], f"sent to the suspended provider during shutdown: {sent}"
    finally:
        await sink.stop()


async def test_a_rate_wait_that_outlasts_the_start_of_a_suspension_sends_nothing(
        redis_server: EmbeddedRedis, redis_client: aioredis.Redis) -> None:
    # At 0.2 msg/s the second message waits 5 s for its permit (fleet.py _ask). Was: a suspension 1 s into
    # that wait did not stop it (now `abort` is asked after every rate wait).
    sink = await Sink().start()
    try:
        await publish(redis_server.url, [parse_policy({
            "apiVersion": "mxgate.io/v1alpha1", "kind": "ProviderPolicy", "metadata": {"name": "yahoo"},
            "spec": {"match": {"domains": ["yahoo.test"]}, "route": {"hosts": [f"127.0.0.1:{sink.port}"]},
                     "limits": {"messagesPerSecond": 0.2},
                     "adaptive": {"floor": {"messagesPerSecond": 0.1}}}}, source="test")])
        async with running_gateway(redis_server.url) as gw:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port) as smtp:
                await smtp.sendmail("app@example.com", ["a@yahoo.test"], b"Subject: 1\r\n\r\nx\r\n")
                await smtp.sendmail("app@example.com", ["b@yahoo.test"], b"Subject: 2\r\n\r\nx\r\n")
            await sink.wait_for(1)
            await asyncio.sleep(1.0)      # the second job is now in the rate wait (about 4 s left)
            await _suspend_from_another_gateway(redis_client, gw, seconds=60)
            await asyncio.sleep(5.5)      # past the end of the rate wait
            sent = [m.rcpt_tos for m in sink.handler.messages]
            assert len(sent) == 1, f"both sent, the second to the suspended provider after the rate wait: {sent}"
    finally:
        await sink.stop()


async def test_a_connection_granted_during_a_suspension_does_not_connect(
        redis_server: EmbeddedRedis, redis_client: aioredis.Redis) -> None:
    # Was: _use_connection looked before connecting only when the provider had a cap, so a suspension was
    # first seen after session.open: an empty connection (EHLO, QUIT) to a suspended provider.
    sink = await Sink().start()
    try:
        await publish(redis_server.url, [policy("yahoo", domains=["yahoo.test"], route=[f"127.0.0.1:{sink.port}"],
                                                maxConnections=1)])
        other_pod = FleetLimiter(redis_client)
        async with running_gateway(redis_server.url) as gw:
            async with other_pod.connection("yahoo", limit=1):       # another gateway's connection
                async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port) as smtp:
                    await smtp.sendmail("app@example.com", ["a@yahoo.test"], b"Subject: 1\r\n\r\nx\r\n")
                await asyncio.sleep(0.5)      # the job is claimed; its connection waits for the lease
                await _suspend_from_another_gateway(redis_client, gw, seconds=60, other_pod=other_pod)
            # The other gateway's connection closed (as a suspension makes it): the lease goes to our waiter.
            await asyncio.sleep(1.5)
            assert await redis_client.zcard(keys.queue("yahoo")) == 1
            assert sink.handler.messages == []
            assert sink.max_open == 0, "a connection was opened to the suspended provider (EHLO, then QUIT)"
        await other_pod.close()
    finally:
        await sink.stop()


async def test_an_idle_connection_closes_when_the_provider_is_suspended(
        redis_server: EmbeddedRedis, redis_client: aioredis.Redis) -> None:
    # Was: an idle connection waited idleTimeoutSeconds (up to 3600) for a job in _next_job, which did not
    # look at the suspension.
    sink = await Sink().start()
    try:
        await publish(redis_server.url, [policy("yahoo", domains=["yahoo.test"], route=[f"127.0.0.1:{sink.port}"],
                                                idleTimeoutSeconds=60)])
        async with running_gateway(redis_server.url) as gw:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port) as smtp:
                await smtp.sendmail("app@example.com", ["a@yahoo.test"], b"Subject: 1\r\n\r\nx\r\n")
            await sink.wait_for(1)
            await asyncio.sleep(0.5)
            assert sink.open == 1                      # kept for reuse, idle
            await _suspend_from_another_gateway(redis_client, gw, seconds=3600)
            await asyncio.sleep(2.0)
            assert sink.open == 0, "an idle connection stays open to the suspended provider until its idle timeout"
    finally:
        await sink.stop()


# -- the adaptive loop's window after a change -----------------------------------------------------------


def _with_window(p: ProviderPolicy, window: str) -> ProviderPolicy:
    adaptive = p.spec.adaptive.model_copy(update={"evaluation_window": window})
    return p.model_copy(update={"spec": p.spec.model_copy(update={"adaptive": adaptive})})


async def _refusals(redis_client: aioredis.Redis, provider: str, *seconds: int) -> None:
    # What the gateways flush for a second in which the provider refused a third of the connections.
    for second in seconds:
        await redis_client.hset(keys.telemetry(provider, second), mapping={"delivered": 30, "deferred_connections": 10})


async def test_with_a_one_second_window_the_seconds_before_a_cut_do_not_cut_again(
        redis_client: aioredis.Redis) -> None:
    p = _with_window(policy("ms", domains=["outlook.test"], maxConnections=20), "1s")
    await publish_policies(redis_client, [p])
    n = int(time.time())
    clock = [n + 0.5]
    loop = AdaptiveLoop(redis_client, lambda: {"ms": p}, clock=lambda: clock[0])
    await _refusals(redis_client, "ms", n - 2, n - 1, n, n + 1)     # all drawn while the limit was 20
    assert await loop.tick() == []                    # the first window collects evidence
    clock[0] = n + 1.5
    (cut,) = await loop.tick()                        # reads second n-1: 20 -> 14, changed at n+1.5
    assert cut.decision.state.connections == 14
    clock[0] = n + 2.5
    after = await loop.tick()                         # no complete second after the change exists yet
    live = int(await redis_client.hget(keys.limits("ms"), "maxConnections"))
    assert live == 14, (
        f"refusals of second {n} (limit 20, before the cut at {n + 1.5}) cut again: "
        f"{[(e.window.seconds, e.window.deferred_connections, e.decision.reason) for e in after]} -> {live}")


async def test_a_tick_just_after_a_policy_change_does_not_cut_on_the_old_limits_refusals(
        redis_client: aioredis.Redis) -> None:
    # The operator: a ProviderPolicy's ceiling lowered 20 -> 10 (put_in_force), the 5 s window due 0.3 s later.
    old = _with_window(policy("ms", domains=["outlook.test"], maxConnections=20), "5s")
    new = _with_window(policy("ms", domains=["outlook.test"], maxConnections=10), "5s")
    await publish_policies(redis_client, [old])
    n = int(time.time())
    clock = [n + 0.5]
    loop = AdaptiveLoop(redis_client, lambda: {"ms": old}, clock=lambda: clock[0])
    await loop.put_in_force(old)                      # the create handler: live limits at the ceiling, 20
    assert await loop.tick_one(old) is None           # first window: collect; due at n+5.5
    await _refusals(redis_client, "ms", *range(n, n + 5))                # drawn at 20 connections
    clock[0] = n + 5.2
    await publish_policies(redis_client, [new])
    placed = await loop.put_in_force(new)
    assert placed.state.connections == 10
    clock[0] = n + 5.5
    evaluation = await loop.tick_one(new)             # due; no complete second after the change exists yet
    live = int(await redis_client.hget(keys.limits("ms"), "maxConnections"))
    seen = (evaluation.window.seconds, evaluation.window.deferred_connections) if evaluation else None
    assert live == 10, (
        f"refusals seen at 20 connections, before the change at {n + 5.2}, cut the new ceiling: "
        f"(window seconds, connection deferrals) = {seen} -> {live}")

