"""The ``mxgate`` command line.

    mxgate gateway     one gateway process (SMTP in, delivery out) against a Redis
    mxgate controller  loads ProviderPolicy files into Redis and keeps them there
    mxgate operator    the Kubernetes operator: ProviderPolicy objects -> Redis, adaptive limits, status
    mxgate dev         everything on one machine: embedded Redis + controller + gateway
    mxgate passwd      prints a credentials-file line for SMTP AUTH
    mxgate sim         a local SMTP server that throttles like a mailbox provider (tests, benchmarks)

Configuration errors end with a one-line message on stderr and exit status 2; nothing half-starts.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import ipaddress
import logging
import os
import socket
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from mxgate import __version__
from mxgate.errors import ConfigError, MxgateError, SpoolError
from mxgate.telemetry.logs import configure_logging

log = logging.getLogger("mxgate.cli")


def host_port(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    from mxgate.policy import parse_host_port

    try:
        host, port = parse_host_port(text, default_port=default_port or 0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if port == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host, port


def networks(text: str) -> tuple[Any, ...]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            out.append(ipaddress.ip_network(part, strict=False))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{part!r} is not a CIDR network: {exc}") from exc
    return tuple(out)


def replica_acks(text: str) -> int | None:
    """``auto`` (None) or a number of replicas."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 16:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto or a number of replicas from 0 to 16")
    return value


def ack_timeout(text: str) -> float:
    """Seconds to wait for replicas: above 0 and at most 10 (a whole enqueue gives up after 20)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 10:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds above 0 and at most 10")
    return value


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def _redis_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=os.environ.get("MXGATE_REDIS_URL"),
                        help="redis://HOST:PORT[/DB], rediss://..., unix:///PATH, "
                        "redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER[/DB] or "
                        "redis+cluster://HOST:PORT[,HOST:PORT...] (default: $MXGATE_REDIS_URL)")
    parser.add_argument("--redis-password-file", type=Path, default=os.environ.get("MXGATE_REDIS_PASSWORD_FILE"),
                        metavar="PATH", help="file holding the Redis password, e.g. a mounted Secret "
                        "(default: $MXGATE_REDIS_PASSWORD_FILE); overrides a password in the URL")


def _gateway_options(parser: argparse.ArgumentParser, *, with_redis: bool) -> None:
    if with_redis:
        _redis_options(parser)
    parser.add_argument("--listen", type=host_port, default=("0.0.0.0", 2525), metavar="HOST:PORT",
                        help="SMTP listen address (default 0.0.0.0:2525)")
    parser.add_argument("--metrics-listen", type=host_port, default=("0.0.0.0", 9325), metavar="HOST:PORT",
                        help="/healthz, /readyz and /metrics (default 0.0.0.0:9325)")
    parser.add_argument("--reuse-port", action="store_true",
                        help="share the SMTP port with other gateway processes (SO_REUSEPORT)")
    parser.add_argument("--hostname", default=socket.getfqdn(), help="name in banner, EHLO and Received headers")
    parser.add_argument("--allowed-networks", type=networks, default=networks("127.0.0.0/8,::1/128"),
                        metavar="CIDR[,CIDR...]", help="clients that may relay without AUTH (default loopback)")
    parser.add_argument("--tls-cert", type=existing_file, help="PEM certificate for STARTTLS")
    parser.add_argument("--tls-key", type=existing_file, help="PEM private key for STARTTLS")
    parser.add_argument("--credentials-file", type=existing_file,
                        help="user:$argon2id$... lines (mxgate passwd); enables AUTH PLAIN/LOGIN")
    parser.add_argument("--auth-without-tls", action="store_true",
                        help="also offer AUTH on unencrypted connections (insecure; off by default)")
    parser.add_argument("--max-message-size", type=int, default=25 * 1024 * 1024, metavar="BYTES")
    parser.add_argument("--max-recipients", type=int, default=1000)
    parser.add_argument("--command-timeout", type=float, default=300.0, metavar="SECONDS")
    parser.add_argument("--visibility", type=float, default=60.0, metavar="SECONDS",
                        help="claim lease of a delivery job; a dead process's jobs are due again after it")
    parser.add_argument("--connection-lease", type=float, default=30.0, metavar="SECONDS",
                        help="fleet connection-slot lease; a dead process's slots come back after it")
    parser.add_argument("--shutdown-grace", type=float, default=25.0, metavar="SECONDS")
    parser.add_argument("--replica-acks", type=replica_acks, default=os.environ.get("MXGATE_REPLICA_ACKS", "auto"),
                        metavar="N|auto", help="replicas that must have a message before it gets 250 (default "
                        "auto: 1 once the primary has a replica, 0 on a lone Redis; $MXGATE_REPLICA_ACKS)")
    parser.add_argument("--replica-ack-timeout", type=ack_timeout,
                        default=os.environ.get("MXGATE_REPLICA_ACK_TIMEOUT", "1.0"), metavar="SECONDS",
                        help="how long to wait for those replicas; then 451 4.3.0 (default 1.0; "
                        "$MXGATE_REPLICA_ACK_TIMEOUT)")
    parser.add_argument("--dns-server", action="append", metavar="IP", help="name server for MX lookups (repeatable)")
    parser.add_argument("--dns-port", type=int, default=53)
    parser.add_argument("--mx-port", type=int, default=25, help="port of MX next hops (default 25)")
    parser.add_argument("--no-outbound-starttls", action="store_true", help="never use STARTTLS towards next hops")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mxgate", description="Outbound SMTP gateway that keeps a fleet "
                                     "within each mailbox provider's connection and rate limits.")
    parser.add_argument("--version", action="version", version=f"mxgate {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("MXGATE_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="json", choices=["json", "text"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gateway = sub.add_parser("gateway", help="run one gateway process against a Redis")
    _gateway_options(gateway, with_redis=True)

    controller = sub.add_parser("controller", help="load ProviderPolicy files into Redis and keep them there")
    _redis_options(controller)
    controller.add_argument("--policies", type=Path, required=True, metavar="DIR")
    controller.add_argument("--once", action="store_true", help="publish once and exit")

    dev = sub.add_parser("dev", help="embedded Redis + controller + gateway on this machine")
    _gateway_options(dev, with_redis=False)
    dev.add_argument("--policies", type=Path, default=Path("examples/policies"), metavar="DIR")
    dev.add_argument("--data-dir", type=Path, default=Path(".mxgate-dev"), metavar="DIR",
                     help="where the embedded Redis keeps its append-only file (default .mxgate-dev)")
    dev.add_argument("--redis-port", type=int, default=0, help="embedded Redis port (default: a free one)")
    dev.add_argument("--redis-url", help="use this Redis (any scheme mxgate takes) instead of an embedded one")
    dev.add_argument("--redis-password-file", type=Path, metavar="PATH", help="its password, from a file")

    operator = sub.add_parser("operator", help="Kubernetes operator: ProviderPolicy objects -> Redis, adaptive "
                              "limits, status and Events")
    _redis_options(operator)
    operator.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE"),
                          help="namespace whose ProviderPolicies are served (default: $POD_NAMESPACE)")
    peering = operator.add_mutually_exclusive_group()
    peering.add_argument("--peering", default="mxgate", metavar="NAME",
                         help="KopfPeering object shared by the replicas; one of them is active (default mxgate)")
    peering.add_argument("--standalone", action="store_true", help="no peering: the only replica")
    operator.add_argument("--priority", type=int, metavar="N",
                          help="peering priority; the highest runs (default: random, so replicas never tie)")
    operator.add_argument("--health-listen", type=host_port, default=("0.0.0.0", 8080), metavar="HOST:PORT",
                          help="GET /healthz for liveness probes (default 0.0.0.0:8080)")

    status = sub.add_parser("status", help="each provider's limits, traffic and queue")
    _redis_options(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                        help="refresh every SECONDS (default 2) until Ctrl-C")
    status.add_argument("--window", type=int, default=60, metavar="SECONDS", help="traffic window (default 60)")

    passwd = sub.add_parser("passwd", help="print a credentials-file line for USER (password from stdin or prompt)")
    passwd.add_argument("user")

    policy = sub.add_parser("policy", help="work with ProviderPolicy files")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    validate = policy_sub.add_parser("validate", help="validate policy files offline")
    validate.add_argument("files", nargs="+", type=Path)

    from mxgate.sim.command import add_arguments as add_sim_arguments

    sim = sub.add_parser("sim", help="a local SMTP server that throttles like a mailbox provider")
    add_sim_arguments(sim)
    return parser


def gateway_settings(args: argparse.Namespace, *, redis_url: str, redis_password: str | None = None) -> Any:
    from mxgate.app import GatewaySettings

    return GatewaySettings(
        redis_url=redis_url, redis_password=redis_password, replica_acks=args.replica_acks,
        replica_ack_timeout=args.replica_ack_timeout, listen=args.listen, metrics_listen=args.metrics_listen,
        reuse_port=args.reuse_port,
        hostname=args.hostname, allowed_networks=args.allowed_networks, tls_cert=args.tls_cert,
        tls_key=args.tls_key, credentials_file=args.credentials_file, auth_without_tls=args.auth_without_tls,
        max_message_size=args.max_message_size, max_recipients=args.max_recipients,
        command_timeout=args.command_timeout, visibility_seconds=args.visibility,
        lease_seconds=args.connection_lease,
        shutdown_grace=args.shutdown_grace, dns_servers=tuple(args.dns_server) if args.dns_server else None,
        dns_port=args.dns_port, mx_port=args.mx_port, outbound_starttls=not args.no_outbound_starttls)


def _redis_target(args: argparse.Namespace) -> Any:
    """The ``RedisTarget`` of ``--redis-url`` with ``--redis-password-file``'s password; a ConfigError names what is
    wrong (never the password)."""
    from mxgate.redisconn import parse_redis_url

    if not args.redis_url:
        raise ConfigError("--redis-url is required (or set MXGATE_REDIS_URL)")
    target = parse_redis_url(str(args.redis_url))
    password_file = getattr(args, "redis_password_file", None)
    if password_file:
        target = target.with_password(_read_secret(Path(password_file)))
    return target


def _read_secret(path: Path) -> str:
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"--redis-password-file {path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--redis-password-file {path}: not UTF-8 text") from exc
    if not secret:
        raise ConfigError(f"--redis-password-file {path}: the file is empty")
    return secret


async def _gateway(args: argparse.Namespace) -> None:
    from mxgate.app import Gateway

    target = _redis_target(args)
    gateway = Gateway(gateway_settings(args, redis_url=target.url, redis_password=target.password))
    await gateway.run()


async def _controller(args: argparse.Namespace) -> None:
    from mxgate.redisconn import REDIS_ERRORS, RedisConnection
    from mxgate_operator.filemode import FileController

    target = _redis_target(args)
    connection = RedisConnection(target)
    controller = FileController(connection.client, args.policies)
    try:
        await connection.initialize()
        await controller.publish()
        if not args.once:
            await _until_signal(controller.run())
    except REDIS_ERRORS as exc:
        raise ConfigError(f"cannot reach Redis at {target.redacted}: {target.redact(str(exc))}") from exc
    except SpoolError as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        await connection.aclose()


async def _dev(args: argparse.Namespace) -> None:
    from mxgate.app import Gateway
    from mxgate.embedded_redis import EmbeddedRedis
    from mxgate.policy_files import load_policy_dir
    from mxgate.redisconn import RedisConnection, parse_redis_url
    from mxgate.tasks import cancel_and_wait
    from mxgate_operator.filemode import FileController

    load_policy_dir(args.policies)  # fail before starting anything
    # --redis-url: an external Redis (single, Sentinel or Cluster) instead of the embedded one.
    target = _redis_target(args) if args.redis_url else None
    redis_server = None if target else EmbeddedRedis(args.data_dir.resolve(), port=args.redis_port or None).start()
    if target is None:
        assert redis_server is not None
        target = parse_redis_url(redis_server.url)
    connection = RedisConnection(target)
    control_task: asyncio.Task[None] | None = None
    try:
        try:
            await connection.initialize()
        except SpoolError as exc:
            raise ConfigError(str(exc)) from exc
        controller = FileController(connection.client, args.policies)
        await controller.publish()
        gateway = Gateway(gateway_settings(args, redis_url=target.url, redis_password=target.password))
        stop = asyncio.Event()
        control_task = asyncio.get_running_loop().create_task(controller.run())
        run_task = asyncio.get_running_loop().create_task(gateway.run(stop))
        while gateway.server is None and not run_task.done():
            await asyncio.sleep(0.05)
        if run_task.done():
            await run_task
        host, port = args.listen
        metrics = f"http://{args.metrics_listen[0]}:{args.metrics_listen[1]}" if args.metrics_listen else "off"
        where = f"Redis at {target.redacted}" + (f" (data in {args.data_dir})" if redis_server else "")
        print(f"mxgate dev: SMTP on {host}:{gateway.port}, {where}, policies from {args.policies}, health and "
              f"metrics on {metrics}. Ctrl-C stops.", file=sys.stderr, flush=True)
        await serve_with_controller(run_task, control_task, stop)
    finally:
        # Also when the gateway failed to start (port in use): the controller loop must not outlive it.
        if control_task is not None:
            await cancel_and_wait([control_task], timeout=5.0)
        await connection.aclose()
        if redis_server is not None:
            redis_server.stop()


async def serve_with_controller(run_task: asyncio.Task[None], control_task: asyncio.Task[None],
                                stop: asyncio.Event) -> None:
    """Wait for the gateway (``run_task``); should the in-process controller end first, stop the gateway
    and fail. Its loop never ends on its own: a gateway without it would serve stale policies and limits
    unnoticed, so ``mxgate dev`` stops, loudly."""
    await asyncio.wait([run_task, control_task], return_when=asyncio.FIRST_COMPLETED)
    if control_task.done() and not run_task.done():
        failure = None if control_task.cancelled() else control_task.exception()
        log.critical("the in-process controller stopped (%r); stopping mxgate dev", failure, exc_info=failure)
        stop.set()
        await run_task
        raise MxgateError(f"the in-process controller stopped: {failure!r}")
    await run_task


async def _until_signal(coro: Coroutine[Any, Any, None]) -> None:
    import signal

    loop = asyncio.get_running_loop()
    task = loop.create_task(coro)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass


async def _operator(args: argparse.Namespace) -> None:
    from mxgate_operator.kube import OperatorConfig, run

    if not args.namespace:
        raise ConfigError("--namespace is required (or set POD_NAMESPACE)")
    config = OperatorConfig(redis=_redis_target(args), namespace=args.namespace,
                            peering=None if args.standalone else args.peering, priority=args.priority,
                            health_listen=args.health_listen)
    await _until_signal(run(config))


async def _sim(args: argparse.Namespace) -> None:
    from mxgate.sim.command import run

    await run(args)


async def _status(args: argparse.Namespace) -> None:
    import json

    from mxgate.redisconn import REDIS_ERRORS, RedisConnection
    from mxgate.status import collect, render_table

    target = _redis_target(args)
    connection = RedisConnection(target)
    redis = connection.client
    try:
        try:
            await connection.initialize()
        except SpoolError as exc:
            raise ConfigError(f"cannot read status from Redis at {target.redacted}: "
                              f"{target.redact(str(exc.__cause__ or exc))}") from exc
        while True:
            try:
                rows = await collect(redis, window=args.window)
            except REDIS_ERRORS as exc:
                raise ConfigError(f"cannot read status from Redis at {target.redacted}: "
                                  f"{target.redact(str(exc))}") from exc
            if args.json:
                print(json.dumps([row.as_dict() for row in rows]), flush=True)
            else:
                if args.watch:
                    print("\x1b[2J\x1b[H", end="")  # clear the screen between refreshes
                    print(time.strftime("%Y-%m-%d %H:%M:%S"), f"(every {args.watch:g}s, Ctrl-C stops)")
                print(render_table(rows, window=args.window, log=10 if args.watch else 0), flush=True)
            if not args.watch:
                return
            await asyncio.sleep(args.watch)
    finally:
        await connection.aclose()


def _passwd(args: argparse.Namespace) -> None:
    from mxgate.ingress.auth import hash_password

    if ":" in args.user or not args.user.strip():
        raise ConfigError("user names must be non-empty and must not contain ':'")
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.user}: ")
        if password != getpass.getpass("again: "):
            raise ConfigError("passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 12:
        raise ConfigError("use a password of at least 12 characters")
    print(f"{args.user}:{hash_password(password)}")


def _policy_validate(args: argparse.Namespace) -> int:
    from mxgate.errors import PolicyError
    from mxgate.policy_files import load_policy_file

    status = 0
    for path in args.files:
        try:
            policies = load_policy_file(path)
        except PolicyError as exc:
            print(str(exc), file=sys.stderr)
            status = 1
            continue
        for policy in policies:
            print(f"{path}: {policy.name}: ok")
    return status


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(level=args.log_level, json_format=args.log_format == "json")
    try:
        if args.command == "gateway":
            _run(_gateway(args))
        elif args.command == "controller":
            _run(_controller(args))
        elif args.command == "operator":
            _run(_operator(args))
        elif args.command == "dev":
            _run(_dev(args))
        elif args.command == "status":
            _run(_status(args))
        elif args.command == "passwd":
            _passwd(args)
        elif args.command == "policy":
            return _policy_validate(args)
        elif args.command == "sim":
            _run(_sim(args))
    except MxgateError as exc:
        print(f"mxgate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
