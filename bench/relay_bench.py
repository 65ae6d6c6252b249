#!/usr/bin/env python3
"""Relay throughput: mxgate against Postfix, same load, same sink, one run.

For each system (Postfix first, then mxgate) this script starts a fresh ``smtp-sink`` on a
loopback port, starts the relay in front of it, sends one untimed smoke message through and
waits for it at the sink, then runs::

    smtp-source -c -s SESSIONS -m MESSAGES -l SIZE -d \
        -f sender@example.com -t user@bench.test 127.0.0.1:RELAYPORT

and measures two figures:

* **ingest**: smtp-source's wall time to hand all MESSAGES to the relay (each one accepted
  with 250 after DATA), i.e. MESSAGES / (time smtp-source exited - time it started);
* **end-to-end**: from smtp-source's start until the sink has received all MESSAGES.

smtp-source's ``-m`` is the total number of messages (spread over ``-s`` parallel
sessions); ``-d`` keeps each session's connection open for its next message. The sink is
``smtp-sink -c``: its running counters are read from the tail of its output file, a few
bytes per message, so it is never the bottleneck.

It prints progress every second to stderr, then a table with msgs/s for both systems and the
ratio mxgate/Postfix, the exact command line, the machine, the date and the versions.
``--json FILE`` writes the same as JSON. This is a benchmark, not a test: it asserts nothing
about speed. It does fail (exit 1) if a system loses or duplicates messages, if smtp-source
reports an error, or if deliveries stall.

Usage::

    python3 bench/relay_bench.py                      # both systems, 20,000 messages each
    python3 bench/relay_bench.py --only postfix --messages 5000
    python3 bench/relay_bench.py --gateways 1 --json /tmp/relay.json

See bench/README.md for caveats (everything shares 2 cores over loopback).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _postfix import PostfixRelay, postfix_version
from _procs import (
    LOOPBACK,
    BenchError,
    ManagedProcess,
    ProcessManager,
    SmtpSink,
    cpu_seconds,
    find_free_port,
    install_signal_handlers,
    log_tail,
    machine_cpu,
    read_counter,
    require_tool,
    start_redis,
    tool_output,
    wait_for_http,
    wait_for_port,
)

REPO = Path(__file__).resolve().parents[1]
SENDER = "sender@example.com"
RECIPIENT = "user@bench.test"
SYSTEMS = ("postfix", "mxgate", "mxgate-replicated")
DEFAULT_SYSTEMS = ("postfix", "mxgate")

_SOURCE_RECORD = re.compile(r"^\s*(\d+)\s*$")

POLICY_YAML = """\
apiVersion: mxgate.io/v1alpha1
kind: ProviderPolicy
metadata: {{name: bench}}
spec:
  match: {{domains: [bench.test]}}
  route: {{hosts: ["{host}:{port}"]}}
  limits: {{maxConnections: 40, maxMessagesPerConnection: 1000}}
"""


@dataclass
class RunResult:
    """What one system did with the load."""

    system: str
    messages: int
    ingest_seconds: float
    e2e_seconds: float
    delivered: int
    source_command: str
    sink_command: str
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ingest_rate(self) -> float:
        """Messages per second handed over by smtp-source."""
        return self.messages / self.ingest_seconds

    @property
    def e2e_rate(self) -> float:
        """Messages per second from smtp-source's start to the last arrival at the sink."""
        return self.messages / self.e2e_seconds

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict including the derived rates."""
        data = asdict(self)
        data["ingest_seconds"] = round(self.ingest_seconds, 3)
        data["e2e_seconds"] = round(self.e2e_seconds, 3)
        data["ingest_msgs_per_s"] = round(self.ingest_rate, 1)
        data["e2e_msgs_per_s"] = round(self.e2e_rate, 1)
        return data


# ---------------------------------------------------------------------------------------
# Load generation and measurement
# ---------------------------------------------------------------------------------------
def source_argv(
    args: argparse.Namespace, port: int, messages: int, sessions: int, counter: bool
) -> list[str]:
    """The smtp-source command line for ``messages`` messages to ``127.0.0.1:port``."""
    argv = [require_tool("smtp-source")]
    if counter:
        argv.append("-c")
    argv += ["-s", str(sessions), "-m", str(messages), "-l", str(args.size), "-d"]
    argv += ["-f", SENDER, "-t", RECIPIENT, f"{LOOPBACK}:{port}"]
    return argv


def smoke(
    system: str, port: int, sink: SmtpSink, args: argparse.Namespace, alive: Callable[[], None]
) -> None:
    """Send one message through the relay and wait until the sink has it (not timed).

    Proves the whole path works before the measured run, so a misconfiguration fails fast
    with a clear message instead of as a stall.
    """
    before = sink.delivered()
    argv = source_argv(args, port, 1, 1, counter=False)
    done = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"[{system}] smoke message refused: `{shlex.join(argv)}`:\n{done.stdout.strip()}")
    deadline = time.monotonic() + 60
    while sink.delivered() <= before:
        alive()
        if time.monotonic() > deadline:
            raise BenchError(f"[{system}] smoke message accepted but not at the sink after 60 s")
        time.sleep(0.05)


def run_load(
    system: str,
    port: int,
    sink: SmtpSink,
    manager: ProcessManager,
    args: argparse.Namespace,
    alive: Callable[[], None],
    cpu_roots: dict[str, Callable[[], list[int]]],
) -> RunResult:
    """Run smtp-source against ``port`` and time ingest and end-to-end delivery at ``sink``.

    ``alive`` raises if the system under test died; ``cpu_roots`` maps a label to a function
    returning the pids whose process trees' CPU time is reported under that label.
    """
    n = args.messages
    base = sink.delivered()  # the smoke message is already counted
    argv = source_argv(args, port, n, args.sessions, counter=True)
    cpu_before = {label: cpu_seconds(pids()) for label, pids in cpu_roots.items()}
    cpu_before["smtp-sink"] = cpu_seconds([sink.proc.pid])
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine_before = machine_cpu()
    self_before = _self_cpu()
    load_before = os.getloadavg()[0]

    t0 = time.monotonic()
    source: ManagedProcess = manager.start(f"smtp-source-{system}", argv)
    ingest_end: float | None = None
    e2e_end: float | None = None
    source_cpu = 0.0
    delivered = 0
    last_print = t0
    last_progress = t0
    last_seen = (-1, -1)
    prev_delivered = 0

    def source_exited(at: float) -> float:
        """Record smtp-source's exit: its CPU time, and fail if it reported an error."""
        nonlocal source_cpu
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        source_cpu = (after.ru_utime - children_before.ru_utime) + (after.ru_stime - children_before.ru_stime)
        manager.stop(source)
        if source.popen.returncode != 0:
            raise BenchError(
                f"[{system}] smtp-source failed with status {source.popen.returncode}: "
                f"`{shlex.join(argv)}`\n{log_tail(source.log_path, 10)}"
            )
        return at

    while True:
        now = time.monotonic()
        if ingest_end is None and source.popen.poll() is not None:
            ingest_end = source_exited(now)
        delivered = sink.delivered() - base
        if delivered >= n:
            e2e_end = now
            break
        accepted = n if ingest_end is not None else read_counter(source.log_path, _SOURCE_RECORD)
        if (accepted, delivered) != last_seen:
            last_seen = (accepted, delivered)
            last_progress = now
        if now - last_print >= 1.0:
            rate = (delivered - prev_delivered) / (now - last_print)
            prev_delivered = delivered
            last_print = now
            print(
                f"[{system}] {now - t0:6.1f}s  accepted {accepted:>7}/{n}  delivered {delivered:>7}/{n}"
                f"  ({rate:6.0f} msg/s)",
                file=sys.stderr,
                flush=True,
            )
            alive()
        if now - last_progress > args.stall_timeout:
            raise BenchError(
                f"[{system}] no progress for {args.stall_timeout:.0f} s: accepted {accepted}/{n}, "
                f"delivered {delivered}/{n}"
            )
        time.sleep(0.02)

    if ingest_end is None:  # the sink had everything before smtp-source exited (a synchronous relay)
        source.popen.wait(60)
        ingest_end = source_exited(time.monotonic())
    cpu = {label: cpu_seconds(pids()) - cpu_before[label] for label, pids in cpu_roots.items()}
    cpu["smtp-sink"] = cpu_seconds([sink.proc.pid]) - cpu_before["smtp-sink"]
    cpu["smtp-source"] = source_cpu
    cpu["relay_bench.py"] = _self_cpu() - self_before
    machine = machine_cpu() - machine_before
    other = max(0.0, machine.tasks - sum(cpu.values())) + machine.steal
    cores = len(os.sched_getaffinity(0))
    print(f"[{system}] done: {n} messages delivered in {e2e_end - t0:.2f} s", file=sys.stderr, flush=True)

    # Late arrivals beyond N would be duplicates.
    time.sleep(1.0)
    final = sink.delivered() - base
    result = RunResult(
        system=system,
        messages=n,
        ingest_seconds=ingest_end - t0,
        e2e_seconds=e2e_end - t0,
        delivered=final,
        source_command=shlex.join(argv),
        sink_command=sink.command,
        cpu_seconds={k: round(v, 2) for k, v in cpu.items()},
    )
    result.checks["other_load"] = {
        "machine_process_cpu_s": round(machine.tasks, 2),
        "kernel_irq_softirq_cpu_s": round(machine.interrupts, 2),
        "steal_cpu_s": round(machine.steal, 2),
        "other_processes_and_steal_cpu_s": round(other, 2),
        "capacity_cpu_s": round(cores * (e2e_end - t0), 2),
        "loadavg_1m_before": round(load_before, 2),
    }
    if other > 0.1 * cores * (e2e_end - t0):
        result.notes.append(
            f"WARNING: processes outside the benchmark (and hypervisor steal) used {other:.1f} CPU-s of the "
            f"{cores * (e2e_end - t0):.1f} available during the run "
            f"(load average before: {load_before:.1f}); "
            "the figures are depressed by that load: rerun on a quiet machine"
        )
    if final != n:
        result.notes.append(f"sink received {final} messages for {n} sent (duplicates)")
    return result


# ---------------------------------------------------------------------------------------
# The two systems
# ---------------------------------------------------------------------------------------
def run_postfix(args: argparse.Namespace, workdir: Path) -> RunResult:
    """Benchmark a private Postfix relay (see _postfix.py)."""
    root = workdir / "postfix"
    with ProcessManager(root / "logs") as manager:
        sink = SmtpSink.start(manager, "smtp-sink")
        with PostfixRelay(root / "instance", sink.port) as relay:

            def alive() -> None:
                sink.proc.check_alive()
                if relay.master_pid() is None:
                    raise BenchError(
                        f"Postfix master died; last lines of {relay.log_path}:\n{log_tail(relay.log_path)}"
                    )

            def roots() -> list[int]:
                pid = relay.master_pid()
                return [pid] if pid else []

            print(
                f"[postfix] relay on {LOOPBACK}:{relay.listen_port} -> sink {LOOPBACK}:{sink.port}",
                file=sys.stderr,
            )
            smoke("postfix", relay.listen_port, sink, args, alive)
            result = run_load("postfix", relay.listen_port, sink, manager, args, alive, {"postfix": roots})
            # Give qmgr a moment to remove the last queue files, then check nothing is left.
            deadline = time.monotonic() + 10
            while sum(relay.queue_counts().values()) and time.monotonic() < deadline:
                time.sleep(0.2)
            queues = relay.queue_counts()
            result.checks["queue_files_left"] = queues
            result.checks["maillog"] = relay.log_summary()
            result.notes.append(relay.defaults_note())
            result.checks["commands"] = {
                "start": f"{relay.postfix} -c {relay.config_dir} start",
                "stop": f"{relay.postfix} -c {relay.config_dir} stop",
            }
            if sum(queues.values()):
                result.notes.append(f"queue not empty after the run: {queues}")
    return result


def mxgate_command(override: str | None = None) -> tuple[list[str], dict[str, str]]:
    """How to run mxgate, and its environment.

    ``override`` (``--mxgate-cmd``) wins; then the ``mxgate`` executable if on PATH; else
    ``python -m mxgate.cli``. This checkout's ``gateway/`` and ``operator/`` are put first on
    PYTHONPATH either way, so the code benchmarked is the code next to this script.
    """
    env = dict(os.environ)
    paths = [str(REPO / "gateway"), str(REPO / "operator")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if override:
        return shlex.split(override), env
    exe = shutil.which("mxgate")
    if exe:
        return [exe], env
    return [sys.executable, "-m", "mxgate.cli"], env


def check_mxgate_cli(override: str | None) -> None:
    """Fail clearly if mxgate's CLI cannot run its gateway subcommand."""
    cmd, env = mxgate_command(override)
    done = subprocess.run(
        [*cmd, "gateway", "--help"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(
            f"mxgate CLI not usable (`{shlex.join([*cmd, 'gateway', '--help'])}` exited {done.returncode}):\n"
            f"{done.stdout.strip()[-2000:]}\nrun with --only postfix to benchmark Postfix alone"
        )


def run_mxgate_replicated(args: argparse.Namespace, workdir: Path) -> RunResult:
    """mxgate with a replica behind its Redis: every 250 waits for the replica's acknowledgement (WAIT 1)."""
    return run_mxgate(args, workdir, replicated=True)


def run_mxgate(args: argparse.Namespace, workdir: Path, *, replicated: bool = False) -> RunResult:
    """Benchmark mxgate: redis-server, one controller, ``--gateways`` gateway processes."""
    root = workdir / ("mxgate-replicated" if replicated else "mxgate")
    cmd, env = mxgate_command(args.mxgate_cmd)
    with ProcessManager(root / "logs") as manager:
        sink = SmtpSink.start(manager, "smtp-sink")
        redis = start_redis(manager, root / "redis")
        replica = start_redis(manager, root / "replica", replica_of=redis, name="redis-replica") if replicated \
            else None
        policies = root / "policies"
        policies.mkdir(parents=True)
        (policies / "bench.yaml").write_text(POLICY_YAML.format(host=LOOPBACK, port=sink.port))

        controller = manager.start(
            "mxgate-controller",
            [*cmd, "controller", "--redis-url", redis.url, "--policies", str(policies)],
            env=env,
        )
        listen = find_free_port()
        gateways: list[tuple[ManagedProcess, int]] = []
        for i in range(args.gateways):
            metrics = find_free_port()
            gateway_argv = [*cmd, "gateway", "--redis-url", redis.url, "--listen", f"{LOOPBACK}:{listen}"]
            gateway_argv += ["--metrics-listen", f"{LOOPBACK}:{metrics}", "--allowed-networks", "127.0.0.0/8"]
            gateway_argv += ["--reuse-port", "--replica-acks", "1" if replicated else "0"]
            proc = manager.start(f"mxgate-gateway-{i}", gateway_argv, env=env)
            gateways.append((proc, metrics))
        for proc, metrics in gateways:
            controller.check_alive()
            wait_for_http(f"http://{LOOPBACK}:{metrics}/readyz", timeout=args.start_timeout, proc=proc)
        wait_for_port(listen, proc=gateways[0][0])

        def alive() -> None:
            sink.proc.check_alive()
            redis.proc.check_alive()
            if replica is not None:
                replica.proc.check_alive()
            controller.check_alive()
            for proc, _ in gateways:
                proc.check_alive()

        print(
            f"[mxgate] {args.gateways} gateway(s) on {LOOPBACK}:{listen} (redis {redis.url}) "
            f"-> sink {LOOPBACK}:{sink.port}",
            file=sys.stderr,
        )
        smoke("mxgate", listen, sink, args, alive)
        result = run_load(
            "mxgate-replicated" if replicated else "mxgate",
            listen,
            sink,
            manager,
            args,
            alive,
            {
                "mxgate": lambda: [controller.pid, *(p.pid for p, _ in gateways)],
                "redis": lambda: [redis.proc.pid, *([replica.proc.pid] if replica else [])],
            },
        )
        # Stop the gateways now (SIGTERM, all at once) to see whether they shut down cleanly.
        result.checks["gateway_stop"] = manager.stop_many([g for g, _ in gateways], timeout=args.stop_timeout)
        result.checks["gateways"] = args.gateways
        result.checks["commands"] = {
            "redis": shlex.join(redis.proc.argv),
            "controller": shlex.join(controller.argv),
            "gateway-0": shlex.join(gateways[0][0].argv),
        }
        result.checks["redis_persistence"] = "appendonly yes, appendfsync everysec, no RDB"
        result.checks["replica_acks"] = 1 if replicated else 0
        result.checks["log_error_lines"] = {
            p.name: _count_errors(p.log_path) for p in [controller, *(g for g, _ in gateways)]
        }
        result.notes.append(
            f"{args.gateways} gateway process(es) sharing one port (--reuse-port), one controller, "
            "policy maxConnections=40 maxMessagesPerConnection=1000"
        )
    return result


def wait_idle(limit: float, threshold: float = 0.10, window: float = 3.0) -> str:
    """Wait up to ``limit`` seconds until the machine is idle; return what was seen.

    Idle means: over a ``window``-second sample, processes used less than ``threshold`` of
    all cores. Returns a short description for the report (it never fails: a busy machine is
    flagged by the per-run ``other_load`` figures anyway).
    """
    cores = len(os.sched_getaffinity(0))
    deadline = time.monotonic() + limit
    while True:
        before = machine_cpu()
        time.sleep(window)
        busy = (machine_cpu() - before).tasks / (cores * window)
        if busy < threshold:
            return f"idle ({busy:.0%} busy over {window:.0f} s)"
        if time.monotonic() >= deadline:
            return f"still {busy:.0%} busy after waiting {limit:.0f} s"
        print(f"waiting for an idle machine: {busy:.0%} busy", file=sys.stderr, flush=True)


def _self_cpu() -> float:
    """CPU seconds this script has used itself (it polls counters during the run)."""
    times = os.times()
    return times.user + times.system


def _count_errors(path: Path) -> int:
    """Lines in a log that look like errors or tracebacks."""
    if not path.exists():
        return 0
    pattern = re.compile(r"\b(ERROR|CRITICAL|Traceback)\b")
    with open(path, encoding="utf-8", errors="replace") as fh:
        return sum(1 for line in fh if pattern.search(line))


# ---------------------------------------------------------------------------------------
# Environment description and output
# ---------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """nproc, CPU model, RAM, kernel."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
                break
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
    }


def versions(systems: Sequence[str], mxgate_cmd: str | None) -> dict[str, str]:
    """Versions of everything involved."""
    info = {
        "python": platform.python_version(),
        "postfix": postfix_version(),
    }
    if any(s.startswith("mxgate") for s in systems):
        redis = tool_output([require_tool("redis-server"), "--version"])
        match = re.search(r"v=(\S+)", redis)
        info["redis"] = match.group(1) if match else redis
        cmd, env = mxgate_command(mxgate_cmd)
        done = subprocess.run(
            [*cmd, "--version"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )
        version = done.stdout.strip()
        info["mxgate"] = version.removeprefix("mxgate ") if done.returncode == 0 and version else "unknown"
    commit = tool_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    if commit and re.fullmatch(r"[0-9a-f]+", commit):
        dirty = tool_output(
            ["git", "--no-optional-locks", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]
        )
        info["mxgate_repo_commit"] = commit + ("+uncommitted changes" if dirty else "")
    return info


def print_report(report: dict[str, Any], results: dict[str, RunResult]) -> None:
    """The human-readable summary on stdout."""
    out = sys.stdout
    p = report["parameters"]
    print(file=out)
    print(
        f"Relay benchmark: {p['messages']} messages of {p['size']} bytes, "
        f"{p['sessions']} smtp-source sessions "
        f"(-d: connections reused), loopback",
        file=out,
    )
    header = (
        f"{'system':<18}{'ingest s':>10}{'ingest msg/s':>14}{'e2e s':>10}{'e2e msg/s':>12}{'delivered':>11}"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for name, r in results.items():
        print(
            f"{name:<18}{r.ingest_seconds:>10.2f}{r.ingest_rate:>14.1f}{r.e2e_seconds:>10.2f}{r.e2e_rate:>12.1f}"
            f"{r.delivered:>11}",
            file=out,
        )
    if "ratio_mxgate_over_postfix" in report:
        ratio = report["ratio_mxgate_over_postfix"]
        print(
            f"{'mxgate/postfix':<18}{'':>10}{ratio['ingest']:>14.2f}{'':>10}{ratio['e2e']:>12.2f}",
            file=out,
        )
    if "ratio_replicated_over_lone" in report:
        ratio = report["ratio_replicated_over_lone"]
        print(
            f"{'replicated/lone':<18}{'':>10}{ratio['ingest']:>14.2f}{'':>10}{ratio['e2e']:>12.2f}",
            file=out,
        )
    print(file=out)
    for name, r in results.items():
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in r.cpu_seconds.items())
        print(f"{name}: CPU seconds during the run: {cpu}", file=out)
        for note in r.notes:
            print(f"{name}: {note}", file=out)
        for key, value in r.checks.items():
            print(f"{name}: {key}: {value}", file=out)
        print(f"{name}: load: {r.source_command}", file=out)
        print(f"{name}: sink: {r.sink_command}", file=out)
    m = report["machine"]
    print(file=out)
    print(f"command:  {report['command']}", file=out)
    print(
        f"machine:  nproc={m['nproc']}, CPU: {m['cpu_model']}, RAM {m['ram_gib']} GiB, kernel {m['kernel']}",
        file=out,
    )
    print(f"date:     {report['date']}", file=out)
    print(f"versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}", file=out)
    print(
        "caveat:   load generator, sink, relay (and Redis) all share the same cores over loopback; "
        "see bench/README.md",
        file=out,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Push the same SMTP load through mxgate and through a Postfix relay to one smtp-sink; "
        "print ingest and end-to-end msgs/s for both and the ratio mxgate/Postfix.",
    )
    parser.add_argument("--messages", type=int, default=20000, help="messages per system (default: 20000)")
    parser.add_argument(
        "--sessions", type=int, default=20, help="parallel smtp-source sessions (default: 20)"
    )
    parser.add_argument(
        "--size", type=int, default=2048, help="message body bytes, smtp-source -l (default: 2048)"
    )
    parser.add_argument(
        "--gateways",
        type=int,
        default=os.cpu_count() or 1,
        help="mxgate gateway processes sharing the listen port (default: os.cpu_count() = %(default)s)",
    )
    parser.add_argument(
        "--mxgate-cmd",
        metavar="CMD",
        help="command that runs mxgate's CLI (default: `mxgate` on PATH, else `python -m mxgate.cli`)",
    )
    parser.add_argument("--only", choices=SYSTEMS, help="benchmark only this system")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), metavar="A,B",
                        help=f"systems to run, in order, from {', '.join(SYSTEMS)} (default: %(default)s); "
                        "mxgate-replicated runs mxgate with a replica behind Redis and --replica-acks 1")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument(
        "--workdir", type=Path, help="put the throwaway instances here (default: a new directory under /tmp)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, queues) afterwards"
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        help="fail if neither ingest nor delivery progresses for this many seconds (default: 60)",
    )
    parser.add_argument(
        "--start-timeout", type=float, default=60.0, help="seconds to wait for mxgate's /readyz (default: 60)"
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each system, wait up to this long for other processes to use < 10%% of the CPUs "
        "(default: 0, don't wait)",
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        help="seconds mxgate gateways get to exit after SIGTERM before SIGKILL (default: 30)",
    )
    args = parser.parse_args(argv)
    args.systems = [args.only] if args.only else [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown or not args.systems:
        parser.error(f"--systems: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(SYSTEMS)}")
    if args.messages < 1 or args.sessions < 1 or args.size < 0 or args.gateways < 1:
        parser.error("--messages, --sessions and --gateways must be >= 1, --size >= 0")
    return args


@contextlib.contextmanager
def work_directory(args: argparse.Namespace) -> Iterator[Path]:
    """The run's work directory; removed afterwards unless --keep or the run failed (Ctrl-C removes it)."""
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="relay-bench-", dir=args.workdir))
    else:
        path = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    os.chmod(path, 0o755)  # Postfix's daemons (user postfix) must reach their queue inside it
    keep = args.keep
    try:
        yield path
    except KeyboardInterrupt:
        raise
    except BaseException:
        keep = True  # a failure: keep the logs for a post-mortem
        raise
    finally:
        if keep:
            print(f"work directory kept (logs, queues): {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 on failure, 130 when interrupted."""
    args = parse_args(argv)
    install_signal_handlers()
    systems = list(args.systems)
    try:
        for tool in ("smtp-source", "smtp-sink"):
            require_tool(tool)
        if "postfix" in systems:
            require_tool("postfix")
        if any(s.startswith("mxgate") for s in systems):
            require_tool("redis-server")
            check_mxgate_cli(args.mxgate_cmd)

        report: dict[str, Any] = {
            "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "versions": versions(systems, args.mxgate_cmd),
            "parameters": {
                "messages": args.messages,
                "sessions": args.sessions,
                "size": args.size,
                "gateways": args.gateways if any(s.startswith("mxgate") for s in systems) else None,
                "connections_reused": True,
            },
        }
        results: dict[str, RunResult] = {}
        with work_directory(args) as workdir:
            for system in systems:
                idle = wait_idle(args.wait_idle) if args.wait_idle > 0 else None
                runner = {"postfix": run_postfix, "mxgate": run_mxgate,
                          "mxgate-replicated": run_mxgate_replicated}[system]
                results[system] = runner(args, workdir)
                if idle:
                    results[system].checks["before_run"] = idle
        report["results"] = {name: r.to_json() for name, r in results.items()}
        if "postfix" in results and "mxgate" in results:
            report["ratio_mxgate_over_postfix"] = {
                "ingest": round(results["mxgate"].ingest_rate / results["postfix"].ingest_rate, 3),
                "e2e": round(results["mxgate"].e2e_rate / results["postfix"].e2e_rate, 3),
            }
        if "mxgate" in results and "mxgate-replicated" in results:
            report["ratio_replicated_over_lone"] = {
                "ingest": round(results["mxgate-replicated"].ingest_rate / results["mxgate"].ingest_rate, 3),
                "e2e": round(results["mxgate-replicated"].e2e_rate / results["mxgate"].e2e_rate, 3),
            }
        print_report(report, results)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            print(f"\nJSON written to {args.json}", file=sys.stderr)
        failed = [f"{n}: {note}" for n, r in results.items() for note in r.notes if "duplicates" in note]
        failed += [
            f"{n}: queue not empty"
            for n, r in results.items()
            if any(r.checks.get("queue_files_left", {}).values())
        ]
        if failed:
            print("FAILED: " + "; ".join(failed), file=sys.stderr)
            return 1
        return 0
    except BenchError as exc:
        print(f"relay_bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(
            f"relay_bench: interrupted ({str(exc) or 'Ctrl-C'}); everything started was stopped",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
