"""Fixtures for tests that run mxgate and Redis as real processes (`procs` is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mxgate.embedded_redis import EmbeddedRedis


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of this test's own (tests may kill it); AOF with fsync every second, as in dev."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    yield server
    server.stop(kill=True)
