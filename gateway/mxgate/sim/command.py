"""``mxgate sim``: flags, their translation into a :class:`SimConfig`, and the run until SIGTERM/SIGINT.

Kept apart from ``mxgate.cli`` so the CLI only registers the subcommand; importing this module loads no
SMTP or HTTP library (they are imported when the simulator runs).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from mxgate.errors import ConfigError
from mxgate.sim.config import SimConfig
from mxgate.sim.profiles import CONNECTION_STAGES, PROFILES, RATE_STAGES, Stage

__all__ = ["add_arguments", "config_from_args", "run"]


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` with port 0-65535 (0 = pick a free port)."""
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT (port 0 picks a free one)")
    return host, int(port)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a probability between 0 and 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``sim`` flags on its subparser."""
    profiles = ", ".join(f"{p.name} (connections at {p.connection_stage}, rate at {p.rate_stage})"
                         for p in PROFILES.values())
    parser.description = ("A local SMTP server that throttles like a mailbox provider and records what it "
                          f"saw. Profiles: {profiles}.")
    parser.add_argument("--listen", type=listen_address, default=("127.0.0.1", 2526), metavar="HOST:PORT",
                        help="SMTP listen address (default 127.0.0.1:2526; port 0 picks a free one, printed)")
    parser.add_argument("--profile", choices=list(PROFILES), default="generic",
                        help="provider whose replies and stages are used (default generic)")
    parser.add_argument("--max-connections", type=int, default=0, metavar="N",
                        help="concurrent connections allowed per client IP; 0 = unlimited (default)")
    parser.add_argument("--connection-stage", choices=[str(s) for s in CONNECTION_STAGES],
                        help="where a connection over the limit is refused (default: the profile's)")
    parser.add_argument("--rate", type=float, default=0.0, metavar="R",
                        help="messages per second per client IP; 0 = unlimited (default)")
    parser.add_argument("--burst", type=float, metavar="B", help="token bucket size (default max(1, R))")
    parser.add_argument("--rate-stage", choices=[str(s) for s in RATE_STAGES],
                        help="where the rate counts and defers: mail (per transaction), rcpt (per "
                             "recipient), data (per message, end of DATA) (default: the profile's)")
    parser.add_argument("--connection-reply", metavar="REPLY",
                        help="replace the profile's connection reply ('{ip}' becomes the client IP)")
    parser.add_argument("--rate-reply", metavar="REPLY",
                        help="replace the profile's rate reply ('{ip}' becomes the client IP)")
    parser.add_argument("--temp-fail-rate", type=_fraction, default=0.0, metavar="P",
                        help="probability of '451 4.3.0 Temporary failure' at end of DATA (default 0)")
    parser.add_argument("--latency", type=float, default=0.0, metavar="SECONDS",
                        help="wait before each final reply to DATA (default 0)")
    parser.add_argument("--latency-jitter", type=float, default=0.0, metavar="SECONDS",
                        help="add a uniform random -J..+J to each wait (default 0)")
    parser.add_argument("--seed", type=int, help="seed for temporary failures and jitter (default: random)")
    parser.add_argument("--hostname", default="sim.mxgate.test", help="name in the greeting and EHLO reply")
    parser.add_argument("--max-message-size", type=int, default=35 * 1024 * 1024, metavar="BYTES",
                        help="larger messages get 552 (default 35 MiB; 0 = unlimited)")
    parser.add_argument("--sink-log", type=Path, metavar="FILE",
                        help="append one JSON line per accepted message (time, message_id, rcpts, size)")
    parser.add_argument("--report", type=Path, metavar="FILE", help="write the JSON report here on exit")
    parser.add_argument("--report-interval", type=float, metavar="SECONDS",
                        help="also write --report every SECONDS")
    parser.add_argument("--http", type=listen_address, metavar="HOST:PORT",
                        help="serve GET /report and POST /reset here (port 0 picks a free one, printed)")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """The SimConfig the flags describe (ConfigError if they contradict each other)."""
    host, port = args.listen
    http_host, http_port = args.http if args.http else (None, 0)
    return SimConfig(
        host=host, port=port, hostname=args.hostname, profile=args.profile,
        max_connections=args.max_connections,
        connection_stage=Stage(args.connection_stage) if args.connection_stage else None,
        rate=args.rate, burst=args.burst, rate_stage=Stage(args.rate_stage) if args.rate_stage else None,
        connection_reply=args.connection_reply, rate_reply=args.rate_reply,
        temp_fail_rate=args.temp_fail_rate, latency=args.latency, latency_jitter=args.latency_jitter,
        seed=args.seed, max_message_size=args.max_message_size, sink_log=args.sink_log,
        report_file=args.report, report_interval=args.report_interval, http_host=http_host,
        http_port=http_port,
    )


def _banner(config: SimConfig, port: int, http_port: int | None) -> str:
    parts = [f"mxgate sim: listening on {config.host}:{port}", f"profile={config.profile}"]
    if config.max_connections:
        parts.append(f"max_connections={config.max_connections}@{config.effective_connection_stage}")
    if config.rate:
        parts.append(f"rate={config.rate:g}/s burst={config.effective_burst:g}@{config.effective_rate_stage}")
    if config.temp_fail_rate:
        parts.append(f"temp_fail_rate={config.temp_fail_rate:g}")
    if config.latency or config.latency_jitter:
        parts.append(f"latency={config.latency:g}s±{config.latency_jitter:g}s")
    if http_port is not None:
        parts.append(f"http=http://{config.http_host}:{http_port}/report")
    if config.report_file is not None:
        parts.append(f"report={config.report_file}")
    return " ".join(parts)


async def run(args: argparse.Namespace) -> None:
    """Run the simulator until SIGTERM or SIGINT, then write the report and exit."""
    from mxgate.sim.server import ProviderSimulator

    config = config_from_args(args)
    # aiosmtpd logs every command at INFO: at thousands of messages a second that alone would be the load.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    simulator = ProviderSimulator(config)
    try:
        await simulator.start()
    except OSError as exc:
        raise ConfigError(f"cannot start the simulator: {exc}") from exc
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    try:
        http_port = simulator.http_port if config.http_host is not None else None
        print(_banner(config, simulator.port, http_port), flush=True)
        await stopped.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await simulator.stop()
        print(f"mxgate sim: stopped; {simulator.model.recorder.messages} messages accepted", file=sys.stderr,
              flush=True)
