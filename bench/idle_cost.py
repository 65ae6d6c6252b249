#!/usr/bin/env python3
"""Cost follows the mail: one message to each of N distinct domains, then what the idle fleet costs.

A fresh redis-server, ``mxgate controller`` with a ``default`` policy routing every domain to a fresh
``smtp-sink``, and one ``mxgate gateway``. Ten SMTP sessions send one message to each of N domains (each its
own ``domain:*`` provider); the bench counts messages refused at ingest, waits until the sink has the rest,
waits ``--settle`` seconds, then measures over ``--window`` seconds: Redis commands per second (server-side,
``INFO commandstats``: the calls inside Lua scripts count too, so a script call shows as 1 + its inner
commands; ``evalsha`` alone is the scripts), and the gateway's and the controller's CPU. Last it restarts the
gateway and counts the Redis errors ("Too many connections", "claim failed") in its first 8 s.

    python3 bench/idle_cost.py --domains 2000
    python3 bench/idle_cost.py --domains 10000 --json /tmp/idle.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import smtplib
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
from _procs import (
    LOOPBACK,
    ProcessManager,
    SmtpSink,
    cpu_seconds,
    find_free_port,
    install_signal_handlers,
    start_redis,
    wait_for_http,
    wait_for_port,
)
from relay_bench import mxgate_command

DEFAULT_POLICY = """\
apiVersion: mxgate.io/v1alpha1
kind: ProviderPolicy
metadata: {{name: default}}
spec:
  route: {{hosts: ["{host}:{port}"]}}
"""


def commandstats(port: int) -> dict[str, int]:
    with redis.Redis(host=LOOPBACK, port=port, socket_timeout=5) as client:
        stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}


def send(port: int, domains: list[str]) -> int:
    """One session sending one message to each domain; how many were refused."""
    refused = 0
    with smtplib.SMTP(LOOPBACK, port, timeout=60) as smtp:
        for domain in domains:
            rcpt = f"user@{domain}"
            try:
                smtp.sendmail("app@example.com", [rcpt], f"To: {rcpt}\r\nSubject: idle\r\n\r\nbody\r\n")
            except smtplib.SMTPResponseException:
                refused += 1
    return refused


def start_gateway(manager: ProcessManager, cmd: list[str], env: dict[str, str], redis_url: str, listen: int,
                  name: str) -> tuple[object, int]:
    metrics = find_free_port()
    proc = manager.start(name, [*cmd, "gateway", "--redis-url", redis_url, "--listen", f"{LOOPBACK}:{listen}",
                                "--metrics-listen", f"{LOOPBACK}:{metrics}"], env=env)
    wait_for_http(f"http://{LOOPBACK}:{metrics}/readyz", timeout=60)
    wait_for_port(listen, timeout=30)
    return proc, metrics


def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    cmd, env = mxgate_command(None)
    with ProcessManager(workdir) as manager:
        sink = SmtpSink.start(manager)
        redis = start_redis(manager, workdir / "redis")
        policies = workdir / "policies"
        policies.mkdir()
        (policies / "default.yaml").write_text(DEFAULT_POLICY.format(host=LOOPBACK, port=sink.port))
        controller = manager.start("controller", [*cmd, "controller", "--redis-url", redis.url, "--policies",
                                                  str(policies)], env=env)
        listen = find_free_port()
        gateway, _ = start_gateway(manager, cmd, env, redis.url, listen, "gateway")
        domains = [f"d{n}.idle.test" for n in range(args.domains)]
        began = time.monotonic()
        with ThreadPoolExecutor(10) as pool:
            refused = sum(pool.map(lambda i: send(listen, domains[i::10]), range(10)))
        accepted = args.domains - refused
        while sink.delivered() < accepted:
            if time.monotonic() - began > args.timeout:
                raise RuntimeError(f"only {sink.delivered()} of {accepted} delivered after {args.timeout} s")
            time.sleep(0.2)
        drained = time.monotonic() - began
        print(f"{accepted} accepted, {refused} refused, all delivered in {drained:.1f} s; settling "
              f"{args.settle} s", file=sys.stderr)
        time.sleep(args.settle)
        before, cpu_before = commandstats(redis.port), cpu_seconds([gateway.pid, controller.pid])
        gw_before = cpu_seconds([gateway.pid])
        time.sleep(args.window)
        after, cpu_after = commandstats(redis.port), cpu_seconds([gateway.pid, controller.pid])
        gw_after = cpu_seconds([gateway.pid])
        counts = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
        counts["info"] = counts.get("info", 0) - 1
        total = sum(counts.values())
        # A restart with those providers known.
        manager.stop(gateway)
        restarted, _ = start_gateway(manager, cmd, env, redis.url, listen, "gateway-restarted")
        time.sleep(8)
        log = restarted.log_path.read_text(errors="replace")
        errors = log.count("Too many connections") + log.count("claim failed")
    return {"domains": args.domains, "refused_at_ingest": refused, "delivered": accepted,
            "drain_seconds": round(drained, 1), "idle_window_seconds": args.window,
            "idle_redis_commands_per_s": round(total / args.window, 2),
            "idle_script_calls_per_s": round(counts.get("evalsha", 0) / args.window, 2),
            "idle_commands": counts,
            "idle_cpu_percent_gateway": round(100 * (gw_after - gw_before) / args.window, 2),
            "idle_cpu_percent_gateway_and_controller": round(100 * (cpu_after - cpu_before) / args.window, 2),
            "redis_errors_in_restarted_gateway_8s": errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", type=int, default=2000)
    parser.add_argument("--settle", type=float, default=30.0, help="seconds after the drain before measuring")
    parser.add_argument("--window", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    install_signal_handlers()
    with tempfile.TemporaryDirectory(prefix="mxgate-idle-") as tmp:
        result = run(args, Path(tmp))
    result["machine"] = f"{platform.node()} ({platform.machine()}, {len(os.sched_getaffinity(0))} cpus)"
    result["date"] = time.strftime("%Y-%m-%d %H:%M")
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
