#!/usr/bin/env python3
"""Redis cost of a delivered message, and throughput with 1, 2 and 4 gateway processes on one Redis.

For each gateway count: a fresh redis-server, ``mxgate controller`` and G ``mxgate gateway`` processes
sharing one SMTP port (``--reuse-port``), relaying to a fresh ``smtp-sink``; ``smtp-source`` sends N
messages; the run ends when the sink has them all. Each gateway counts the requests it sends to Redis
(commands and pipelines: ``mxgate_redis_roundtrips_total`` on /metrics); the sum over the gateways,
divided by the messages delivered, is the round trips per delivered message (target: at most 3,
amortised). The count covers everything a gateway does, background work included (policy refresh,
lease renewal, telemetry flushes, dispatcher scans). The server's own count (``INFO commandstats``: every
command, those inside Lua scripts included, from gateways and controller alike) per delivered message is
printed beside it (issue 11's target: at most 8 with a rate limit on, ``--rate``).

    python3 bench/redis_cost.py                       # 1, 2, 4 gateways, 10,000 messages each
    python3 bench/redis_cost.py --gateways 2 --messages 20000 --json /tmp/cost.json
    python3 bench/redis_cost.py --gateways 2 --rate 500        # with a fleet rate limit (GCRA) on
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _procs import (
    LOOPBACK,
    ProcessManager,
    SmtpSink,
    find_free_port,
    install_signal_handlers,
    require_tool,
    start_redis,
    wait_for_http,
    wait_for_port,
)
from relay_bench import POLICY_YAML, mxgate_command

_ROUNDTRIPS = re.compile(r"^mxgate_redis_roundtrips_total(?:\{[^}]*\})? ([0-9.e+]+)$", re.MULTILINE)


def roundtrips(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = _ROUNDTRIPS.search(text)
    if match is None:
        raise RuntimeError(f"no mxgate_redis_roundtrips_total on port {metrics_port}")
    return float(match.group(1))


def server_commands(port: int) -> dict[str, int]:
    """Every command the server has run, by name (``INFO commandstats``; a script call counts once, and so
    does each command inside it)."""
    import redis as redis_sync

    with redis_sync.Redis(host=LOOPBACK, port=port, socket_timeout=5) as client:
        stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}


def run(gateways: int, args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    cmd, env = mxgate_command(args.mxgate_cmd)
    source = require_tool("smtp-source", "apt-get install postfix")
    with ProcessManager(workdir / f"g{gateways}") as manager:
        sink = SmtpSink.start(manager)
        redis = start_redis(manager, workdir / f"g{gateways}" / "redis")
        policies = workdir / f"g{gateways}" / "policies"
        policies.mkdir(parents=True)
        policy = POLICY_YAML.format(host=LOOPBACK, port=sink.port)
        if args.rate:
            policy = policy.replace("maxMessagesPerConnection: 1000}", f"maxMessagesPerConnection: 1000, "
                                    f"messagesPerSecond: {args.rate}}}")
        (policies / "bench.yaml").write_text(policy)
        manager.start("controller", [*cmd, "controller", "--redis-url", redis.url, "--policies", str(policies)],
                      env=env)
        listen = find_free_port()
        metrics_ports = []
        for i in range(gateways):
            metrics = find_free_port()
            metrics_ports.append(metrics)
            manager.start(f"gateway-{i}", [*cmd, "gateway", "--redis-url", redis.url, "--listen",
                                           f"{LOOPBACK}:{listen}", "--metrics-listen", f"{LOOPBACK}:{metrics}",
                                           "--reuse-port"], env=env)
        for metrics in metrics_ports:
            wait_for_http(f"http://{LOOPBACK}:{metrics}/readyz", timeout=60)
        wait_for_port(listen, timeout=30)
        before = sum(roundtrips(port) for port in metrics_ports)
        server_before = server_commands(redis.port)
        started = time.monotonic()
        load = manager.start("smtp-source", [source, "-s", str(args.sessions), "-m", str(args.messages), "-l",
                                             str(args.size), "-d", "-f", "sender@example.com", "-t",
                                             "user@bench.test", f"{LOOPBACK}:{listen}"])
        last_progress = 0.0
        while sink.delivered() < args.messages:
            if time.monotonic() - started > args.timeout:
                raise RuntimeError(f"only {sink.delivered()} of {args.messages} delivered after {args.timeout}s")
            if time.monotonic() - last_progress >= 1:
                print(f"  {gateways} gateway(s): {sink.delivered()}/{args.messages} delivered", file=sys.stderr)
                last_progress = time.monotonic()
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        load.popen.wait(timeout=30)
        time.sleep(1.5)  # let each gateway's last acks and telemetry flush land
        after = sum(roundtrips(port) for port in metrics_ports)
        server_after = server_commands(redis.port)
        delivered = sink.delivered()
    return {"gateways": gateways, "messages": delivered, "seconds": round(elapsed, 2),
            "msgs_per_s": round(delivered / elapsed, 1), "redis_roundtrips": int(after - before),
            "roundtrips_per_message": round((after - before) / delivered, 2),
            "server_commands": sum(server_after.values()) - sum(server_before.values()),
            "server_commands_per_message": round((sum(server_after.values()) - sum(server_before.values()))
                                                 / delivered, 2),
            "server_commands_by_name": {name: calls - server_before.get(name, 0)
                                        for name, calls in sorted(server_after.items(), key=lambda kv: -kv[1])
                                        if calls - server_before.get(name, 0)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateways", type=int, action="append", help="gateway counts (default 1, 2, 4)")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--mxgate-cmd", default=None)
    parser.add_argument("--rate", type=float, help="the policy's messagesPerSecond (default: no rate limit)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    install_signal_handlers()
    counts = args.gateways or [1, 2, 4]
    results = []
    with tempfile.TemporaryDirectory(prefix="redis-cost-") as tmp:
        for gateways in counts:
            results.append(run(gateways, args, Path(tmp)))
    print(f"\nRedis cost: {args.messages} messages of {args.size} bytes, {args.sessions} smtp-source sessions, "
          "one redis-server (appendonly everysec)")
    print(f"rate limit: {args.rate or 'none'} msg/s")
    print(f"{'gateways':>8}  {'msg/s e2e':>9}  {'seconds':>7}  {'redis round trips':>17}  {'per message':>11}  "
          f"{'server commands':>15}  {'per message':>11}")
    for r in results:
        print(f"{r['gateways']:>8}  {r['msgs_per_s']:>9}  {r['seconds']:>7}  {r['redis_roundtrips']:>17}  "
              f"{r['roundtrips_per_message']:>11}  {r['server_commands']:>15}  {r['server_commands_per_message']:>11}")
    print(f"\ncommand:  {' '.join([sys.executable, *sys.argv])}")
    print(f"machine:  nproc={os.cpu_count()}, {platform.processor() or platform.machine()}, "
          f"{platform.platform()}")
    print(f"date:     {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "argv": sys.argv}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
