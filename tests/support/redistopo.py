"""Real Redis topologies for failover tests: nodes, a cutting TCP proxy, a Sentinel set and a Cluster.

Everything is a real ``redis-server`` (Debian's 7.0) in its own process group, with its own directory, config
file and log, owned by one ``RedisProcesses`` that SIGKILLs every group and stops every proxy when the
fixture ends, however the test ends.

Addresses. Linux routes all of 127/8 to ``lo``, so each process gets a loopback address of its own
(127.0.0.10, .11, ...) and binds there; ``bind-source-addr`` makes its outgoing links (replication,
Sentinel's links, the cluster bus) leave from that address too — ``bind`` alone does not: Redis 7.0 then
connects from 127.0.0.1 (seen with CLIENT LIST). A test client connects from 127.0.0.1.

Sentinel set. Every data node sits behind a ``TcpProxy`` on its own address, and is known to everyone
(``replicaof``, ``sentinel monitor``, ``replica-announce-ip/port``) only by that proxy's address, so the
sentinels, the replicas and a client reach a node only through its proxy, each from its own source address:

    client 127.0.0.1 ──┐
    sentinels .13-.15 ─┼─> proxy 127.0.0.10:P ──> primary 127.0.0.10:N
    replicas  .11, .12 ┘                 (replicas and the sentinels reach .11/.12 through their proxies)

``partition_primary()`` cuts, at the primary's proxy, every source but the client's: the sentinels promote a
replica while the client still writes to the old primary; after ``heal()`` the sentinels turn the old primary
into a replica of the new one and what it took meanwhile is discarded.

Cluster set. Six cluster-enabled nodes (each on its own address, bus port = port + 10000) joined by
``redis-cli --cluster create --cluster-replicas 1``; no proxies.

Start-up waits are synchronous (they run before the test's event loop has work); the waits that span a
failover are ``async`` so a test's gateways keep running meanwhile. Proxies run in threads of their own,
so a test loop that blocks does not stall replication. ``info()`` and the other probes are short
synchronous calls with a 2 s socket timeout (a SIGSTOPped node makes them wait that long).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mxgate import keys
from mxgate.embedded_redis import find_redis_server, free_port
from support.procs import eventually

Address = tuple[str, int]
Directives = Mapping[str, str | Sequence[str]]  # "directive": "value", or a list for a repeated directive
T = TypeVar("T")


def _wait(check: Callable[[], T], *, timeout: float, what: str, interval: float = 0.05) -> T:
    """Synchronous ``eventually`` for start-up, before any event loop has work to do."""
    deadline = time.monotonic() + timeout
    last: T = check()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)
        last = check()
    return last


EMPTY = '""'  # how a config file spells an empty value (save "")


def _render(directives: Directives) -> str:
    lines = []
    for name, value in directives.items():
        for one in [value] if isinstance(value, str) else value:
            lines.append(f"{name} {one or EMPTY}")
    return "\n".join(lines) + "\n"


# -- one redis-server --------------------------------------------------------------------------------------


@dataclass(eq=False)
class RedisNode:
    """One ``redis-server`` (or sentinel) on ``host:port``; its config is written once, at the first start.

    Redis itself rewrites the config later (a sentinel its state, a data node after Sentinel's REPLICAOF
    + CONFIG REWRITE), so ``restart()`` comes back in the role it was last given, on the same port, with
    its AOF (and a cluster node its nodes.conf).
    """

    name: str
    host: str
    port: int
    directory: Path
    config: Directives
    sentinel: bool = False
    password: str | None = None
    popen: subprocess.Popen[bytes] | None = None
    stopped: bool = False  # SIGSTOPped and not yet continued

    @property
    def address(self) -> Address:
        return self.host, self.port

    @property
    def conf_path(self) -> Path:
        return self.directory / ("sentinel.conf" if self.sentinel else "redis.conf")

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def answering(self) -> bool:
        return self.alive and not self.stopped

    def start(self, *, timeout: float = 10.0) -> RedisNode:
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.conf_path.exists():
            base: dict[str, str | Sequence[str]] = {
                "port": str(self.port), "bind": self.host, "bind-source-addr": self.host,
                # Only loopback addresses are bound; other 127.x sources must not meet "protected mode".
                "protected-mode": "no", "dir": str(self.directory), "daemonize": "no", "logfile": "",
            }
            if not self.sentinel:
                base |= {"appendonly": "yes", "appendfsync": "everysec", "save": "",
                         # The default waits 5 s for more replicas before a full sync; tests resync often.
                         "repl-diskless-sync-delay": "0"}
            if self.password:
                base |= {"requirepass": self.password} | ({} if self.sentinel else {"masterauth": self.password})
            self.conf_path.write_text(_render({**base, **self.config}))
        argv = [find_redis_server(), str(self.conf_path), *(["--sentinel"] if self.sentinel else [])]
        with self.log_path.open("ab") as log:  # appended to: one log over restarts
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        self.stopped = False
        self.wait_ready(timeout=timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def client(self, **options: Any) -> redis.Redis:
        """A plain synchronous client for this node: decoded RESP2 replies (flat arrays, whatever redis-py
        defaults to), 2 s timeouts and no retries (redis-py 8 retries a timeout for seconds by default)."""
        settings: dict[str, Any] = {"decode_responses": True, "socket_timeout": 2, "socket_connect_timeout": 2,
                                    "protocol": 2, "retry": Retry(NoBackoff(), 0)}
        return redis.Redis(host=self.host, port=self.port, password=self.password, **(settings | options))

    def call(self, *args: str | int) -> Any:
        """One command, with redis-py's reply parsing bypassed for multi-word commands (raw replies)."""
        with self.client() as client:
            return client.execute_command(*args)

    def info(self, section: str = "replication") -> dict[str, Any]:
        with self.client() as client:
            info: dict[str, Any] = client.info(section)
            return info

    def wait_ready(self, *, timeout: float = 10.0) -> None:
        """Until PING answers PONG (not -LOADING); fails at once, with the log, if the process exits."""
        def ready() -> bool:
            if not self.alive:
                raise AssertionError(f"{self.name} exited ({self.popen and self.popen.returncode}):\n"
                                     f"{self.log_tail()}")
            try:
                with self.client(socket_timeout=0.5) as client:
                    return bool(client.ping())
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                return False
        _wait(ready, timeout=timeout, what=f"{self.name} on {self.host}:{self.port} to answer PING")

    def _signal_group(self, signum: int) -> None:
        # Only while the leader is unreaped: after that its pid (our group id) may belong to someone else.
        if self.alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signum)

    def kill9(self) -> None:
        """SIGKILL the whole group (an AOF-rewrite child too), as a crash or the OOM killer would."""
        self._signal_group(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(timeout=10)
        self.stopped = False

    def stop(self) -> None:
        """SIGSTOP: the node keeps its sockets but answers nothing (a stalled VM, a long GC pause)."""
        self._signal_group(signal.SIGSTOP)
        self.stopped = True

    def cont(self) -> None:
        self._signal_group(signal.SIGCONT)
        self.stopped = False

    def terminate(self, *, timeout: float = 10.0) -> None:
        """SIGTERM (Redis fsyncs the AOF and exits), SIGKILL if it has not exited within ``timeout``."""
        if not self.alive:
            return
        self._signal_group(signal.SIGTERM)
        self.cont()  # a stopped process acts on SIGTERM only once continued
        try:
            assert self.popen is not None
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()

    def restart(self, *, timeout: float = 10.0) -> RedisNode:
        """Start again after ``kill9()``/``terminate()``: same port, same directory, config and AOF."""
        return self.start(timeout=timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# -- a TCP proxy that can cut chosen sources -----------------------------------------------------------


class TcpProxy:
    """Forwards ``listen_host:<port>`` to ``target``; ``cut(sources)`` partitions chosen client addresses.

    Runs an asyncio loop in a thread of its own. Every public method hands its work to that loop and waits
    for it, so when ``cut()`` returns the cut connections are already reset (both sides aborted) and any
    new connection from a cut source is reset on accept, until ``heal()``. Connections from other sources
    are untouched. ``sources()`` counts the connections accepted per source address, cut ones included.
    """

    def __init__(self, target: Address, *, listen_host: str, name: str) -> None:
        self.target = target
        self.listen_host = listen_host
        self.name = name
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"proxy-{name}", daemon=True)
        self._server: asyncio.Server | None = None
        self._cut: set[str] = set()
        self._seen: Counter[str] = Counter()
        self._links: dict[str, set[asyncio.WriteTransport]] = {}

    @property
    def address(self) -> Address:
        return self.listen_host, self.port

    def start(self) -> TcpProxy:
        self._thread.start()
        self._server = self._run(asyncio.start_server(self._handle, self.listen_host, 0))
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def _run(self, work: Any) -> Any:
        """Run a coroutine, or call a function, in the proxy's loop and wait for its result."""
        if asyncio.iscoroutine(work):
            return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout=10)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            try:
                future.set_result(work())
            except BaseException as exc:  # handed back to the caller's thread
                future.set_exception(exc)
        self._loop.call_soon_threadsafe(call)
        return future.result(timeout=10)

    def cut(self, sources: Iterable[str]) -> None:
        def cut_now() -> None:
            for source in sources:
                self._cut.add(source)
                for transport in self._links.pop(source, set()):
                    transport.abort()
        self._run(cut_now)

    def heal(self) -> None:
        self._run(self._cut.clear)

    def sources(self) -> Counter[str]:
        counts: Counter[str] = self._run(lambda: Counter(self._seen))
        return counts

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for handler in handlers:
                handler.cancel()  # its finally aborts both sides of its link
            await asyncio.gather(*handlers, return_exceptions=True)
        self._run(shut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = str(writer.get_extra_info("peername")[0])
        self._seen[source] += 1
        if source in self._cut:
            writer.transport.abort()
            return
        link = self._links.setdefault(source, set())
        link.add(writer.transport)
        upstream: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream = await asyncio.open_connection(*self.target)
            if source in self._cut or writer.transport.is_closing():  # cut (or gone) while we connected
                return
            link.add(upstream.transport)
            pumps = [asyncio.ensure_future(_pump(reader, upstream)), asyncio.ensure_future(_pump(up_reader, writer))]
            _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pending:
                pump.cancel()
        except OSError:
            pass  # the node is down: the client sees its connection reset, as it would without a proxy
        finally:
            for transport in (writer.transport, *([upstream.transport] if upstream else [])):
                link.discard(transport)
                transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


# -- the owner of every process and proxy ------------------------------------------------------------------


@dataclass
class RedisProcesses:
    """Creates nodes, proxies and whole topologies in ``directory``; ``close()`` ends them all."""

    directory: Path
    nodes: list[RedisNode] = field(default_factory=list)
    proxies: list[TcpProxy] = field(default_factory=list)
    _next_octet: int = 10

    def hosts(self, count: int) -> list[str]:
        """``count`` loopback addresses no other node of this test uses (127.0.0.10 upwards)."""
        if self._next_octet + count > 255:
            raise RuntimeError("out of 127.0.0.x addresses")
        first, self._next_octet = self._next_octet, self._next_octet + count
        return [f"127.0.0.{octet}" for octet in range(first, first + count)]

    def node(self, name: str, host: str, *, port: int | None = None, config: Directives | None = None,
             sentinel: bool = False, password: str | None = None) -> RedisNode:
        """A node (not started yet): ``start()`` it once the config can name everything it needs."""
        node = RedisNode(name, host, port or free_port(host), self.directory / name, dict(config or {}),
                         sentinel=sentinel, password=password)
        self.nodes.append(node)
        return node

    def proxy(self, target: Address, *, listen_host: str, name: str) -> TcpProxy:
        proxy = TcpProxy(target, listen_host=listen_host, name=name)
        self.proxies.append(proxy)
        return proxy.start()

    def sentinel_set(self, *, password: str | None = None, down_after_ms: int = 1500,
                     failover_timeout_ms: int = 3000, data_config: Directives | None = None,
                     sentinel_config: Directives | None = None) -> SentinelSet:
        """A primary, two replicas and three sentinels, started and in sync (see ``SentinelSet``).

        ``down_after_ms`` 1500, not 1000: Sentinel reconnects a link at most once a second, and with 1000 a
        sentinel that had just switched to the new primary sometimes timed it out before its first PONG
        and started a second, needless failover (2 of 6 runs here with a cluster failing over meanwhile;
        0 of 8 with 1500).
        """
        return SentinelSet(self, password=password, down_after_ms=down_after_ms,
                           failover_timeout_ms=failover_timeout_ms, data_config=data_config or {},
                           sentinel_config=sentinel_config or {})

    def cluster_set(self, *, password: str | None = None, node_timeout_ms: int = 1500,
                    config: Directives | None = None) -> ClusterSet:
        """Three primaries with a replica each, formed, ``cluster_state:ok`` (see ``ClusterSet``)."""
        return ClusterSet(self, password=password, node_timeout_ms=node_timeout_ms, config=config or {})

    def close(self) -> None:
        """SIGKILL every node's group and stop every proxy; one failing does not spare the others."""
        errors: list[BaseException] = []
        for end in [*(n.kill9 for n in self.nodes), *(p.close for p in self.proxies)]:
            try:
                end()
            except Exception as exc:  # raised below, once everything else has been ended
                errors.append(exc)
        if errors:
            raise errors[0]


def _merge(base: Directives, extra: Directives) -> dict[str, str | Sequence[str]]:
    """``extra`` over ``base``; a repeated directive (a list, e.g. "sentinel") is appended to, not replaced."""
    merged = dict(base)
    for name, value in extra.items():
        old = merged.get(name)
        if isinstance(old, list) and not isinstance(value, str):
            merged[name] = [*old, *value]
        else:
            merged[name] = value
    return merged


def _probe(check: Callable[[], T]) -> T | None:
    """``check()``, or None while the node it asks is unreachable or busy (a failover in progress)."""
    try:
        return check()
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        return None


# -- Sentinel ------------------------------------------------------------------------------------------


class SentinelSet:
    """A primary, two replicas and three sentinels (quorum 2) monitoring it as ``master_name``.

    ``data_nodes[0]`` is the primary at start-up, ``data_nodes[1:]`` the replicas; ``proxies[i]`` fronts
    ``data_nodes[i]``, and every address the sentinels report is a proxy's address (``node_at`` maps it
    back). Extra directives: ``data_config`` for the data nodes, ``sentinel_config`` for the sentinels (a
    "sentinel" list there is appended to the set's own ``sentinel ...`` lines).
    """

    master_name = "mxgate"

    def __init__(self, owner: RedisProcesses, *, password: str | None, down_after_ms: int,
                 failover_timeout_ms: int, data_config: Directives, sentinel_config: Directives) -> None:
        began = time.monotonic()
        self.password = password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        hosts = owner.hosts(6)
        self.proxies: list[TcpProxy] = []
        self.data_nodes: list[RedisNode] = []
        # Each node's port stays bound until the proxies have theirs, so no proxy is given a node's port.
        reserved = [socket.create_server((host, 0)) for host in hosts[:3]]
        try:
            for index, (host, sock) in enumerate(zip(hosts[:3], reserved, strict=True)):
                self.proxies.append(owner.proxy((host, sock.getsockname()[1]), listen_host=host, name=f"data{index}"))
        finally:
            for sock in reserved:
                sock.close()
        primary = self.proxies[0].address
        for index, (host, proxy) in enumerate(zip(hosts[:3], self.proxies, strict=True)):
            config: dict[str, str | Sequence[str]] = {
                # Known to all by its proxy's address, so replicas and sentinels never bypass the proxy.
                "replica-announce-ip": proxy.listen_host, "replica-announce-port": str(proxy.port)}
            if index:
                config["replicaof"] = f"{primary[0]} {primary[1]}"
            node = owner.node(f"data{index}", host, port=proxy.target[1], password=password,
                              config=_merge(config, data_config))
            self.data_nodes.append(node.start())
        name = self.master_name
        self.sentinels: list[RedisNode] = []
        for index, host in enumerate(hosts[3:]):
            port = free_port(host)
            lines = [f"monitor {name} {primary[0]} {primary[1]} 2",
                     f"down-after-milliseconds {name} {self.down_after_ms}",
                     f"failover-timeout {name} {self.failover_timeout_ms}", f"parallel-syncs {name} 1",
                     f"announce-ip {host}", f"announce-port {port}",
                     *([f"auth-pass {name} {password}"] if password else [])]
            node = owner.node(f"sentinel{index}", host, port=port, sentinel=True, password=password,
                              config=_merge({"sentinel": lines}, sentinel_config))
            self.sentinels.append(node.start())
        _wait(self._formed, timeout=30, what="2 replicas online and 3 sentinels that know them and each other")
        self.startup_seconds = time.monotonic() - began

    def _formed(self) -> bool:
        replicas = [v for k, v in self.data_nodes[0].info("replication").items() if k.startswith("slave")]
        if len(replicas) != 2 or any(r["state"] != "online" for r in replicas):
            return False
        for sentinel in self.sentinels:
            state = self.sentinel_master(sentinel)
            if (state["flags"], state["num-slaves"], state["num-other-sentinels"]) != ("master", "2", "2"):
                return False
        return True

    @property
    def sentinel_addresses(self) -> list[Address]:
        return [s.address for s in self.sentinels]

    @property
    def replicas(self) -> list[RedisNode]:
        """The replicas at start-up (stable indices for stop_replica/cont_replica, whatever was promoted)."""
        return self.data_nodes[1:]

    def address_of(self, node: RedisNode) -> Address:
        """How the sentinels, the other nodes and clients reach ``node``: its proxy's address."""
        return self.proxies[self.data_nodes.index(node)].address

    def node_at(self, address: Address) -> RedisNode:
        for node, proxy in zip(self.data_nodes, self.proxies, strict=True):
            if address in (proxy.address, node.address):
                return node
        raise KeyError(f"no data node at {address}")

    def sentinel_master(self, sentinel: RedisNode) -> dict[str, str]:
        """SENTINEL MASTER, raw: field -> value (strings)."""
        flat = sentinel.call("SENTINEL", "MASTER", self.master_name)
        return dict(zip(flat[::2], flat[1::2], strict=True))

    def primary_reports(self) -> list[Address | None]:
        """What each sentinel answers to SENTINEL GET-MASTER-ADDR-BY-NAME (None: it did not answer)."""
        def ask(sentinel: RedisNode) -> Address | None:
            if not sentinel.answering:
                return None
            reply = _probe(lambda: sentinel.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name))
            return (reply[0], int(reply[1])) if reply else None
        return [ask(s) for s in self.sentinels]

    def current_primary(self) -> Address | None:
        """The primary's address if every answering sentinel reports the same one, else None."""
        reports = {r for r in self.primary_reports() if r is not None}
        return reports.pop() if len(reports) == 1 else None

    def primary_node(self) -> RedisNode:
        address = self.current_primary()
        if address is None:
            raise AssertionError(f"the sentinels disagree on the primary: {self.primary_reports()}")
        return self.node_at(address)

    async def wait_for_failover(self, old: Address, *, timeout: float = 30.0) -> Address:
        """Until all answering sentinels report one primary other than ``old`` and it says role:master."""
        def promoted() -> Address | None:
            now = self.current_primary()
            if now is None or now == old or not self.node_at(now).answering:
                return None
            role = _probe(lambda: self.node_at(now).info("replication")["role"])
            return now if role == "master" else None
        result: Address = await eventually(promoted, timeout=timeout,
                                           what=f"the sentinels to promote a replica in place of {old}")
        return result

    def partition_primary(self) -> Address:
        """Cut the links to the current primary from the other data nodes and the sentinels, not from
        clients (the primary makes no links of its own while it is one).

        Returns the primary's address; clients connecting from 127.0.0.1 still reach it there.
        """
        primary = self.primary_node()
        others = [n.host for n in self.data_nodes if n is not primary] + [s.host for s in self.sentinels]
        self.proxies[self.data_nodes.index(primary)].cut(others)
        return self.address_of(primary)

    def heal(self) -> None:
        """End every cut. Sentinel turns a healed old primary into a replica of the new one only after it
        has reported role:master for 4 hello periods (8 s): about 8-11 s after heal() here."""
        for proxy in self.proxies:
            proxy.heal()

    def kill9_primary(self) -> Address:
        """SIGKILL the node the sentinels report as primary; returns its address. ``restart()`` brings it
        back as a primary with its AOF; the sentinels make it a replica some 8-11 s later (see heal)."""
        primary = self.primary_node()
        primary.kill9()
        return self.address_of(primary)

    def stop_replica(self, index: int) -> RedisNode:
        self.replicas[index].stop()
        return self.replicas[index]

    def cont_replica(self, index: int) -> RedisNode:
        self.replicas[index].cont()
        return self.replicas[index]

    def replication_lag(self) -> dict[str, int]:
        """Bytes each connected replica is behind: the primary's master_repl_offset minus the offset the
        replica last acknowledged (replicas ack every second, and at once on WAIT). Keyed by node name;
        a replica the primary does not list as connected is absent."""
        info = self.primary_node().info("replication")
        return {self.node_at((r["ip"], int(r["port"]))).name: int(info["master_repl_offset"]) - int(r["offset"])
                for k, r in info.items() if k.startswith("slave")}


# -- Cluster -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterNodeView:
    """One line of CLUSTER NODES: how the asked node sees ``address``."""

    node_id: str
    address: Address
    flags: frozenset[str]  # myself, master, slave, fail, fail?, ...
    master_id: str | None  # the primary it replicates, for a replica

    @classmethod
    def parse(cls, line: str) -> ClusterNodeView:
        node_id, where, flags, master = line.split()[:4]
        host, port = where.split("@")[0].rsplit(":", 1)
        return cls(node_id, (host, int(port)), frozenset(flags.split(",")), None if master == "-" else master)


def _cluster_port(host: str) -> int:
    """A free port whose cluster bus port (port + 10000) is free as well."""
    for _ in range(100):
        port = free_port(host)
        if port + 10000 > 65535:
            continue
        try:
            with socket.create_server((host, port + 10000)):
                return port
        except OSError:
            continue
    raise RuntimeError(f"no free port pair (port, port + 10000) on {host}")


class ClusterSet:
    """Six cluster nodes: three primaries with one replica each, all slots assigned, every link up."""

    def __init__(self, owner: RedisProcesses, *, password: str | None, node_timeout_ms: int,
                 config: Directives) -> None:
        began = time.monotonic()
        self.password = password
        self.nodes: list[RedisNode] = []
        for index, host in enumerate(owner.hosts(6)):
            base = {"cluster-enabled": "yes", "cluster-config-file": "nodes.conf",
                    "cluster-node-timeout": str(node_timeout_ms), "cluster-announce-ip": host}
            node = owner.node(f"cluster{index}", host, port=_cluster_port(host), password=password,
                              config=_merge(base, config))
            self.nodes.append(node.start())
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli not found on PATH (Debian: apt-get install redis-tools)")
        auth = ["-a", password, "--no-auth-warning"] if password else []
        created = subprocess.run([cli, *auth, "--cluster", "create", *(f"{h}:{p}" for h, p in self.startup_nodes),
                                  "--cluster-replicas", "1", "--cluster-yes"],
                                 capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if created.returncode:
            raise AssertionError(f"redis-cli --cluster create failed ({created.returncode}):\n"
                                 f"{created.stdout}\n{created.stderr}")
        _wait(self.formed, timeout=30,
              what="cluster_state:ok on every node and a replica online for every primary")
        self.startup_seconds = time.monotonic() - began

    @property
    def startup_nodes(self) -> list[Address]:
        return [n.address for n in self.nodes]

    def node_at(self, address: Address) -> RedisNode:
        for node in self.nodes:
            if node.address == address:
                return node
        raise KeyError(f"no cluster node at {address}")

    def _asked(self) -> RedisNode:
        for node in self.nodes:
            if node.answering:
                return node
        raise AssertionError("no cluster node answers")

    def cluster_info(self, node: RedisNode) -> dict[str, str]:
        text: str = node.call("CLUSTER", "INFO")
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def view(self, node: RedisNode | None = None) -> list[ClusterNodeView]:
        """CLUSTER NODES as ``node`` (default: the first answering node) sees it."""
        text: str = (node or self._asked()).call("CLUSTER", "NODES")
        return [ClusterNodeView.parse(line) for line in text.splitlines() if line.strip()]

    def primaries(self) -> list[RedisNode]:
        """The primaries that serve slots, in ``nodes`` order (a failed one is not among them)."""
        serving = {tuple(entry[2][:2]) for entry in self._asked().call("CLUSTER", "SLOTS")}
        return [n for n in self.nodes if (n.host, n.port) in {(h, int(p)) for h, p in serving}]

    def replica_of(self, primary: RedisNode) -> RedisNode:
        """The replica ``primary`` feeds, by its own INFO (its live replica link, not gossip)."""
        replicas = [v for k, v in primary.info("replication").items() if k.startswith("slave")]
        if not replicas:
            raise AssertionError(f"{primary.name} has no replica connected")
        return self.node_at((replicas[0]["ip"], int(replicas[0]["port"])))

    def keyslot(self, key: str) -> int:
        return int(self._asked().call("CLUSTER", "KEYSLOT", key))

    def slot_owners(self) -> dict[int, RedisNode]:
        """Slot -> the primary serving it, from CLUSTER SLOTS."""
        owners: dict[int, RedisNode] = {}
        for start, end, primary, *_ in self._asked().call("CLUSTER", "SLOTS"):
            node = self.node_at((primary[0], int(primary[1])))
            owners.update(dict.fromkeys(range(int(start), int(end) + 1), node))
        return owners

    def node_for_key(self, key: str) -> RedisNode:
        return self.slot_owners()[self.keyslot(key)]

    def providers_on_distinct_shards(self, count: int, *, template: str = "domain:d{}.test") -> list[str]:
        """``count`` provider ids (``template`` numbered 1, 2, ...) whose keys (``mxg:{p:<id>}:...``, the
        slot of ``keys.queue(id)``) are served by ``count`` different primaries."""
        owners = self.slot_owners()
        if count > len(set(owners.values())):
            raise ValueError(f"only {len(set(owners.values()))} primaries serve slots, {count} asked")
        chosen: dict[str, str] = {}  # primary name -> provider id
        for number in range(1, 1001):
            provider = template.format(number)
            chosen.setdefault(owners[self.keyslot(keys.queue(provider))].name, provider)
            if len(chosen) == count:
                return list(chosen.values())
        raise AssertionError(f"1000 names from {template!r} did not reach {count} primaries")

    def formed(self) -> bool:
        """Every node says cluster_state:ok and sees all six healthy, as three primary/replica pairs, and
        every slot-serving primary has its replica online."""
        def check() -> bool:
            for node in self.nodes:
                if self.cluster_info(node)["cluster_state"] != "ok":
                    return False
                views = self.view(node)  # and it knows everyone, healthy, as three primary/replica pairs
                fed = Counter(v.master_id for v in views if "slave" in v.flags)
                if (len(views) != len(self.nodes) or any({"fail", "fail?"} & v.flags for v in views)
                        or sorted(fed.values()) != [1, 1, 1]):
                    return False
            primaries = self.primaries()
            if len(primaries) != 3:
                return False
            for primary in primaries:
                info = primary.info("replication")
                if info["role"] != "master" or info.get("slave0", {}).get("state") != "online":
                    return False
            return True
        return bool(_probe(check))

    async def kill9_primary(self, primary: RedisNode, *, timeout: float = 30.0) -> RedisNode:
        """SIGKILL ``primary``; wait until its replica serves its slots and every live node says ok.
        Returns the promoted replica, which has no replica until ``primary.restart()`` (it rejoins as one)."""
        replica = self.replica_of(primary)
        primary.kill9()

        def promoted() -> bool:
            def check() -> bool:
                return (replica.info("replication")["role"] == "master"
                        and replica in self.primaries()
                        and all(self.cluster_info(n)["cluster_state"] == "ok" for n in self.nodes if n.answering))
            return bool(_probe(check))
        await eventually(promoted, timeout=timeout, what=f"{replica.name} to take over from {primary.name}")
        return replica

    def stop_replica(self, primary: RedisNode) -> RedisNode:
        replica = self.replica_of(primary)
        replica.stop()
        return replica
