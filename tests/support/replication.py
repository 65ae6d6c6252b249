"""Helpers for tests against a primary and its replica: a job of one domain, mxgate's spool on a URL."""

from __future__ import annotations

from mxgate.redisconn import RedisConnection, parse_redis_url
from mxgate.spool.store import NewJob, Spool


def job(provider: str, qid: str, n: int = 0, *, body: bytes = b"Subject: t\r\n\r\nhello\r\n") -> NewJob:
    return NewJob(provider=provider, job_id=f"{qid}.{n}", queue_id=qid, sender="a@example.com",
                  recipients=[f"b@d{n}.test"], domain=f"d{n}.test", body=body)


async def spool_on(url: str, **options: object) -> tuple[RedisConnection, Spool]:
    connection = RedisConnection(parse_redis_url(url), **options)  # type: ignore[arg-type]
    await connection.initialize()
    return connection, Spool(connection, stage_ms=300)
