"""Fixtures for tests that run mxgate and Redis as real processes (`procs` is in tests/conftest.py)."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from mxgate.embedded_redis import EmbeddedRedis
from support.procs import eventually
from support.redistopo import ClusterSet, RedisProcesses, SentinelSet


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of this test's own (tests may kill it); AOF with fsync every second, as in dev."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    yield server
    server.stop(kill=True)


@pytest.fixture
def redis_topologies(tmp_path: Path) -> Iterator[RedisProcesses]:
    """Redis nodes, cutting proxies, Sentinel sets and clusters of this test's own (support/redistopo.py):
    ``redis_topologies.sentinel_set(password=...)``, ``.cluster_set(...)``, ``.node(...)``. Every process is
    SIGKILLed (its whole group) and every proxy stopped when the test ends, however it ends."""
    owner = RedisProcesses(tmp_path / "redistopo")
    yield owner
    owner.close()


@pytest.fixture
def sentinel_set(redis_topologies: RedisProcesses) -> SentinelSet:
    """A primary, two replicas and three sentinels, in sync, without a password (about 2.5 s to start)."""
    return redis_topologies.sentinel_set()


@pytest.fixture
def cluster_set(redis_topologies: RedisProcesses) -> ClusterSet:
    """Three primaries with a replica each, cluster_state:ok everywhere, no password (about 2 s to start)."""
    return redis_topologies.cluster_set()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, EmbeddedRedis]]:
    """Two redis-servers of this test's own, to be made a primary and its replica (``replicated``)."""
    primary = EmbeddedRedis(tmp_path / "primary").start()
    replica = EmbeddedRedis(tmp_path / "replica").start()
    try:
        yield primary, replica
    finally:
        if replica.process is not None and replica.process.poll() is None:
            os.kill(replica.process.pid, signal.SIGCONT)
        replica.stop()
        primary.stop()


@pytest.fixture
async def replicated(pair: tuple[EmbeddedRedis, EmbeddedRedis]
                     ) -> AsyncIterator[tuple[aioredis.Redis, aioredis.Redis]]:
    """``pair`` linked (REPLICAOF) and in sync; clients to the primary and the replica."""
    primary, replica = pair
    p, r = aioredis.Redis.from_url(primary.url), aioredis.Redis.from_url(replica.url)
    await r.replicaof(primary.host, primary.port)

    async def linked() -> bool:
        info = await p.info("replication")
        return bool(info["connected_slaves"] == 1 and info["slave0"]["state"] == "online")

    await eventually(linked, timeout=15, what="the replica to sync")
    yield p, r
    await p.aclose()
    await r.aclose()
