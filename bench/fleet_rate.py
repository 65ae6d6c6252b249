#!/usr/bin/env python3
"""Issue 3's rate acceptance at full size: 4 gateways, one Redis, a 50 msg/s policy, 5,000 messages.

The simulator (``mxgate sim``, no limits of its own) records how many messages it accepted in each
second; this prints the delivered rate over every 10 s window while a backlog existed (the limit
must hold: at most 55/s, and the fleet must use it: at least 45/s), and the overall figures.

    python3 bench/fleet_rate.py                   # 5,000 messages at 50/s, about two minutes
    python3 bench/fleet_rate.py --messages 2000 --rate 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _procs import (
    LOOPBACK,
    ProcessManager,
    find_free_port,
    install_signal_handlers,
    require_tool,
    start_redis,
    wait_for_http,
    wait_for_port,
)
from relay_bench import mxgate_command

POLICY = """\
apiVersion: mxgate.io/v1alpha1
kind: ProviderPolicy
metadata: {{name: microsoft}}
spec:
  match: {{domains: [outlook.test]}}
  route: {{hosts: ["{host}:{port}"]}}
  limits: {{maxConnections: 20, maxMessagesPerConnection: 1000, messagesPerSecond: {rate}}}
"""


def report(http_port: int) -> dict:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{http_port}/report", timeout=10) as response:
        return json.loads(response.read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--gateways", type=int, default=4)
    args = parser.parse_args()
    install_signal_handlers()
    cmd, env = mxgate_command(None)
    source = require_tool("smtp-source", "apt-get install postfix")
    with tempfile.TemporaryDirectory(prefix="fleet-rate-") as tmp, ProcessManager(Path(tmp)) as manager:
        sim_port, sim_http = find_free_port(), find_free_port()
        manager.start("sim", [*cmd, "sim", "--listen", f"{LOOPBACK}:{sim_port}", "--http", f"{LOOPBACK}:{sim_http}"],
                      env=env)
        wait_for_port(sim_port, timeout=30)
        redis = start_redis(manager, Path(tmp) / "redis")
        policies = Path(tmp) / "policies"
        policies.mkdir()
        (policies / "ms.yaml").write_text(POLICY.format(host=LOOPBACK, port=sim_port, rate=args.rate))
        manager.start("controller", [*cmd, "controller", "--redis-url", redis.url, "--policies", str(policies)],
                      env=env)
        listen = find_free_port()
        for i in range(args.gateways):
            metrics = find_free_port()
            manager.start(f"gateway-{i}", [*cmd, "gateway", "--redis-url", redis.url, "--listen",
                                           f"{LOOPBACK}:{listen}", "--metrics-listen", f"{LOOPBACK}:{metrics}",
                                           "--reuse-port"], env=env)
            wait_for_http(f"http://{LOOPBACK}:{metrics}/readyz", timeout=60)
        urllib.request.urlopen(urllib.request.Request(f"http://{LOOPBACK}:{sim_http}/reset", method="POST"),
                               timeout=10).read()
        started = time.monotonic()
        load = manager.start("smtp-source", [source, "-s", "20", "-m", str(args.messages), "-l", "2048", "-d",
                                             "-f", "app@example.com", "-t", "u@outlook.test", f"{LOOPBACK}:{listen}"])
        while (accepted := report(sim_http)["accepted"]["messages"]) < args.messages:
            print(f"  {accepted}/{args.messages} delivered, {time.monotonic() - started:.0f}s", file=sys.stderr)
            if time.monotonic() - started > args.messages / args.rate * 3 + 120:
                raise SystemExit(f"only {accepted} delivered")
            time.sleep(2)
        load.popen.wait(timeout=30)
        final = report(sim_http)
    series = dict(final["accepted_per_second"])
    seconds = range(min(series), max(series) + 1)
    per_second = [series.get(s, 0) for s in seconds]
    # Every full 10 s window from the first accepted message to the last (the backlog existed throughout:
    # smtp-source hands over messages far faster than 50/s).
    windows = [sum(per_second[i:i + 10]) / 10 for i in range(0, len(per_second) - 9)]
    inner = windows[1:-1] if len(windows) > 2 else windows   # first/last windows straddle start and end
    print(f"\nFleet rate: {args.gateways} gateways, one Redis, policy messagesPerSecond={args.rate:g}, "
          f"{args.messages} messages (smtp-source -s 20 -d), simulator without limits")
    delivered = final["accepted"]["messages"]
    print(f"delivered {delivered} in {len(per_second)} s: {delivered / len(per_second):.1f}/s overall; "
          f"duplicates {final['duplicates']['messages']}, deferrals {final['deferrals']['total']}")
    print(f"10 s windows: max {max(windows):.1f}/s, min {min(inner):.1f}/s (excluding the first and last), "
          f"{len(windows)} windows")
    print(f"limit {args.rate:g}/s: max window {'within' if max(windows) <= args.rate * 1.1 else 'ABOVE'} +10 %, "
          f"min window {'within' if min(inner) >= args.rate * 0.9 else 'BELOW'} -10 %")
    print(f"\ncommand: {' '.join([sys.executable, *sys.argv])}\nmachine: nproc={os.cpu_count()}\n"
          f"date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
