"""The simulated provider's decisions, one SMTP event at a time; pure, so each rule is tested without sockets.

The aiosmtpd adapter (:mod:`mxgate.sim.server`) calls :class:`ProviderModel` at each event of a session and
sends what it returns::

    open(ip) ─► at_connect ─► at_mail ─► at_rcpt (per recipient) ─► at_data_end ─► accept ─► close
                   │              │           │                         │
                   └──────────────┴───────────┴─── a Deferral (reply + kind; 421 closes) ◄──┘

At the connection stage a connection without a slot tries to get one (see
:class:`~mxgate.sim.limits.ConcurrencyTracker`); at the rate stage it takes a token from its IP's bucket.
The connection check comes first: a refused connection must not also spend the IP's tokens. At the end of
DATA, a message that passed the rate may still draw a random temporary failure. Every deferral is counted
by its cause (:class:`~mxgate.sim.record.DeferralKind`), not by its text, so a custom reply is still
counted under the right kind.

The clock and the random generator are injected; nothing here reads the time, sleeps or does I/O.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mxgate.sim.config import SimConfig
from mxgate.sim.limits import ConcurrencyTracker, TokenBucket
from mxgate.sim.profiles import SHUTDOWN_REPLY, TEMP_FAIL_REPLY, Stage, render_reply
from mxgate.sim.record import DeferralKind, Recorder

__all__ = ["Connection", "Deferral", "ProviderModel"]


@dataclass(frozen=True, slots=True)
class Deferral:
    """A 4xx the simulator sends instead of accepting, and why."""

    line: str
    """The reply line, without CRLF."""
    kind: DeferralKind
    """The cause, for the report."""
    closes: bool
    """Close the connection after the reply (a 421, or any refusal in the greeting)."""


class Connection:
    """One client connection as the model sees it."""

    __slots__ = ("ip", "admitted", "bucket", "closed")

    def __init__(self, ip: str, bucket: TokenBucket | None) -> None:
        self.ip = ip
        self.admitted = False
        """Holds one of its IP's connection slots."""
        self.bucket = bucket
        """Its IP's token bucket; None when the rate is unlimited."""
        self.closed = False


class ProviderModel:
    """Connection slots, token buckets and the recorder of one simulated provider."""

    def __init__(self, config: SimConfig, *, clock: Callable[[], float], epoch_offset: float,
                 rng: random.Random) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng
        self.tracker = ConcurrencyTracker(limit=config.max_connections)
        self.recorder = Recorder(now=clock(), epoch_offset=epoch_offset, series_seconds=config.series_seconds,
                                 duplicate_sample=config.duplicate_sample)
        self._buckets: dict[str, TokenBucket] = {}
        self._sequence = 0
        connection_stage = config.effective_connection_stage if config.max_connections else None
        rate_stage = config.effective_rate_stage if config.rate else None
        # One flag per (limit, stage): the per-command path tests a bool instead of comparing enums.
        self._slots_at_connect = connection_stage is Stage.CONNECT
        self._slots_at_mail = connection_stage is Stage.MAIL
        self._slots_at_rcpt = connection_stage is Stage.RCPT
        self._rate_at_mail = rate_stage is Stage.MAIL
        self._rate_at_rcpt = rate_stage is Stage.RCPT
        self._rate_at_data = rate_stage is Stage.DATA
        self._connection_reply = config.effective_connection_reply
        self._rate_reply = config.effective_rate_reply
        self._connection_closes = self._connection_reply.startswith("421")
        self._rate_closes = self._rate_reply.startswith("421")

    # -- the session, event by event -----------------------------------------------------------------

    def open(self, ip: str) -> Connection:
        """A client connected (before the greeting)."""
        self.tracker.opened(ip)
        self.recorder.connections_opened += 1
        bucket = None
        if self.config.rate:
            bucket = self._buckets.get(ip)
            if bucket is None:
                bucket = TokenBucket(rate=self.config.rate, burst=self.config.effective_burst,
                                     now=self.clock())
                self._buckets[ip] = bucket
        connection = Connection(ip, bucket)
        if not self.config.max_connections:
            connection.admitted = True
        return connection

    def at_connect(self, connection: Connection) -> Deferral | None:
        """The greeting: a Deferral replaces the 220 banner, and the connection is closed after it."""
        if self._slots_at_connect and not self._admit(connection):
            return self._defer(self._connection_reply, DeferralKind.CONNECTIONS, connection, closes=True)
        return None

    def at_mail(self, connection: Connection) -> Deferral | None:
        """A syntactically valid MAIL FROM."""
        if self._slots_at_mail and not self._admit(connection):
            return self._defer(self._connection_reply, DeferralKind.CONNECTIONS, connection,
                               closes=self._connection_closes)
        if self._rate_at_mail and not self._take_token(connection):
            return self._defer(self._rate_reply, DeferralKind.RATE, connection, closes=self._rate_closes)
        return None

    def at_rcpt(self, connection: Connection) -> Deferral | None:
        """A syntactically valid RCPT TO."""
        if self._slots_at_rcpt and not self._admit(connection):
            return self._defer(self._connection_reply, DeferralKind.CONNECTIONS, connection,
                               closes=self._connection_closes)
        if self._rate_at_rcpt and not self._take_token(connection):
            return self._defer(self._rate_reply, DeferralKind.RATE, connection, closes=self._rate_closes)
        return None

    def at_data_end(self, connection: Connection) -> Deferral | None:
        """The message data has arrived: None means it may be accepted (call :meth:`accept` when replying)."""
        if self._rate_at_data and not self._take_token(connection):
            return self._defer(self._rate_reply, DeferralKind.RATE, connection, closes=self._rate_closes)
        if self.config.temp_fail_rate and self.rng.random() < self.config.temp_fail_rate:
            return self._defer(TEMP_FAIL_REPLY, DeferralKind.RANDOM, connection, closes=False)
        return None

    def data_reply_delay(self) -> float:
        """Seconds to wait before the final reply to DATA: latency ± jitter, never negative."""
        delay = self.config.latency
        if self.config.latency_jitter:
            delay += self.rng.uniform(-self.config.latency_jitter, self.config.latency_jitter)
        return delay if delay > 0 else 0.0

    def accept(self, content: bytes, recipients: int) -> tuple[str, str | None]:
        """Record an accepted message: ``(reply line, Message-ID or None)``."""
        message_id = self.recorder.accepted(self.clock(), content, recipients)
        self._sequence += 1
        return f"250 2.0.0 Ok: queued as S{self._sequence}", message_id

    def shutdown(self, connection: Connection) -> Deferral:
        """The reply for a connection still open when the simulator stops."""
        return self._defer(SHUTDOWN_REPLY, DeferralKind.OTHER, connection, closes=True)

    def close(self, connection: Connection) -> None:
        """The connection is gone (idempotent)."""
        if not connection.closed:
            connection.closed = True
            self.tracker.closed(connection.ip, admitted=connection.admitted)

    # -- reporting -----------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """The current report as plain JSON data."""
        tracker = self.tracker
        recorded = self.recorder.snapshot(self.clock())
        series = recorded.pop("accepted_per_second")
        return {
            "config": self.config.describe(),
            **recorded,
            "connections": {
                "opened": self.recorder.connections_opened,
                "open": tracker.open_total,
                "max_concurrency": tracker.max_total,
                "max_concurrency_by_ip": dict(sorted(tracker.max_by_ip.items())),
                "open_by_ip": dict(sorted(tracker.open_by_ip.items())),
            },
            "accepted_per_second": series,
        }

    def reset(self) -> None:
        """Zero the counters; open connections, slots and token buckets are the provider's state and stay."""
        self.recorder.reset(self.clock())
        self.tracker.reset_observed()

    # -- helpers -------------------------------------------------------------------------------------

    def _admit(self, connection: Connection) -> bool:
        if not connection.admitted:
            connection.admitted = self.tracker.admit(connection.ip)
        return connection.admitted

    def _take_token(self, connection: Connection) -> bool:
        bucket = connection.bucket
        return bucket is None or bucket.take(self.clock())

    def _defer(self, template: str, kind: DeferralKind, connection: Connection, *, closes: bool) -> Deferral:
        self.recorder.deferred(kind)
        return Deferral(render_reply(template, connection.ip), kind, closes)
