"""A provider dispatcher's claimed jobs: where each one is, and how an attempt at one ends.

A job the dispatcher claimed is *held* (``held``, its claim lease renewed) until it is acknowledged,
deferred, moved or handed back. While held it is in exactly one place: a queue for its next hops
(``pending``), *taken* by a step that works on it (routing it, a connection sending it), or in the ack
batch (``acks``).

No job stays claimed because something raised. A step works on a job inside a *turn*
(``ClaimedJobs._turn``): when the step raises while the job is still taken, the attempt ends as an
internal error, a deferral with ``451 4.3.0 internal error: <type>`` on the ordinary ladder (attempts + 1),
which fails with a notification like any deferral once the job outlives the max age. So every outcome
is one of::

    delivered / failed          2xx / 5xx (or a deferral past the max age): acknowledged; a DSN for failures
    deferred                    4xx from the next hop, or an internal error: rescheduled, attempts + 1
    queued again / handed back  a suspension, a used-up cap, Redis away, shutdown: not an attempt
    claim let go                the spool could not be written: the lease runs out, attempted again

and around the verdict: a retry schedule that raises falls back to ``outcome.judge_plainly`` (delivered
mail is still acknowledged); a notification that cannot be built (a sender no DSN can be addressed to)
is logged and the job finished anyway; the renewal and ack loops log and count an exception and go on.
Every such case is logged with the job's queue id and counted in ``mxgate_internal_errors_total`` by
``Stage``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from mxgate.egress.dsn import RecipientFailure, build_dsn, should_notify
from mxgate.egress.outcome import EXPIRED_STATUS, Verdict, judge, judge_plainly
from mxgate.egress.replies import DeferralClass, SmtpReply
from mxgate.egress.retry import THROTTLED
from mxgate.egress.session import DeliveryReport
from mxgate.errors import SpoolError
from mxgate.limits.fleet import LimiterUnavailable
from mxgate.policybook import PolicyBook
from mxgate.routing.router import NextHop, Router
from mxgate.spool.store import Job, NewJob, Spool
from mxgate.telemetry.logs import queue_id_var
from mxgate.telemetry.metrics import Metrics

log = logging.getLogger("mxgate.delivery")

ACK_BATCH = 64                # acks are batched: one round trip per batch instead of per message
ACK_DELAY = 0.005             # ... and flushed this long after the first of a batch (seconds)
ACK_RETRY_PAUSES = (0.2, 1.0, 3.0, None)   # seconds between tries of a failed ack (None: the last)
PACED_RETRIES = 5             # throttled attempts at one claimed job queued again here before it goes back to Redis


class Stage(enum.StrEnum):
    """Where an internal error happened: the ``stage`` label of ``mxgate_internal_errors_total``. A fixed set,
    so the metric has one series per stage however many messages fail."""

    ROUTE = "route"        # classifying a claimed job and finding its next hops
    LEASE = "lease"        # taking (or giving back) the fleet's connection lease
    PERMIT = "permit"      # the fleet's caps and rate permit for one message
    CONNECT = "connect"    # opening the connection to a next hop
    DELIVER = "deliver"    # the MAIL / RCPT / DATA transaction
    JUDGE = "judge"        # the verdict over the replies (the provider's retry schedule and rules)
    NOTIFY = "notify"      # building or queueing the delivery status notification
    RECORD = "record"      # writing the outcome: defer or acknowledge, suspend the provider
    CLAIM = "claim"        # one round of a dispatcher's claim loop
    RENEW = "renew"        # renewing the claim leases of held jobs
    ACK = "ack"            # flushing a batch of acknowledgements
    SCAN = "scan"          # the engine's periodic scan of the provider index


def internal_error_reply(exc: BaseException) -> SmtpReply:
    """The reply an attempt that raised ``exc`` ends with: temporary (ours, not the provider's), naming only
    the exception's type, since its text may quote the envelope."""
    return SmtpReply(451, "4.3.0", f"internal error: {type(exc).__name__}")


def note_internal_error(metrics: Metrics, stage: Stage, exc: BaseException, *, provider: str,
                        job: Job | None = None, batch: Sequence[Job] = ()) -> None:
    """Log ``exc`` (with its traceback and the queue id of ``job``, or those of a ``batch`` of jobs) and count
    it under ``stage``."""
    metrics.internal_error(stage)
    token = queue_id_var.set(job.queue_id) if job is not None else None
    try:
        extra: dict[str, object] = {"provider": provider, "stage": str(stage), "error": type(exc).__name__}
        if job is not None:
            extra["job"] = job.job_id
        if batch:
            extra["qids"] = ",".join(j.queue_id for j in batch)  # at most ACK_BATCH of them
        log.error("internal error (%s): %s", stage, exc, extra=extra, exc_info=exc)
    finally:
        if token is not None:
            queue_id_var.reset(token)


@dataclass(slots=True)
class Turn:
    """One step's hold on a job it took (see ``ClaimedJobs._turn``)."""

    job: Job
    stage: Stage
    """How far the step got: the stage an exception is counted under."""
    failed: bool = False
    """The step raised: the job's attempt was ended for it (or the exception noted, if the job was placed)."""


class _Suspends(Protocol):
    async def suspend(self, provider: str, *, seconds: float, reason: str) -> None: ...


class _Settings(Protocol):
    @property
    def helo_name(self) -> str: ...
    @property
    def visibility_ms(self) -> int: ...


class DeliveryParts(Protocol):
    """What claimed jobs need of the delivery engine (``engine.DeliveryEngine``)."""

    @property
    def spool(self) -> Spool: ...
    @property
    def book(self) -> PolicyBook: ...
    @property
    def router(self) -> Router: ...
    @property
    def limiter(self) -> _Suspends: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def settings(self) -> _Settings: ...
    def random(self) -> float: ...


class ClaimedJobs:
    """The jobs one provider's dispatcher holds (``engine.ProviderDispatcher`` adds claiming and connections)."""

    def __init__(self, engine: DeliveryParts, provider: str) -> None:
        self.engine = engine
        self.provider = provider
        self.held: dict[str, Job] = {}            # every claimed job not yet finished, for lease renewal
        self.pending: dict[tuple[NextHop, ...], deque[Job]] = {}   # held jobs waiting for a connection
        self.acks: list[Job] = []                 # held jobs finished, their ack not yet flushed
        self._poke = asyncio.Event()
        self._acks_waiting = asyncio.Event()       # set when `acks` gets its first job: the ack loop sleeps till then
        self._flushing = asyncio.Lock()            # one ack flush at a time (each takes the batch it found)

    def poke(self) -> None:
        self._poke.set()

    async def _release(self, job: Job) -> bool:
        """Hand ``job`` back, due now; whether Redis took it (if not, its lease runs out: nothing is lost)."""
        self.held.pop(job.job_id, None)
        try:
            await self.engine.spool.release(job)
            return True
        except SpoolError:
            return False
        except Exception as exc:  # the same, but noted: stop() must go on releasing the others
            note_internal_error(self.engine.metrics, Stage.RECORD, exc, provider=self.provider, job=job)
            return False

    # -- turns and internal errors ----------------------------------------------------------------

    def _taken(self, job: Job) -> bool:
        """Whether ``job`` is held but in none of the places that hand it on: a queue here, the ack batch."""
        if self.held.get(job.job_id) is not job or any(j is job for j in self.acks):
            return False
        return not any(j is job for queue in self.pending.values() for j in queue)

    @contextlib.asynccontextmanager
    async def _turn(self, job: Job, stage: Stage) -> AsyncIterator[Turn]:
        """A step's work on ``job``, which it took off a queue or a claim: whatever the step raises, the job
        comes out placed. If it is still taken (``_taken``), the attempt ends as an internal error
        (``_end_in_error``); if the step had placed it already, the exception is only noted. The exception
        does not propagate (``turn.failed`` says it happened), except LimiterUnavailable once the job is
        queued again (Redis is away: the caller backs off). Cancellation is not an error: stop() hands every
        held job back."""
        turn = Turn(job, stage)
        token = queue_id_var.set(job.queue_id)
        try:
            yield turn
        except Exception as exc:
            turn.failed = True
            if self._taken(job):
                await self._end_in_error(job, turn.stage, exc)
            elif isinstance(exc, LimiterUnavailable):
                raise
            else:
                note_internal_error(self.engine.metrics, turn.stage, exc, provider=self.provider, job=job)
        finally:
            queue_id_var.reset(token)

    async def _end_in_error(self, job: Job, stage: Stage, exc: Exception) -> None:
        """End the attempt at ``job`` that raised ``exc`` at ``stage``: every recipient deferred with
        ``internal_error_reply`` (attempts + 1, the ordinary ladder, no policy rule asked: the reply is ours),
        and failed with a notification like any deferral once the job outlives the max age, so repeated
        errors end too. Never raises: if even that cannot be recorded, the claim is let go and the lease
        runs out."""
        note_internal_error(self.engine.metrics, stage, exc, provider=self.provider, job=job)
        try:
            reply = internal_error_reply(exc)
            await self._finish(job, DeliveryReport(dict.fromkeys(job.recipients, reply), ""), ours=True)
        except Exception as last:
            note_internal_error(self.engine.metrics, Stage.RECORD, last, provider=self.provider, job=job)
            self.held.pop(job.job_id, None)

    # -- outcomes ------------------------------------------------------------------------------------

    async def _finish(self, job: Job, report: DeliveryReport, *, ours: bool = False,
                      hops: tuple[NextHop, ...] | None = None) -> Verdict:
        """Judge one attempt's replies and record the outcome; ``ours``: the replies are our own (an internal
        error), so the policy's rules are not asked and no deferral is reported as the provider's. With
        ``hops`` (the job's next hops), a throttled attempt may be queued again here (``_retry_paced``).
        Does not raise for a verdict, notification or spool write that fails (see ``_judge`` and
        ``_record``)."""
        engine = self.engine
        token = queue_id_var.set(job.queue_id)
        try:
            verdict = self._judge(job, report.replies, ours=ours)
            metrics = engine.metrics
            for rcpt in verdict.delivered:
                metrics.delivered(self.provider)
                log.info("delivered", extra={"rcpt": rcpt, "remote": report.remote,
                                             "reply": str(report.replies[rcpt])})
            for rcpt, reply in verdict.failed:
                metrics.failed(self.provider)
                log.warning("failed permanently", extra={"rcpt": rcpt, "reply": str(reply)})
            if verdict.suspend_for:
                await self._suspend(job, verdict)
            for rcpt, reply in verdict.deferred:
                if not ours:
                    metrics.deferred(self.provider, verdict.deferral or DeferralClass.OTHER)
                log.info("deferred", extra={"rcpt": rcpt, "reply": str(reply),
                                            "retry_in": round(verdict.retry_delay, 1)})
            if hops is None or not await self._retry_paced(job, verdict, hops):
                await self._record(job, verdict, report.remote)
            return verdict
        finally:
            queue_id_var.reset(token)

    async def _retry_paced(self, job: Job, verdict: Verdict, hops: tuple[NextHop, ...]) -> bool:
        """Queue a throttled attempt again here instead of deferring it in Redis: whether it was.

        A deferral for too many connections or too high a rate (``THROTTLED``) is the sender's pace, not
        the message's fault: the message goes again as soon as the pacer (the fleet's connection lease and
        rate permit, this pod's reflex, the live limits the refusal just lowered) lets it, not after a
        backoff that leaves capacity idle. Only when the attempt changed nothing else (every recipient
        deferred, so the job in Redis is still exact), no Suspend rule matched, and at most
        ``PACED_RETRIES`` times per claim; then the retry ladder takes over."""
        if (verdict.deferral not in THROTTLED or verdict.delivered or verdict.failed or verdict.suspend_for
                or len(verdict.deferred) != len(job.recipients) or job.paced_retries >= PACED_RETRIES
                or not self._may_pace(verdict)):
            return False
        job.paced_retries += 1
        job.last_reply = str(verdict.deferred[0][1])
        self.pending.setdefault(hops, deque()).append(job)
        await self._requeued(hops)
        return True

    def _may_pace(self, verdict: Verdict) -> bool:
        """Whether something here will pace the job's next attempt (the dispatcher says, see engine)."""
        return True

    async def _requeued(self, hops: tuple[NextHop, ...]) -> None:
        """A job was queued again for ``hops`` (the dispatcher wakes a connection for it)."""
        self.poke()

    def _judge(self, job: Job, replies: dict[str, SmtpReply], *, ours: bool) -> Verdict:
        """``judge`` with the provider's schedule and rules; ``judge_plainly`` if that raises (a schedule a
        policy validator let through, such as a zero delay): delivered mail must still be acknowledged."""
        engine = self.engine
        age = time.time() - job.created_ms / 1000
        rand = engine.random()
        try:
            return judge(replies, attempts=job.attempts, age=age, schedule=engine.book.retry(self.provider),
                         rules=() if ours else engine.book.rules(self.provider), rand=rand)
        except Exception as exc:
            note_internal_error(engine.metrics, Stage.JUDGE, exc, provider=self.provider, job=job)
            return judge_plainly(replies, attempts=job.attempts, age=age, rand=rand)

    async def _suspend(self, job: Job, verdict: Verdict) -> None:
        assert verdict.suspend_for is not None
        reply_text = str(verdict.deferred[0][1]) if verdict.deferred else ""
        try:
            await self.engine.limiter.suspend(self.provider, seconds=verdict.suspend_for,
                                              reason=f"Suspend rule: {reply_text}")
            log.warning("provider suspended", extra={"provider": self.provider, "seconds": verdict.suspend_for,
                                                     "reply": reply_text})
        except LimiterUnavailable as exc:
            log.warning("%s", exc)
        except Exception as exc:  # the job's own outcome is still recorded
            note_internal_error(self.engine.metrics, Stage.RECORD, exc, provider=self.provider, job=job)

    async def _record(self, job: Job, verdict: Verdict, remote: str) -> None:
        """Notify the sender of the failed recipients, then defer or acknowledge ``job``. Never raises. A
        notification that cannot be built or queued for another reason than the spool is logged and the job
        finished anyway. When the spool cannot be written the claim is let go: the lease runs out and the
        job is attempted again (a notification is then queued again too, with the same job id)."""
        engine = self.engine
        try:
            if verdict.failed:
                try:
                    await self._notify_sender(job, verdict.failed, remote, expired=verdict.expired)
                except SpoolError:
                    raise
                except Exception as exc:
                    note_internal_error(engine.metrics, Stage.NOTIFY, exc, provider=self.provider, job=job)
                    log.warning("the sender is not notified of the failed recipients",
                                extra={"job": job.job_id, "failed": len(verdict.failed)})
            if verdict.deferred:
                ok = await engine.spool.defer(
                    job, delay_ms=int(verdict.retry_delay * 1000), attempts=job.attempts + 1,
                    last_reply=str(verdict.deferred[0][1]), recipients=[r for r, _ in verdict.deferred])
                if not ok:
                    log.warning("lost the claim before deferring; another worker owns the job now")
                self.held.pop(job.job_id, None)
            else:
                self.acks.append(job)
                self._acks_waiting.set()
                if len(self.acks) >= ACK_BATCH:
                    await self._flush_acks()
        except Exception as exc:
            # Nothing is lost: the claim lease expires and the job is attempted again.
            if not isinstance(exc, SpoolError):
                note_internal_error(engine.metrics, Stage.RECORD, exc, provider=self.provider, job=job)
            log.error("could not record the outcome: %s", exc, extra={"job": job.job_id})
            self.held.pop(job.job_id, None)

    async def _notify_sender(self, job: Job, failed: list[tuple[str, SmtpReply]], remote: str, *,
                             expired: bool) -> None:
        if job.dsn or not should_notify(job.sender):
            return
        engine = self.engine
        failures = [failure for rcpt, reply in failed
                    if (failure := _reportable(rcpt, reply, remote, expired=expired)) is not None]
        if not failures:
            raise ValueError("no failed recipient can be reported in a notification (see the warnings)")
        now = time.time()
        body = build_dsn(reporting_mta=engine.settings.helo_name, sender=job.sender, queue_id=job.queue_id,
                         arrival=datetime.fromtimestamp(job.created_ms / 1000, UTC),
                         now=datetime.fromtimestamp(now, UTC), failures=failures, original=job.body)
        domain = job.sender.rpartition("@")[2].lower()
        provider = await engine.router.provider_for(domain)
        await engine.spool.enqueue([NewJob(provider=provider, job_id=f"{job.job_id}.dsn{job.attempts}",
                                           queue_id=job.queue_id, sender="", recipients=[job.sender],
                                           domain=domain, body=body, dsn=True)])
        log.info("delivery status notification queued", extra={"to": job.sender, "provider": provider})

    async def _flush_acks(self) -> None:
        # One at a time: the ack loop's flush and a full batch's can meet, and each removes the batch it
        # took from the front of `acks`; two at once removed jobs appended after the first one's snapshot,
        # never acked (held for ever, then delivered again at shutdown).
        async with self._flushing:
            await self._flush_acks_now()

    async def _flush_acks_now(self) -> None:
        if not self.acks:
            return
        batch = list(self.acks)
        try:
            for pause in ACK_RETRY_PAUSES:   # a delivered job not acked is delivered again: worth a few tries
                try:
                    await self.engine.spool.ack(self.provider, batch)
                    break
                except SpoolError as exc:
                    if pause is None:
                        raise
                    log.warning("ack failed, trying again in %g s: %s", pause, exc)
                    await asyncio.sleep(pause)
        except SpoolError as exc:
            log.error("ack failed (the jobs will be delivered again after their lease): %s", exc)
        except Exception as exc:  # the same fate, noted; the batch must not stay here to fail for ever
            note_internal_error(self.engine.metrics, Stage.ACK, exc, provider=self.provider, batch=batch)
        # Only now: if we were cancelled mid-ack the batch stays and is acked again (acks are idempotent).
        del self.acks[:len(batch)]
        for job in batch:
            self.held.pop(job.job_id, None)
        self.poke()

    async def _ack_loop(self) -> None:
        """Flush acks ``ACK_DELAY`` after the first of a batch; asleep while there is none (an idle dispatcher
        costs nothing)."""
        while True:
            await self._acks_waiting.wait()
            await asyncio.sleep(ACK_DELAY)
            if not self.acks:
                self._acks_waiting.clear()
                continue
            try:
                await self._flush_acks()
            except Exception as exc:  # a dead ack loop would deliver every later message twice
                note_internal_error(self.engine.metrics, Stage.ACK, exc, provider=self.provider)

    async def _renew_loop(self) -> None:
        visibility = self.engine.settings.visibility_ms
        while True:
            await asyncio.sleep(visibility / 3000)
            if self.held:
                try:
                    await self.engine.spool.extend(self.provider, list(self.held.values()), visibility_ms=visibility)
                except SpoolError as exc:
                    log.warning("lease renewal failed: %s", exc)
                except Exception as exc:  # a dead renewal loop lets every held lease run out mid-delivery
                    note_internal_error(self.engine.metrics, Stage.RENEW, exc, provider=self.provider)


def _reportable(rcpt: str, reply: SmtpReply, remote: str, *, expired: bool) -> RecipientFailure | None:
    """``rcpt``'s failure as the notification reports it; without the next hop if its name cannot be written
    there; None (logged) for a recipient no notification can name (control characters: a job spooled before
    ingress refused them), so that the sender still learns about the others."""
    status = _dsn_status(reply, expired=expired)
    for remote_mta in dict.fromkeys((remote or None, None)):
        try:
            return RecipientFailure(recipient=rcpt, status=status, remote_mta=remote_mta, diagnostic=str(reply))
        except ValueError as exc:
            problem = exc
    log.warning("a failed recipient cannot be named in the notification: %s", problem)
    return None


def _dsn_status(reply: SmtpReply, *, expired: bool) -> str:
    """The DSN status of a failed recipient: its own enhanced code, or 5.4.7 when it ran out of time."""
    if expired:
        return "5" + EXPIRED_STATUS[1:]
    if reply.enhanced and reply.enhanced[0] == "5":
        return reply.enhanced
    return f"{reply.code // 100}.0.0"
