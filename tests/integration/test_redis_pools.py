"""More commands in flight than pooled connections: they wait for a free connection instead of failing with
"Too many connections" (which, for an ack, meant delivering the message again after its lease), on every
Redis deployment mxgate supports."""

from __future__ import annotations

import asyncio

import pytest

from mxgate.embedded_redis import EmbeddedRedis
from mxgate.redisconn import RedisConnection, parse_redis_url
from support.redistopo import RedisProcesses

IN_FLIGHT = 40


async def crowd(url: str) -> None:
    connection = RedisConnection(parse_redis_url(url), max_connections=3, pool_timeout=10)
    try:
        await connection.initialize()
        client = connection.client
        # Each BLPOP holds its connection for 0.1 s: 40 of them (half in pipelines) on 3 connections go in turns.
        async def pipelined(i: int) -> object:
            pipe = client.pipeline(transaction=False)
            pipe.blpop([f"nothing:{i}"], timeout=0.1)
            (reply,) = await pipe.execute()
            return reply

        replies = await asyncio.gather(*(client.blpop([f"nothing:{i}"], timeout=0.1) if i % 2 else pipelined(i)
                                         for i in range(IN_FLIGHT)), return_exceptions=True)
        assert [r for r in replies if r is not None] == []   # no error: every one waited its turn
    finally:
        await connection.aclose()


async def test_single_server(redis_server: EmbeddedRedis) -> None:
    await crowd(redis_server.url)


@pytest.mark.parametrize("mode", ["sentinel", "cluster"])
async def test_sentinel_and_cluster(redis_topologies: RedisProcesses, mode: str) -> None:
    if mode == "sentinel":
        s = redis_topologies.sentinel_set()
        url = "redis+sentinel://" + ",".join(f"{h}:{p}" for h, p in s.sentinel_addresses) + f"/{s.master_name}"
    else:
        c = redis_topologies.cluster_set()
        url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in c.startup_nodes)
    await crowd(url)
