"""`mxgate status` reads policies, effective limits, leases, queues and telemetry from Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from mxgate import keys
from mxgate.embedded_redis import EmbeddedRedis, free_port
from mxgate.limits.effective import Effective
from mxgate.status import collect, render_table
from mxgate_operator.publish import publish_effective_limits, publish_policies
from support.gateway import policy


async def test_status_shows_tightening_traffic_and_queue(redis_server: EmbeddedRedis, redis_client) -> None:
    await publish_policies(redis_client, [policy("microsoft", domains=["outlook.test"], maxConnections=20,
                                                 messagesPerSecond=200), policy("default", maxConnections=5)])
    await publish_effective_limits(redis_client, "microsoft", Effective(5, 50.0, reason="4.7.652 connections"))
    now = int(time.time())
    await redis_client.hset(keys.telemetry("microsoft", now), mapping={"attempts": 100, "delivered": 90,
                                                                      "deferred_connections": 10})
    await redis_client.zadd(keys.queue("microsoft"), {"a.0": 0, "b.0": 0})
    await redis_client.zadd(keys.leases("microsoft"), {"t1": now * 1000 + 30_000, "t2": now * 1000 - 1})
    await redis_client.sadd(keys.PROVIDERS, "domain:example.org")
    rows = {r.provider: r for r in await collect(redis_client)}
    ms = rows["microsoft"]
    assert (ms.connections, ms.ceiling_connections, ms.open_connections) == (5, 20, 1)  # the expired lease is not open
    assert (ms.rate, ms.ceiling_rate, ms.queued) == (50.0, 200.0, 2)
    assert (ms.delivered, ms.deferred, ms.deferral_percent, ms.state) == (90, 10, 10.0, "throttled")
    assert rows["domain:example.org"].ceiling_connections == 5        # the default policy's limits
    table = render_table(list(rows.values()))
    assert "microsoft" in table and "1/5/20" in table and "50/s / 200/s" in table and "throttled" in table

    out = subprocess.run([sys.executable, "-m", "mxgate.cli", "status", "--redis-url", redis_server.url, "--json"],
                         capture_output=True, text=True, check=True)
    parsed = {r["provider"]: r for r in json.loads(out.stdout)}
    assert parsed["microsoft"]["connections"] == 5 and parsed["microsoft"]["reason"] == "4.7.652 connections"
    text = subprocess.run([sys.executable, "-m", "mxgate.cli", "status", "--redis-url", redis_server.url],
                          capture_output=True, text=True, check=True).stdout
    assert text.splitlines()[0].startswith("PROVIDER")


def test_status_without_redis_is_a_clear_error() -> None:
    out = subprocess.run([sys.executable, "-m", "mxgate.cli", "status", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith("mxgate: error: cannot read status from Redis") and "Traceback" not in out.stderr
