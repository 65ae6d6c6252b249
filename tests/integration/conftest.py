"""Fixtures for tests that run mxgate as real processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mxgate.embedded_redis import EmbeddedRedis
from support.procs import Processes


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Starts `mxgate` processes; none outlives the test."""
    processes = Processes(tmp_path)
    yield processes
    processes.close()


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of this test's own (tests may kill it); AOF with fsync every second, as in dev."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    yield server
    server.stop(kill=True)
