"""Self-tests of support/redistopo.py with real redis-server processes and plain redis-py clients.

They prove what the failover tests will lean on: a node on its own 127.0.0.x address that survives kill -9
with its AOF, a proxy that cuts chosen source addresses only, a Sentinel set whose links all run through
the proxies from their own addresses, a failover after kill -9, the split brain of a partitioned primary
that loses what it acknowledged meanwhile (the data loss mxgate must defend against), and a cluster that
forms, fails over and whose WAIT sees a stopped replica. Timings are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ClusterDownError

from mxgate import keys
from support.procs import eventually
from support.redistopo import ClusterSet, RedisProcesses, SentinelSet, TcpProxy

PASSWORD = "s3cret-topo"


def resp_ping(sock: socket.socket) -> bytes:
    sock.sendall(b"PING\r\n")
    return sock.recv(64)


def connect_from(source: str, address: tuple[str, int]) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(2)
    sock.bind((source, 0))
    sock.connect(address)
    return sock


def ping_once(source: str, address: tuple[str, int]) -> bytes:
    """A PING on a new connection from ``source``: the reply, or b"" if the connection was reset."""
    with connect_from(source, address) as sock:
        return pinged(sock)


def pinged(sock: socket.socket) -> bytes:
    try:
        return resp_ping(sock)
    except (ConnectionResetError, BrokenPipeError):
        return b""


def test_node_on_its_own_loopback_address_survives_kill9_and_sigstop(redis_topologies: RedisProcesses) -> None:
    [host] = redis_topologies.hosts(1)
    began = time.monotonic()
    node = redis_topologies.node("solo", host, config={"maxmemory": "64mb"}).start()
    print(f"[timing] one node: {time.monotonic() - began:.2f}s")
    with node.client() as client:
        assert client.client_info()["laddr"] == f"{host}:{node.port}"  # really bound to 127.0.0.x
        assert client.config_get("maxmemory") == {"maxmemory": str(64 * 1024 * 1024)}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        client.set("acknowledged", "1")
    assert os.getpgid(node.pid) == node.pid  # its own process group

    node.kill9()
    assert not node.alive
    node.restart()
    with node.client() as client:
        assert client.get("acknowledged") == "1"  # from the AOF, same port

    node.stop()
    with pytest.raises(redis.TimeoutError), node.client(socket_timeout=0.3) as client:
        client.ping()
    node.cont()
    assert node.info("server")["tcp_port"] == node.port

    node.terminate()
    assert node.popen is not None and node.popen.returncode == 0
    assert "Ready to accept connections" in node.log_path.read_text()


def test_proxy_cuts_only_the_chosen_sources(redis_topologies: RedisProcesses) -> None:
    [host] = redis_topologies.hosts(1)
    node = redis_topologies.node("behind-proxy", host).start()
    proxy: TcpProxy = redis_topologies.proxy(node.address, listen_host=host, name="solo")
    with connect_from("127.0.0.1", proxy.address) as client, \
            connect_from("127.0.0.77", proxy.address) as replica_like:
        assert resp_ping(client) == resp_ping(replica_like) == b"+PONG\r\n"

        proxy.cut(["127.0.0.77"])
        assert pinged(replica_like) == b""  # closed at once
        assert ping_once("127.0.0.77", proxy.address) == b""  # and refused while cut
        assert resp_ping(client) == b"+PONG\r\n"  # other sources keep flowing
        assert ping_once("127.0.0.78", proxy.address) == b"+PONG\r\n"

        proxy.heal()
        assert ping_once("127.0.0.77", proxy.address) == b"+PONG\r\n"
        assert resp_ping(client) == b"+PONG\r\n"
    assert proxy.sources() == {"127.0.0.1": 1, "127.0.0.77": 3, "127.0.0.78": 1}


async def test_sentinel_failover_after_kill9(redis_topologies: RedisProcesses) -> None:
    s = redis_topologies.sentinel_set(password=PASSWORD)
    print(f"[timing] sentinel set with password: {s.startup_seconds:.2f}s")
    primary, replicas = s.data_nodes[0], s.replicas
    # Every link to a data node runs through its proxy, from the linking process's own address.
    sentinel_hosts = {n.host for n in s.sentinels}
    assert set(s.proxies[0].sources()) == sentinel_hosts | {r.host for r in replicas}
    for proxy in s.proxies[1:]:
        assert set(proxy.sources()) == sentinel_hosts
    assert ping_once("127.0.0.1", s.sentinel_addresses[0]).startswith(b"-NOAUTH")
    assert ping_once("127.0.0.1", s.address_of(primary)).startswith(b"-NOAUTH")  # via the proxy
    assert set(s.replication_lag()) == {"data1", "data2"}

    sentinel = Sentinel(s.sentinel_addresses, sentinel_kwargs={"password": PASSWORD}, password=PASSWORD,
                        decode_responses=True)
    assert await sentinel.discover_master(s.master_name) == s.address_of(primary)
    master = sentinel.master_for(s.master_name)
    assert await master.set("before", "1")

    s.stop_replica(0)
    try:
        async with master.pipeline(transaction=False) as pipe:  # WAIT counts for its own connection
            pipe.set("while-stopped", "x" * 10_000).execute_command("WAIT", 2, 300)
            _, acked = await pipe.execute()
        assert acked == 1  # only data2 acknowledged
        lag = s.replication_lag()  # (the sentinels' hello messages are replicated too: a few hundred bytes)
        assert lag["data1"] > 10_000 > lag["data2"]
    finally:
        s.cont_replica(0)
    async with master.pipeline(transaction=False) as pipe:
        _, acked = await pipe.set("after", "1").execute_command("WAIT", 2, 2000).execute()
    assert acked == 2
    assert all(lag < 10_000 for lag in s.replication_lag().values())

    began = time.monotonic()
    old = s.kill9_primary()
    new = await s.wait_for_failover(old, timeout=20)
    print(f"[timing] sentinel failover after kill -9: {time.monotonic() - began:.2f}s "
          f"(down-after {s.down_after_ms} ms)")
    assert old == s.address_of(primary) and new in [s.address_of(r) for r in replicas]

    async def read_from_new_primary() -> str | None:
        try:
            value: str | None = await master.get("before")
            return value
        except (redis.ConnectionError, redis.TimeoutError):
            return None  # the pool's connection to the dead primary; the next one asks the sentinels
    assert await eventually(read_from_new_primary, timeout=10, what="a read via the new primary") == "1"
    assert await sentinel.discover_master(s.master_name) == new
    await eventually(lambda: set(s.replication_lag()) == {r.name for r in replicas} - {s.node_at(new).name},
                     timeout=10, what="the other replica following the new primary")
    await master.aclose()
    for one in sentinel.sentinels:
        await one.aclose()


async def test_partitioned_primary_loses_the_writes_it_acknowledged(sentinel_set: SentinelSet) -> None:
    s = sentinel_set
    print(f"[timing] sentinel set: {s.startup_seconds:.2f}s")
    old_primary = s.data_nodes[0]
    sentinel = Sentinel(s.sentinel_addresses)
    old = await sentinel.discover_master(s.master_name)
    assert old == s.address_of(old_primary)
    # A client that learned the primary before the partition and keeps its connection (as a gateway does).
    client = aioredis.Redis(host=old[0], port=old[1], single_connection_client=True, decode_responses=True)
    await client.set("before", "1")
    assert await client.execute_command("WAIT", 2, 2000) == 2

    assert s.partition_primary() == old
    began = time.monotonic()
    written: list[str] = []
    promoted = asyncio.Event()

    async def keep_writing() -> None:
        while not promoted.is_set():
            key = f"during:{len(written)}"
            assert await client.set(key, "acknowledged")  # the old primary still says OK
            written.append(key)
            await asyncio.sleep(0.05)
    writer = asyncio.create_task(keep_writing())
    try:
        new = await s.wait_for_failover(old, timeout=20)
    finally:
        promoted.set()
        await writer
    print(f"[timing] sentinel failover of a partitioned primary: {time.monotonic() - began:.2f}s")
    assert await client.set("during:after-promotion", "acknowledged")  # split brain: two primaries
    written.append("during:after-promotion")
    replication = await client.info("replication")
    assert (replication["role"], replication["connected_slaves"]) == ("master", 0)
    assert s.node_at(new).info("replication")["role"] == "master"
    assert len(written) > 5

    s.heal()
    began = time.monotonic()

    def follows_new_primary() -> bool:
        info = old_primary.info("replication")
        return (info["role"] == "slave" and (info["master_host"], info["master_port"]) == new
                and info["master_link_status"] == "up")
    await eventually(follows_new_primary, timeout=40, what="the old primary to resync from the new one")
    print(f"[timing] healed old primary turned replica: {time.monotonic() - began:.2f}s")

    # Everything the old primary acknowledged during the partition is gone, on both nodes.
    assert await client.mget(written) == [None] * len(written)
    assert await client.get("before") == "1"
    with s.node_at(new).client() as new_client:
        assert new_client.mget(written) == [None] * len(written)
    assert "MASTER <-> REPLICA sync: Finished with success" in old_primary.log_path.read_text()
    await client.aclose()
    for one in sentinel.sentinels:
        await one.aclose()


async def test_cluster_fails_over_after_kill9(cluster_set: ClusterSet) -> None:
    c = cluster_set
    print(f"[timing] cluster of 6: {c.startup_seconds:.2f}s")
    assert len(c.primaries()) == 3
    assert {c.replica_of(p).name for p in c.primaries()} == {n.name for n in c.nodes} - {p.name for p in c.primaries()}
    provider = c.providers_on_distinct_shards(1)[0]
    key = keys.queue(provider)
    primary = c.node_for_key(key)
    replica = c.replica_of(primary)
    with primary.client() as client, client.pipeline(transaction=False) as pipe:
        assert pipe.zadd(key, {"job-1": 1}).execute_command("WAIT", 1, 2000).execute() == [1, 1]

    cluster = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in c.startup_nodes], decode_responses=True)
    assert await cluster.zscore(key, "job-1") == 1

    began = time.monotonic()
    assert await c.kill9_primary(primary, timeout=20) is replica
    print(f"[timing] cluster failover after kill -9: {time.monotonic() - began:.2f}s")
    assert c.node_for_key(key) is replica
    assert all(c.cluster_info(n)["cluster_state"] == "ok" for n in c.nodes if n.alive)

    async def write_after_failover() -> bool:
        try:
            return bool(await cluster.zadd(key, {"job-2": 2}))
        except (redis.ConnectionError, redis.TimeoutError, ClusterDownError):
            return False  # the client's slot map still names the dead primary; it refreshes
    await eventually(write_after_failover, timeout=10, what="a cluster write after the failover")
    assert await cluster.zrange(key, 0, -1) == ["job-1", "job-2"]
    await cluster.aclose()

    primary.restart()  # same port and nodes.conf: it rejoins as the replica of the one that replaced it
    await eventually(lambda: primary.info("replication")["role"] == "slave" and c.replica_of(replica) is primary,
                     timeout=15, what=f"{primary.name} to rejoin as a replica")


async def test_cluster_shards_and_wait_on_a_stopped_replica(redis_topologies: RedisProcesses) -> None:
    c = redis_topologies.cluster_set(password=PASSWORD)
    print(f"[timing] cluster of 6 with password: {c.startup_seconds:.2f}s")
    assert ping_once("127.0.0.1", c.startup_nodes[0]).startswith(b"-NOAUTH")

    providers = c.providers_on_distinct_shards(3)
    assert len(set(providers)) == 3 and all(p.startswith("domain:d") for p in providers)
    cluster = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in c.startup_nodes], password=PASSWORD)
    await cluster.initialize()  # loads redis-py's own slot map from CLUSTER SLOTS
    for provider in providers:  # redis-py's own slot map agrees
        node = cluster.get_node_from_key(keys.queue(provider))
        assert node is not None and (node.host, node.port) == c.node_for_key(keys.queue(provider)).address
    assert len({c.node_for_key(keys.queue(p)).name for p in providers}) == 3
    for provider in providers:  # every key of a provider lives in its queue's slot
        assert len({cluster.keyslot(k) for k in (keys.queue(provider), keys.limits(provider),
                                                   keys.job(provider, "j1"), keys.leases(provider))}) == 1
    await cluster.aclose()

    primary = c.node_for_key(keys.queue(providers[0]))
    replica = c.stop_replica(primary)
    try:
        with primary.client() as client, client.pipeline(transaction=False) as pipe:
            assert pipe.set(keys.limits(providers[0]), "x").execute_command("WAIT", 1, 500).execute() == [True, 0]
    finally:
        replica.cont()
    with primary.client() as client, client.pipeline(transaction=False) as pipe:
        assert pipe.set(keys.limits(providers[0]), "y").execute_command("WAIT", 1, 2000).execute() == [True, 1]
