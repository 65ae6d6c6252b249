"""Per-process connection and rate limits.

This is the limiter of a single gateway process: it keeps one process within a provider's
``maxConnections`` and ``messagesPerSecond``. The fleet-wide limiter (connection leases and GCRA in
Redis) implements the same two methods, so the delivery engine does not care which one it has.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class LocalLimiter:
    def __init__(self, *, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock
        self._open: defaultdict[str, int] = defaultdict(int)
        self._released: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._tat: dict[str, float] = {}  # theoretical arrival time per provider (GCRA, local)

    def now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    def open_connections(self, provider: str) -> int:
        return self._open[provider]

    @asynccontextmanager
    async def connection(self, provider: str, *, limit: int) -> AsyncIterator[None]:
        """Hold one of ``limit`` connection slots for the life of a connection."""
        while self._open[provider] >= limit:
            event = self._released[provider]
            event.clear()
            await event.wait()
        self._open[provider] += 1
        try:
            yield
        finally:
            self._open[provider] -= 1
            self._released[provider].set()

    async def message(self, provider: str, *, rate: float | None, burst: int | None) -> None:
        """Wait until one more message may be sent at ``rate`` per second (GCRA with ``burst``)."""
        if rate is None:
            return
        interval = 1.0 / rate
        tolerance = interval * (burst if burst is not None else max(1, round(rate)) - 1)
        while True:
            now = self.now()
            tat = max(self._tat.get(provider, now), now)
            wait = tat - tolerance - now
            if wait <= 0:
                self._tat[provider] = tat + interval
                return
            await asyncio.sleep(wait)
