"""Real processes for process-level tests: ``mxgate`` commands, a recording sink and a counting client.

Every ``mxgate`` process runs in its own session (so it is its own process group), writes its output to a
log file in the test's temporary directory, and is killed with its whole group when the test ends,
however it ends (``Processes.close`` runs from a fixture finalizer). The sink and the SMTP client run in
the test's event loop, so every wait here is asynchronous: a blocking wait would stall the sink too.

Counting per message: every message mxgate accepts gets a queue id, returned in ``250 2.0.0 Ok: queued as
<ID>`` and written into the ``Received:`` header it adds (``... (mxgate) with ESMTP id <ID>``). The client
keeps the ids it was given, the sink reads them back from what it received, so losses and duplicates
show up as set differences and counts, whatever the client put (or did not put) in the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from support.sink import Sink, SinkHandler

MXGATE = shutil.which("mxgate") or str(Path(sys.executable).with_name("mxgate"))
LOOPBACK = "127.0.0.1"

_RECEIVED_ID = re.compile(rb"\(mxgate\) with E?SMTPS?A? id ([0-9A-F]+)")
_QUEUED_AS = re.compile(r"queued as ([0-9A-F]+)")


def queue_id_of(data: bytes) -> str | None:
    """The queue id in the ``Received:`` header mxgate added (the first one: mxgate is the last hop)."""
    match = _RECEIVED_ID.search(data, 0, 4096)
    return match.group(1).decode() if match else None


def received_queue_ids(sink: Sink) -> Counter[str]:
    """How many times the sink received each queue id."""
    return Counter(queue_id_of(m.data) or "?" for m in sink.handler.messages)


# -- the sink --------------------------------------------------------------------------------------------


@dataclass
class SlowSinkHandler(SinkHandler):
    """A sink that holds every message ``hold`` seconds before answering, so deliveries are in flight
    when a test strikes."""

    hold: float = 0.0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.hold:
            await asyncio.sleep(self.hold)
        return await super().handle_DATA(server, session, envelope)


async def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str,
                     interval: float = 0.05) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def eventually(check: Callable[[], Any], *, timeout: float, what: str,
                     processes: Sequence[MxgateProcess] = ()) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy, and return that. Fails at once,
    with the log, if one of ``processes`` exits; on timeout with the last value and their logs."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        for process in processes:
            assert process.returncode is None, f"{process.name} exited:\n{process.log_tail(40)}"
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.25)
    logs = "\n".join(f"--- {p.name}\n{p.log_tail(40)}" for p in processes)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})\n{logs}")


def duplicate_count(sink: Sink) -> int:
    """Deliveries beyond the first of each accepted message (at-least-once allows them; losses it does not)."""
    return sum(n - 1 for n in received_queue_ids(sink).values())


async def wait_for_queue_ids(sink: Sink, wanted: set[str], *, timeout: float) -> None:
    """Wait until every queue id in ``wanted`` has arrived at ``sink`` at least once."""
    def missing() -> set[str]:
        return wanted - set(received_queue_ids(sink))

    try:
        await wait_until(lambda: not missing(), timeout=timeout, what="queue ids at the sink", interval=0.2)
    except TimeoutError:
        gone = missing()
        raise AssertionError(f"{len(gone)} of {len(wanted)} accepted messages never arrived, "
                             f"e.g. {sorted(gone)[:5]}") from None


# -- mxgate processes ------------------------------------------------------------------------------------


@dataclass
class MxgateProcess:
    """One ``mxgate`` command in its own process group; output goes to ``log_path``."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def send_signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def kill_group(self) -> None:
        """SIGKILL the process and everything in its group (kill -9, as the kernel's OOM killer would)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)

    def children(self) -> list[int]:
        """Pids of the direct children (``mxgate dev``'s redis-server runs in a session of its own)."""
        out: list[int] = []
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                out += [int(p) for p in (task / "children").read_text().split()]
        return out

    async def wait_exit(self, *, timeout: float) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.popen.poll() is None:
            if loop.time() > deadline:
                raise TimeoutError(f"{self.name} still running {timeout}s later; log:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        return self.popen.returncode

    async def wait_ready(self, metrics_port: int, *, timeout: float = 60.0) -> None:
        """Wait until /readyz answers 200; fail at once (with the log) if the process exits."""
        await wait_for_readyz(metrics_port, 200, timeout=timeout, process=self)


async def readyz(metrics_port: int) -> tuple[int, str] | None:
    """(status, body) of /readyz, or None when nothing answers."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async with http.get(f"http://{LOOPBACK}:{metrics_port}/readyz") as response:
                return response.status, await response.text()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


async def wait_for_readyz(metrics_port: int, status: int, *, timeout: float,
                          process: MxgateProcess | None = None) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: tuple[int, str] | None = None
    while True:
        if process is not None and process.returncode is not None:
            raise AssertionError(f"{process.name} exited with {process.returncode}; "
                                 f"log:\n{process.log_tail()}")
        last = await readyz(metrics_port)
        if last is not None and last[0] == status:
            return last[1]
        if loop.time() > deadline:
            raise TimeoutError(f"/readyz on port {metrics_port} never answered {status} (last: {last})")
        await asyncio.sleep(0.1)


@dataclass
class Processes:
    """Starts ``mxgate`` processes and makes sure none outlives the test."""

    directory: Path
    started: list[MxgateProcess] = field(default_factory=list)
    extra_pids: list[int] = field(default_factory=list)  # grandchildren to reap too (dev's redis-server)

    def mxgate(self, name: str, *args: str, env: dict[str, str] | None = None) -> MxgateProcess:
        log_path = self.directory / f"{name}.log"
        argv = [MXGATE, "--log-format", "json", *args]
        with log_path.open("wb") as log:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **(env or {})})
        process = MxgateProcess(name, argv, log_path, popen)
        self.started.append(process)
        return process

    def close(self) -> None:
        for process in self.started:
            process.kill_group()
        for pid in self.extra_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def run_mxgate(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
               timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run one short ``mxgate`` command to completion (the CLI tests: nothing else runs in the loop)."""
    return subprocess.run([MXGATE, *args], input=stdin, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, start_new_session=True)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- the client ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    number: int
    queue_id: str
    at: float  # time.monotonic() when the 250 arrived


def numbered_message_id(number: int, *, tag: str = "") -> str:
    return f"<d{number}.{os.getpid()}{tag}@example.com>"


def numbered_message(number: int, *, rcpt: str, size: int = 1024, tag: str = "") -> bytes:
    filler = ("x" * 70 + "\r\n") * max(1, size // 72)
    return (f"From: app@example.com\r\nTo: {rcpt}\r\nSubject: durability {number}\r\n"
            f"Message-ID: {numbered_message_id(number, tag=tag)}\r\n\r\n{filler}").encode()


@dataclass
class Sender:
    """Sends ``count`` numbered messages over ``concurrency`` reused connections until each got a 250.

    Every connection goes to the first of ``ports``; a message that fails in any way (a 4xx, a refused
    connection, a gateway killed mid-transaction) is retried on a fresh connection to the next port (a
    client failing over to another gateway). Only a ``250 ... queued as <ID>`` counts; the ids are kept
    in ``accepted``.
    """

    ports: Sequence[int]
    count: int
    host: str = LOOPBACK        # every port is on this address (a Service's ClusterIP in tests/e2e)
    concurrency: int = 20
    rate: float | None = None  # messages per second at most, over all connections (a steady send)
    rcpt: str = "u@outlook.test"
    rcpts: Sequence[str] = ()   # if given, message n goes to rcpts[n % len(rcpts)] instead of rcpt
    tag: str = ""               # in every Message-ID, so that two senders of one process differ
    accepted: dict[int, Accepted] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)
    _next_slot: float = 0.0

    @property
    def queue_ids(self) -> set[str]:
        return {a.queue_id for a in self.accepted.values()}

    @property
    def accepted_message_ids(self) -> set[str]:
        return {numbered_message_id(number, tag=self.tag) for number in self.accepted}

    async def run(self, *, timeout: float) -> None:
        todo: asyncio.Queue[int] = asyncio.Queue()
        for number in range(self.count):
            todo.put_nowait(number)
        await asyncio.wait_for(asyncio.gather(*(self._worker(i, todo) for i in range(self.concurrency))),
                               timeout=timeout)

    async def _worker(self, index: int, todo: asyncio.Queue[int]) -> None:
        port_index = 0
        smtp: aiosmtplib.SMTP | None = None
        try:
            while not todo.empty():
                number = todo.get_nowait()
                await self._pace()
                try:
                    if smtp is None or not smtp.is_connected:
                        smtp = aiosmtplib.SMTP(hostname=self.host, port=self.ports[port_index], timeout=30)
                        await smtp.connect()
                    rcpt = self.rcpts[number % len(self.rcpts)] if self.rcpts else self.rcpt
                    message = numbered_message(number, rcpt=rcpt, tag=self.tag)
                    _, reply = await smtp.sendmail("app@example.com", [rcpt], message)
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    self.failures[_failure_kind(exc)] += 1
                    todo.put_nowait(number)
                    if smtp is not None:
                        smtp.close()
                    smtp = None
                    port_index = (port_index + 1) % len(self.ports)
                    await asyncio.sleep(0.1)
                    continue
                match = _QUEUED_AS.search(reply)
                assert match, f"250 without a queue id: {reply!r}"
                self.accepted[number] = Accepted(number, match.group(1), time.monotonic())
        finally:
            if smtp is not None and smtp.is_connected:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                    await smtp.quit(timeout=5)
                smtp.close()


    async def _pace(self) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        self._next_slot = max(self._next_slot + 1 / self.rate, now)
        if self._next_slot > now:
            await asyncio.sleep(self._next_slot - now)


def _failure_kind(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message.split(' ', 1)[0]}"
    return type(exc).__name__
