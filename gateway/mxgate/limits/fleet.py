"""Fleet-wide limits in Redis: connection leases and the message rate, shared by every gateway pod.

Connection leases are a distributed semaphore per (provider, egress identity): a sorted set of lease
tokens scored by expiry. ``lease_acquire`` grants a lease when fewer than the limit are held *and* no
earlier waiter is queued ahead (a FIFO of waiting connection attempts across all pods, so no pod can
starve another by polling faster); otherwise the attempt joins the queue and sleeps until a release is
announced on ``mxg:events`` ("free <provider>"), or at the latest half the waiter staleness, when it
asks again and so proves it is still alive. A crashed pod's leases expire (default lease 30 s, renewed
every 10 s while the connection lives); its queued attempts go stale after 3 s.

The message rate is GCRA over Redis server time (``gcra.lua``), with optional hourly and daily caps;
the daily cap is ``limits.messagesPerDay`` or, during a warm-up, the ramp's volume for the day
(``warmup.py``), whichever is lower. A used-up cap is not waited out here: ``CapReached`` tells the
caller when the hour or day ends, so it can leave the mail queued instead of holding a connection open
for hours. Every script runs on Redis time, never a pod's clock, and touches one hash slot.

A lowered connection limit is applied at once: every pod renews its leases, surplus ones are marked
for closing (idle connections' first) and those connections close as soon as their current message is
done, then release their lease as usual. Until then the leases stay taken, so nobody opens a new
connection in the meantime: the fleet converges down to the new limit, never past the old one, and
never cuts a message in half.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources

from redis.commands.core import AsyncScript

from mxgate import keys
from mxgate.errors import MxgateError
from mxgate.limits.warmup import daily_cap, utc_date
from mxgate.policy import Warmup
from mxgate.redisconn import REDIS_ERRORS, RedisClient
from mxgate.tasks import cancel_and_wait

log = logging.getLogger("mxgate.limits")



class LimiterUnavailable(MxgateError):
    """Redis could not be asked for a lease or a rate permit: do not send now, try again later."""


class PermitAbandoned(MxgateError):
    """The caller's ``abort`` said, after a rate wait, that the message must not go now after all."""


class CapReached(MxgateError):
    """The provider's hourly or daily cap (``cap``: "hour" or "day") is used up for ``retry_after`` seconds."""

    def __init__(self, provider: str, *, cap: str, retry_after: float) -> None:
        super().__init__(f"{provider}: the {cap}'s cap is reached for {retry_after:.0f} s")
        self.cap = cap
        self.retry_after = retry_after


def _script(name: str) -> str:
    return resources.files("mxgate.limits").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def default_burst(rate: float) -> int:
    # A tenth of a second's worth: smooth enough that any 1 s window stays within ~10 % of the rate.
    return max(1, round(rate / 10))


@dataclass(eq=False, slots=True)
class Lease:
    """One held connection lease. ``lost`` turns true when Redis says it is no longer ours."""

    provider: str
    token: str
    idle: bool = False
    lost: bool = False
    surplus: bool = False
    yielded: bool = False   # idle while another connection waits for a lease: close and hand it over

    @property
    def must_close(self) -> bool:
        return self.lost or self.surplus or (self.yielded and self.idle)


class FleetLimiter:
    def __init__(self, redis: RedisClient, *, lease_ms: int = 30_000, waiter_stale_ms: int = 3_000,
                 identity: str = keys.DEFAULT_IDENTITY, clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.clock = clock      # the pod's clock: only a first guess of the hour and day (Redis decides)
        self.lease_ms = lease_ms
        self.waiter_stale_ms = waiter_stale_ms
        self.identity = identity
        self._acquire: AsyncScript = redis.register_script(_script("lease_acquire"))
        self._renew: AsyncScript = redis.register_script(_script("lease_renew"))
        self._release: AsyncScript = redis.register_script(_script("lease_release"))
        self._gcra: AsyncScript = redis.register_script(_script("gcra"))
        self._suspend: AsyncScript = redis.register_script(_script("suspend"))
        self._refused: AsyncScript = redis.register_script(_script("refused"))
        self._freed: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._pacers: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.held: dict[str, set[Lease]] = defaultdict(set)
        self.limits_now: dict[str, int] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._renew_now = asyncio.Event()

    # -- events --------------------------------------------------------------------------------------

    def released(self, provider: str) -> None:
        """A lease of ``provider`` was released somewhere in the fleet: waiters try again now."""
        self._freed[provider].set()

    def wanted(self, provider: str) -> None:
        """A connection somewhere in the fleet waits for a lease of ``provider``: one of this pod's idle
        connections to it (if any) closes, so its lease goes to mail that is waiting rather than sitting out
        ``idleTimeoutSeconds``. Every pod gives one up, so with P pods one waiter may free up to P leases
        (the others go to later waiters, or back to the pool); a connection that finds work again before
        it noticed keeps its lease (``Lease.yielded`` is cleared)."""
        for lease in self.held.get(provider, ()):
            if lease.idle and not lease.must_close:
                lease.yielded = True
                return

    # -- connection leases ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def connection(self, provider: str, *, limit: int) -> AsyncIterator[Lease]:
        lease = await self.acquire(provider, limit=limit)
        try:
            yield lease
        finally:
            await self.release(lease)

    async def acquire(self, provider: str, *, limit: int) -> Lease:
        token = secrets.token_hex(8)
        waiter = f"w{token}"
        self.limits_now[provider] = limit
        event = self._freed[provider]
        keys_ = [keys.leases(provider, self.identity), keys.waiters(provider, self.identity),
                 keys.waitbeat(provider, self.identity)]
        try:
            while True:
                event.clear()
                try:
                    reply = await self._acquire(keys=keys_, args=[token, self.limits_now[provider], self.lease_ms,
                                                                  waiter, self.waiter_stale_ms, keys.EVENTS,
                                                                  f"{keys.EVENT_WANT} {provider}"])
                except REDIS_ERRORS as exc:
                    raise LimiterUnavailable(f"cannot acquire a connection lease: {exc}") from exc
                if int(reply[0]) == 1:
                    lease = Lease(provider, token)
                    self.held[provider].add(lease)
                    self._ensure_renewer()
                    return lease
                wait = min(int(reply[1]) / 1000, self.waiter_stale_ms / 2000)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=wait)
        except BaseException:
            # Leave the queue at once so we do not hold up the attempts behind us until we go stale.
            with contextlib.suppress(*REDIS_ERRORS):
                pipe = self.redis.pipeline(transaction=True)
                pipe.zrem(keys_[1], waiter)
                pipe.zrem(keys_[2], waiter)
                await pipe.execute()
            raise

    async def release(self, lease: Lease) -> None:
        self.held[lease.provider].discard(lease)
        try:
            await self._release(keys=[keys.leases(lease.provider, self.identity),
                                      keys.closing(lease.provider, self.identity)],
                                args=[lease.token, keys.EVENTS, f"{keys.EVENT_FREE} {lease.provider}"])
        except REDIS_ERRORS as exc:
            log.warning("lease release failed (it expires by itself): %s", exc)

    def set_limit(self, provider: str, limit: int) -> None:
        """A new connection limit: waiters use it at once; surplus idle leases go at the next renewal."""
        old = self.limits_now.get(provider)
        self.limits_now[provider] = limit
        if old is not None and limit < old:
            self._ensure_renewer(now=True)
        elif old is not None and limit > old:
            self.released(provider)

    async def renew(self, provider: str) -> None:
        # Idle connections first: when the fleet is over a lowered limit, they are the ones to go.
        leases = sorted(self.held.get(provider, ()), key=lambda lease: not lease.idle)
        if not leases:
            return
        args: list[str | int] = [self.lease_ms, self.limits_now.get(provider, 1), *(lease.token for lease in leases)]
        try:
            statuses = await self._renew(keys=[keys.leases(provider, self.identity),
                                               keys.closing(provider, self.identity)], args=args)
        except REDIS_ERRORS as exc:
            log.warning("lease renewal failed: %s", exc)
            return
        for lease, status in zip(leases, statuses, strict=True):
            if int(status) == 0:
                lease.lost = True
            elif int(status) == -1:
                lease.surplus = True

    def _ensure_renewer(self, *, now: bool = False) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())
        if now:
            self._renew_now.set()

    async def _renew_loop(self) -> None:
        while any(self.held.values()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._renew_now.wait(), timeout=self.lease_ms / 3000)
            self._renew_now.clear()
            for provider in [p for p, leases in self.held.items() if leases]:
                await self.renew(provider)

    async def suspend(self, provider: str, *, seconds: float, reason: str) -> None:
        """Stop deliveries to ``provider`` fleet-wide for ``seconds`` (never shortens a longer suspension)."""
        try:
            await self._suspend(keys=[keys.limits(provider)], args=[
                int(seconds * 1000), reason[:300], keys.EVENTS, f"{keys.EVENT_LIMITS} {provider}"])
        except REDIS_ERRORS as exc:
            raise LimiterUnavailable(f"cannot suspend {provider}: {exc}") from exc

    async def connection_refused(self, lease: Lease, *, limit: int, floor: int, reply: str) -> int | None:
        """The connection holding ``lease`` was refused for too many connections: bring the fleet's live
        limit down to the number of other connections open now (``refused.lua``). The new limit, or None
        when it stays (as low already, or no other connection was open)."""
        provider = lease.provider
        try:
            cut, old, new = await self._refused(
                keys=[keys.leases(provider, self.identity), keys.limits(provider), keys.adjustments(provider)],
                args=[lease.token, limit, floor, reply[:200], keys.ADJUSTMENTS_KEPT, keys.EVENTS,
                      f"{keys.EVENT_LIMITS} {provider}"])
        except REDIS_ERRORS as exc:
            log.warning("the refused connection was not reported to the fleet: %s", exc)
            return None
        if not int(cut):
            return None
        log.info("limit lowered", extra={"provider": provider, "limit": "connections", "from": int(old),
                                         "to": int(new), "signal": "refused", "reply": reply[:200]})
        self.set_limit(provider, int(new))
        return int(new)

    async def close(self) -> None:
        """Stop renewing (the leases themselves are released by their connections as they close)."""
        if self._renewer is not None:
            await cancel_and_wait([self._renewer])

    # -- message rate --------------------------------------------------------------------------------

    async def message(self, provider: str, *, rate: float | None, burst: int | None,
                      per_hour: int | None = None, per_day: int | None = None, warmup: Warmup | None = None,
                      abort: Callable[[], bool] | None = None) -> None:
        """Wait until the fleet may send one more message to ``provider`` (the rate's short waits only), and
        count it against the hourly and daily caps.

        Raises ``CapReached`` when the hourly or daily cap is used up: the caller keeps the mail queued.
        ``abort`` is asked after every rate wait; if it says so (the provider was suspended meanwhile, the
        process is stopping), ``PermitAbandoned`` is raised and nothing is taken or counted.
        """
        if rate is None and not per_hour and not per_day and warmup is None:
            return
        if rate is None:
            await self._ask(provider, rate=rate, burst=burst, per_hour=per_hour, per_day=per_day, warmup=warmup,
                            peek=False, abort=abort)
            return
        # One asker per provider in this pod, the others queued here in order: when the rate is the limit,
        # every connection asking Redis and sleeping on its own made a herd (2 gateways, 40 connections,
        # 500 msg/s: 27 GCRA scripts per message sent); queued, each message costs about one.
        async with self._pacers[provider]:
            if abort is not None and abort():
                raise PermitAbandoned(f"{provider}: the message is not to be sent now")
            await self._ask(provider, rate=rate, burst=burst, per_hour=per_hour, per_day=per_day, warmup=warmup,
                            peek=False, abort=abort)

    async def check_caps(self, provider: str, *, per_hour: int | None = None, per_day: int | None = None,
                         warmup: Warmup | None = None) -> None:
        """Raise ``CapReached`` if the hourly or daily cap is used up; takes and counts nothing."""
        if per_hour or per_day or warmup is not None:
            await self._ask(provider, rate=None, burst=None, per_hour=per_hour, per_day=per_day, warmup=warmup,
                            peek=True)

    async def _ask(self, provider: str, *, rate: float | None, burst: int | None, per_hour: int | None,
                   per_day: int | None, warmup: Warmup | None, peek: bool,
                   abort: Callable[[], bool] | None = None) -> None:
        interval = 1000.0 / rate if rate else 0.0
        burst_n = burst if burst else default_burst(rate or 1.0)
        now = self.clock()
        hour, day = int(now // 3600), int(now // 86400)
        while True:
            # The cap is computed for the day the keys are named after; the script checks that day is
            # Redis's (see warmup.py: one clock decides the day for the whole fleet).
            day_cap = daily_cap(per_day, warmup, utc_date(day))
            try:
                reply = await self._gcra(
                    keys=[keys.gcra(provider, self.identity), keys.hour_count(provider, hour, self.identity),
                          keys.day_count(provider, day, self.identity)],
                    args=[f"{interval:.6f}", burst_n, per_hour or 0, day_cap or 0, hour if per_hour else "",
                          day if per_day or warmup is not None else "", "1" if peek else "0"])
            except REDIS_ERRORS as exc:
                raise LimiterUnavailable(f"cannot ask for a rate permit: {exc}") from exc
            status = int(reply[0])
            if status == 1:
                return
            if status == -1:  # a new hour or day began (on Redis's clock): use its numbers for the keys
                hour, day = int(reply[1]), int(reply[2])
                continue
            wait = int(reply[1]) / 1000
            kind = reply[2].decode() if isinstance(reply[2], bytes) else str(reply[2])
            if kind != "rate":
                raise CapReached(provider, cap=kind, retry_after=wait)
            await asyncio.sleep(wait)
            if abort is not None and abort():
                raise PermitAbandoned(f"{provider}: the message is not to be sent now")
