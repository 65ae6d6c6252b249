"""Connecting to Redis, one place for every command: a single server, Sentinel or Redis Cluster.

    redis://[[user]:password@]HOST[:PORT][/DB]          one server (as redis-py reads it)
    rediss://...                                         the same over TLS
    unix://[[user]:password@]/PATH[?db=N]                a local socket
    redis+sentinel://[[user]:password@]HOST:PORT[,HOST:PORT...]/MASTER[/DB]
                                                         redis-py's asyncio Sentinel: follows failovers
    redis+cluster://[[user]:password@]HOST:PORT[,HOST:PORT...]
                                                         redis-py's asyncio RedisCluster
    (rediss+sentinel:// and rediss+cluster:// use TLS to every node and sentinel)

The password (from the URL, or from a file that overrides it: ``--redis-password-file``) is used for the data
nodes and, with Sentinel, for the sentinels too. It is never printed: ``RedisTarget.redacted`` is what logs and
errors show.

Durable writes. Replication is asynchronous: a primary that acknowledged a write and then died, or was cut off and
demoted, takes the write with it. So a write that must survive a failover (a message about to be answered 250) is
sent with ``WAIT numreplicas timeout`` right behind it *on the same connection* (WAIT counts the replicas that have
everything this connection wrote): ``RedisConnection.durable`` runs script calls and WAIT as one pipeline on the
node that owns the key. On a cluster that node's primary gets a plain client of its own, because redis-py's cluster
pipeline refuses EVALSHA and sends WAIT (which names no key) to any node.

How many replicas must acknowledge (``--replica-acks``): a number, or ``auto``: 1 for a primary that reports a
connected replica, or has reported one since this process first wrote to it (a replica that dropped off does not
turn the requirement off: that is exactly when a failover would lose writes), 0 for a lone Redis.

Following a Sentinel failover: redis-py asks the sentinels for the primary only when it opens a connection, so a
process whose connections to an old primary still work (the old primary was cut off from its sentinels, not from
us) would keep writing there. ``watch`` asks the sentinels once a second and drops every connection when the
answer changes. Writes sent to the old primary meanwhile are not acknowledged by any replica, so they get 451.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import (
    BlockingConnectionPool,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mxgate.errors import ConfigError, SpoolError

log = logging.getLogger("mxgate.redis")

Mode = Literal["single", "sentinel", "cluster"]
RedisClient = aioredis.Redis | RedisCluster
"""What every module that talks to Redis holds: the commands they use exist on both."""

REDIS_ERRORS = (RedisError, OSError)

SENTINEL_CHECK_INTERVAL = 1.0   # seconds between "who is the primary?" questions to the sentinels
REPLICATION_CHECK_INTERVAL = 1.0  # a node's replica count is re-read at most this often (INFO replication)
REPLICA_LAG_OK = 3              # seconds since a replica's last ack for it to count as up (it acks every second)
ROUND_TRIPS = [0]               # requests sent (single server and Sentinel; cluster nodes are not counted)


# -- the URL ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisTarget:
    """Where Redis is and how to log in, parsed from ``--redis-url``."""

    mode: Mode
    url: str = field(repr=False)
    """The URL as given (it may hold a password: never print it, print ``redacted``)."""
    nodes: tuple[tuple[str, int], ...] = ()
    """Sentinels (sentinel mode) or startup nodes (cluster mode)."""
    master: str = ""
    """The name the sentinels know the primary by (sentinel mode)."""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    @property
    def redacted(self) -> str:
        return redact(self.url, secrets=[self.password, _url_secret(self.url)])

    def redact(self, text: str) -> str:
        """``text`` (an error message, say) without this target's password."""
        return redact(text, secrets=[self.password, _url_secret(self.url)])

    def with_password(self, password: str) -> RedisTarget:
        """The same target logging in with ``password`` (from a mounted Secret) instead of the URL's."""
        return replace(self, password=password)


_SCHEMES: dict[str, tuple[Mode, bool]] = {
    "redis": ("single", False), "rediss": ("single", True), "unix": ("single", False),
    "redis+sentinel": ("sentinel", False), "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False), "rediss+cluster": ("cluster", True),
}


def parse_redis_url(url: str) -> RedisTarget:
    """Parse ``--redis-url``; a ConfigError names what is wrong (and never repeats the password)."""
    secret = _url_secret(url)
    shown = redact(url, secrets=[secret])
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ConfigError(f"--redis-url {shown!r}: expected one of " + ", ".join(f"{s}://" for s in _SCHEMES))
    mode, tls = _SCHEMES[scheme.lower()]
    if mode == "single":
        try:
            options = parse_url(url)
        except ValueError as exc:
            raise ConfigError(f"--redis-url {shown!r}: {redact(str(exc), secrets=[secret])}") from exc
        return RedisTarget(mode="single", url=url, db=int(options.get("db") or 0), username=options.get("username"),
                           password=options.get("password"), tls=tls)
    userinfo, at, location = rest.rpartition("@")
    if not at:
        userinfo, location = "", rest
    username, _, password = userinfo.partition(":") if ":" in userinfo else ("", "", userinfo)
    hosts, _, path = location.partition("/")
    path = path.split("?", 1)[0]
    nodes = tuple(_host_port(part, shown) for part in hosts.split(",") if part.strip())
    if not nodes:
        raise ConfigError(f"--redis-url {shown!r}: no HOST:PORT given")
    segments = [s for s in path.split("/") if s]
    master, db = "", 0
    if mode == "sentinel":
        if not segments:
            raise ConfigError(f"--redis-url {shown!r}: name the primary as the sentinels know it: "
                              f"{scheme}://HOST:PORT[,HOST:PORT...]/MASTER[/DB]")
        master = unquote(segments[0])
        if len(segments) > 2:
            raise ConfigError(f"--redis-url {shown!r}: expected /MASTER[/DB] after the sentinels")
        if len(segments) == 2:
            db = _db(segments[1], shown)
    elif segments:
        raise ConfigError(f"--redis-url {shown!r}: a cluster URL has no path (Redis Cluster has one database)")
    return RedisTarget(mode=mode, url=url, nodes=nodes, master=master, db=db,
                       username=unquote(username) or None, password=unquote(password) or None, tls=tls)


def _host_port(text: str, shown: str) -> tuple[str, int]:
    text = text.strip()
    host, port_text = (text[1:].partition("]")[0], text.partition("]")[2].lstrip(":")) if text.startswith("[") \
        else text.rpartition(":")[::2] if ":" in text else (text, "")
    if not host or not port_text:
        raise ConfigError(f"--redis-url {shown!r}: {text!r} is not HOST:PORT")
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise ConfigError(f"--redis-url {shown!r}: {text!r} has no valid port")
    return host, port


def _db(text: str, shown: str) -> int:
    try:
        db = int(text)
    except ValueError:
        db = -1
    if db < 0:
        raise ConfigError(f"--redis-url {shown!r}: {text!r} is not a database number")
    return db


_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(\S*)@")
_QUERY_PASSWORD = re.compile(r"(password=)[^&\s]*")


def redact(text: str, *, secrets: Iterable[str | None] = ()) -> str:
    """``text`` (a URL, or an error quoting one) with every password replaced by ``***``: the ``secrets`` wherever
    they appear (as given and percent-quoted), and the user-info of any URL in it (all of it up to the last ``@``:
    the parsers take a password with ``/`` or ``@`` in it)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***").replace(quote(secret, safe=""), "***")

    def userinfo(match: re.Match[str]) -> str:
        user, colon, _ = match.group(2).partition(":")
        return f"{match.group(1)}{user}:***@" if colon and "/" not in user else f"{match.group(1)}***@"

    return _QUERY_PASSWORD.sub(r"\1***", _URL_USERINFO.sub(userinfo, text))


def _url_secret(url: str) -> str:
    """What a URL's user-info could hide: all of it after the first ``:`` (or all of it, for schemes that take a
    bare ``secret@`` as the password), up to the last ``@``."""
    rest = url.partition("://")[2]
    info = rest.rpartition("@")[0] if "@" in rest else ""
    return info.partition(":")[2] or info


def url_with_password(url: str, password: str) -> str:
    """``url`` with its password replaced (quoted, so any character is safe in it): for tools that want a URL."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = "&".join(q for q in parts.query.split("&") if q and not q.startswith("password="))
        return urlunsplit(parts._replace(query="&".join(filter(None, [query, f"password={quote(password)}"]))))
    scheme, _, rest = url.partition("://")
    userinfo, at, location = rest.rpartition("@")
    user = userinfo.partition(":")[0] if at else ""
    return f"{scheme}://{user}:{quote(password, safe='')}@{location if at else rest}"


# -- round-trip counting ---------------------------------------------------------------------------------


class _Counting:
    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        ROUND_TRIPS[0] += 1
        await super().send_packed_command(command, check_health)  # type: ignore[misc]


class CountingConnection(_Counting, Connection):
    pass


class CountingSSLConnection(_Counting, SSLConnection):
    pass


class CountingUnixConnection(_Counting, UnixDomainSocketConnection):
    pass


class CountingSentinelConnection(_Counting, SentinelManagedConnection):
    pass


# -- the connection --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """One EVALSHA of a Lua script (``script`` is its source, loaded on demand)."""

    script: str
    sha: str
    keys: Sequence[str]
    args: Sequence[Any]


@dataclass(frozen=True, slots=True)
class Durable:
    """What ``RedisConnection.durable`` got back: each call's result (or exception) and the replicas that have it."""

    results: list[Any]
    replicas: int
    required: int

    @property
    def replicated(self) -> bool:
        return self.replicas >= self.required


@dataclass(slots=True)
class _NodeReplication:
    checked: float = -1e9
    connected: int = 0
    ever: int = 0
    role: str = "master"


POOL_TIMEOUT = 10.0   # seconds a command waits for a free pooled connection: far below the 60 s claim lease
CLUSTER_HEADROOM = 8  # a cluster node's connections left outside the gate (subscriptions hold their own)


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (it follows the primary) with the blocking pool's ``get_connection``: with every
    connection in use a command waits for one (``timeout``) instead of failing (see ``RedisConnection``)."""


_in_gate: contextvars.ContextVar[bool] = contextvars.ContextVar("mxgate_cluster_gate", default=False)


class GatedPipeline(ClusterPipeline):
    """A pipeline of a ``GatedCluster``: its ``execute`` takes one of the gate's slots too (it uses at most
    one connection per node it touches)."""

    def __init__(self, client: GatedCluster, transaction: Any = None) -> None:
        super().__init__(client, transaction)
        self._gated = client

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        async with self._gated.slot():
            return await super().execute(*args, **kwargs)


class GatedCluster(RedisCluster):
    """A cluster client whose commands wait for one of ``gate`` slots. redis-py's cluster nodes have no
    blocking pool: a node with ``max_connections`` in use raises ``MaxConnectionsError`` at once, outside the
    client's retry. With the gate at most ``gate`` commands are in flight, so no node needs more connections
    than that. A command the client issues from inside another (a split multi-key command) passes through:
    holding a slot while waiting for another could deadlock. Pipelines take a slot too (``GatedPipeline``)."""

    def __init__(self, *args: Any, gate: int, gate_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gate = asyncio.Semaphore(gate)
        self._gate_timeout = gate_timeout

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the gate's slots (none more when this task holds one already)."""
        if _in_gate.get():
            yield
            return
        try:
            await asyncio.wait_for(self._gate.acquire(), self._gate_timeout)
        except TimeoutError:
            raise RedisConnectionError(f"no Redis connection free within {self._gate_timeout:g} s") from None
        token = _in_gate.set(True)
        try:
            yield
        finally:
            _in_gate.reset(token)
            self._gate.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.slot():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> GatedPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # type: ignore[return-value]  # it raises
        return GatedPipeline(self, transaction)  # type: ignore[abstract]  # redis-py's class, instantiated as it does


class RedisConnection:
    """One process's connection to its Redis deployment: the command client, durable writes, health."""

    def __init__(self, target: RedisTarget, *, replica_acks: int | None = None, replica_ack_timeout: float = 1.0,
                 socket_timeout: float = 5.0, socket_connect_timeout: float = 2.0, max_connections: int = 200,
                 pool_timeout: float = POOL_TIMEOUT, health_check_interval: float = 10.0) -> None:
        self.target = target
        self.replica_acks = replica_acks  # None: auto
        self.replica_ack_timeout = replica_ack_timeout
        self._common: dict[str, Any] = dict(
            # A WAIT blocks its connection for up to the ack timeout: the read must not time out first.
            username=target.username, password=target.password,
            socket_timeout=max(socket_timeout, replica_ack_timeout + 2.0),
            socket_connect_timeout=socket_connect_timeout, health_check_interval=health_check_interval)
        # A pooled connection that died with a restarted (or failed-over) Redis fails its next command: retry it
        # on a fresh connection. A command that did run before the error runs twice: harmless for enqueue
        # (idempotent per job id), ack, defer, extend and the lease scripts (they check tokens); a claim run twice
        # leaves the first call's jobs to their visibility lease (a delay, not a loss); a GCRA permit run twice
        # counts one message twice (the fleet sends a little below its rate for a moment).
        self._retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), 3)
        self._replication: dict[tuple[str, int], _NodeReplication] = {}
        self._node_clients: dict[tuple[str, int], aioredis.Redis] = {}
        self._sentinel: Sentinel | None = None
        self._watcher: asyncio.Task[None] | None = None
        # With every pooled connection in use, a command waits up to ``pool_timeout`` for one. redis-py's plain
        # pools raise "Too many connections" at once, outside its retry: with thousands of providers' dispatchers
        # a failed ack left delivered mail to its claim lease, and it was delivered again (bench/idle_cost.py,
        # 10,000 domains: 48 and 151 duplicates; none with the blocking pool).
        self.client: RedisClient
        if target.mode == "single":
            self.client = self._single(target, max_connections=max_connections, pool_timeout=pool_timeout)
        elif target.mode == "sentinel":
            self.client = self._sentinel_client(target, max_connections=max_connections, pool_timeout=pool_timeout)
        else:
            self.client = GatedCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in target.nodes], ssl=target.tls,
                max_connections=max_connections, retry=self._retry, gate=max(1, max_connections - CLUSTER_HEADROOM),
                gate_timeout=pool_timeout,
                **self._common)

    def _single(self, target: RedisTarget, *, max_connections: int, pool_timeout: float) -> aioredis.Redis:
        cls: type[Connection] | type[UnixDomainSocketConnection]
        cls = CountingUnixConnection if target.url.startswith("unix://") else \
            CountingSSLConnection if target.tls else CountingConnection
        url = url_with_password(target.url, target.password) if target.password else target.url
        # The retry goes to the pool's connections: redis-py retries with the connection's Retry, and a client
        # built on a pool ignores its own.
        pool = BlockingConnectionPool.from_url(
            url, connection_class=cls, max_connections=max_connections, timeout=pool_timeout, retry=self._retry,
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            **{k: v for k, v in self._common.items() if k not in ("username", "password")})
        return aioredis.Redis(connection_pool=pool)

    def _sentinel_client(self, target: RedisTarget, *, max_connections: int, pool_timeout: float) -> aioredis.Redis:
        sentinel_kwargs = {k: v for k, v in self._common.items() if k != "health_check_interval"}
        if target.tls:
            sentinel_kwargs["ssl"] = True
        self._sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]  # untyped before redis 8
            list(target.nodes), sentinel_kwargs=sentinel_kwargs, **self._common)
        # With TLS the pool picks its SSL connection class itself (those round trips are not counted).
        counting: dict[str, Any] = {} if target.tls else {"connection_class": CountingSentinelConnection}
        client = self._sentinel.master_for(
            target.master, db=target.db, ssl=target.tls, max_connections=max_connections, retry=self._retry,
            retry_on_error=[RedisConnectionError, RedisTimeoutError], connection_pool_class=BlockingSentinelPool,
            timeout=pool_timeout, **counting)
        assert isinstance(client, aioredis.Redis)
        return client

    async def initialize(self) -> None:
        """Connect: learn a cluster's slots, start following a Sentinel primary. Raises SpoolError if unreachable."""
        try:
            if isinstance(self.client, RedisCluster):
                await self.client.initialize()
            else:
                await self.client.ping()
        except REDIS_ERRORS as exc:
            raise SpoolError(f"cannot reach Redis at {self.target.redacted}: {self.target.redact(str(exc))}") from exc
        finally:
            if self._sentinel is not None and self._watcher is None:
                self._watcher = asyncio.get_running_loop().create_task(self._watch_sentinels())

    async def ensure(self) -> None:
        """Learn a cluster's slots if not done yet (redis-py's lazy start breaks when a transaction comes first)."""
        if isinstance(self.client, RedisCluster) and not self.client.nodes_manager.slots_cache:
            await self.client.initialize()

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        for client in [self.client, *self._node_clients.values()]:
            with contextlib.suppress(*REDIS_ERRORS):
                await client.aclose()
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                with contextlib.suppress(*REDIS_ERRORS):
                    await sentinel.aclose()

    def pubsub(self) -> aioredis.client.PubSub:
        """A subscription connection. Classic pub/sub reaches every node of a cluster, so any node will do."""
        if isinstance(self.client, RedisCluster):
            return self.client.pubsub(node=self.client.get_random_node())
        return self.client.pubsub()

    async def refresh(self) -> None:
        """After a connection failure: relearn a cluster's topology (a failover moved its slots), and forget
        the nodes that left it (pods come back on new addresses: their clients must not pile up)."""
        if isinstance(self.client, RedisCluster):
            with contextlib.suppress(*REDIS_ERRORS):
                await self.client.nodes_manager.initialize()
            current = {(node.host, int(node.port)) for node in self.client.get_nodes()}
            for address in [a for a in self._node_clients if a not in current]:
                self._replication.pop(address, None)
                with contextlib.suppress(*REDIS_ERRORS):
                    await self._node_clients.pop(address).aclose()

    # -- durable writes ----------------------------------------------------------------------------------

    async def durable(self, key: str, calls: Sequence[ScriptCall], *, wait: bool = True) -> Durable:
        """Run ``calls`` (whose keys all share ``key``'s slot) and WAIT for replicas, on one connection, in one
        round trip (``wait=False``: no WAIT, for writes whose loss costs nothing).

        Raises SpoolError when Redis cannot be reached or a call failed; returns how many replicas have the
        writes (``Durable.replicated`` tells whether that is enough).
        """
        return (await self.durable_many([(key, calls)], wait=wait))[0]

    async def durable_many(self, groups: Sequence[tuple[str, Sequence[ScriptCall]]], *,
                           wait: bool = True) -> list[Durable]:
        """``durable`` for several slots at once: one pipeline (and one WAIT) per node, the nodes in parallel.
        Returns one ``Durable`` per group, in order; raises SpoolError if any node failed."""
        by_node: dict[tuple[str, int], list[int]] = {}
        clients: dict[tuple[str, int], aioredis.Redis] = {}
        try:
            for index, (key, _) in enumerate(groups):
                node, client = await self._client_for(key)
                by_node.setdefault(node, []).append(index)
                clients[node] = client
        except REDIS_ERRORS as exc:
            await self.refresh()
            raise SpoolError(f"spool write failed: {self.target.redact(str(exc))}") from exc
        out: list[Durable | None] = [None] * len(groups)

        async def on_node(node: tuple[str, int]) -> None:
            indexes = by_node[node]
            calls = [call for i in indexes for call in groups[i][1]]
            done = await self._durable_with_retries(node, clients[node], calls, wait=wait)
            start = 0
            for i in indexes:
                count = len(groups[i][1])
                out[i] = Durable(results=done.results[start:start + count], replicas=done.replicas,
                                 required=done.required)
                start += count

        await asyncio.gather(*(on_node(node) for node in by_node))
        return [d for d in out if d is not None]

    async def _durable_with_retries(self, node: tuple[str, int], client: aioredis.Redis,
                                    calls: Sequence[ScriptCall], *, wait: bool) -> Durable:
        last: BaseException | None = None
        # A single server or Sentinel: redis-py's connection retry already reconnected (to the new primary).
        # A cluster: a failover moves slots to another node, which only asking again finds.
        for attempt in range(3 if isinstance(self.client, RedisCluster) else 1):
            try:
                if attempt and isinstance(self.client, RedisCluster):
                    # The slot may have moved (a failover): ask again which node serves it.
                    node, client = await self._client_for(calls[0].keys[0])
                required = await self._required_acks(node, client) if wait else 0
                return await self._durable_on(client, calls, required)
            except REDIS_ERRORS as exc:
                last = exc
                if not _transient(exc):
                    break
                await self.refresh()
                await asyncio.sleep(0.1 * (attempt + 1))
        raise SpoolError(f"spool write failed: {self.target.redact(str(last))}") from last

    async def _durable_on(self, client: aioredis.Redis, calls: Sequence[ScriptCall], required: int) -> Durable:
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            for call in calls:
                pipe.evalsha(call.sha, len(call.keys), *call.keys, *call.args)
            if required:
                pipe.execute_command("WAIT", required, max(1, int(self.replica_ack_timeout * 1000)))
            results = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                for script in {call.script for call in calls}:
                    await client.script_load(script)
                continue
            for result in results:
                if isinstance(result, Exception):
                    raise result
            replicas = int(results[-1]) if required else 0
            return Durable(results=list(results[:len(calls)]), replicas=replicas, required=required)
        raise SpoolError("scripts could not be loaded")  # pragma: no cover - the loop returns or raises

    async def _client_for(self, key: str) -> tuple[tuple[str, int], aioredis.Redis]:
        if isinstance(self.client, RedisCluster):
            await self.ensure()
            node = self.client.get_node_from_key(key)
            if node is None:
                raise RedisConnectionError(f"no cluster node serves the slot of {key}")
            address = (node.host, int(node.port))
            return address, self._client_for_node(address)
        return ("", 0), self.client

    @property
    def clustered(self) -> bool:
        """Whether this is a Redis Cluster (keys of different slots may be on different nodes)."""
        return isinstance(self.client, RedisCluster)

    async def acks_required(self, key: str) -> int:
        """How many replicas a write to ``key``'s node must reach now (``--replica-acks``, or auto)."""
        node, client = await self._client_for(key)
        return await self._required_acks(node, client)

    async def _required_acks(self, node: tuple[str, int], client: aioredis.Redis) -> int:
        if self.replica_acks is not None:
            return self.replica_acks   # a number given: nothing to look up
        return self._required(await self._node_replication(node, client))

    def _required(self, state: _NodeReplication) -> int:
        """``--replica-acks``, or auto: 1 once this primary has had a replica."""
        return self.replica_acks if self.replica_acks is not None else min(1, state.ever)

    async def _node_replication(self, node: tuple[str, int], client: aioredis.Redis, *,
                                fresh: bool = False) -> _NodeReplication:
        # A single server or Sentinel (node ("", 0)) has one state, "the primary, whichever it is", not one per
        # address: INFO goes out on any pooled connection, and for a moment after a failover some of those
        # still reach the old primary (redis-py drops only idle ones when it learns the new address). Filed
        # under the new address, the old primary's "connected_slaves:0" made a fresh state's `ever` 0, so
        # writes went to the cut-off primary without WAIT and were answered 250, then lost in its demotion
        # (CI, Debian's 3.11.2). One state per deployment: once it has had a replica, every write waits.
        state = self._replication.setdefault(node, _NodeReplication())
        now = time.monotonic()
        if fresh or now - state.checked >= REPLICATION_CHECK_INTERVAL:
            info = await client.info("replication")
            state.checked = now
            state.role = str(info.get("role", "master"))
            replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            state.ever = max(state.ever, int(info.get("connected_slaves", 0)))
            # A replica that stopped answering (SIGSTOP, a partition) stays "connected" until repl-timeout
            # (60 s by default); its lag (seconds since its last ack) says the truth sooner.
            state.connected = sum(1 for r in replicas if int(r.get("lag", 0)) <= REPLICA_LAG_OK
                                  and r.get("state") == "online")
        return state

    # -- health ------------------------------------------------------------------------------------------

    async def problems(self) -> list[str]:
        """Why this Redis cannot take a 250 now (empty when it can): unreachable, not a writable primary, too few
        replicas for ``--replica-acks``, or a cluster with uncovered slots."""
        try:
            if isinstance(self.client, RedisCluster):
                return await self._cluster_problems(self.client)
            state = await self._node_replication(("", 0), self.client, fresh=True)
            return self._replication_problems("Redis", state)
        except REDIS_ERRORS as exc:
            return [f"redis unreachable: {self.target.redact(str(exc)) or type(exc).__name__}"]

    async def _cluster_problems(self, cluster: RedisCluster) -> list[str]:
        node = cluster.get_random_node()
        info = await cluster.cluster_info(target_nodes=node)
        if info.get("cluster_state") != "ok":
            await self.refresh()
            return [f"redis cluster state is {info.get('cluster_state')!r} (seen from {node.name})"]
        problems = []
        for primary in cluster.get_primaries():
            address = (primary.host, int(primary.port))
            state = await self._node_replication(address, self._client_for_node(address), fresh=True)
            problems += self._replication_problems(f"Redis {primary.name}", state)
        return problems

    def _client_for_node(self, address: tuple[str, int]) -> aioredis.Redis:
        """A plain client for one cluster node: WAIT must follow the writes on the same connection."""
        client = self._node_clients.get(address)
        if client is None:
            client = self._node_clients[address] = aioredis.Redis(
                host=address[0], port=address[1], ssl=self.target.tls, retry=Retry(ExponentialBackoff(), 0),
                **self._common)
        return client

    def _replication_problems(self, name: str, state: _NodeReplication) -> list[str]:
        if state.role != "master":
            return [f"{name} is a {state.role}, not a writable primary"]
        required = self._required(state)
        if state.connected < required:
            return [f"{name} has {state.connected} connected replica(s); --replica-acks needs {required}"]
        return []

    # -- following Sentinel ------------------------------------------------------------------------------

    async def _watch_sentinels(self) -> None:
        assert self._sentinel is not None and isinstance(self.client, aioredis.Redis)
        pool = self.client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        # The primary this loop last made every connection go to. Not pool.master_address: redis-py sets that
        # itself whenever a new connection asks the sentinels, and then drops only the idle connections, so a
        # change seen there first would go unnoticed here while busy connections kept the old primary.
        followed = tuple(pool.master_address) if pool.master_address else None
        while True:
            await asyncio.sleep(SENTINEL_CHECK_INTERVAL)
            try:
                address = tuple(await self._sentinel.discover_master(self.target.master))
                if followed is not None and address != followed:
                    log.warning("redis primary changed", extra={"old": f"{followed[0]}:{followed[1]}",
                                                                "new": f"{address[0]}:{address[1]}"})
                    pool.master_address = address
                    # Every connection, in use or not: one still open to the old primary would keep writing there.
                    await pool.disconnect(inuse_connections=True)
                followed = address
            except REDIS_ERRORS as exc:
                log.debug("sentinels not answering: %s", self.target.redact(str(exc)))
            except Exception:
                # This loop is what follows failovers: it must outlive anything unexpected.
                log.exception("following the Sentinel primary failed; trying again")


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError | ReadOnlyError):
        return True
    text = str(exc)
    return isinstance(exc, ResponseError) and text.startswith(("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN",
                                                               "READONLY", "LOADING", "MASTERDOWN"))
