"""The live policy table of one gateway process, read from Redis only.

A controller (``mxgate controller``, ``mxgate dev`` or the Kubernetes operator) writes the policies to
``mxg:policies`` and announces each change on ``mxg:events``. The book loads the table at start, reloads
on every announcement, and also every ``refresh_interval`` seconds in case an announcement was missed
(pub/sub is fire-and-forget). The same subscription carries the "wake <provider>" messages of ingress,
which the book hands to the delivery engine.

The gateway is ready only once a controller has published (``mxg:control`` exists): without it the
gateway would not know any provider's limits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError

from mxgate import keys
from mxgate.egress.retry import RetrySchedule
from mxgate.policy import DEFAULT_POLICY_NAME, Limits, ProviderPolicy, ProviderTable, Retry, parse_duration

log = logging.getLogger("mxgate.policybook")

_BUILTIN_DEFAULT = Limits()


class PolicyBook:
    def __init__(self, redis: aioredis.Redis, *, refresh_interval: float = 5.0) -> None:
        self.redis = redis
        self.refresh_interval = refresh_interval
        self.table = ProviderTable.of([])
        self.loaded = False
        self.revision = b""
        self._on_wake: list[Callable[[str], None]] = []
        self._on_change: list[Callable[[], None]] = []
        self._schedules: dict[Retry, RetrySchedule] = {}

    # -- queries ---------------------------------------------------------------------------------------

    def policy(self, provider: str) -> ProviderPolicy | None:
        return self.table.policies.get(provider)

    def limits(self, provider: str) -> Limits:
        """Limits in force for ``provider``; unmatched domains get the ``default`` policy's, per domain."""
        policy = self.table.policies.get(provider) or self.table.policies.get(DEFAULT_POLICY_NAME)
        return policy.spec.limits if policy else _BUILTIN_DEFAULT

    def retry(self, provider: str) -> RetrySchedule:
        policy = self.table.policies.get(provider) or self.table.policies.get(DEFAULT_POLICY_NAME)
        spec = policy.spec.retry if policy else Retry()
        cached = self._schedules.get(spec)
        if cached is None:
            cached = self._schedules[spec] = RetrySchedule(
                initial_delay=parse_duration(spec.initial_delay), max_delay=parse_duration(spec.max_delay),
                throttled_delay=parse_duration(spec.throttled_delay),
                throttled_max_delay=parse_duration(spec.throttled_max_delay), max_age=parse_duration(spec.max_age))
        return cached

    def on_wake(self, callback: Callable[[str], None]) -> None:
        self._on_wake.append(callback)

    def on_change(self, callback: Callable[[], None]) -> None:
        self._on_change.append(callback)

    # -- loading ---------------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Read the table from Redis. Returns False (and keeps the old table) if Redis fails."""
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hgetall(keys.POLICIES)
            pipe.hget(keys.CONTROL, "rev")
            raw, rev = await pipe.execute()
        except (aioredis.RedisError, OSError) as exc:
            log.warning("cannot read policies from Redis: %s", exc)
            return False
        if rev is None:
            self.loaded = False
            return True
        if rev == self.revision and self.loaded:
            return True
        policies = []
        for name, doc in raw.items():
            try:
                policies.append(ProviderPolicy.from_json(doc))
            except ValidationError as exc:
                # A newer controller may write fields this gateway does not know: keep serving the rest.
                log.error("ignoring policy %s from Redis: %s", name.decode(), exc.errors()[0]["msg"])
        self.table = ProviderTable.of(policies)
        self.revision = rev
        self.loaded = True
        log.info("policies loaded", extra={"revision": rev.decode(), "policies": sorted(self.table.policies)})
        for callback in self._on_change:
            callback()
        return True

    async def run(self) -> None:
        """Subscribe to events and keep the table fresh until cancelled."""
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(keys.EVENTS)
                await self.reload()
                loop = asyncio.get_running_loop()
                next_refresh = loop.time() + self.refresh_interval
                while True:
                    timeout = max(0.0, next_refresh - loop.time())
                    message: dict[str, Any] | None = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=timeout)
                    if message is not None and message.get("type") == "message":
                        self._dispatch(message["data"])
                    if loop.time() >= next_refresh:
                        await self.reload()
                        next_refresh = loop.time() + self.refresh_interval
            except (aioredis.RedisError, OSError) as exc:
                log.warning("event subscription lost: %s; retrying", exc)
                self.loaded = self.loaded  # keep serving the last table while Redis is away
                await asyncio.sleep(1.0)
            finally:
                try:
                    await pubsub.aclose()
                except (aioredis.RedisError, OSError):
                    pass

    def _dispatch(self, data: bytes) -> None:
        kind, _, arg = data.decode("utf-8", "replace").partition(" ")
        if kind == keys.EVENT_WAKE:
            for callback in self._on_wake:
                callback(arg)
        elif kind == keys.EVENT_POLICIES:
            asyncio.get_running_loop().create_task(self.reload())
