"""One gateway process: SMTP ingress, the delivery engine and the health endpoints around one Redis.

Gateways keep no state of their own: the spool, the policies and (later) the fleet limits are in
Redis, so any number of them can run against one Redis and any of them can be killed at any moment.

Shutdown (SIGTERM, as Kubernetes sends it): readiness turns false at once, the listening socket
closes, SMTP sessions get ``shutdown_grace`` to finish their transaction (a client cut off before its
``250`` keeps its message and retries elsewhere), deliveries in flight finish or are handed back to
the spool, and claimed jobs not yet attempted are released so another pod takes them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.smtp import SMTP

from mxgate.egress.engine import DeliveryEngine, EngineSettings
from mxgate.errors import ConfigError, SpoolError
from mxgate.ingress.auth import Authenticator, Credentials
from mxgate.ingress.handler import IngressHandler, IngressPolicy, IPNetwork
from mxgate.ingress.selfcheck import probe_host, smtp_problem
from mxgate.ingress.smtp import IngressSMTP
from mxgate.limits.fleet import FleetLimiter
from mxgate.policybook import PolicyBook
from mxgate.redisconn import RedisConnection, parse_redis_url
from mxgate.routing.dns import MxResolver
from mxgate.routing.router import Router
from mxgate.smtpwire import writable
from mxgate.spool.store import Spool
from mxgate.tasks import cancel_and_wait
from mxgate.telemetry.fleet import TelemetryRecorder
from mxgate.telemetry.health import HealthServer
from mxgate.telemetry.metrics import Metrics
from mxgate.telemetry.redis_cost import register_round_trips

log = logging.getLogger("mxgate.gateway")

DEFAULT_NETWORKS: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewaySettings:
    """Everything one gateway process needs; the CLI and the Helm chart fill it in."""

    redis_url: str
    """Redis holding the spool, policies and limits: ``redis://``, ``rediss://``, ``unix://``,
    ``redis+sentinel://`` or ``redis+cluster://`` (see ``mxgate.redisconn``)."""
    redis_password: str | None = field(default=None, repr=False)
    """Password for the Redis nodes (and sentinels), read from a file; overrides one in the URL."""
    replica_acks: int | None = None
    """Replicas that must have a message before it is answered 250; None: auto (1 once the primary has a
    replica, 0 on a lone Redis)."""
    replica_ack_timeout: float = 1.0
    """Seconds to wait for those replicas; a message not replicated by then gets 451 4.3.0."""
    listen: tuple[str, int] = ("0.0.0.0", 2525)
    """SMTP listen address."""
    metrics_listen: tuple[str, int] | None = ("0.0.0.0", 9325)
    """/healthz, /readyz and /metrics listen address; None disables them."""
    reuse_port: bool = False
    """SO_REUSEPORT on the SMTP socket, so several gateway processes share one port."""
    hostname: str = field(default_factory=socket.getfqdn)
    """Our name in the banner, EHLO, Received headers and bounce messages."""
    allowed_networks: tuple[IPNetwork, ...] = DEFAULT_NETWORKS
    """Clients in these networks may relay without authenticating."""
    tls_cert: Path | None = None
    """PEM certificate chain offered with STARTTLS."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""
    credentials_file: Path | None = None
    """File of ``user:$argon2id$...`` lines; enables SMTP AUTH PLAIN and LOGIN."""
    auth_without_tls: bool = False
    """Offer AUTH on unencrypted connections too (off: passwords only travel inside TLS)."""
    max_message_size: int = 25 * 1024 * 1024
    """Largest message accepted, in bytes (advertised with SIZE)."""
    max_recipients: int = 1000
    """Most recipients in one message."""
    command_timeout: float = 300.0
    """Seconds an SMTP client may stay silent (RFC 5321 §4.5.3.2 suggests 5 minutes)."""
    visibility_seconds: float = 60.0
    """Claim lease of a delivery job: a job held by a dead process is due again after this."""
    lease_seconds: float = 30.0
    """Connection lease length: a dead process's connection slots come back to the fleet after this."""
    shutdown_grace: float = 25.0
    """Seconds SMTP sessions and deliveries get to finish on SIGTERM."""
    dns_servers: tuple[str, ...] | None = None
    """Name servers for MX lookups; None means the system's resolv.conf."""
    dns_port: int = 53
    """Port of ``dns_servers``."""
    mx_port: int = 25
    """Port to connect to on MX hosts (25; another in a lab)."""
    outbound_starttls: bool = True
    """Use STARTTLS towards next hops that offer it (opportunistic, unverified)."""


class RefuseSession(asyncio.Protocol):
    """What a client gets when its SMTP session cannot be set up: a 421 and the connection closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = writable(transport)
        stream.write(b"421 4.3.0 Cannot start an SMTP session here, try again later\r\n")
        stream.close()


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.stopping = False
        target = parse_redis_url(settings.redis_url)
        if settings.redis_password:
            target = target.with_password(settings.redis_password)
        register_round_trips()
        self.connection = RedisConnection(target, replica_acks=settings.replica_acks,
                                          replica_ack_timeout=settings.replica_ack_timeout)
        self.redis = self.connection.client
        self.recorder = TelemetryRecorder(self.redis)
        self.metrics = Metrics(recorder=self.recorder)
        self.limiter = FleetLimiter(self.redis, lease_ms=int(settings.lease_seconds * 1000))
        self.spool = Spool(self.connection)
        self.book = PolicyBook(self.connection)
        self.resolver = MxResolver(nameservers=settings.dns_servers, port=settings.dns_port)
        self.router = Router(self.book, self.resolver, settings.mx_port)
        self.engine = DeliveryEngine(
            spool=self.spool, book=self.book, router=self.router, limiter=self.limiter, metrics=self.metrics,
            settings=EngineSettings(helo_name=settings.hostname, visibility_ms=int(settings.visibility_seconds * 1000),
                                    starttls=settings.outbound_starttls))
        self.tls_context = self._tls_context()
        self.authenticator = (Authenticator(Credentials.load(settings.credentials_file))
                              if settings.credentials_file else None)
        auth_offered = self.authenticator is not None
        self.handler = IngressHandler(
            IngressPolicy(hostname=settings.hostname, allowed_networks=settings.allowed_networks,
                          max_recipients=settings.max_recipients, max_message_size=settings.max_message_size,
                          auth_offered=auth_offered),
            self.spool, self.router, self.metrics)
        self.sessions: set[IngressSMTP] = set()
        self.server: asyncio.Server | None = None
        self.health: HealthServer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def _tls_context(self) -> ssl.SSLContext | None:
        cert, key = self.settings.tls_cert, self.settings.tls_key
        if cert is None and key is None:
            return None
        if cert is None or key is None:
            raise ConfigError("--tls-cert and --tls-key go together")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from exc
        return context

    def _protocol(self) -> asyncio.Protocol:
        # Never raise from here: on uvloop one exception from a protocol factory stops the listener
        # for good (measured: every later client waits for a greeting that never comes), so a bug in
        # session set-up would turn into an outage. Such a client gets 421 and the next one a new try.
        try:
            return self._session()
        except Exception:
            log.exception("cannot start an SMTP session")
            self.metrics.internal_error("ingress")
            return RefuseSession()

    def _session(self) -> SMTP:
        smtp = IngressSMTP(
            self.handler, authenticator=self.authenticator, hostname=self.settings.hostname,
            ident="mxgate ESMTP", tls_context=self.tls_context, data_size_limit=self.settings.max_message_size,
            enable_SMTPUTF8=True, timeout=self.settings.command_timeout,
            auth_require_tls=not self.settings.auth_without_tls,
            command_call_limit={"AUTH": 3, "*": 1_000_000})
        self.sessions.add(smtp)
        original = smtp.connection_lost

        def connection_lost(error: Exception | None) -> None:
            self.sessions.discard(smtp)
            original(error)

        smtp.connection_lost = connection_lost  # type: ignore[method-assign]
        return smtp

    async def readiness(self) -> list[str]:
        """Why this gateway should get no traffic now (empty: ready). Redis and SMTP are checked at once."""
        problems = []
        if self.stopping:
            problems.append("shutting down")
        redis_problems, smtp = await asyncio.gather(self._redis_problems(), self._smtp_problem())
        problems += redis_problems
        if not self.book.loaded:
            problems.append("no policies published yet (is `mxgate controller` or the operator running?)")
        if smtp is not None:
            problems.append(smtp)
        return problems

    async def _redis_problems(self) -> list[str]:
        try:
            return await asyncio.wait_for(self.connection.problems(), timeout=2.0)
        except TimeoutError:
            return ["redis did not answer within 2 s"]

    async def _smtp_problem(self) -> str | None:
        if self.server is None or not self.server.is_serving():
            return None if self.stopping else "SMTP listener not open"
        return await smtp_problem(probe_host(self.settings.listen[0]), self.port, timeout=2.0)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self.connection.initialize()
            if moved := await self.spool.adopt_old_provider_index():
                log.info("provider index of mxgate 0.1 adopted", extra={"providers": moved})
        except SpoolError as exc:
            # Not fatal: Redis may come up after us; until then /readyz says why and ingress answers 451.
            log.warning("%s", exc)
        await self.book.reload()
        self._tasks.append(loop.create_task(self.book.run()))
        self.engine.start()
        self.recorder.start()
        host, port = self.settings.listen
        try:
            self.server = await loop.create_server(self._protocol, host=host, port=port,
                                                   reuse_port=self.settings.reuse_port or None, backlog=1024)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        if self.settings.metrics_listen is not None:
            mhost, mport = self.settings.metrics_listen
            self.health = HealthServer(host=mhost, port=mport, readiness=self.readiness)
            try:
                await self.health.start()
            except OSError as exc:
                raise ConfigError(f"cannot listen on {mhost}:{mport}: {exc.strerror}") from exc
        log.info("gateway started", extra={"listen": f"{host}:{port}", "redis": self.connection.target.redacted,
                                           "tls": self.tls_context is not None, "auth": self.authenticator is not None})

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def shutdown(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.handler.accepting = False
        grace = self.settings.shutdown_grace
        log.info("shutting down", extra={"grace": grace, "sessions": len(self.sessions)})
        if self.server is not None:
            self.server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace / 2
        # Sessions with a message on its way get up to half the grace to finish it; idle ones go now
        # (their clients simply reconnect, to another pod).
        while loop.time() < deadline:
            for session in list(self.sessions):
                if not session.in_transaction and session.transport is not None:
                    session.say_goodbye()
            if not self.sessions:
                break
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        await self.engine.stop(grace=max(1.0, deadline + grace / 2 - loop.time()))
        await cancel_and_wait(self._tasks, timeout=5.0)
        await self.recorder.stop()
        await self.limiter.close()
        if self.health is not None:
            await self.health.stop()
        await self.connection.aclose()
        log.info("stopped")

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Start, serve until SIGTERM/SIGINT (or ``stop``), then shut down gracefully."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
        try:
            # Inside the try: a start that fails half-way (port in use) must still stop the tasks it
            # started, or the process never exits.
            await self.start()
            await stop.wait()
        finally:
            await self.shutdown()

