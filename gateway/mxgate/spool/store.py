"""The durable spool: delivery jobs in Redis, claimed with visibility leases.

Ingress turns each accepted message into one job per recipient domain and answers ``250`` only after
Redis has stored every job *and* enough replicas have them (``enqueue``; ``--replica-acks``, see
``mxgate.redisconn``). Delivery workers ``claim`` due jobs; a claim is a lease: the job's score in the
provider queue becomes "now + visibility", so if the worker dies the job is due again when the lease runs
out and another worker takes it. ``ack`` deletes a finished job, ``defer`` reschedules it, ``extend``
renews leases of jobs still in progress. Every state change is one Lua script on Redis server time that
checks the caller's claim token first (``spool/lua``) and touches only the keys it is given.

Delivery is therefore at-least-once: a worker killed after the remote ``250`` but before its ack causes
one duplicate delivery, never a loss.

All or nothing for a message to several domains. Its jobs live in different providers' slots (on a
cluster, on different nodes), so no single script can store them together. They are stored *staged*
(not claimable for ``STAGE_MS``, and marked with the key of a commit record), then the commit record is
written and replicated, and only then does the client get ``250``; the jobs are then made due at once
(``promote``). A message refused with ``451`` half-way has no commit record: its stored jobs are withdrawn
at once, and any that could not be withdrawn are found by the claim that eventually takes them, which
deletes a job whose commit record does not exist once it is older than twice ``STAGE_MS``. The client's retry
therefore never duplicates part of a message. One window remains: a commit record written on the primary
whose replication could not be confirmed is deleted before the ``451``; if even that delete fails, the
jobs are delivered and the retry duplicates them (never a loss).

The body is stored in each job: a message to several domains is stored once per domain. Transactional
mail has one recipient, so this costs nothing in the common case and keeps every job in its provider's
slot (Redis Cluster) with no cross-slot reference counting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

from redis.commands.core import AsyncScript

from mxgate import keys
from mxgate.errors import SpoolError
from mxgate.redisconn import REDIS_ERRORS, RedisClient, RedisConnection, ScriptCall

log = logging.getLogger("mxgate.spool")

STAGE_MS = 60_000        # a staged job is not claimable before this (its message commits within seconds)
# A staged job without a commit record that is older than twice STAGE_MS was never acknowledged.
COMMIT_TTL = 31 * 86400  # seconds a commit record lives at most: longer than any job (retry.maxAge <= 30d)
ENQUEUE_TIMEOUT = 20.0   # seconds ingress waits for a whole enqueue; far below STAGE_MS, so no commit comes late
TAKE_BACK_TIMEOUT = 5.0  # seconds a refused message's withdrawal may take before the 451 goes out anyway


def _script(name: str) -> str:
    return resources.files("mxgate.spool").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def new_queue_id() -> str:
    """Short, roughly time-ordered, unique: 10 hex digits of milliseconds + 6 random hex digits."""
    return f"{int(time.time() * 1000):010X}{secrets.token_hex(3).upper()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class NewJob:
    """A job about to be spooled: one message for the recipients of one domain."""

    provider: str
    job_id: str
    queue_id: str
    sender: str
    recipients: Sequence[str]
    domain: str
    body: bytes
    dsn: bool = False  # True for our own bounce notifications: they never cause another one
    commit: str = ""   # the commit record's key while the job is staged (a multi-domain message)
    crlf: bool = False  # the producer checked that ``body`` has CRLF line ends only (ingress refuses others)

    def fields(self) -> list[str | bytes]:
        out: list[str | bytes] = [
            "qid", self.queue_id,
            "from", self.sender,
            "rcpts", json.dumps(list(self.recipients)),
            "domain", self.domain,
            "body", self.body,
            "dsn", "1" if self.dsn else "0",
        ]
        if self.crlf:
            out += ["crlf", "1"]
        if self.commit:
            out += ["commit", self.commit]
        return out


@dataclass(slots=True, kw_only=True)
class Job:
    """A claimed job. ``token`` proves the claim to ack/defer/extend."""

    provider: str
    job_id: str
    token: str
    queue_id: str
    sender: str
    recipients: list[str]
    domain: str
    body: bytes
    created_ms: int
    attempts: int
    dsn: bool
    crlf: bool = False  # see NewJob.crlf: egress need not look for bare line ends again
    last_reply: str = ""
    commit: str = ""   # set while the job's message is not known to be committed (see the module docstring)
    paced_retries: int = 0   # this claim's throttled attempts queued again here (egress.claimed), not stored

    @classmethod
    def from_redis(cls, provider: str, job_id: str, token: str, fields: dict[bytes, bytes]) -> Job:
        raw = {k.decode(): v for k, v in fields.items()}
        return cls(
            provider=provider,
            job_id=job_id,
            token=token,
            queue_id=raw["qid"].decode(),
            sender=raw["from"].decode("utf-8", "surrogateescape"),
            recipients=json.loads(raw["rcpts"]),
            domain=raw["domain"].decode(),
            body=raw["body"],
            created_ms=int(raw["created"]),
            attempts=int(raw.get("attempts", b"0")),
            dsn=raw.get("dsn") == b"1",
            crlf=raw.get("crlf") == b"1",
            last_reply=raw.get("last", b"").decode("utf-8", "replace"),
            commit=raw.get("commit", b"").decode(),
        )

    def as_new(self, provider: str) -> NewJob:
        """The same job for another provider queue (used when routing finds it belongs elsewhere)."""
        return NewJob(provider=provider, job_id=self.job_id, queue_id=self.queue_id, sender=self.sender,
                      recipients=self.recipients, domain=self.domain, body=self.body, dsn=self.dsn,
                      crlf=self.crlf)


@dataclass(frozen=True, slots=True)
class Claim:
    jobs: list[Job]
    now_ms: int
    next_due_ms: int | None  # set when nothing was due: when the earliest job becomes due


class Spool:
    """Spool operations on one Redis deployment (single, Sentinel or Cluster)."""

    def __init__(self, connection: RedisConnection, *, stage_ms: int = STAGE_MS) -> None:
        self.connection = connection
        self.stage_ms = stage_ms     # tests shorten it; an uncommitted staged job is dropped at twice its age
        self.redis = connection.client
        self._texts = {name: _script(name) for name in (
            "enqueue", "claim", "ack", "defer", "extend", "promote", "withdraw", "confirm", "commit", "uncommit",
            "index", "due")}
        self._scripts: dict[str, AsyncScript] = {
            name: self.redis.register_script(text) for name, text in self._texts.items()}

    def _call(self, name: str, keys_: Sequence[str], args: Sequence[Any]) -> ScriptCall:
        script = self._scripts[name]
        return ScriptCall(script=self._texts[name], sha=str(script.sha), keys=keys_, args=args)

    # -- enqueue -----------------------------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[NewJob]) -> None:
        """Store all jobs of one message durably, or none of them: raises SpoolError unless all are stored
        and replicated as ``--replica-acks`` asks (what was stored is then withdrawn)."""
        if not jobs:
            return
        commit_key = keys.commit(jobs[0].provider, jobs[0].queue_id) if len(jobs) > 1 else None
        try:
            async with asyncio.timeout(ENQUEUE_TIMEOUT):
                if commit_key is None:
                    await self._enqueue_one(jobs[0])
                else:
                    await self._enqueue_staged(jobs, commit_key)
        except BaseException as exc:
            # Refused, out of time or cancelled (the session went): nothing of the message may count, or the
            # client's retry would deliver it twice. Shielded: a cancellation must not cut the take-back short.
            await asyncio.shield(self._take_back(jobs, commit_key))
            if isinstance(exc, TimeoutError):
                raise SpoolError(f"spool write took longer than {ENQUEUE_TIMEOUT:.0f} s") from exc
            if isinstance(exc, REDIS_ERRORS):
                raise SpoolError(f"spool unavailable: {self.connection.target.redact(str(exc))}") from exc
            raise

    async def _enqueue_one(self, job: NewJob) -> None:
        """One job: one script call. While replicas are asked (WAIT), the job is not claimable, so a job whose
        replication falls short is withdrawn before any worker can take it; then it is made due at once."""
        stage_ms = 0
        if await self.connection.acks_required(keys.queue(job.provider)):
            stage_ms = int(self.connection.replica_ack_timeout * 2000) + 2000
        await self._store([job], stage_ms=stage_ms)
        if stage_ms:
            await self._promote([job])

    async def _enqueue_staged(self, jobs: Sequence[NewJob], commit_key: str) -> None:
        staged = [replace(job, commit=commit_key) for job in jobs]
        await self._store(staged, stage_ms=self.stage_ms)
        durable = await self.connection.durable(commit_key, [self._call("commit", [commit_key], [COMMIT_TTL])])
        if not durable.replicated:
            raise _NotReplicated(durable.replicas, durable.required)
        # Committed: the message counts now. Make its jobs due at once (best effort: a job not promoted is
        # claimed after STAGE_MS and finds the commit record).
        if await self._promote(staged):
            # Every job is an ordinary one now: nobody will ask the record again.
            try:
                await self.connection.durable(commit_key, [self._call("uncommit", [commit_key], [])], wait=False)
            except SpoolError as exc:
                log.warning("commit record not deleted (it expires): %s", exc)

    async def _promote(self, jobs: Sequence[NewJob]) -> bool:
        """Make staged jobs due now; True if every one was. Best effort: a staged job is due after its stage."""
        try:
            promoted = await self.connection.durable_many([(keys.queue(provider), [
                self._call("promote", _job_keys(job), [job.job_id, keys.EVENTS, f"{keys.EVENT_WAKE} {provider}"])
                for job in group]) for provider, group in _by_provider(jobs).items()], wait=False)
        except SpoolError as exc:
            log.warning("staged jobs not promoted (they become due by themselves): %s", exc)
            return False
        return all(int(result) == 1 for outcome in promoted for result in outcome.results)

    async def _store(self, jobs: Sequence[NewJob], *, stage_ms: int) -> None:
        """Write ``jobs`` (one script call each, one pipeline per Redis node) and wait for their replicas; then
        bring their providers' due-index entries forward (index.lua), replicated too, before any 250: a job
        without its entry would wait for the next mail to its provider. On one server (or Sentinel) the
        entries ride in the jobs' pipeline, after them, under the same WAIT; on a cluster they may be on
        other nodes and follow in a second round."""
        by_provider = _by_provider(jobs)
        groups = [(keys.queue(provider), [
            self._call("enqueue", _job_keys(job), [job.job_id, keys.EVENTS, f"{keys.EVENT_WAKE} {provider}",
                                                    stage_ms, *job.fields()]) for job in group])
            for provider, group in by_provider.items()]
        index = [(keys.due(provider), [self._call("index", [keys.due(provider)], [provider, 0])])
                 for provider in by_provider]
        if self.connection.clustered:
            outcomes = await self.connection.durable_many(groups)
            if all(outcome.replicated for outcome in outcomes):
                outcomes += await self.connection.durable_many(index)
        else:
            outcomes = await self.connection.durable_many([*groups, *index])
        short = [outcome for outcome in outcomes if not outcome.replicated]
        if short:
            raise _NotReplicated(short[0].replicas, short[0].required)

    async def _take_back(self, jobs: Sequence[NewJob], commit_key: str | None) -> None:
        """Withdraw what a refused message left behind, so the client's retry does not duplicate it."""
        try:
            async with asyncio.timeout(TAKE_BACK_TIMEOUT):
                if commit_key is not None:
                    await self.connection.durable(commit_key, [self._call("uncommit", [commit_key], [])], wait=False)
                await self.connection.durable_many([(keys.queue(provider), [
                    self._call("withdraw", _job_keys(job), [job.job_id]) for job in group])
                    for provider, group in _by_provider(jobs).items()], wait=False)
        except (SpoolError, TimeoutError, *REDIS_ERRORS) as exc:
            # Staged jobs without a commit record are deleted by the claim that finds them; a single job
            # that stays will be delivered (the client's retry is then a duplicate, never a loss).
            log.warning("could not withdraw the jobs of a refused message: %s", exc or type(exc).__name__)

    # -- the due index ------------------------------------------------------------------------------------

    async def _index(self, providers: Iterable[str], *, delay_ms: int = 0) -> None:
        """Bring the providers' due-index entries forward to ``delay_ms`` from now (never later)."""
        await self.connection.durable_many([
            (keys.due(p), [self._call("index", [keys.due(p)], [p, max(0, delay_ms)])]) for p in sorted(set(providers))],
            wait=False)

    async def settle(self, provider: str, next_due_ms: int | None) -> None:
        """A dispatcher saw ``provider``'s earliest job at ``next_due_ms`` (None: the queue is empty): move the
        entry there (or drop it). The caller must then look at the queue once more (a claim), because a job
        written meanwhile may have brought the entry forward just before this call moved it back."""
        try:
            if next_due_ms is None:
                await self.redis.zrem(keys.due(provider), provider)
            else:
                await self.redis.zadd(keys.due(provider), {provider: next_due_ms})
        except REDIS_ERRORS as exc:
            raise SpoolError(f"due index not updated: {self.connection.target.redact(str(exc))}") from exc

    async def due(self, shard: int, *, limit: int = 1000) -> tuple[int, int | None, list[str]]:
        """One shard of the due index: (Redis now in ms, the earliest later entry or None, providers due)."""
        try:
            reply: list[Any] = await self._scripts["due"](keys=[keys.due_shard(shard)], args=[limit])
        except REDIS_ERRORS as exc:
            raise SpoolError(f"due index not read: {self.connection.target.redact(str(exc))}") from exc
        later = int(reply[1])
        return int(reply[0]), None if later < 0 else later, [_text(m) for m in reply[2:]]

    async def adopt_old_provider_index(self) -> int:
        """Mail queued by mxgate <= 0.1.x is listed in a provider SET (``mxg:providers``, later
        ``mxg:{fleet}:providers``): put those providers in the due index, due now, so an upgrade leaves no queue
        unlooked-at (a provider found empty then leaves the index). Returns how many; a no-op once done."""
        moved = 0
        try:
            for old in (f"{keys.PREFIX}:providers", keys.PROVIDERS):
                members = [_text(m) for m in await self.redis.smembers(old)]
                if members:
                    await self._index(members)
                    await self.redis.delete(old)
                    moved += len(members)
        except REDIS_ERRORS as exc:
            raise SpoolError(f"provider index not migrated: {self.connection.target.redact(str(exc))}") from exc
        return moved

    # -- claims --------------------------------------------------------------------------------------------

    async def claim(self, provider: str, *, limit: int, visibility_ms: int) -> Claim:
        token = secrets.token_hex(8)
        try:
            reply: list[Any] = await self._scripts["claim"](
                keys=[keys.queue(provider), keys.claims(provider)], args=[limit, visibility_ms, token])
            now_ms, next_due = int(reply[0]), int(reply[1])
            ids = [raw.decode() for raw in reply[2:]]
            jobs: list[Job] = []
            if ids:
                pipe = self.redis.pipeline(transaction=False)
                for job_id in ids:
                    pipe.hgetall(keys.job(provider, job_id))
                hashes: list[dict[bytes, bytes]] = await pipe.execute()
                stale = [job_id for job_id, fields in zip(ids, hashes, strict=True) if not fields]
                if stale:  # an index entry without its job (a half-finished delete): drop it
                    await self._scripts["ack"](keys=[keys.queue(provider), keys.claims(provider),
                                                     *(keys.job(provider, i) for i in stale)],
                                               args=[*stale, *([token] * len(stale))])
                jobs = [Job.from_redis(provider, job_id, token, fields)
                        for job_id, fields in zip(ids, hashes, strict=True) if fields]
                if any(job.commit for job in jobs):
                    jobs = await self._resolve_staged(jobs, now_ms)
        except REDIS_ERRORS as exc:
            raise SpoolError(f"claim failed: {self.connection.target.redact(str(exc))}") from exc
        return Claim(jobs=jobs, now_ms=now_ms, next_due_ms=None if next_due < 0 else next_due)

    async def _resolve_staged(self, jobs: list[Job], now_ms: int) -> list[Job]:
        """Claimed jobs of multi-domain messages whose promotion did not happen: deliver those whose message
        was committed, drop those that never were, leave the young ones staged."""
        staged = [job for job in jobs if job.commit]
        pipe = self.redis.pipeline(transaction=False)
        for job in staged:
            pipe.exists(job.commit)
        committed = [bool(n) for n in await pipe.execute()]
        keep = [job for job in jobs if not job.commit]
        for job, ok in zip(staged, committed, strict=True):
            if ok:
                await self._scripts["confirm"](keys=[keys.claims(job.provider), keys.job(job.provider, job.job_id)],
                                               args=[job.job_id, job.token])
                job.commit = ""
                keep.append(job)
            elif now_ms - job.created_ms > 2 * self.stage_ms:
                log.warning("job dropped: its message was refused with 451 and never committed",
                            extra={"qid": job.queue_id, "job": job.job_id})
                await self.ack(job.provider, [job])
            else:
                await self.defer(job, delay_ms=job.created_ms + 2 * self.stage_ms - now_ms + 100)
        return keep

    async def ack(self, provider: str, jobs: Iterable[Job]) -> int:
        batch = list(jobs)
        if not batch:
            return 0
        try:
            return int(await self._scripts["ack"](
                keys=[keys.queue(provider), keys.claims(provider), *(keys.job(provider, j.job_id) for j in batch)],
                args=[*(j.job_id for j in batch), *(j.token for j in batch)]))
        except REDIS_ERRORS as exc:
            raise SpoolError(f"ack failed: {self.connection.target.redact(str(exc))}") from exc

    async def defer(self, job: Job, *, delay_ms: int, attempts: int | None = None, last_reply: str | None = None,
                    recipients: Sequence[str] | None = None) -> bool:
        """Reschedule ``job`` ``delay_ms`` from now, optionally for fewer recipients (the others were
        delivered or bounced); False when another worker owns the job by now."""
        fields: list[str | int] = []
        if recipients is not None:
            fields += ["rcpts", json.dumps(list(recipients))]
        if attempts is not None:
            fields += ["attempts", attempts]
        if last_reply is not None:
            fields += ["last", last_reply]
        try:
            deferred = bool(await self._scripts["defer"](
                keys=[keys.queue(job.provider), keys.claims(job.provider), keys.job(job.provider, job.job_id)],
                args=[job.job_id, job.token, max(0, delay_ms), *fields]))
            if deferred:
                await self._index([job.provider], delay_ms=delay_ms)
            return deferred
        except REDIS_ERRORS as exc:
            raise SpoolError(f"defer failed: {self.connection.target.redact(str(exc))}") from exc

    async def release(self, job: Job) -> bool:
        """Hand a claimed, unattempted job back at once (shutdown, local back-pressure)."""
        return await self.defer(job, delay_ms=0)

    async def extend(self, provider: str, jobs: Iterable[Job], *, visibility_ms: int) -> int:
        args: list[str | int] = [visibility_ms]
        for job in jobs:
            args += [job.job_id, job.token]
        if len(args) == 1:
            return 0
        try:
            return int(await self._scripts["extend"](keys=[keys.queue(provider), keys.claims(provider)], args=args))
        except REDIS_ERRORS as exc:
            raise SpoolError(f"extend failed: {self.connection.target.redact(str(exc))}") from exc

    async def move(self, job: Job, provider: str) -> None:
        """Move a claimed job to another provider's queue: enqueue there first, then ack here, so a crash
        in between duplicates the job rather than losing it."""
        await self.enqueue([job.as_new(provider)])
        await self.ack(job.provider, [job])

    async def depth(self, provider: str) -> int:
        try:
            return int(await self.redis.zcard(keys.queue(provider)))
        except REDIS_ERRORS as exc:
            raise SpoolError(f"depth failed: {self.connection.target.redact(str(exc))}") from exc

    async def providers(self) -> set[str]:
        """Every provider in the due index: those with queued jobs (and, briefly, some just emptied)."""
        try:
            return await due_providers(self.redis)
        except REDIS_ERRORS as exc:
            raise SpoolError(f"providers failed: {self.connection.target.redact(str(exc))}") from exc


async def due_providers(redis: RedisClient) -> set[str]:
    """Every provider in the due index (all shards): those with queued jobs, and briefly some just emptied."""
    shards: list[Any] = list(await asyncio.gather(*(redis.zrange(key, 0, -1) for key in keys.due_shards())))
    return {_text(m) for members in shards for m in members}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _NotReplicated(SpoolError):
    def __init__(self, replicas: int, required: int) -> None:
        super().__init__(f"acknowledged by {replicas} of the {required} replica(s) --replica-acks asks for")


def _job_keys(job: NewJob) -> list[str]:
    return [keys.queue(job.provider), keys.claims(job.provider), keys.job(job.provider, job.job_id)]


def _by_provider(jobs: Sequence[NewJob]) -> dict[str, list[NewJob]]:
    groups: defaultdict[str, list[NewJob]] = defaultdict(list)
    for job in jobs:
        groups[job.provider].append(job)
    return dict(groups)
