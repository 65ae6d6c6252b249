#!/usr/bin/env python3
"""Demonstration of the adaptive limits (issue 4 item 7): mxgate vs Postfix against a throttling provider.

A simulated Outlook (``mxgate sim --profile outlook --max-connections 5 --rate 50``: 5 connections and
50 msg/s per client IP; everything runs on 127.0.0.1, so the limits are fleet-wide) receives the same
load from

1. mxgate: redis-server, ``mxgate controller`` (the adaptive loop) and two ``mxgate gateway`` processes,
   with a policy whose ceilings (20 connections, 200 msg/s) are far above what the provider allows —
   mxgate does not know the real limits and must find them;
2. a private Postfix relay (bench/_postfix.py) with its defaults, relayhost = the simulator;
3. (unless ``--no-tuned``) the same Postfix hand-tuned to 5 connections per destination.

The load is ``smtp-source -s 20 -m N -l 2048 -d -f app@example.com -t u@outlook.test``. Every second
the script samples the live limits (Redis hash ``mxg:{p:microsoft}:limits``; absent = ceiling), mxgate's
queue (jobs accepted and not yet delivered: ZCARD of ``mxg:{p:microsoft}:q``) and the simulator's
/report (accepted messages, deferrals by kind, open connections). The simulator's counters are reset
(POST /reset) between phases.

The policy sets only the two ceilings; everything else is mxgate's default (retry ladders, response
rules, maxMessagesPerConnection). ``--tuned-policy`` adds what the demonstration needed before issue 11
(``retry: {throttledDelay: 1s, throttledMaxDelay: 5s}`` and a rule making ``451 4.7.650`` a rate signal),
to compare.

    python3 bench/adaptive_demo.py                              # ~10 minutes (Postfix passes are capped)
    python3 bench/adaptive_demo.py --json /tmp/adaptive.json --postfix-cap 300
    python3 bench/adaptive_demo.py --only mxgate
    python3 bench/adaptive_demo.py --replot /tmp/adaptive.json --png /tmp/adaptive.png   # figures and plot again

Figures: deferral % = simulator deferrals / (simulator accepted + simulator deferrals), i.e. the share
of attempts the provider refused; goodput = accepted / duration. "After convergence" = from
``--converge`` seconds (30) after the start, from the per-second samples, over two spans:

* while there is a backlog (the target's figure): up to the last sample at which mxgate's queue still
  held at least one second of the provider's rate (50 messages). Past that point goodput falls because
  the 3,000 messages run out, not because of mxgate's limits;
* to the last delivery (printed too): includes the tail, where the last few messages trickle in.

Postfix's queue is not sampled; its passes are capped long before its backlog runs out, so its spans
both end at the cap.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _postfix import PostfixRelay, postfix_version
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

REPO = Path(__file__).resolve().parent.parent
PROVIDER = "microsoft"
REAL_CONNECTIONS, REAL_RATE = 5, 50.0
CEIL_CONNECTIONS, CEIL_RATE = 20, 200.0
BACKLOG = int(REAL_RATE)   # queued messages: one second of the provider's rate

POLICY = """\
apiVersion: mxgate.io/v1alpha1
kind: ProviderPolicy
metadata: {{name: {provider}}}
spec:
  match: {{domains: [outlook.test]}}
  route: {{hosts: ["{host}:{port}"]}}
  limits: {{maxConnections: {conns}, messagesPerSecond: {rate}}}
"""
# Before issue 11 the demonstration needed these: short throttled retries and 4.7.650 made a rate signal
# (--tuned-policy runs with them again, to compare).
TUNED_POLICY = """\
  retry: {throttledDelay: 1s, throttledMaxDelay: 5s}
  responses:
  - {match: '^451 4\\.7\\.65[01]\\b', action: TightenRate}
"""

TUNED = "\n# hand-tuned to the provider's 5 connections\n" \
        "default_destination_concurrency_limit = 5\nsmtp_destination_concurrency_limit = 5\n"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sim_report(http_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{http_port}/report", timeout=10) as response:
        return json.loads(response.read())


def sim_reset(http_port: int) -> None:
    request = urllib.request.Request(f"http://{LOOPBACK}:{http_port}/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).read()


def sample_of(t: float, report: dict[str, Any]) -> dict[str, Any]:
    d = report["deferrals"]
    return {"t": round(t, 3), "accepted": report["accepted"]["messages"], "def_connections": d["connections"],
            "def_rate": d["rate"], "def_total": d["total"], "open": report["connections"]["open"]}


def measure(label: str, http_port: int, source_argv: list[str], manager: ProcessManager, messages: int,
            cap: float, extra: Any = None) -> dict[str, Any]:
    """Start smtp-source, sample every second until the simulator accepted ``messages`` (or ``cap`` s)."""
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    start_epoch = time.time()
    load = manager.start(f"smtp-source-{label}", source_argv)
    capped = False
    source_done: float | None = None
    while True:
        t = time.monotonic() - started
        row = sample_of(t, sim_report(http_port))
        if extra is not None:
            row.update(extra())
        samples.append(row)
        if source_done is None and load.popen.poll() is not None:
            source_done = t
        limits = f" limits {row['maxConnections']}c/{row['messagesPerSecond']:g}/s" if "maxConnections" in row else ""
        queued = f" queued {row['queued']}" if "queued" in row else ""
        log(f"  [{label}] {t:5.0f}s accepted {row['accepted']}/{messages} deferrals conn={row['def_connections']} "
            f"rate={row['def_rate']} total={row['def_total']} open={row['open']}{limits}{queued}")
        if row["accepted"] >= messages:
            break
        if t > cap:
            capped = True
            log(f"  [{label}] cap of {cap:g}s reached: stopping with {row['accepted']}/{messages} delivered")
            break
        next_at = started + len(samples)
        time.sleep(max(0.0, next_at - time.monotonic()))
    final = sim_report(http_port)
    if load.alive():
        load.popen.wait(timeout=5) if not capped else None
    source_rc = load.popen.poll()
    return {"label": label, "start_epoch": start_epoch, "samples": samples, "capped": capped,
            "smtp_source_status": source_rc, "smtp_source_done_s": source_done, "final_report": final}


def span_figures(first: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """Deliveries, deferrals and goodput between two samples."""
    a, d = last["accepted"] - first["accepted"], last["def_total"] - first["def_total"]
    span = last["t"] - first["t"]
    return {"from_s": round(first["t"], 1), "to_s": round(last["t"], 1), "accepted": a, "deferrals": d,
            "deferral_pct": 100.0 * d / (a + d) if a + d else None, "goodput": a / span if span else 0.0}


def figures(run: dict[str, Any], converge: float, backlog: int) -> dict[str, Any]:
    s = run["samples"]
    end = s[-1]
    duration = end["t"]
    acc, dfr = end["accepted"], end["def_total"]
    out: dict[str, Any] = {
        "duration_s": round(duration, 1), "accepted": acc, "deferrals": dfr,
        "deferrals_connections": end["def_connections"], "deferrals_rate": end["def_rate"],
        "deferral_pct": 100.0 * dfr / (acc + dfr) if acc + dfr else 0.0,
        "goodput": acc / duration if duration else 0.0, "capped": run["capped"]}
    after = [x for x in s if x["t"] >= converge]
    if len(after) < 2:
        return out
    out["to_end"] = span_figures(after[0], end)
    if "queued" in after[0]:
        # The target's span ends where mxgate's backlog fell below one second of the provider's rate.
        held = [x for x in after if x["queued"] >= backlog]
        if len(held) >= 2:
            out["with_backlog"] = span_figures(after[0], held[-1])
    else:
        out["with_backlog"] = out["to_end"]   # not sampled (Postfix): its backlog outlasts the cap
    return out


class TunedPostfix(PostfixRelay):
    def write_config(self) -> None:
        super().write_config()
        with open(self.config_dir / "main.cf", "a") as fh:
            fh.write(TUNED)


def run_mxgate(args: argparse.Namespace, manager: ProcessManager, tmp: Path, sim_port: int, sim_http: int,
               source: str) -> dict[str, Any]:
    import redis as redis_sync

    cmd, env = mxgate_command(args.mxgate_cmd)
    redis = start_redis(manager, tmp / "redis")
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "microsoft.yaml").write_text(POLICY.format(provider=PROVIDER, host=LOOPBACK, port=sim_port,
                                                           conns=CEIL_CONNECTIONS, rate=CEIL_RATE)
                                             + (TUNED_POLICY if args.tuned_policy else ""))
    procs = [manager.start("controller", [*cmd, "controller", "--redis-url", redis.url,
                                          "--policies", str(policies)], env=env)]
    listen = find_free_port()
    for i in range(args.gateways):
        metrics = find_free_port()
        procs.append(manager.start(f"gateway-{i}", [*cmd, "gateway", "--redis-url", redis.url, "--listen",
                                                    f"{LOOPBACK}:{listen}", "--metrics-listen",
                                                    f"{LOOPBACK}:{metrics}", "--reuse-port"], env=env))
        wait_for_http(f"http://{LOOPBACK}:{metrics}/readyz", timeout=60, proc=procs[-1])
    r = redis_sync.Redis(host=LOOPBACK, port=redis.port)
    limits_key = f"mxg:{{p:{PROVIDER}}}:limits"
    adjustments_key = f"mxg:{{p:{PROVIDER}}}:adjustments"

    queue_key = f"mxg:{{p:{PROVIDER}}}:q"

    def live_limits() -> dict[str, Any]:
        raw = {k.decode(): v.decode() for k, v in r.hgetall(limits_key).items()}
        conns = int(raw["maxConnections"]) if raw.get("maxConnections") else CEIL_CONNECTIONS
        rate = float(raw["messagesPerSecond"]) if raw.get("messagesPerSecond") else CEIL_RATE
        return {"maxConnections": conns, "messagesPerSecond": rate, "reason": raw.get("reason", ""),
                "queued": int(r.zcard(queue_key))}

    time.sleep(1.0)
    sim_reset(sim_http)
    argv = [source, "-s", str(args.sessions), "-m", str(args.messages), "-l", "2048", "-d",
            "-f", "app@example.com", "-t", "u@outlook.test", f"{LOOPBACK}:{listen}"]
    log(f"mxgate: {args.gateways} gateways + controller, policy ceilings {CEIL_CONNECTIONS} connections / "
        f"{CEIL_RATE:g} msg/s; provider allows {REAL_CONNECTIONS} / {REAL_RATE:g}")
    run = measure("mxgate", sim_http, argv, manager, args.messages, args.mxgate_cap, extra=live_limits)
    run["adjustments"] = [json.loads(x) for x in reversed(r.lrange(adjustments_key, 0, -1))]
    run["final_limits"] = {k.decode(): v.decode() for k, v in r.hgetall(limits_key).items()}
    run["source_argv"] = argv
    for proc in reversed(procs):
        manager.stop(proc, timeout=20)
    return run


def run_postfix(args: argparse.Namespace, manager: ProcessManager, tmp: Path, sim_port: int, sim_http: int,
                source: str, tuned: bool) -> dict[str, Any]:
    label = "postfix-tuned" if tuned else "postfix"
    root = Path(tempfile.mkdtemp(prefix=f"adaptive-{label}-", dir="/tmp"))
    cls = TunedPostfix if tuned else PostfixRelay
    relay = cls(root, sim_port)
    try:
        with relay:
            log(f"{label}: {relay.defaults_note()}")
            time.sleep(1.0)
            sim_reset(sim_http)
            argv = [source, "-s", str(args.sessions), "-m", str(args.messages), "-l", "2048", "-d",
                    "-f", "app@example.com", "-t", "u@outlook.test", f"{LOOPBACK}:{relay.listen_port}"]
            run = measure(label, sim_http, argv, manager, args.messages, args.postfix_cap)
            run["queue"] = relay.queue_counts()
            run["maillog"] = relay.log_summary()
            run["concurrency_limit"] = relay.param("smtp_destination_concurrency_limit")
            run["source_argv"] = argv
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)
    return run


RUN_STYLES = (("mxgate", "tab:green", "mxgate"), ("postfix", "tab:gray", "Postfix (defaults)"),
              ("postfix-tuned", "tab:purple", "Postfix (5 connections)"))


def per_second(samples: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """A counter sampled about once a second, as a rate per second (at the end of each interval)."""
    pairs = list(zip(samples, samples[1:], strict=False))
    return [b["t"] for _, b in pairs], [(b[key] - a[key]) / (b["t"] - a["t"]) if b["t"] > a["t"] else 0.0
                                        for a, b in pairs]


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mx = result["runs"]["mxgate"]
    s = mx["samples"]
    t = [x["t"] for x in s]
    xmax = max(t[-1] + 1, result["converge_s"] + 5)
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, sharex=True, figsize=(10, 10))
    # Panel 1: live limits vs the provider's real ones.
    ax1.step(t, [x["maxConnections"] for x in s], where="post", color="tab:blue", lw=1.8,
             label="live maxConnections (left axis)")
    ax1.axhline(REAL_CONNECTIONS, color="tab:blue", ls="--", lw=1,
                label=f"provider's real limit, {REAL_CONNECTIONS} connections")
    ax1.set_ylabel("connections", color="tab:blue")
    ax1.set_ylim(0, CEIL_CONNECTIONS * 1.1)
    ax1b = ax1.twinx()
    ax1b.step(t, [x["messagesPerSecond"] for x in s], where="post", color="tab:red", lw=1.8,
              label="live messagesPerSecond (right axis)")
    ax1b.axhline(REAL_RATE, color="tab:red", ls="--", lw=1, label=f"provider's real rate, {REAL_RATE:g}/s")
    ax1b.set_ylabel("messages / s", color="tab:red")
    ax1b.set_ylim(0, CEIL_RATE * 1.1)
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax1b.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    ax1.set_title(f"mxgate's live limits (policy ceilings {CEIL_CONNECTIONS} connections, {CEIL_RATE:g} msg/s; "
                  "the provider's are not told)")
    # Panel 2: delivered per second (the simulator's exact per-second series), mxgate's queue.
    for key, colour, name in RUN_STYLES:
        run = result["runs"].get(key)
        if not run:
            continue
        series = dict(run["final_report"]["accepted_per_second"])
        base = int(run["start_epoch"])
        last = int(run["start_epoch"] + run["samples"][-1]["t"]) + 1
        xs = list(range(base, last + 1))
        ax2.plot([x - run["start_epoch"] for x in xs], [series.get(x, 0) for x in xs], color=colour,
                 lw=1.8 if key == "mxgate" else 1.2, label=name, drawstyle="steps-post")
    ax2.axhline(REAL_RATE, color="tab:red", ls="--", lw=1, label=f"provider's rate {REAL_RATE:g}/s")
    ax2.axhline(0.9 * REAL_RATE, color="tab:orange", ls=":", lw=1.2, label="target ≥ 90 % (45/s)")
    span = result["figures"]["mxgate"].get("with_backlog")
    if span:
        ax2.axvspan(span["from_s"], span["to_s"], color="tab:green", alpha=0.08,
                    label=f"measured after convergence: {span['goodput']:.1f}/s, "
                          f"{span['deferral_pct'] or 0:.2f} % deferred")
    ax2.set_ylabel("delivered / s")
    ax2.set_ylim(0, max(REAL_RATE * 1.6, ax2.get_ylim()[1]))
    ax2b = ax2.twinx()
    ax2b.plot(t, [x.get("queued", 0) for x in s], color="tab:green", ls="--", lw=0.9,
              label="mxgate queue (right axis)")
    ax2b.set_ylabel("messages queued in mxgate", color="tab:green")
    ax2b.set_ylim(0, result["messages"] * 1.05)
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax2b.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8, ncol=2)
    ax2.set_title("messages accepted by the provider per second (same load, same simulator; Postfix passes "
                  "ran after mxgate's)", fontsize=10)
    # Panel 3: deferrals per second, from the 1 s samples: mxgate by kind, Postfix in total.
    tc, conn = per_second(s, "def_connections")
    ax3.plot(tc, conn, color="tab:blue", lw=1.6, label="mxgate: connection limit (4.7.652)", drawstyle="steps-pre")
    tc, rate = per_second(s, "def_rate")
    ax3.plot(tc, rate, color="tab:red", lw=1.6, label="mxgate: rate limit (4.7.650)", drawstyle="steps-pre")
    for key, colour, name in RUN_STYLES[1:]:
        run = result["runs"].get(key)
        if run:
            tp, total = per_second(run["samples"], "def_total")
            ax3.plot(tp, total, color=colour, lw=1.0, label=f"{name}: all deferrals", drawstyle="steps-pre")
    ax3.set_yscale("symlog", linthresh=10)   # linear to 10/s, logarithmic above: Postfix's bursts are 10x mxgate's
    ax3.set_ylim(0, None)
    ax3.set_ylabel("deferrals / s (log above 10)")
    ax3.set_xlabel("seconds since smtp-source started (dotted line: convergence deadline; Postfix passes "
                   "continue past the right edge)")
    ax3.legend(loc="upper right", fontsize=8)
    ax3.set_title("deferrals per second by the provider")
    for ax in (ax1, ax2, ax3):
        ax.axvline(result["converge_s"], color="k", ls=":", lw=1)
    ax3.set_xlim(0, xmax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_total": mem, "kernel": platform.release(),
            "python": platform.python_version(), "postfix": postfix_version(),
            "loadavg_start": os.getloadavg()}


def table(result: dict[str, Any]) -> str:
    head = ("system", "duration s", "accepted", "deferral % (whole run)", "goodput msg/s (whole run)",
            "deferral % (after 30 s, backlog)", "goodput msg/s (after 30 s, backlog)",
            "span after 30 s", "deferral % / goodput msg/s (after 30 s, to the end)")
    rows = []
    names = {"mxgate": "mxgate (2 gateways, adaptive)", "postfix": "Postfix, defaults",
             "postfix-tuned": "Postfix, 5 connections"}
    def pct(span: dict[str, Any]) -> str:
        return "no attempts" if span["deferral_pct"] is None else f"{span['deferral_pct']:.2f}"

    for key, f in result["figures"].items():
        b, e = f.get("with_backlog"), f.get("to_end")
        backlog = (pct(b), f"{b['goodput']:.1f}", f"{b['from_s']:.0f}–{b['to_s']:.0f} s") if b else ("—", "—", "—")
        to_end = f"{pct(e)} / {e['goodput']:.1f}" if e else "—"
        capped = " (cap)" if f["capped"] else ""
        rows.append((names[key], f"{f['duration_s']:.0f}{capped}", f"{f['accepted']}", f"{f['deferral_pct']:.1f}",
                     f"{f['goodput']:.1f}", *backlog, to_end))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + " |" for r in [head, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--converge", type=float, default=30.0, help="convergence deadline, seconds (30)")
    parser.add_argument("--mxgate-cap", type=float, default=600.0, help="stop the mxgate phase after this (600 s)")
    parser.add_argument("--postfix-cap", type=float, default=180.0,
                        help="stop each Postfix pass after this many seconds (180); Postfix retries slowly")
    parser.add_argument("--no-tuned", action="store_true", help="skip the hand-tuned Postfix pass")
    parser.add_argument("--tuned-policy", action="store_true",
                        help="mxgate's policy with the short throttled retries and 4.7.650 rule of before issue 11")
    parser.add_argument("--only", choices=("mxgate", "postfix"))
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "adaptive-demo.png")
    parser.add_argument("--json", type=Path, help="write all samples, adjustments and figures here")
    parser.add_argument("--mxgate-cmd", help="how to run mxgate (default: mxgate on PATH)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="run nothing: print the figures and draw the plot of a run saved with --json")
    args = parser.parse_args()
    if args.replot:
        result = json.loads(args.replot.read_text())
        for key, run in result["runs"].items():
            result["figures"][key] = figures(run, result["converge_s"], BACKLOG)
        report(result, png=args.png, json_path=None)
        return 0
    install_signal_handlers()
    source = require_tool("smtp-source", "apt-get install postfix")
    cmd, env = mxgate_command(args.mxgate_cmd)
    result: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]),
                              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                              "converge_s": args.converge, "messages": args.messages, "runs": {}, "figures": {}}
    tmp = Path(tempfile.mkdtemp(prefix="adaptive-demo-", dir="/tmp"))
    ok = False
    try:
        with ProcessManager(tmp / "logs") as manager:
            sim_port, sim_http = find_free_port(), find_free_port()
            sim_argv = [*cmd, "sim", "--listen", f"{LOOPBACK}:{sim_port}", "--profile", "outlook",
                        "--max-connections", str(REAL_CONNECTIONS), "--rate", f"{REAL_RATE:g}",
                        "--http", f"{LOOPBACK}:{sim_http}"]
            result["sim_argv"] = sim_argv
            sim = manager.start("sim", sim_argv, env=env)
            wait_for_port(sim_port, timeout=30, proc=sim)
            wait_for_http(f"http://{LOOPBACK}:{sim_http}/report", timeout=30, proc=sim)
            if args.only in (None, "mxgate"):
                run = run_mxgate(args, manager, tmp, sim_port, sim_http, source)
                result["runs"]["mxgate"] = run
                result["figures"]["mxgate"] = figures(run, args.converge, BACKLOG)
                time.sleep(2.0)   # let the provider's bucket refill and connections close
            if args.only in (None, "postfix"):
                for tuned in ((False,) if args.no_tuned else (False, True)):
                    run = run_postfix(args, manager, tmp, sim_port, sim_http, source, tuned)
                    result["runs"][run["label"]] = run
                    result["figures"][run["label"]] = figures(run, args.converge, BACKLOG)
                    time.sleep(2.0)
        ok = True
    finally:
        if not (ok and not args.keep):
            log(f"work directory kept: {tmp}")
        else:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
    result["machine"]["loadavg_end"] = os.getloadavg()
    report(result, png=args.png, json_path=args.json)
    return 0


def report(result: dict[str, Any], *, png: Path, json_path: Path | None) -> None:
    """Print the figures, the targets and the controller's adjustments; write the JSON and the plot."""
    messages = result["messages"]
    sessions = result["runs"].get("mxgate", next(iter(result["runs"].values())))["source_argv"][2]
    print(f"\nAdaptive limits demo: {messages} messages, smtp-source -s {sessions} -d -l 2048, provider "
          f"'outlook' allowing {REAL_CONNECTIONS} connections and {REAL_RATE:g} msg/s per IP")
    print(table(result))
    mxf = result["figures"].get("mxgate")
    if mxf:
        span = mxf.get("with_backlog")
        if span:
            dpct, gp = span["deferral_pct"], span["goodput"]
            met_d, met_g = dpct < 2.0, gp >= 0.9 * REAL_RATE
            result["targets"] = {"deferral_pct_lt_2": met_d, "goodput_ge_45": met_g}
            print(f"\ntargets after convergence ({span['from_s']:g}–{span['to_s']:g} s, while mxgate's queue held "
                  f">= {BACKLOG} messages): deferrals < 2 % -> {dpct:.2f} % {'MET' if met_d else 'MISSED'}; "
                  f"goodput >= {0.9 * REAL_RATE:g}/s -> {gp:.1f}/s {'MET' if met_g else 'MISSED'}")
        else:
            result["targets"] = None
            print(f"\ntargets after convergence: NOT MEASURED (mxgate's queue fell below {BACKLOG} messages "
                  f"before {result['converge_s']:g} s, or the run was too short)")
        done = result["runs"]["mxgate"].get("smtp_source_done_s")
        when = f"{done:.0f} s" if done is not None else "the end"
        print(f"smtp-source finished handing the {messages} messages to mxgate at {when}")
        adj = result["runs"]["mxgate"]["adjustments"]
        print(f"\ncontroller adjustments ({len(adj)}), oldest first, t = seconds since smtp-source started:")
        start = result["runs"]["mxgate"]["start_epoch"]
        for a in adj:
            rest = {k: v for k, v in a.items() if k != "time"}
            print(f"  t={a['time'] - start:6.1f}s {json.dumps(rest)}")
    for key, run in result["runs"].items():
        if key.startswith("postfix"):
            maillog = {k: v for k, v in run["maillog"].items() if k != "warning_samples"}
            print(f"{key}: queue left {run['queue']}, maillog {maillog}"
                  f", smtp_destination_concurrency_limit={run['concurrency_limit']}")
    print(f"command: {result['command']}\ndate: {result['date']}\nmachine: {json.dumps(result['machine'])}")
    if json_path:
        json_path.write_text(json.dumps(result, indent=1, default=str))
        print(f"json: {json_path}")
    if result["runs"].get("mxgate"):
        plot(result, png)
        print(f"\nplot: {png}")


if __name__ == "__main__":
    sys.exit(main())
