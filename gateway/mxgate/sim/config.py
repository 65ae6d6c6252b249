"""Settings of one ``mxgate sim`` instance: :class:`SimConfig`, validated once, used by the CLI and tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mxgate.errors import ConfigError
from mxgate.sim.profiles import CONNECTION_STAGES, PROFILES, RATE_STAGES, Profile, Stage, check_reply

__all__ = ["SimConfig"]


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """How the simulated provider behaves, where it listens and what it records.

    Stages, burst and replies left as None take the profile's value: read them through the ``effective_*``
    properties. Invalid settings raise :class:`mxgate.errors.ConfigError` on construction.
    """

    host: str = "127.0.0.1"
    """SMTP listen address."""
    port: int = 0
    """SMTP listen port; 0 picks a free one (read it from ``ProviderSimulator.port``)."""
    hostname: str = "sim.mxgate.test"
    """Name in the 220 greeting and the EHLO reply."""
    profile: str = "generic"
    """Provider whose replies and stage defaults are used: outlook, yahoo, gmail or generic (``PROFILES``)."""
    max_connections: int = 0
    """Concurrent connections allowed per client IP; the ones above are refused. 0 = unlimited."""
    connection_stage: Stage | None = None
    """Where a connection over the limit is refused: connect, mail or rcpt. None = the profile's default."""
    rate: float = 0.0
    """Messages per second allowed per client IP (token bucket). 0 = unlimited."""
    burst: float | None = None
    """Bucket size: messages a rested client may send at once. None = max(1, rate)."""
    rate_stage: Stage | None = None
    """Where the rate counts and defers: mail (per transaction), rcpt (per recipient) or data (per message,
    at the end of DATA). None = the profile's default."""
    connection_reply: str | None = None
    """Replaces the profile's connection reply; ``{ip}`` becomes the client's IP. A 421 also closes."""
    rate_reply: str | None = None
    """Replaces the profile's rate reply; ``{ip}`` becomes the client's IP. A 421 also closes."""
    temp_fail_rate: float = 0.0
    """Probability (0..1) that a message the limits let through gets ``451 4.3.0 Temporary failure``."""
    latency: float = 0.0
    """Seconds waited before every final reply to DATA (a slow provider)."""
    latency_jitter: float = 0.0
    """Each wait is latency ± a uniform random amount up to this many seconds (never below 0)."""
    seed: int | None = None
    """Seed of the random temporary failures and jitter; None = unpredictable."""
    max_message_size: int = 35 * 1024 * 1024
    """Largest message accepted (552 above it; advertised as SIZE). 0 = unlimited."""
    command_timeout: float = 300.0
    """Idle seconds before the server drops a connection (RFC 5321 §4.5.3.2.7 suggests 5 minutes)."""
    sink_log: Path | None = None
    """File that gets one JSON line per accepted message (time, message_id, rcpts, size); buffered, flushed
    about once a second and on stop."""
    report_file: Path | None = None
    """File the JSON report is written to on stop (and every ``report_interval`` seconds if set)."""
    report_interval: float | None = None
    """Seconds between periodic writes of ``report_file``; None = only on stop."""
    http_host: str | None = None
    """Address of the HTTP control endpoint (GET /report, POST /reset); None = no endpoint."""
    http_port: int = 0
    """Port of the HTTP control endpoint; 0 picks a free one (``ProviderSimulator.http_port``)."""
    series_seconds: int = 3600
    """How many one-second counts of accepted messages the report keeps (oldest dropped): bounds memory."""
    duplicate_sample: int = 20
    """How many duplicate Message-IDs the report lists by name (all are counted)."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.profile not in PROFILES:
            problems.append(f"profile {self.profile!r}: expected one of {', '.join(PROFILES)}")
        if self.connection_stage is not None and self.connection_stage not in CONNECTION_STAGES:
            problems.append(f"connection stage {self.connection_stage}: expected connect, mail or rcpt")
        if self.rate_stage is not None and self.rate_stage not in RATE_STAGES:
            problems.append(f"rate stage {self.rate_stage}: expected mail, rcpt or data")
        if not 0 <= self.port < 65536 or not 0 <= self.http_port < 65536:
            problems.append("ports must be 0-65535")
        if self.max_connections < 0:
            problems.append(f"max connections {self.max_connections}: must be >= 0")
        if self.rate < 0:
            problems.append(f"rate {self.rate}: must be >= 0")
        if self.burst is not None and self.burst < 1:
            problems.append(f"burst {self.burst}: must be >= 1")
        if not 0 <= self.temp_fail_rate <= 1:
            problems.append(f"temp fail rate {self.temp_fail_rate}: must be between 0 and 1")
        if self.latency < 0 or self.latency_jitter < 0:
            problems.append("latency and latency jitter must be >= 0")
        if self.max_message_size < 0:
            problems.append(f"max message size {self.max_message_size}: must be >= 0")
        if self.command_timeout <= 0:
            problems.append(f"command timeout {self.command_timeout}: must be > 0")
        if self.report_interval is not None and self.report_interval <= 0:
            problems.append(f"report interval {self.report_interval}: must be > 0")
        if self.report_interval is not None and self.report_file is None:
            problems.append("a report interval needs a report file")
        if self.series_seconds < 1 or self.duplicate_sample < 0:
            problems.append("series seconds must be >= 1 and duplicate sample >= 0")
        for name, reply in (("connection reply", self.connection_reply), ("rate reply", self.rate_reply)):
            if reply is not None:
                try:
                    check_reply(reply)
                except ValueError as exc:
                    problems.append(f"{name}: {exc}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def provider(self) -> Profile:
        """The profile named by ``profile``."""
        return PROFILES[self.profile]

    @property
    def effective_connection_stage(self) -> Stage:
        """``connection_stage``, or the profile's."""
        return self.connection_stage or self.provider.connection_stage

    @property
    def effective_rate_stage(self) -> Stage:
        """``rate_stage``, or the profile's."""
        return self.rate_stage or self.provider.rate_stage

    @property
    def effective_burst(self) -> float:
        """``burst``, or max(1, rate): at least one message must fit in the bucket."""
        return self.burst if self.burst is not None else max(1.0, self.rate)

    @property
    def effective_connection_reply(self) -> str:
        """``connection_reply``, or the profile's (a template with ``{ip}``)."""
        return self.connection_reply or self.provider.connection_reply

    @property
    def effective_rate_reply(self) -> str:
        """``rate_reply``, or the profile's (a template with ``{ip}``)."""
        return self.rate_reply or self.provider.rate_reply

    def describe(self) -> dict[str, Any]:
        """The behaviour settings, resolved, as plain JSON data (the ``config`` section of a report)."""
        return {
            "profile": self.profile,
            "max_connections": self.max_connections,
            "connection_stage": str(self.effective_connection_stage),
            "connection_reply": self.effective_connection_reply,
            "rate": self.rate,
            "burst": self.effective_burst if self.rate else None,
            "rate_stage": str(self.effective_rate_stage),
            "rate_reply": self.effective_rate_reply,
            "temp_fail_rate": self.temp_fail_rate,
            "latency": self.latency,
            "latency_jitter": self.latency_jitter,
            "max_message_size": self.max_message_size,
        }
