"""Shared fixtures: a real redis-server per test session, flushed between tests; `mxgate` processes."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from mxgate.embedded_redis import EmbeddedRedis
from mxgate.redisconn import RedisConnection, parse_redis_url

sys.path.insert(0, str(Path(__file__).parent))  # tests.support helpers importable as `support`

from support.procs import Processes


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Starts `mxgate` processes; none outlives the test."""
    processes = Processes(tmp_path)
    yield processes
    processes.close()


@pytest.fixture
async def redis_client(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def redis_connection(redis_server: EmbeddedRedis, redis_client: aioredis.Redis) -> AsyncIterator[RedisConnection]:
    """mxgate's own connection object to the (flushed) session Redis, as the gateway makes it."""
    connection = RedisConnection(parse_redis_url(redis_server.url))
    await connection.initialize()
    yield connection
    await connection.aclose()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    # The gateway runs on uvloop (mxgate.cli), so the tests do too: its transports differ from asyncio's
    # in ways that matter (they are not asyncio.WriteTransport subclasses, for one).
    import uvloop

    return {"uvloop": uvloop.new_event_loop}
