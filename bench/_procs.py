"""Process helpers shared by the benchmarks in ``bench/``.

Everything here is for *benchmarks*, not tests: it starts real programs (redis-server,
smtp-sink, smtp-source, mxgate) on loopback ports, logs each one to a file, and makes sure
every process it started is gone when the benchmark ends, whether it ends normally, on an
error, on Ctrl-C or on SIGTERM.

Only the standard library is used, so a benchmark can run before mxgate's own dependencies
are importable.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Self

__all__ = [
    "BenchError",
    "ManagedProcess",
    "ProcessManager",
    "RedisServer",
    "SmtpSink",
    "ToolMissing",
    "cpu_seconds",
    "find_free_port",
    "install_signal_handlers",
    "log_tail",
    "MachineCpu",
    "machine_cpu",
    "read_counter",
    "require_tool",
    "start_redis",
    "tool_output",
    "wait_for_http",
    "wait_for_port",
]

LOOPBACK = "127.0.0.1"


class BenchError(RuntimeError):
    """A benchmark could not be set up or run; the message says why and where the logs are."""


class ToolMissing(BenchError):
    """An external program the benchmark needs is not installed."""


# Which Debian package ships each external tool; used in "not found" errors.
_PACKAGE_HINTS: dict[str, str] = {
    "smtp-source": "apt-get install postfix",
    "smtp-sink": "apt-get install postfix",
    "postfix": "apt-get install postfix",
    "postconf": "apt-get install postfix",
    "redis-server": "apt-get install redis-server",
}


def require_tool(name: str, hint: str | None = None) -> str:
    """Return the absolute path of ``name`` or raise :class:`ToolMissing` with an install hint.

    ``/usr/sbin`` and ``/sbin`` are searched too: Debian installs the Postfix tools there and
    they are often not on a non-root ``PATH``.
    """
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
    path = shutil.which(name, path=search)
    if path is None:
        hint = hint or _PACKAGE_HINTS.get(name, f"install {name}")
        raise ToolMissing(f"{name} not found: {hint}")
    return path


def tool_output(argv: Sequence[str], timeout: float = 10.0) -> str:
    """Run a short command and return its stripped stdout+stderr ("" if it cannot run)."""
    try:
        done = subprocess.run(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def find_free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that was free a moment ago (the kernel picks it).

    There is an unavoidable race between closing the probe socket and the real server
    binding it; on a benchmark machine that is good enough.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path | None, lines: int = 20) -> str:
    """Return the last ``lines`` lines of a log file (for error messages)."""
    if path is None or not path.exists():
        return "(no log)"
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 16384))
        data = fh.read().decode("utf-8", "replace").replace("\r", "\n")
    return "\n".join(data.splitlines()[-lines:]) or "(empty log)"


def read_counter(path: Path, pattern: re.Pattern[str]) -> int:
    """Return the last complete value of a ``\\r``-separated running counter written to ``path``.

    ``smtp-sink -c`` and ``smtp-source -c`` rewrite one status line terminated by ``\\r`` after
    each event. Only the tail of the file is read, so this costs the same at message 10 and
    at message 100,000. The last record may be half-written, so only records followed by a
    ``\\r`` are parsed. ``pattern`` must have one group holding the number. Returns 0 when no
    complete record exists yet.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 512))
            data = fh.read().decode("ascii", "replace")
    except FileNotFoundError:
        return 0
    records = data.replace("\n", "\r").split("\r")[:-1]  # drop the (possibly partial) last piece
    for record in reversed(records):
        match = pattern.search(record)
        if match:
            return int(match.group(1))
    return 0


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stats() -> dict[int, tuple[int, float, float]]:
    """pid -> (ppid, own CPU seconds, reaped children's CPU seconds) for every process."""
    stats: dict[int, tuple[int, float, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read().decode("ascii", "replace")
        except OSError:
            continue
        # The command name (field 2) may contain spaces and parentheses: split after the last ")".
        fields = raw[raw.rfind(")") + 2 :].split()
        ppid = int(fields[1])
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        stats[int(entry)] = (ppid, (utime + stime) / _CLK_TCK, (cutime + cstime) / _CLK_TCK)
    return stats


def cpu_seconds(roots: Sequence[int]) -> float:
    """CPU seconds (user+system) used so far by the process trees rooted at ``roots``.

    Counts each root's own time, the time of its children that it has already reaped, and
    the own time of every live descendant. Take it before and after a run and subtract.
    (Descendants that exited and were reaped by a live descendant are in that descendant's
    reaped-children time, which is counted too.) Linux only; 0.0 elsewhere.
    """
    if not os.path.isdir("/proc"):
        return 0.0
    stats = _proc_stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total = 0.0
    seen: set[int] = set()
    stack = [pid for pid in roots if pid in stats]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        _, own, reaped = stats[pid]
        total += own + reaped
        stack.extend(children.get(pid, ()))
    return total


@dataclass(frozen=True)
class MachineCpu:
    """Cumulative CPU seconds of all cores since boot, split by kind (from ``/proc/stat``)."""

    tasks: float = 0.0  #: user + nice + system: time charged to processes
    interrupts: float = 0.0  #: irq + softirq: includes loopback TCP processing, charged to no process
    steal: float = 0.0  #: taken by the hypervisor for other guests

    def __sub__(self, other: MachineCpu) -> MachineCpu:
        return MachineCpu(
            self.tasks - other.tasks, self.interrupts - other.interrupts, self.steal - other.steal
        )


def machine_cpu() -> MachineCpu:
    """Read ``/proc/stat``'s first line (all zeros if unavailable).

    Taken before and after a run, its ``tasks`` minus the CPU time of the benchmark's own
    processes shows how much *other* load shared the machine during the measurement.
    """
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return MachineCpu()
    # cpu user nice system idle iowait irq softirq steal guest guest_nice
    v = [int(x) / _CLK_TCK for x in fields[1:9]]
    return MachineCpu(tasks=v[0] + v[1] + v[2], interrupts=v[5] + v[6], steal=v[7])


@dataclass
class ManagedProcess:
    """A child process started by :class:`ProcessManager`, in its own process group."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: int = signal.SIGTERM

    @property
    def pid(self) -> int:
        """The child's pid (also its process group id)."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while the child has not exited."""
        return self.popen.poll() is None

    def check_alive(self) -> None:
        """Raise :class:`BenchError` with the log tail if the child has exited."""
        if not self.alive():
            raise BenchError(
                f"{self.name} exited with status {self.popen.returncode}; "
                f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
            )

    def stop(self, timeout: float = 10.0) -> int | None:
        """Signal the child's whole process group, wait, then SIGKILL it if it lingers."""
        if self.alive():
            _signal_group(self.pid, self.stop_signal)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        # Children of the child that survived their parent are still in the group.
        _signal_group(self.pid, signal.SIGKILL)
        return self.popen.returncode


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass
class ProcessManager:
    """Starts child processes with logs to files and stops all of them, newest first.

    Use as a context manager. Each child runs in a new session (its own process group), so
    stopping it also stops whatever it forked, and a Ctrl-C on the terminal reaches only the
    benchmark, which then stops the children in order. An ``atexit`` hook is a last resort
    for exits that bypass ``__exit__``.
    """

    log_dir: Path
    processes: list[ManagedProcess] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop_all)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log_name: str | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> ManagedProcess:
        """Start ``argv`` with stdout and stderr appended to ``log_dir/<log_name or name>.log``."""
        log_path = self.log_dir / (log_name or f"{name}.log")
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        proc = ManagedProcess(name, list(argv), popen, log_path, stop_signal)
        self.processes.append(proc)
        return proc

    def add_cleanup(self, func: Callable[[], None]) -> None:
        """Run ``func`` on exit, in reverse order of registration, after newer processes stop."""
        self.cleanups.append(func)

    def stop(self, proc: ManagedProcess, timeout: float = 10.0) -> int | None:
        """Stop one process now and forget it."""
        rc = proc.stop(timeout)
        with contextlib.suppress(ValueError):
            self.processes.remove(proc)
        return rc

    def stop_many(
        self, procs: Sequence[ManagedProcess], timeout: float = 10.0
    ) -> dict[str, dict[str, float | int | None]]:
        """Signal several processes at once, wait for them, SIGKILL stragglers; forget them.

        Returns, per process name, its exit status (negative: killed by that signal, so -9
        means it did not stop within ``timeout`` seconds) and how long it took to exit.
        """
        start = time.monotonic()
        for proc in procs:
            if proc.alive():
                _signal_group(proc.pid, proc.stop_signal)
        report: dict[str, dict[str, float | int | None]] = {}
        for proc in procs:
            remaining = max(0.0, timeout - (time.monotonic() - start))
            try:
                proc.popen.wait(remaining)
            except subprocess.TimeoutExpired:
                pass
            took = time.monotonic() - start
            rc = proc.stop(timeout=0.1)
            report[proc.name] = {"exit_status": rc, "seconds": round(took, 2)}
            with contextlib.suppress(ValueError):
                self.processes.remove(proc)
        return report

    def stop_all(self) -> None:
        """Stop every process and run every cleanup, newest first; never raises."""
        while self.processes:
            proc = self.processes.pop()
            with contextlib.suppress(Exception):
                proc.stop()
        while self.cleanups:
            func = self.cleanups.pop()
            with contextlib.suppress(Exception):
                func()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def install_signal_handlers() -> None:
    """Turn SIGINT, SIGTERM and SIGHUP into ``KeyboardInterrupt`` so ``finally`` blocks clean up.

    SIGINT is set explicitly because a shell starts background jobs with SIGINT ignored,
    and Python then leaves it ignored.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def wait_for_port(
    port: int, host: str = LOOPBACK, timeout: float = 15.0, proc: ManagedProcess | None = None
) -> None:
    """Wait until something accepts TCP connections on ``host:port``.

    Fails early, with the log tail, if ``proc`` exits while we wait.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None:
            proc.check_alive()
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        if time.monotonic() > deadline:
            where = f"; last lines of {proc.log_path}:\n{log_tail(proc.log_path)}" if proc else ""
            raise BenchError(f"nothing listens on {host}:{port} after {timeout:.0f}s{where}")
        time.sleep(0.05)


def wait_for_http(
    url: str, timeout: float = 30.0, proc: ManagedProcess | None = None, expect: int = 200
) -> None:
    """Wait until ``GET url`` answers with status ``expect`` (e.g. a ``/readyz`` endpoint)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if proc is not None:
            proc.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == expect:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            where = f"; last lines of {proc.log_path}:\n{log_tail(proc.log_path)}" if proc else ""
            raise BenchError(f"{url} not {expect} after {timeout:.0f}s (last: {last}){where}")
        time.sleep(0.1)


@dataclass
class RedisServer:
    """A throwaway redis-server on a loopback port."""

    proc: ManagedProcess
    port: int
    data_dir: Path

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{LOOPBACK}:{self.port}/0"


def _redis_ping(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.5) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")
    return False


def start_redis(manager: ProcessManager, data_dir: Path, timeout: float = 15.0, *,
                replica_of: RedisServer | None = None, name: str = "redis") -> RedisServer:
    """Start redis-server on a free loopback port with its files in ``data_dir``.

    Persistence is what a production spool would use: no RDB snapshots, AOF on with an
    fsync every second (``--save '' --appendonly yes --appendfsync everysec``). With
    ``replica_of`` it replicates that server and this returns once the link is up.
    """
    binary = require_tool("redis-server")
    data_dir.mkdir(parents=True, exist_ok=True)
    port = find_free_port()
    argv = [
        binary,
        "--port", str(port),
        "--bind", LOOPBACK,
        "--dir", str(data_dir),
        "--save", "",
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--daemonize", "no",
        "--protected-mode", "yes",
        "--logfile", "",
    ]  # fmt: skip
    if replica_of is not None:
        argv += ["--replicaof", LOOPBACK, str(replica_of.port)]
    proc = manager.start(name, argv)
    deadline = time.monotonic() + timeout
    while not _redis_ping(port):
        proc.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"redis-server not answering PING on port {port}:\n{log_tail(proc.log_path)}")
        time.sleep(0.05)
    if replica_of is not None:
        while b"master_link_status:up" not in _redis_command(port, b"INFO replication"):
            proc.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"redis replica on port {port} did not sync:\n{log_tail(proc.log_path)}")
            time.sleep(0.05)
    return RedisServer(proc, port, data_dir)


def _redis_command(port: int, command: bytes) -> bytes:
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.5) as sock:
        sock.sendall(command + b"\r\n")
        return sock.recv(65536)
    return b""


_SINK_RECORD = re.compile(r"mesg=(\d+)")


@dataclass
class SmtpSink:
    """``smtp-sink -c`` on a free loopback port, counting the messages it has received.

    ``-c`` makes smtp-sink rewrite one ``sess=N quit=N mesg=N`` record (``\\r``-terminated)
    after every session end, QUIT and ``.``; its stdout goes to a file whose tail we read.
    That is a few bytes of buffered output per message: the sink stays a C program that
    throws mail away, far faster than anything measured against it (≈7,700 msg/s on the
    project's 2-core machine with smtp-source on the same cores). No ``-d``/``-D`` dump files:
    disk writes would make the sink the bottleneck.
    """

    proc: ManagedProcess
    port: int
    counter_path: Path

    #: Flags shared by every run so both systems see the same sink.
    FLAGS: tuple[str, ...] = ("-c",)
    BACKLOG: int = 1024

    @classmethod
    def start(cls, manager: ProcessManager, name: str = "smtp-sink", timeout: float = 10.0) -> SmtpSink:
        """Start a sink with fresh counters and wait until it accepts connections."""
        binary = require_tool("smtp-sink")
        port = find_free_port()
        argv = [binary, *cls.FLAGS]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # smtp-sink refuses to run as root without -u
        argv += [f"{LOOPBACK}:{port}", str(cls.BACKLOG)]
        proc = manager.start(name, argv)
        wait_for_port(port, timeout=timeout, proc=proc)
        # The probe connection counts as a session, not as a message: mesg stays 0.
        return cls(proc, port, proc.log_path)

    @property
    def command(self) -> str:
        """The exact command line of this sink."""
        return " ".join(self.proc.argv)

    def delivered(self) -> int:
        """Messages received so far (the sink's ``mesg`` counter)."""
        return read_counter(self.counter_path, _SINK_RECORD)
