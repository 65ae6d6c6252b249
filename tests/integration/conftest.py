"""Fixtures for tests that run mxgate and Redis as real processes (`procs` is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mxgate.embedded_redis import EmbeddedRedis
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
