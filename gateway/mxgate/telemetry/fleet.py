"""Per-provider delivery telemetry in Redis: the input of the adaptive controller and `mxgate status`.

Layout (one place, read by the operator and the CLI through ``read_window``):

    mxg:{p:<provider>}:tm:<epoch second>   HASH   counter -> count, summed over all gateway pods
                                                  TTL 15 minutes

Counters: ``attempts`` (delivery transactions), ``delivered`` and ``failed`` (recipients),
``deferred_connections``, ``deferred_rate``, ``deferred_reputation``, ``deferred_other``
(recipients, by the class of the reply), ``connection_errors`` (connections that failed or were refused
in the greeting), ``lease_wait_ms`` (time spent waiting for a connection lease).

Each pod adds its counts for past seconds in one pipelined write per second (at most), so Redis sees
one round trip per pod per second however much mail flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping

from mxgate import keys
from mxgate.redisconn import REDIS_ERRORS, RedisClient

log = logging.getLogger("mxgate.telemetry")

COUNTERS = ("attempts", "delivered", "failed", "deferred_connections", "deferred_rate", "deferred_reputation",
            "deferred_other", "connection_errors", "lease_wait_ms")
TTL_SECONDS = 900


class TelemetryRecorder:
    def __init__(self, redis: RedisClient | None = None, *, flush_interval: float = 1.0) -> None:
        self.redis = redis
        self.flush_interval = flush_interval
        # second -> provider -> counter -> count
        self._buckets: defaultdict[int, defaultdict[str, defaultdict[str, int]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(int)))
        self._task: asyncio.Task[None] | None = None

    def count(self, provider: str, counter: str, n: int = 1) -> None:
        self._buckets[int(time.time())][provider][counter] += n

    def start(self) -> None:
        if self.redis is not None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush(everything=True)

    async def flush(self, *, everything: bool = False) -> None:
        if self.redis is None:
            return
        now = int(time.time())
        seconds = [s for s in self._buckets if everything or s < now]
        if not seconds:
            return
        pipe = self.redis.pipeline(transaction=False)
        taken = {s: self._buckets.pop(s) for s in seconds}
        for second, providers in taken.items():
            for provider, counts in providers.items():
                key = keys.telemetry(provider, second)
                for counter, n in counts.items():
                    pipe.hincrby(key, counter, n)
                pipe.expire(key, TTL_SECONDS)
        try:
            await pipe.execute()
        except REDIS_ERRORS as exc:
            # Keep the counts for the next try; telemetry is never worth blocking delivery for.
            for second, providers in taken.items():
                for provider, counts in providers.items():
                    for counter, n in counts.items():
                        self._buckets[second][provider][counter] += n
            log.warning("telemetry flush failed: %s", exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush()


async def read_window(redis: RedisClient, providers: Iterable[str], *, start: int, end: int
                      ) -> dict[str, dict[str, int]]:
    """Counters per provider summed over the epoch seconds ``start`` (inclusive) to ``end`` (exclusive)."""
    providers = list(providers)
    pipe = redis.pipeline(transaction=False)
    for provider in providers:
        for second in range(start, end):
            pipe.hgetall(keys.telemetry(provider, second))
    answers = await pipe.execute()
    out: dict[str, dict[str, int]] = {}
    per = end - start
    for i, provider in enumerate(providers):
        totals = dict.fromkeys(COUNTERS, 0)
        for raw in answers[i * per:(i + 1) * per]:
            _add(totals, raw)
        out[provider] = totals
    return out


def _add(totals: dict[str, int], raw: Mapping[bytes, bytes]) -> None:
    for name, value in raw.items():
        key = name.decode()
        totals[key] = totals.get(key, 0) + int(value)
