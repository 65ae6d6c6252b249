"""`mxgate status` reads policies, effective limits, leases, queues, telemetry and the adaptive loop's
adjustments from Redis; the adjustments here are made by the real AdaptiveLoop from real telemetry."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis

from mxgate import keys
from mxgate.embedded_redis import EmbeddedRedis, free_port
from mxgate.limits.effective import Effective
from mxgate.limits.fleet import FleetLimiter
from mxgate.policy import ProviderPolicy, parse_policy
from mxgate.status import collect, render_table
from mxgate_operator.adaptive import AdaptiveLoop
from mxgate_operator.publish import publish_effective_limits, publish_policies
from support.gateway import policy


def status_cli(redis_url: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mxgate.cli", "status", "--redis-url", redis_url, *args],
                          capture_output=True, text=True, check=True, timeout=timeout)


async def test_status_shows_tightening_traffic_and_queue(redis_server: EmbeddedRedis, redis_client) -> None:
    await publish_policies(redis_client, [policy("microsoft", domains=["outlook.test"], maxConnections=20,
                                                 messagesPerSecond=200), policy("default", maxConnections=5)])
    await publish_effective_limits(redis_client, "microsoft", Effective(5, 50.0, reason="4.7.652 connections"))
    now = int(time.time())
    await redis_client.hset(keys.telemetry("microsoft", now), mapping={"attempts": 100, "delivered": 90,
                                                                      "deferred_connections": 10})
    await redis_client.zadd(keys.queue("microsoft"), {"a.0": 0, "b.0": 0})
    await redis_client.zadd(keys.leases("microsoft"), {"t1": now * 1000 + 30_000, "t2": now * 1000 - 1})
    await redis_client.zadd(keys.due("domain:example.org"), {"domain:example.org": 0})
    rows = {r.provider: r for r in await collect(redis_client)}
    ms = rows["microsoft"]
    assert (ms.connections, ms.ceiling_connections, ms.open_connections) == (5, 20, 1)  # the expired lease is not open
    assert (ms.rate, ms.ceiling_rate, ms.queued) == (50.0, 200.0, 2)
    assert (ms.delivered, ms.deferred, ms.deferral_percent, ms.state) == (90, 10, 10.0, "throttled")
    assert ms.adjustments == [] and ms.suspended_until is None and ms.day_cap is None
    assert rows["domain:example.org"].ceiling_connections == 5        # the default policy's limits
    table = render_table(list(rows.values()))
    assert "microsoft" in table and "1/5/20" in table and "50/200" in table and "throttled" in table

    parsed = {r["provider"]: r for r in json.loads(status_cli(redis_server.url, "--json").stdout)}
    assert parsed["microsoft"]["connections"] == 5 and parsed["microsoft"]["reason"] == "4.7.652 connections"
    assert status_cli(redis_server.url).stdout.splitlines()[0].startswith("PROVIDER")


def adaptive(name: str, **limits: object) -> ProviderPolicy:
    base = policy(name, domains=[f"{name}.test"], **limits)
    tuned = base.spec.adaptive.model_copy(update={"evaluation_window": "1s"})
    return base.model_copy(update={"spec": base.spec.model_copy(update={"adaptive": tuned})})


async def test_status_follows_the_adaptive_loops_tightening(redis_server: EmbeddedRedis, redis_client) -> None:
    ms, yahoo = adaptive("microsoft", maxConnections=20, messagesPerSecond=200), adaptive("yahoo", maxConnections=10)
    await publish_policies(redis_client, [ms, yahoo])
    now = time.time()
    for second in range(int(now) - 4, int(now) - 1):     # connection refusals, as the gateways report them
        await redis_client.hset(keys.telemetry("microsoft", second), mapping={"delivered": 30,
                                                                              "deferred_connections": 10})
    loop = AdaptiveLoop(redis_client, lambda: {"microsoft": ms, "yahoo": yahoo}, clock=lambda: now)
    await loop.evaluate("microsoft", ms, now=now, seconds=3)

    row = {r.provider: r for r in await collect(redis_client)}["microsoft"]
    assert (row.connections, row.ceiling_connections, row.state) == (14, 20, "throttled")
    first = row.adjustments[0]
    assert (first.signal, first.limit, first.old, first.new) == ("connections", "connections", 20, 14)
    assert "deferred for too many connections" in first.reason
    assert "conns 20→14 (connections) 3s ago" in render_table([row], now=now + 3)

    # The next window is as bad: the table moves on, the log under it lists both, newest first.
    await loop.evaluate("microsoft", ms, now=now + 1, seconds=3)
    rows = await collect(redis_client)
    table = render_table(rows, now=now + 4, log=10)
    assert "conns 14→9 (connections) 3s ago" in table
    log = table.split("RECENT ADJUSTMENTS (newest first)\n")[1].splitlines()
    assert [line.split()[3] for line in log] == ["14→9", "20→14"] and all("microsoft" in line for line in log)
    assert all(len(line) <= 120 for line in table.splitlines())

    parsed = {r["provider"]: r for r in json.loads(status_cli(redis_server.url, "--json").stdout)}
    assert [(a["old"], a["new"], a["signal"]) for a in parsed["microsoft"]["adjustments"]] == [
        (14, 9, "connections"), (20, 14, "connections")]
    assert parsed["yahoo"]["adjustments"] == []

    # --watch redraws until stopped, the log of adjustments under the table.
    try:
        status_cli(redis_server.url, "--watch", "0.2", timeout=3)
    except subprocess.TimeoutExpired as stopped:
        watched = stopped.stdout.decode() if isinstance(stopped.stdout, bytes) else stopped.stdout or ""
    assert watched.count("RECENT ADJUSTMENTS") >= 2 and "conns 14→9 (connections)" in watched


async def test_status_shows_a_suspension_until_when_and_why(redis_server: EmbeddedRedis, redis_client) -> None:
    await publish_policies(redis_client, [policy("yahoo", domains=["yahoo.test"], maxConnections=10)])
    limiter = FleetLimiter(aioredis.Redis.from_url(redis_server.url))
    try:   # what a gateway does when a Suspend response rule matches
        await limiter.suspend("yahoo", seconds=600, reason="Suspend rule: 421 4.7.0 [TSS04] Messages temporarily "
                                                           "deferred due to unexpected volume or user complaints")
    finally:
        await limiter.redis.aclose()
    await redis_client.hset(keys.limits("yahoo"), "reason", "calm for 3 windows")   # the controller's next window
    (row,) = await collect(redis_client)
    assert row.state == "suspended" and row.suspended_until is not None
    assert 590 < row.suspended_until - time.time() <= 600
    until = datetime.fromtimestamp(row.suspended_until, UTC).strftime("%H:%M:%SZ")
    lines = render_table([row], now=row.suspended_until - 300).splitlines()
    assert lines[2].split()[-2:] == ["suspended", "-"]
    assert lines[3].startswith(f"yahoo suspended until {until} (5m00s more): Suspend rule: 421 4.7.0 [TSS04]")
    assert all(len(line) <= 120 for line in lines)


async def test_status_shows_a_warmup_day_used_up(redis_server: EmbeddedRedis, redis_client) -> None:
    seconds, _ = await redis_client.time()
    today = datetime.fromtimestamp(seconds, UTC).date()
    warm = parse_policy({"apiVersion": "mxgate.io/v1alpha1", "kind": "ProviderPolicy", "metadata": {"name": "warm"},
                         "spec": {"match": {"domains": ["warm.test"]}, "limits": {"messagesPerDay": 1000},
                                  "warmup": {"startDate": (today - timedelta(days=2)).isoformat(), "schedule": [
                                      {"day": 1, "messagesPerDay": 2}, {"day": 3, "messagesPerDay": 5},
                                      {"day": 5, "messagesPerDay": 5000}]}}}, source="test")
    await publish_policies(redis_client, [warm])
    await redis_client.set(keys.day_count("warm", seconds // 86400), 5)
    await redis_client.zadd(keys.queue("warm"), {f"j{i}.0": 0 for i in range(7)})
    (row,) = await collect(redis_client)
    assert (row.day_cap, row.sent_today, row.state, row.queued) == (5, 5, "capped", 7)
    assert "capped 5/day" in render_table([row])


def test_status_without_redis_is_a_clear_error() -> None:
    out = subprocess.run([sys.executable, "-m", "mxgate.cli", "status", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith("mxgate: error: cannot read status from Redis") and "Traceback" not in out.stderr
