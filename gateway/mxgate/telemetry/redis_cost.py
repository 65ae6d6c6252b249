"""The gateway's Redis client: retries on a dropped connection, and counts its round trips.

Every command or pipeline redis-py sends is one round trip; the count is exported as
``mxgate_redis_roundtrips_total`` and read by ``bench/redis_cost.py`` to report round trips per
delivered message (the target is at most 3, amortised).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Observation
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError

ROUND_TRIPS = [0]


def _observe(_: CallbackOptions) -> list[Observation]:
    return [Observation(ROUND_TRIPS[0])]


class _Counting:
    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        ROUND_TRIPS[0] += 1
        await super().send_packed_command(command, check_health)  # type: ignore[misc]


class CountingConnection(_Counting, Connection):
    pass


class CountingUnixConnection(_Counting, UnixDomainSocketConnection):
    pass


_registered = False


def connect_redis(url: str) -> aioredis.Redis:
    """A client whose round trips are counted; timeouts bound how long a dead Redis can stall us."""
    global _registered
    if not _registered:
        otel_metrics.get_meter("mxgate").create_observable_counter(
            "mxgate_redis_roundtrips", callbacks=[_observe],
            description="Requests sent to Redis (commands or pipelines)")
        _registered = True
    cls = CountingUnixConnection if url.startswith("unix://") else CountingConnection
    pool = aioredis.ConnectionPool.from_url(url, connection_class=cls, socket_timeout=5, socket_connect_timeout=2,
                                            health_check_interval=10)
    # A pooled connection that died with a restarted Redis fails its next command: retry it on a fresh
    # connection. Every mxgate script is safe to run twice (enqueue is idempotent per job id; ack, defer
    # and renew check tokens), so a command that did run before the error only costs a no-op.
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), 2)
    return aioredis.Redis(connection_pool=pool, retry=retry, retry_on_error=[ConnectionError])
