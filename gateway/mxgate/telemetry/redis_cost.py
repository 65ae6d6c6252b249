"""Counting Redis round trips: the cost of a delivered message in Redis requests.

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
            "mxgate_redis_roundtrips", callbacks=[_observe], description="Requests sent to Redis (commands or pipelines)")
        _registered = True
    cls = CountingUnixConnection if url.startswith("unix://") else CountingConnection
    pool = aioredis.ConnectionPool.from_url(url, connection_class=cls, socket_timeout=5, socket_connect_timeout=2,
                                            health_check_interval=10)
    return aioredis.Redis(connection_pool=pool)
