"""The delivery engine: one dispatcher per provider, each with its own connections.

    DeliveryEngine
      ├── ProviderDispatcher "microsoft"   claims due jobs -> per-next-hop local queues -> connections
      ├── ProviderDispatcher "domain:example.org"
      └── ...

Every provider has its own dispatcher, queue and connection slots, so mail to a throttled provider
never holds up mail to another. A dispatcher claims only as many jobs as its connections can work
through soon (``prefetch``), so a backlog stays in Redis where every gateway pod can take from it,
and renews the visibility lease of the jobs it holds. Connections are reused for up to
``maxMessagesPerConnection`` messages and closed after ``idleTimeoutSeconds`` without work.

Dispatchers start when ingress announces new mail ("wake" events) or when the fleet's due index
(``keys.due``: provider -> when its earliest job is due) says a provider's mail is due: mail deferred
earlier, or jobs a crashed pod held. The engine's watcher reads the index's few shards and sleeps until
the earliest entry (at most ``WATCH_MAX_SLEEP``); nothing polls per provider. A dispatcher that finds nothing
due moves its provider's entry to the earliest job (or drops it: the queue is empty), looks once more, then
sleeps until that job is due or an event pokes it, and stops after ``DISPATCHER_IDLE_EXIT`` holding nothing.

No job stays claimed because something raised: routing a claimed job and sending one over a connection
each work on it in a turn (``claimed.ClaimedJobs._turn``), so an exception ends that job's attempt with a
classified outcome (see ``egress.claimed``). A connection lease that cannot be taken ends the attempt at
the next queued job the same way; the claim loop and the provider scan log and count an exception and go
on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from mxgate import keys
from mxgate.egress.claimed import ClaimedJobs, Stage, Turn, note_internal_error
from mxgate.egress.outcome import Verdict
from mxgate.egress.replies import DeferralClass, SmtpReply
from mxgate.egress.session import DeliveryReport, GreetingRefused, OutboundSession
from mxgate.errors import DeliveryError, DnsPermanentError, DnsTemporaryError, SpoolError
from mxgate.limits.fleet import CapReached, Lease, LimiterUnavailable, PermitAbandoned
from mxgate.policy import Limits, Warmup
from mxgate.policybook import PolicyBook
from mxgate.routing.router import NextHop, Router
from mxgate.spool.store import Job, Spool
from mxgate.tasks import cancel_and_wait
from mxgate.telemetry.logs import queue_id_var
from mxgate.telemetry.metrics import Metrics

log = logging.getLogger("mxgate.delivery")

DISPATCHER_IDLE_EXIT = 10.0   # seconds without work (and holding nothing) before a provider's dispatcher stops
WATCH_MAX_SLEEP = 10.0        # the due watcher looks at the index at least this often (entries brought forward)
IDLE_CLAIM_SLEEP = 30.0       # a dispatcher holding claimed jobs looks at its queue at least this often
CLAIM_STOP_WAIT = 16.0        # how long stop() lets a claim in flight come back (a pooled connection within
                              # POOL_TIMEOUT, 10 s, then the Redis socket timeout, 5 s)
CAP_RECHECK = 30.0            # a used-up hourly/daily cap is asked again after this long (a policy may have changed)


class Limiter(Protocol):
    def connection(self, provider: str, *, limit: int) -> contextlib.AbstractAsyncContextManager[Lease]: ...
    async def message(self, provider: str, *, rate: float | None, burst: int | None,
                      per_hour: int | None = None, per_day: int | None = None,
                      warmup: Warmup | None = None, abort: Callable[[], bool] | None = None) -> None: ...
    async def check_caps(self, provider: str, *, per_hour: int | None = None, per_day: int | None = None,
                         warmup: Warmup | None = None) -> None: ...
    def set_limit(self, provider: str, limit: int) -> None: ...
    def released(self, provider: str) -> None: ...
    def wanted(self, provider: str) -> None: ...
    async def suspend(self, provider: str, *, seconds: float, reason: str) -> None: ...
    async def connection_refused(self, lease: Lease, *, limit: int, floor: int, reply: str) -> int | None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineSettings:
    helo_name: str
    visibility_ms: int = 60_000          # claim lease; renewed every third of it while the job is held
    starttls: bool = True


class DeliveryEngine:
    def __init__(self, *, spool: Spool, book: PolicyBook, router: Router, limiter: Limiter,
                 settings: EngineSettings, metrics: Metrics) -> None:
        self.spool = spool
        self.book = book
        self.router = router
        self.limiter = limiter
        self.settings = settings
        self.metrics = metrics
        self.dispatchers: dict[str, ProviderDispatcher] = {}
        self.stopping = False
        self._watch_task: asyncio.Task[None] | None = None
        self._rng = random.Random()
        book.on_wake(self.wake)
        book.on_free(limiter.released)
        book.on_want(limiter.wanted)
        book.on_limits(self._limits_changed)
        book.on_policies(self._policies_changed)

    def start(self) -> None:
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_due())

    def wake(self, provider: str) -> None:
        if self.stopping:
            return
        dispatcher = self.dispatchers.get(provider)
        if dispatcher is None or dispatcher.done:
            dispatcher = ProviderDispatcher(self, provider)
            self.dispatchers[provider] = dispatcher
            dispatcher.start()
        else:
            dispatcher.poke()

    async def _watch_due(self) -> None:
        """Wake the dispatchers of providers the due index says are due; sleep until the next entry is (or
        ``WATCH_MAX_SLEEP``: entries brought forward by other pods are not announced)."""
        while not self.stopping:
            sleep_for = WATCH_MAX_SLEEP
            try:
                shards = await asyncio.gather(*(self.spool.due(n) for n in range(keys.DUE_SHARDS)))
                for now_ms, later_ms, providers in shards:
                    for provider in providers:
                        self.wake(provider)
                    if later_ms is not None:
                        sleep_for = min(sleep_for, max(0.01, (later_ms - now_ms) / 1000))
            except SpoolError as exc:
                log.warning("due index not read: %s", exc)
                sleep_for = 1.0
            except Exception as exc:  # the watcher restarts dispatchers: it must outlive any defect
                note_internal_error(self.metrics, Stage.SCAN, exc, provider="")
                sleep_for = 1.0
            await asyncio.sleep(sleep_for)

    async def stop(self, *, grace: float) -> None:
        """Stop claiming; let connections finish their current message; hand everything else back."""
        self.stopping = True
        if self._watch_task:
            await cancel_and_wait([self._watch_task])
        await asyncio.gather(*(d.stop(grace=grace) for d in self.dispatchers.values()), return_exceptions=True)

    def random(self) -> float:
        return self._rng.random()

    def _limits_changed(self, provider: str) -> None:
        limits = self.book.limits(provider)
        self.limiter.set_limit(provider, limits.max_connections)
        dispatcher = self.dispatchers.get(provider)
        if dispatcher is not None:
            dispatcher.poke()

    def _policies_changed(self) -> None:
        # A changed policy may raise a used-up cap (a warm-up step, messagesPerDay): ask again now.
        for dispatcher in self.dispatchers.values():
            dispatcher.capped_until = 0.0
            dispatcher.poke()


class ProviderDispatcher(ClaimedJobs):
    engine: DeliveryEngine

    def __init__(self, engine: DeliveryEngine, provider: str) -> None:
        super().__init__(engine, provider)
        self.connections: dict[tuple[NextHop, ...], set[asyncio.Task[None]]] = {}
        self.done = False
        self.connection_backoff = 0.0       # local reflex state, see _reflex
        self.no_new_connections_until = 0.0
        self.reflex_cap = 0
        self.rate_backoff = 0.0
        self.paused_until = 0.0
        self.capped_until = 0.0             # monotonic: the hourly/daily cap is used up until then (or a recheck)
        self.cap_resets_at = 0.0
        # Where this dispatcher last put its provider's due-index entry: 0 = not known (as an enqueue leaves
        # it: due now), None = dropped (the queue was empty), else epoch ms.
        self._index_at: int | None = 0
        self._work = asyncio.Condition()
        # Connections per next hops that are connecting or in a transaction: they cannot take another job
        # now, so queued jobs beyond the others get connections of their own (no head-of-line blocking).
        self._busy: dict[tuple[NextHop, ...], int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._waiting_for_lease: set[asyncio.Task[Any]] = set()

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._claim_loop()), loop.create_task(self._renew_loop()),
                       loop.create_task(self._ack_loop())]

    @property
    def limits(self) -> Limits:
        return self.engine.book.limits(self.provider)

    def open_connections(self) -> int:
        return sum(len(tasks) for tasks in self.connections.values())

    def queued(self) -> int:
        return sum(len(q) for q in self.pending.values())

    async def stop(self, *, grace: float) -> None:
        # Stop claiming, but let a claim already sent to Redis come back first: cancelled in flight, its jobs
        # would be leased in Redis yet held nowhere here, so nothing would hand them back and they would
        # sit out the whole visibility timeout. `stopping` ends the loop after its current round.
        self.poke()
        await asyncio.wait([self._tasks[0]], timeout=CLAIM_STOP_WAIT)
        await cancel_and_wait([self._tasks[0]])   # a claim stuck past that: the lease runs out instead
        # No connection yet, so nothing to finish: their jobs are handed back below.
        await cancel_and_wait(self._waiting_for_lease)
        conns = [t for tasks in self.connections.values() for t in tasks]
        async with self._work:
            self._work.notify_all()  # idle connections notice `stopping` and quit
        if conns:
            _, still = await asyncio.wait(conns, timeout=grace)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        await cancel_and_wait(self._tasks[1:])  # the renewal and ack loops: stopped before the last flush
        await self._flush_acks()  # first: a finished job must be deleted, not handed back
        handed_back = kept = 0
        # Queued for a connection, or interrupted mid-delivery: due again at once (a queued job is held too).
        unfinished = {job.job_id: job for queue in self.pending.values() for job in queue} | self.held
        for job in unfinished.values():
            if await self._release(job):
                handed_back += 1
            else:
                kept += 1
        for queue in self.pending.values():
            queue.clear()
        if handed_back or kept:
            log.info("handed back %d jobs to %s%s", handed_back, self.provider,
                     f"; {kept} could not be (Redis away): their leases run out" if kept else "",
                     extra={"provider": self.provider, "handed_back": handed_back, "not_handed_back": kept})
        self.done = True

    # -- claiming ------------------------------------------------------------------------------------

    def _prefetch(self) -> int:
        # Enough for every connection to have its next message ready, not more: the rest of a backlog
        # stays in Redis for other pods.
        return min(500, max(4, 2 * self.limits.max_connections))

    async def _claim_loop(self) -> None:
        engine = self.engine
        idle_since = time.monotonic()
        try:
            while not engine.stopping:
                try:
                    sleep_for, busy, may_exit = await self._claim_round()
                except SpoolError as exc:
                    log.warning("claim failed for %s: %s", self.provider, exc)
                    await asyncio.sleep(1.0)
                    continue
                except Exception as exc:  # a dispatcher that stops claiming strands its provider's mail
                    note_internal_error(engine.metrics, Stage.CLAIM, exc, provider=self.provider)
                    await asyncio.sleep(1.0)
                    continue
                if busy:
                    idle_since = time.monotonic()
                elif may_exit and not self.held and time.monotonic() - idle_since > DISPATCHER_IDLE_EXIT:
                    break
                if sleep_for <= 0:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poke.wait(), timeout=sleep_for)
                self._poke.clear()
        finally:
            if not engine.stopping:
                self.done = not self.held
                if self.done:
                    for task in self._tasks[1:]:
                        task.cancel()

    async def _claim_round(self) -> tuple[float, bool, bool]:
        """Claim what fits the window and route it: (seconds to wait before the next round, whether there was
        work (jobs claimed, or the window full), whether nothing is due later either, so the dispatcher may
        stop once idle long enough)."""
        engine = self.engine
        room = self._prefetch() - len(self.held)
        if self.suspended() or self.capped():
            room = 0  # suspended, or the day's (hour's) cap is used up: leave the mail in Redis
        if room <= 0:
            self._spawn_connections()
            return 1.0, True, False
        claim = await engine.spool.claim(self.provider, limit=min(room, 100),
                                         visibility_ms=engine.settings.visibility_ms)
        # All held before any is routed: a claim is never outside `held`, where renewal and stop() find it.
        self.held.update((job.job_id, job) for job in claim.jobs)
        for job in claim.jobs:
            await self._route(job)
        self._spawn_connections()
        if claim.jobs:
            self._index_at = 0   # jobs were due, so someone had brought the entry forward
            return 0.0, True, False
        if await self._settle_index(claim.next_due_ms, claim.now_ms):
            return 0.0, False, False   # look once more: a job written meanwhile may be due (see Spool.settle)
        if claim.next_due_ms is not None:
            wait = (claim.next_due_ms - claim.now_ms) / 1000
            return min(IDLE_CLAIM_SLEEP if self.held else DISPATCHER_IDLE_EXIT, max(0.001, wait)), False, True
        return DISPATCHER_IDLE_EXIT, False, True

    async def _settle_index(self, next_due_ms: int | None, now_ms: int) -> bool:
        """Move the provider's due-index entry to its earliest job (drop it when the queue is empty), when the
        entry would otherwise wake the fleet for nothing; whether it was moved (the caller then looks again)."""
        if next_due_ms is None:
            if self._index_at is None:
                return False
        elif (self._index_at is not None and self._index_at > now_ms) or next_due_ms <= now_ms + 1000:
            return False   # the entry is in the future already, or the job is due in a moment anyway
        await self.engine.spool.settle(self.provider, next_due_ms)
        self._index_at = next_due_ms
        return True

    async def _route(self, job: Job) -> None:
        """Put a newly claimed job where it belongs: the queue of its next hops here, another provider's
        spool queue, or finished (DNS says it cannot be delivered, or not now)."""
        engine = self.engine
        async with self._turn(job, Stage.ROUTE):
            try:
                provider = await engine.router.provider_for(job.domain)
                if provider != self.provider:
                    try:
                        await engine.spool.move(job, provider)
                    except SpoolError as exc:
                        log.warning("could not move job: %s", exc)  # its lease runs out; it is routed again
                        self.held.pop(job.job_id, None)
                        return
                    self.held.pop(job.job_id, None)
                    log.info("job moved to provider %s", provider, extra={"job": job.job_id})
                    engine.wake(provider)
                    return
                hops = tuple(await engine.router.next_hops(self.provider, job.domain))
            except (DnsTemporaryError, DnsPermanentError) as exc:
                reply = SmtpReply(exc.code, exc.enhanced, str(exc))
                await self._finish(job, DeliveryReport(dict.fromkeys(job.recipients, reply), ""))
                return
            self.pending.setdefault(hops, deque()).append(job)
        async with self._work:
            self._work.notify()

    def _may_pace(self, verdict: Verdict) -> bool:
        # A connection refused for too many connections is queued again here only while other connections of
        # this pod to the provider stay open to take it (the reflex lets none replace the refused one for a
        # while). With none, a new connection would be the very next thing: the job waits on the retry
        # ladder in Redis instead (one refused message must not become six connections in 20 ms).
        if verdict.deferral is DeferralClass.CONNECTIONS:
            return self.open_connections() > 1
        return True

    async def _requeued(self, hops: tuple[NextHop, ...]) -> None:
        async with self._work:
            self._work.notify()
        self.poke()

    def _spawn_connections(self) -> None:
        limit = self.limits.max_connections
        if time.monotonic() < self.no_new_connections_until:
            limit = min(limit, self.reflex_cap)   # local reflex: replace working connections, add none
        if self._must_not_send() or self.capped():
            return  # (stopping: stop() collected the connections to wait for, no new one may start)
        for hops, queue in self.pending.items():
            tasks = self.connections.setdefault(hops, set())
            # One connection per queued job at most, not counting those busy connecting or sending, which
            # cannot take it now (one hanging at the next hop must not hold the jobs behind it).
            while queue and len(tasks) - self._busy.get(hops, 0) < len(queue) and self.open_connections() < limit:
                task = asyncio.get_running_loop().create_task(self._connection(hops))
                tasks.add(task)
                task.add_done_callback(functools.partial(self._connection_ended, tasks))

    def _connection_ended(self, tasks: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        self.poke()

    # -- connections ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _busy_with(self, hops: tuple[NextHop, ...]) -> Iterator[None]:
        """A connection to ``hops`` is connecting or sending for a while: the jobs queued behind it get
        connections of their own if the limits allow."""
        self._busy[hops] = self._busy.get(hops, 0) + 1
        try:
            if self.pending.get(hops):
                self._spawn_connections()
            yield
        finally:
            self._busy[hops] -= 1
            if not self._busy[hops]:
                del self._busy[hops]

    async def _next_job(self, hops: tuple[NextHop, ...], *, wait: float, lease: Lease | None = None) -> Job | None:
        """The next queued job for ``hops``, waiting up to ``wait`` seconds; None when there is none, or
        when the connection must close (its lease was lost or is surplus to a lowered limit)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            if lease is not None and (lease.lost or lease.surplus):
                return None
            if self.suspended():
                return None   # a connection does not sit out a suspension open; its jobs stay queued here
            queue = self.pending.get(hops)
            if queue and not self.engine.stopping:
                if lease is not None:
                    lease.yielded = False   # asked to give way while idle, but there is work here again
                return queue.popleft()
            if lease is not None and lease.must_close:
                return None   # idle, and a connection elsewhere waits for a lease: give ours up
            remaining = deadline - loop.time()
            if remaining <= 0 or self.engine.stopping:
                return None
            async with self._work:
                with contextlib.suppress(TimeoutError):
                    # Short slices: a lease marked surplus while we idle must be noticed soon.
                    await asyncio.wait_for(self._work.wait_for(
                        lambda: bool(self.pending.get(hops)) or self.engine.stopping), timeout=min(remaining, 0.5))

    async def _connection(self, hops: tuple[NextHop, ...]) -> None:
        engine = self.engine
        started = time.monotonic()
        task = asyncio.current_task()
        assert task is not None
        self._waiting_for_lease.add(task)
        granted = False
        try:
            async with engine.limiter.connection(self.provider, limit=self.limits.max_connections) as lease:
                granted = True
                self._waiting_for_lease.discard(task)
                engine.metrics.lease_wait(self.provider, time.monotonic() - started)
                await self._use_connection(hops, lease)
        except LimiterUnavailable as exc:
            # Redis is away: the jobs stay queued here and are tried again (or released on shutdown).
            log.warning("%s", exc, extra={"provider": self.provider})
            await asyncio.sleep(1.0)
        except Exception as exc:
            queue = self.pending.get(hops)
            if granted or not queue:
                # Every job the connection took was placed by its turn: only giving the lease back failed
                # (it expires on its own), or there is no job left to end.
                note_internal_error(engine.metrics, Stage.LEASE, exc, provider=self.provider)
            else:
                # No lease, so no connection: the attempt at the next queued job ends here. A limiter that keeps
                # failing thus ends jobs (deferred, bounced after the max age) instead of holding them for ever.
                await self._end_in_error(queue.popleft(), Stage.LEASE, exc)
            await asyncio.sleep(1.0)  # a limiter that fails at once must not make this a busy loop
        finally:
            self._waiting_for_lease.discard(task)

    async def _use_connection(self, hops: tuple[NextHop, ...], lease: Lease) -> None:
        """Send queued jobs for ``hops`` over one connection, each in a turn of its own, until the queue stays
        empty for ``idleTimeoutSeconds`` or the connection must close."""
        session: OutboundSession | None = None
        try:
            job = await self._next_job(hops, wait=0)
            while job is not None:
                async with self._turn(job, Stage.PERMIT) as turn:
                    if session is None:
                        session = await self._open(turn, hops, lease)
                    more = session is not None and await self._send(turn, session, hops, lease)
                if turn.failed:
                    if session is not None:
                        session.close()  # its state after an exception is unknown: not reused, not even for QUIT
                    break
                if not more:
                    break
                lease.idle = True
                job = await self._next_job(hops, wait=self.limits.idle_timeout_seconds, lease=lease)
                lease.idle = False
        finally:
            if session is not None:
                await session.quit()

    async def _open(self, turn: Turn, hops: tuple[NextHop, ...], lease: Lease) -> OutboundSession | None:
        """Connect to the first of ``hops`` that greets us, for ``turn.job``, the connection's first job. None when
        no connection may or could be made: the job is then queued again, or finished with the reason."""
        engine = self.engine
        job = turn.job
        # A suspended provider, or one whose hourly or daily cap is used up (a warm-up day's volume sent),
        # must not see connections that send nothing: look before connecting. The permit itself is taken per
        # message, once connected, so a next hop that cannot be reached uses up none of the day's volume.
        if not await self._permit(hops, job, before_connecting=True):
            return None
        turn.stage = Stage.CONNECT
        session = OutboundSession(helo_name=engine.settings.helo_name, resolver=engine.router.resolver,
                                  timeouts=engine.book.timeouts(self.provider), starttls=engine.settings.starttls)
        try:
            with self._busy_with(hops):
                await session.open(hops)
        except GreetingRefused as exc:
            engine.metrics.connection_error(self.provider)
            verdict = await self._finish(job, DeliveryReport({r: exc.reply for r in job.recipients}, exc.hop.host),
                                         hops=hops)
            if verdict.deferral is DeferralClass.CONNECTIONS:
                await self._refused(lease, exc.reply)
            self._reflex(verdict.deferral)
            return None
        except DeliveryError as exc:
            engine.metrics.connection_error(self.provider)
            log.warning("%s", exc, extra={"provider": self.provider})
            reply = SmtpReply(451, "4.4.1", str(exc)[:400])
            await self._finish(job, DeliveryReport({r: reply for r in job.recipients}, ""))
            return None
        except BaseException:
            session.close()  # whatever it got as far as connecting
            raise
        return session

    async def _send(self, turn: Turn, session: OutboundSession, hops: tuple[NextHop, ...], lease: Lease) -> bool:
        """Deliver ``turn.job`` over ``session``; whether the connection may carry another message."""
        job = turn.job
        turn.stage = Stage.PERMIT
        if not await self._permit(hops, job):
            return False   # suspended, or the cap is used up: the job is queued again, the connection closes
        turn.stage = Stage.DELIVER
        with self._busy_with(hops):
            report = await self._attempt(session, job)
        turn.stage = Stage.RECORD
        verdict = await self._finish(job, report, hops=hops)
        self._reflex(verdict.deferral if verdict.deferred else None, delivered=bool(verdict.delivered))
        if verdict.deferral is DeferralClass.CONNECTIONS:
            # (The job may have failed instead, past its max age: the refusal is the report's reply.)
            await self._refused(lease, next(iter(report.replies.values())))
            return False  # the provider says we have too many connections: this one goes first
        if not session.usable or session.messages >= self.limits.max_messages_per_connection:
            return False
        return not lease.must_close  # surplus to a lowered limit, or the lease expired: close between messages

    async def _refused(self, lease: Lease, reply: SmtpReply) -> None:
        """The provider refused this connection for too many connections: tell the fleet how many it had open
        (``FleetLimiter.connection_refused``), which is the provider's limit, as the new live limit at once.
        Only for a provider the adaptive loop governs (its own policy, adaptive control on): the loop then
        probes upwards from there. Unmatched domains (``domain:*``) and fixed limits keep the local reflex."""
        policy = self.engine.book.policy(self.provider)
        if policy is None or not policy.spec.adaptive.enabled:
            return
        await self.engine.limiter.connection_refused(lease, limit=self.limits.max_connections,
                                                     floor=policy.spec.adaptive.floor.connections, reply=str(reply))

    # -- permits and caps ----------------------------------------------------------------------------

    def _has_cap(self) -> bool:
        limits = self.limits
        return bool(limits.messages_per_hour or limits.messages_per_day or self.engine.book.warmup(self.provider))

    def capped(self) -> bool:
        return time.monotonic() < self.capped_until

    async def _permit(self, hops: tuple[NextHop, ...], job: Job, *, before_connecting: bool = False) -> bool:
        """Wait for the fleet's permit to send ``job`` (``before_connecting``: only look whether the caps leave
        room). False when the provider's hourly or daily cap is used up: the job goes back to the front of
        its queue (still claimed, so it stays in Redis) and no connection opens or claim is made until the
        cap resets, the policies change, or ``CAP_RECHECK`` has passed. False too, with the job queued again,
        while the provider is suspended or the process is stopping, looked at again after every wait (the
        pod's rate pause, the fleet's rate wait): a connection must not sit out a suspension (often hours)
        open, nor send to a provider that was suspended while it waited."""
        if self.suspended() or self.engine.stopping:
            self.pending.setdefault(hops, deque()).appendleft(job)
            return False
        limiter, limits, warmup = self.engine.limiter, self.limits, self.engine.book.warmup(self.provider)
        try:
            if before_connecting:
                if self._has_cap():
                    await limiter.check_caps(self.provider, per_hour=limits.messages_per_hour,
                                             per_day=limits.messages_per_day, warmup=warmup)
            else:
                # Every wait ends by looking again: a suspension (or a shutdown) may have begun meanwhile.
                await self._wait_while_paused()
                if self.suspended() or self.engine.stopping:
                    self.pending.setdefault(hops, deque()).appendleft(job)
                    return False
                await limiter.message(self.provider, rate=limits.messages_per_second, burst=limits.burst,
                                      per_hour=limits.messages_per_hour, per_day=limits.messages_per_day,
                                      warmup=warmup, abort=self._must_not_send)
        except PermitAbandoned:
            self.pending.setdefault(hops, deque()).appendleft(job)
            return False
        except CapReached as exc:
            self.pending.setdefault(hops, deque()).appendleft(job)
            now = time.monotonic()
            if now >= self.cap_resets_at:
                log.info("cap reached: mail stays queued", extra={
                    "provider": self.provider, "cap": exc.cap, "resets_in": round(exc.retry_after)})
            self.cap_resets_at = now + exc.retry_after
            self.capped_until = now + min(exc.retry_after, CAP_RECHECK)
            return False
        except LimiterUnavailable:
            self.pending.setdefault(hops, deque()).appendleft(job)
            raise
        return True

    # -- local reflex --------------------------------------------------------------------------------

    def _reflex(self, deferral: DeferralClass | None, *, delivered: bool = False) -> None:
        """This pod's immediate reaction to a throttling reply, before the controller cuts fleet limits.

        A connection-limit reply: the refused connection closes, and for a while (1 s, doubling up to
        30 s) this pod keeps at most the connections that still work: it may replace them but not add
        more (and opens none at all when the refused one was its only one). A rate or reputation reply
        pauses this pod's sending to the provider (0.5 s, doubling up to 30 s).
        A burst of refusals doubles the backoff once, not once per refusal; a delivery resets it.
        """
        now = time.monotonic()
        if deferral is DeferralClass.CONNECTIONS:
            # The refused connection is still counted in open_connections(): keep the others, add none (not
            # even a replacement for the refused one when it was the only one) until the backoff ends.
            if now >= self.no_new_connections_until:
                self.connection_backoff = min(30.0, max(1.0, self.connection_backoff * 2))
                self.reflex_cap = max(0, self.open_connections() - 1)
            else:
                self.reflex_cap = max(0, min(self.reflex_cap, self.open_connections() - 1))
            self.no_new_connections_until = now + self.connection_backoff
            # Queued jobs may be waiting for the backoff to end: look again then.
            asyncio.get_running_loop().call_later(self.connection_backoff, self.poke)
            self.engine.metrics.reflex(self.provider, "connections")
        elif deferral in (DeferralClass.RATE, DeferralClass.REPUTATION):
            if now >= self.paused_until:
                self.rate_backoff = min(30.0, max(0.5, self.rate_backoff * 2))
            self.paused_until = now + self.rate_backoff
            self.engine.metrics.reflex(self.provider, "rate")
        elif delivered:
            self.connection_backoff = 0.0
            self.rate_backoff = 0.0

    def suspended(self) -> bool:
        """Whether the fleet is told to send nothing to this provider now (``suspendedUntil``)."""
        return self.engine.book.suspended_until_ms(self.provider) > time.time() * 1000

    def _must_not_send(self) -> bool:
        return self.suspended() or self.engine.stopping

    async def _wait_while_paused(self) -> None:
        """Sit out this pod's own rate reflex pause; a suspension or a shutdown ends the wait at once."""
        while True:
            wait = self.paused_until - time.monotonic()
            if wait <= 0 or self._must_not_send():
                return
            await asyncio.sleep(min(wait, 0.5))

    async def _attempt(self, session: OutboundSession, job: Job) -> DeliveryReport:
        token = queue_id_var.set(job.queue_id)
        started = time.monotonic()
        try:
            with self.engine.metrics.attempt_span(self.provider, job) as span:
                report = await session.deliver(job)
                span.set_attribute("mxgate.remote", report.remote)
            self.engine.metrics.attempt_done(self.provider, time.monotonic() - started)
            return report
        finally:
            queue_id_var.reset(token)

