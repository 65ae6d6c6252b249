"""The durable spool: delivery jobs in Redis, claimed with visibility leases.

Ingress turns each accepted message into one job per recipient domain and answers ``250`` only after
Redis has acknowledged every job (``enqueue``). Delivery workers ``claim`` due jobs; a claim is a lease:
the job's score in the provider queue becomes "now + visibility", so if the worker dies the job is due
again when the lease runs out and another worker takes it. ``ack`` deletes a finished job, ``defer``
reschedules it, ``extend`` renews leases of jobs still in progress. Every state change is one Lua script
on Redis server time that checks the caller's claim token first (``spool/lua``).

Delivery is therefore at-least-once: a worker killed after the remote ``250`` but before its ack causes
one duplicate delivery, never a loss.

The body is stored in each job: a message to several domains is stored once per domain. Transactional
mail has one recipient, so this costs nothing in the common case and keeps every job in its provider's
slot (Redis Cluster) with no cross-slot reference counting.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from mxgate import keys
from mxgate.errors import SpoolError

_REDIS_ERRORS = (aioredis.RedisError, OSError)


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

    def fields(self) -> list[str | bytes]:
        return [
            "qid", self.queue_id,
            "from", self.sender,
            "rcpts", json.dumps(list(self.recipients)),
            "domain", self.domain,
            "body", self.body,
            "dsn", "1" if self.dsn else "0",
        ]


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
    last_reply: str = ""

    @classmethod
    def from_redis(cls, provider: str, job_id: str, token: str, flat: Sequence[bytes]) -> Job:
        raw = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
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
            last_reply=raw.get("last", b"").decode("utf-8", "replace"),
        )

    def as_new(self, provider: str) -> NewJob:
        """The same job for another provider queue (used when routing finds it belongs elsewhere)."""
        return NewJob(provider=provider, job_id=self.job_id, queue_id=self.queue_id, sender=self.sender,
                      recipients=self.recipients, domain=self.domain, body=self.body, dsn=self.dsn)


@dataclass(frozen=True, slots=True)
class Claim:
    jobs: list[Job]
    now_ms: int
    next_due_ms: int | None  # set when nothing was due: when the earliest job becomes due


class Spool:
    """Spool operations on one Redis (or Redis Cluster) connection pool."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._enqueue: AsyncScript = redis.register_script(_script("enqueue"))
        self._claim: AsyncScript = redis.register_script(_script("claim"))
        self._ack: AsyncScript = redis.register_script(_script("ack"))
        self._defer: AsyncScript = redis.register_script(_script("defer"))
        self._extend: AsyncScript = redis.register_script(_script("extend"))
        self._registered: dict[str, float] = {}

    async def enqueue(self, jobs: Sequence[NewJob]) -> None:
        """Store all jobs of one message in one round trip; raises SpoolError unless all are stored."""
        try:
            await self._register(job.provider for job in jobs)
            if len(jobs) == 1:
                job = jobs[0]
                await self._enqueue(keys=self._job_keys(job), args=self._job_args(job))
                return
            # Several domains: one pipeline of EVALSHA (redis-py's pipelined Script objects would first
            # ask SCRIPT EXISTS on every execute: a second round trip per message).
            for attempt in range(2):
                pipe = self.redis.pipeline(transaction=False)
                for job in jobs:
                    pipe.evalsha(self._enqueue.sha, 2, *self._job_keys(job), *self._job_args(job))
                results = await pipe.execute(raise_on_error=False)
                if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                    await self.redis.script_load(self._enqueue.script)
                    continue
                for result in results:
                    if isinstance(result, Exception):
                        raise SpoolError(f"spool write failed: {result}") from result
                return
        except _REDIS_ERRORS as exc:
            raise SpoolError(f"spool unavailable: {exc}") from exc

    @staticmethod
    def _job_keys(job: NewJob) -> list[str]:
        return [keys.queue(job.provider), keys.job(job.provider, job.job_id)]

    @staticmethod
    def _job_args(job: NewJob) -> list[str | bytes]:
        return [job.job_id, keys.EVENTS, f"{keys.EVENT_WAKE} {job.provider}", *job.fields()]

    async def _register(self, providers: Iterable[str]) -> None:
        """Add providers to the index the dispatchers scan, at most once a minute per provider per process."""
        now = time.monotonic()
        new = [p for p in set(providers) if self._registered.get(p, 0.0) < now]
        if new:
            await self.redis.sadd(keys.PROVIDERS, *new)
            for provider in new:
                self._registered[provider] = now + 60.0

    async def claim(self, provider: str, *, limit: int, visibility_ms: int) -> Claim:
        token = secrets.token_hex(8)
        try:
            reply: list[Any] = await self._claim(
                keys=[keys.queue(provider)], args=[keys.job_prefix(provider), limit, visibility_ms, token])
        except _REDIS_ERRORS as exc:
            raise SpoolError(f"claim failed: {exc}") from exc
        now_ms, next_due = int(reply[0]), int(reply[1])
        jobs = [Job.from_redis(provider, reply[i].decode(), token, reply[i + 1]) for i in range(2, len(reply), 2)]
        return Claim(jobs=jobs, now_ms=now_ms, next_due_ms=None if next_due < 0 else next_due)

    async def ack(self, provider: str, jobs: Iterable[Job]) -> int:
        args: list[str] = [keys.job_prefix(provider)]
        for job in jobs:
            args += [job.job_id, job.token]
        if len(args) == 1:
            return 0
        try:
            return int(await self._ack(keys=[keys.queue(provider)], args=args))
        except _REDIS_ERRORS as exc:
            raise SpoolError(f"ack failed: {exc}") from exc

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
            return bool(await self._defer(
                keys=[keys.queue(job.provider)],
                args=[keys.job_prefix(job.provider), job.job_id, job.token, max(0, delay_ms), *fields]))
        except _REDIS_ERRORS as exc:
            raise SpoolError(f"defer failed: {exc}") from exc

    async def release(self, job: Job) -> bool:
        """Hand a claimed, unattempted job back at once (shutdown, local back-pressure)."""
        return await self.defer(job, delay_ms=0)

    async def extend(self, provider: str, jobs: Iterable[Job], *, visibility_ms: int) -> int:
        args: list[str | int] = [keys.job_prefix(provider), visibility_ms]
        for job in jobs:
            args += [job.job_id, job.token]
        if len(args) == 2:
            return 0
        try:
            return int(await self._extend(keys=[keys.queue(provider)], args=args))
        except _REDIS_ERRORS as exc:
            raise SpoolError(f"extend failed: {exc}") from exc

    async def move(self, job: Job, provider: str) -> None:
        """Move a claimed job to another provider's queue: enqueue there first, then ack here, so a crash
        in between duplicates the job rather than losing it."""
        await self.enqueue([job.as_new(provider)])
        await self.ack(job.provider, [job])

    async def depth(self, provider: str) -> int:
        try:
            return int(await self.redis.zcard(keys.queue(provider)))
        except _REDIS_ERRORS as exc:
            raise SpoolError(f"depth failed: {exc}") from exc

    async def providers(self) -> set[str]:
        try:
            members = await self.redis.smembers(keys.PROVIDERS)
        except _REDIS_ERRORS as exc:
            raise SpoolError(f"providers failed: {exc}") from exc
        return {m.decode() if isinstance(m, bytes) else m for m in members}
