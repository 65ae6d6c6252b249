"""The live policy table of one gateway process, read from Redis only.

A controller (``mxgate controller``, ``mxgate dev`` or the Kubernetes operator) writes the policies to
``mxg:{fleet}:policies`` and announces each change on ``mxg:events``. The book loads the table at start, reloads
on every announcement, after every (re)subscription, and also every ``refresh_interval`` seconds (15) in case an
announcement was missed on a live subscription (pub/sub is fire-and-forget): five commands, so an idle gateway
costs Redis a third of a command a second for it. The same subscription carries the "wake <provider>" messages
of ingress, which the book hands to the delivery engine.

It also keeps each provider's *effective* limits (``mxg:{p:<provider>}:limits``, written by the
controller as it tightens and relaxes them), reloading one provider's on a "limits <provider>" event and
all of them on every refresh, and forwards "free <provider>" (a connection lease came back) to the
fleet limiter.

The gateway is ready only once a controller has published (``mxg:{fleet}:control`` exists): without it the
gateway would not know any provider's limits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from pydantic import ValidationError

from mxgate import keys
from mxgate.duration import parse_duration
from mxgate.egress.outcome import CompiledRule, compile_rules
from mxgate.egress.retry import RetrySchedule
from mxgate.egress.timeouts import StageTimeouts
from mxgate.limits.effective import Effective
from mxgate.policy import (
    DEFAULT_POLICY_NAME,
    Limits,
    ProviderPolicy,
    ProviderTable,
    ResponseRule,
    Retry,
    Timeouts,
    Warmup,
)
from mxgate.redisconn import REDIS_ERRORS, RedisConnection

log = logging.getLogger("mxgate.policybook")

_BUILTIN_DEFAULT = Limits()


class PolicyBook:
    def __init__(self, connection: RedisConnection, *, refresh_interval: float = 15.0) -> None:
        self.connection = connection
        self.redis = connection.client
        self.refresh_interval = refresh_interval
        self.table = ProviderTable.of([])
        self.loaded = False
        self.revision = b""
        self.effective: dict[str, Effective] = {}
        self._on_wake: list[Callable[[str], None]] = []
        self._on_free: list[Callable[[str], None]] = []
        self._on_limits: list[Callable[[str], None]] = []
        self._on_want: list[Callable[[str], None]] = []
        self._on_policies: list[Callable[[], None]] = []
        self._schedules: dict[Retry, RetrySchedule] = {}
        self._timeouts: dict[Timeouts, StageTimeouts] = {}
        self._rules: dict[tuple[ResponseRule, ...], tuple[CompiledRule, ...]] = {}
        self._background: set[asyncio.Task[bool]] = set()

    # -- queries ---------------------------------------------------------------------------------------

    def policy(self, provider: str) -> ProviderPolicy | None:
        return self.table.policies.get(provider)

    def governing(self, provider: str) -> ProviderPolicy | None:
        """The provider's own policy, or for unmatched domains (``domain:<name>``) the ``default`` one."""
        return self.table.policies.get(provider) or self.table.policies.get(DEFAULT_POLICY_NAME)

    def ceiling(self, provider: str) -> Limits:
        """The policy's limits for ``provider``; unmatched domains get the ``default`` policy's, per domain."""
        policy = self.governing(provider)
        return policy.spec.limits if policy else _BUILTIN_DEFAULT

    def limits(self, provider: str) -> Limits:
        """Limits in force now: the ceiling with the controller's effective values applied."""
        ceiling = self.ceiling(provider)
        effective = self.effective.get(provider)
        return effective.applied_to(ceiling) if effective else ceiling

    def warmup(self, provider: str) -> Warmup | None:
        """The policy's warm-up ramp, if any (unmatched domains ramp each by the default policy's)."""
        policy = self.governing(provider)
        return policy.spec.warmup if policy else None

    def suspended_until_ms(self, provider: str) -> int:
        effective = self.effective.get(provider)
        return effective.suspended_until_ms if effective else 0

    def retry(self, provider: str) -> RetrySchedule:
        policy = self.governing(provider)
        spec = policy.spec.retry if policy else Retry()
        cached = self._schedules.get(spec)
        if cached is None:
            cached = self._schedules[spec] = RetrySchedule(
                initial_delay=parse_duration(spec.initial_delay), max_delay=parse_duration(spec.max_delay),
                throttled_delay=parse_duration(spec.throttled_delay),
                throttled_max_delay=parse_duration(spec.throttled_max_delay), max_age=parse_duration(spec.max_age))
        return cached

    def timeouts(self, provider: str) -> StageTimeouts:
        """The policy's outbound stage timeouts, in seconds (unmatched domains use the default policy's)."""
        policy = self.governing(provider)
        spec = policy.spec.timeouts if policy else Timeouts()
        cached = self._timeouts.get(spec)
        if cached is None:
            cached = self._timeouts[spec] = StageTimeouts(
                connect=parse_duration(spec.connect), greeting=parse_duration(spec.greeting),
                helo=parse_duration(spec.helo), mail=parse_duration(spec.mail), rcpt=parse_duration(spec.rcpt),
                data_init=parse_duration(spec.data_init), data_done=parse_duration(spec.data_done))
        return cached

    def rules(self, provider: str) -> tuple[CompiledRule, ...]:
        """The policy's ``spec.responses``, compiled (unmatched domains use the default policy's)."""
        policy = self.governing(provider)
        if policy is None or not policy.spec.responses:
            return ()
        key = tuple(policy.spec.responses)
        compiled = self._rules.get(key)
        if compiled is None:
            compiled = self._rules[key] = compile_rules(policy.spec.responses)
        return compiled

    def on_wake(self, callback: Callable[[str], None]) -> None:
        self._on_wake.append(callback)

    def on_free(self, callback: Callable[[str], None]) -> None:
        self._on_free.append(callback)

    def on_want(self, callback: Callable[[str], None]) -> None:
        self._on_want.append(callback)

    def on_limits(self, callback: Callable[[str], None]) -> None:
        """Called with the provider whose effective limits changed."""
        self._on_limits.append(callback)

    def on_policies(self, callback: Callable[[], None]) -> None:
        """Called after a new revision of the policy table was loaded."""
        self._on_policies.append(callback)

    # -- loading ---------------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Read the policy table and every policy's effective limits. False (old state kept) if Redis fails."""
        try:
            await self.connection.ensure()
            pipe = self.redis.pipeline(transaction=True)
            pipe.hgetall(keys.POLICIES)
            pipe.hget(keys.CONTROL, "rev")
            raw, rev = await pipe.execute()
        except REDIS_ERRORS as exc:
            log.warning("cannot read policies from Redis: %s", self.connection.target.redact(str(exc)))
            return False
        if rev is None:
            self.loaded = False
            return True
        changed = rev != self.revision or not self.loaded
        if changed:
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
        ok = await self.reload_limits(*self.table.policies)
        if changed:
            for callback in self._on_policies:
                callback()
        return ok

    async def reload_limits(self, *providers: str) -> bool:
        if not providers:
            return True
        try:
            pipe = self.redis.pipeline(transaction=False)
            for provider in providers:
                pipe.hgetall(keys.limits(provider))
            answers = await pipe.execute()
        except REDIS_ERRORS as exc:
            log.warning("cannot read effective limits from Redis: %s", self.connection.target.redact(str(exc)))
            return False
        for provider, raw in zip(providers, answers, strict=True):
            before = self.limits(provider)
            if raw:
                self.effective[provider] = Effective.from_redis(raw, self.ceiling(provider))
            else:
                self.effective.pop(provider, None)
            if self.limits(provider) != before:
                now = self.limits(provider)
                log.info("effective limits changed", extra={
                    "provider": provider, "max_connections": now.max_connections,
                    "messages_per_second": now.messages_per_second})
                for callback in self._on_limits:
                    callback(provider)
        return True

    async def run(self) -> None:
        """Subscribe to events and keep the table fresh until cancelled."""
        while True:
            pubsub = self.connection.pubsub()
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
            except REDIS_ERRORS as exc:
                log.warning("event subscription lost: %s; retrying", self.connection.target.redact(str(exc)))
                await self.connection.refresh()
                await asyncio.sleep(1.0)
            finally:
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # untyped before redis 8
                except REDIS_ERRORS:
                    pass

    def _dispatch(self, data: bytes) -> None:
        kind, _, arg = data.decode("utf-8", "replace").partition(" ")
        if kind == keys.EVENT_WAKE:
            for callback in self._on_wake:
                callback(arg)
        elif kind == keys.EVENT_FREE:
            for callback in self._on_free:
                callback(arg)
        elif kind == keys.EVENT_WANT:
            for callback in self._on_want:
                callback(arg)
        elif kind == keys.EVENT_LIMITS:
            self._spawn(self.reload_limits(arg))
        elif kind == keys.EVENT_POLICIES:
            self._spawn(self.reload())

    def _spawn(self, coro: Coroutine[Any, Any, bool]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)   # keep a reference until done (the loop only holds weak ones)
        task.add_done_callback(self._background.discard)
