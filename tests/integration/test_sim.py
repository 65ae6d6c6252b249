"""``mxgate sim`` over real sockets: SMTP clients on loopback, the HTTP endpoint, the CLI in a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from mxgate.sim import ProviderSimulator, SimConfig, Stage

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


class RawClient:
    """A byte-level SMTP client: sends exactly what a test says and shows exactly what the server does."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def reply(self) -> str:
        """The last line of the next reply (a multi-line reply ends with "NNN " rather than "NNN-")."""
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 5)).decode().rstrip("\r\n")
            if len(line) < 4 or line[3] == " ":
                return line

    async def command(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply()

    async def start(self) -> None:
        assert (await self.reply()).startswith("220 ")
        assert (await self.command("EHLO client.test")).startswith("250 ")

    async def closed_by_server(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 5) == b""

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def message(n: int | str, body: str = "hello", *, message_id: bool = True) -> bytes:
    header = f"Message-ID: <{n}@example.com>\r\n" if message_id else ""
    return f"{header}From: a@example.com\r\nTo: b@example.com\r\nSubject: {n}\r\n\r\n{body}\r\n".encode()


def smtp(port: int) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="client.test", timeout=10)


@pytest.fixture
async def started() -> AsyncIterator[Any]:
    simulators: list[ProviderSimulator] = []

    async def start(config: SimConfig, **kwargs: Any) -> ProviderSimulator:
        simulators.append(await ProviderSimulator(config, **kwargs).start())
        return simulators[-1]

    yield start
    for sim in simulators:
        await sim.stop()


CONNECTION_CASES = [
    ("generic", Stage.CONNECT, "421 4.4.5 Too many connections from your host.", True),
    ("outlook", Stage.MAIL,
     "451 4.7.652 The mail server [127.0.0.1] has exceeded the maximum number of connections.", False),
    ("generic", Stage.RCPT, "421 4.4.5 Too many connections from your host.", True),
]


@pytest.mark.parametrize(("profile", "stage", "expected", "closes"), CONNECTION_CASES)
async def test_connection_limit_at_each_stage(started: Any, profile: str, stage: Stage, expected: str,
                                              closes: bool) -> None:
    sim = await started(SimConfig(profile=profile, max_connections=2, connection_stage=stage))
    admitted = [await RawClient.connect(sim.port) for _ in range(2)]
    for client in admitted:
        await client.start()
        assert (await client.command("MAIL FROM:<a@example.com>")).startswith("250 ")
        assert (await client.command("RCPT TO:<b@example.com>")).startswith("250 ")
    extra = await RawClient.connect(sim.port)
    if stage is Stage.CONNECT:
        assert await extra.reply() == expected
    else:
        await extra.start()
        mail = await extra.command("MAIL FROM:<a@example.com>")
        if stage is Stage.MAIL:
            assert mail == expected
        else:
            assert mail.startswith("250 ")
            assert await extra.command("RCPT TO:<b@example.com>") == expected
    if closes:
        assert await extra.closed_by_server()
    else:
        # A 451 leaves the connection open; once an admitted connection has gone, the next MAIL gets through.
        assert await extra.command("RSET") == "250 OK"
        await admitted[0].command("QUIT")
        await admitted[0].close()
        assert (await extra.command("MAIL FROM:<a@example.com>")).startswith("250 ")
    report = sim.report()
    assert report["deferrals"]["connections"] == 1 and report["deferrals"]["total"] == 1
    assert report["connections"]["max_concurrency"] == 3
    assert report["connections"]["max_concurrency_by_ip"] == {"127.0.0.1": 3}
    for client in [*admitted[1:], extra]:
        await client.close()


async def test_senders_within_the_limit_are_never_refused(started: Any) -> None:
    sim = await started(SimConfig(profile="outlook", max_connections=3))

    async def send(worker: int) -> None:
        async with smtp(sim.port) as client:
            for n in range(5):
                await client.sendmail("a@example.com", ["b@example.com"], message(f"{worker}-{n}"))

    await asyncio.gather(*(send(w) for w in range(3)))
    report = sim.report()
    assert report["accepted"]["messages"] == 15 and report["deferrals"]["total"] == 0
    assert report["connections"]["max_concurrency"] <= 3 and report["connections"]["opened"] == 3


async def test_rate_at_end_of_data_on_a_fake_clock(started: Any) -> None:
    clock = FakeClock()
    sim = await started(SimConfig(rate=2, burst=2), clock=clock)
    async with smtp(sim.port) as client:
        for n in range(2):
            await client.sendmail("a@example.com", ["b@example.com"], message(n))
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.sendmail("a@example.com", ["b@example.com"], message(2))
        assert refused.value.code == 451
        assert refused.value.message == "4.7.1 Rate limit exceeded, try again later"
        clock.now += 0.5                                   # one token at 2/s
        await client.sendmail("a@example.com", ["b@example.com"], message(2))
        with pytest.raises(aiosmtplib.SMTPDataError):
            await client.sendmail("a@example.com", ["b@example.com"], message(3))
    report = sim.report()
    assert report["accepted"]["messages"] == 3 and report["deferrals"]["rate"] == 2


async def test_outlook_rate_limits_each_recipient(started: Any) -> None:
    sim = await started(SimConfig(profile="outlook", rate=1, burst=2), clock=FakeClock())
    async with smtp(sim.port) as client:
        rcpts = ["r1@example.com", "r2@example.com", "r3@example.com"]
        errors, _ = await client.sendmail("a@example.com", rcpts, message(1))
    assert list(errors) == ["r3@example.com"]
    assert errors["r3@example.com"].code == 451
    assert errors["r3@example.com"].message == (
        "4.7.650 The mail server [127.0.0.1] has been temporarily rate limited due to IP reputation.")
    report = sim.report()
    assert report["accepted"]["recipients"] == 2 and report["deferrals"]["rate"] == 1


async def test_yahoo_defers_at_mail_from_and_hangs_up(started: Any) -> None:
    sim = await started(SimConfig(profile="yahoo", rate=1, burst=1), clock=FakeClock())
    client = await RawClient.connect(sim.port)
    await client.start()
    assert (await client.command("MAIL FROM:<a@example.com>")).startswith("250 ")
    assert (await client.command("RSET")).startswith("250 ")
    assert await client.command("MAIL FROM:<a@example.com>") == (
        "421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to unexpected volume or user "
        "complaints")
    assert await client.closed_by_server()
    await client.close()


async def test_duplicates_sink_log_and_exact_content(started: Any, tmp_path: Path) -> None:
    sink_log = tmp_path / "sink.jsonl"
    sim = await started(SimConfig(sink_log=sink_log, max_message_size=4096))
    stuffed = (b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\nends with a period.\r\n.\r\n"
               b"a line of one dot above\r\n")
    async with smtp(sim.port) as client:
        await client.sendmail("a@example.com", ["b@example.com"], message("dup"))
        await client.sendmail("a@example.com", ["b@example.com", "c@example.com"],
                              message("dup", "other body"))
        await client.sendmail("a@example.com", ["b@example.com"], message("x", "same body", message_id=False))
        await client.sendmail("a@example.com", ["b@example.com"], message("y", "same body", message_id=False))
        await client.sendmail("a@example.com", ["b@example.com"], stuffed)
        await client.sendmail("a@example.com", ["b@example.com"], message("after"))
    report = sim.report()
    assert report["accepted"]["messages"] == 6
    assert report["duplicates"]["messages"] == 2
    first, second = report["duplicates"]["sample"]
    assert first == "<dup@example.com>" and second.startswith("(no Message-ID, body ")
    assert report["without_message_id"] == 3
    await sim.stop()
    lines = [json.loads(line) for line in sink_log.read_text().splitlines()]
    assert [line["message_id"] for line in lines] == [
        "<dup@example.com>", "<dup@example.com>", None, None, None, "<after@example.com>"]
    assert lines[1]["rcpts"] == ["b@example.com", "c@example.com"]
    assert lines[4]["size"] == len(stuffed)                # dot-stuffing undone exactly
    assert all(abs(line["time"] - time.time()) < 60 for line in lines)


@pytest.mark.parametrize("line_length", [70, 5000])
async def test_a_message_over_the_size_limit_is_drained_and_refused(started: Any, line_length: int) -> None:
    sim = await started(SimConfig(max_message_size=4096))
    client = await RawClient.connect(sim.port)
    await client.start()
    for attempt in ("too big", "fits"):
        assert (await client.command("MAIL FROM:<a@example.com>")).startswith("250 ")
        assert (await client.command("RCPT TO:<b@example.com>")).startswith("250 ")
        assert (await client.command("DATA")).startswith("354 ")
        line = b"x" * (line_length if attempt == "too big" else 10) + b"\r\n"
        body = b"Subject: size\r\n\r\n" + line * (8000 // len(line) + 1 if attempt == "too big" else 1)
        client.writer.write(body + b".\r\n")
        reply = await client.reply()
        assert reply == ("552 5.3.4 Error: message size exceeds fixed maximum message size" if attempt == "too big"
                         else "250 2.0.0 Ok: queued as S1")
    await client.close()
    assert sim.report()["accepted"]["messages"] == 1


@pytest.mark.parametrize(("size", "accepted"), [(4096, True), (4097, False)])
async def test_the_size_limit_is_exact(started: Any, size: int, accepted: bool) -> None:
    sim = await started(SimConfig(max_message_size=4096))
    client = await RawClient.connect(sim.port)
    await client.start()
    assert (await client.command("MAIL FROM:<a@example.com>")).startswith("250 ")
    assert (await client.command("RCPT TO:<b@example.com>")).startswith("250 ")
    assert (await client.command("DATA")).startswith("354 ")
    head = b"Subject: boundary\r\n\r\n"
    client.writer.write(head + b"y" * (size - len(head) - 2) + b"\r\n.\r\n")
    assert (await client.reply()).startswith("250 " if accepted else "552 ")
    await client.close()
    assert sim.report()["accepted"]["bytes"] == (size if accepted else 0)


async def test_an_empty_message_and_a_leading_dot_line(started: Any) -> None:
    sim = await started(SimConfig())
    client = await RawClient.connect(sim.port)
    await client.start()
    for data in (b".\r\n", b"..\r\n.\r\n"):           # nothing at all; a single line holding one dot
        assert (await client.command("MAIL FROM:<>")).startswith("250 ")
        assert (await client.command("RCPT TO:<b@example.com>")).startswith("250 ")
        assert (await client.command("DATA")).startswith("354 ")
        client.writer.write(data)
        assert (await client.reply()).startswith("250 2.0.0 Ok")
    await client.close()
    assert sim.report()["accepted"]["bytes"] == 0 + len(b".\r\n")


async def test_temporary_failures_and_latency(started: Any) -> None:
    sim = await started(SimConfig(temp_fail_rate=1.0, latency=0.3))
    async with smtp(sim.port) as client:
        begun = time.monotonic()
        with pytest.raises(aiosmtplib.SMTPDataError) as failed:
            await client.sendmail("a@example.com", ["b@example.com"], message(1))
        assert time.monotonic() - begun >= 0.3
    assert (failed.value.code, failed.value.message) == (451, "4.3.0 Temporary failure")
    assert sim.report()["deferrals"]["random"] == 1


async def test_report_and_reset_over_http(started: Any) -> None:
    sim = await started(SimConfig(http_host="127.0.0.1"))
    url = f"http://127.0.0.1:{sim.http_port}"
    async with smtp(sim.port) as client:
        for n in range(3):
            await client.sendmail("a@example.com", ["b@example.com"], message(n))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/report") as response:
                assert response.status == 200
                report = await response.json()
            assert report["accepted"]["messages"] == 3 and report["connections"]["open"] == 1
            assert sum(count for _, count in report["accepted_per_second"]) == 3
            async with http.post(f"{url}/reset") as response:
                assert response.status == 200
            await client.sendmail("a@example.com", ["b@example.com"], message(0))   # not a duplicate any more
            async with http.get(f"{url}/report") as response:
                report = await response.json()
    assert report["accepted"]["messages"] == 1 and report["duplicates"]["messages"] == 0
    assert report["connections"]["max_concurrency"] == 1     # the connection open across the reset


async def test_report_file_is_written_periodically_and_on_stop(started: Any, tmp_path: Path) -> None:
    report_file = tmp_path / "report.json"
    sim = await started(SimConfig(report_file=report_file, report_interval=0.05))
    for _ in range(200):
        if report_file.exists():
            break
        await asyncio.sleep(0.05)
    assert json.loads(report_file.read_text())["accepted"]["messages"] == 0
    async with smtp(sim.port) as client:
        await client.sendmail("a@example.com", ["b@example.com"], message(1))
    await sim.stop()
    assert json.loads(report_file.read_text())["accepted"]["messages"] == 1
    assert not (tmp_path / f".report.json.{os.getpid()}.tmp").exists()


async def test_stop_says_421_to_open_connections(started: Any) -> None:
    sim = await started(SimConfig())
    client = await RawClient.connect(sim.port)
    await client.start()
    await sim.stop()
    assert await client.reply() == "421 4.3.2 Service shutting down"
    assert await client.closed_by_server()
    assert sim.report()["deferrals"]["other"] == 1 and sim.report()["connections"]["open"] == 0
    await client.close()


def test_cli_help() -> None:
    import subprocess

    out = subprocess.run([sys.executable, "-m", "mxgate.cli", "sim", "--help"], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    for flag in ("--max-connections", "--connection-stage", "--rate-stage", "--burst", "--temp-fail-rate",
                 "--latency-jitter", "--sink-log", "--report-interval", "--http", "outlook", "yahoo",
                 "gmail"):
        assert flag in out


async def test_cli_writes_the_report_on_sigterm(tmp_path: Path) -> None:
    report_file = tmp_path / "report.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mxgate.cli", "sim", "--listen", "127.0.0.1:0", "--profile", "outlook",
        "--max-connections", "5", "--rate", "100", "--report", str(report_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        banner = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+) profile=outlook max_connections=5@mail "
                          r"rate=100/s burst=100@rcpt", banner)
        assert match, banner
        async with smtp(int(match.group(1))) as client:
            await client.sendmail("a@example.com", ["b@example.com"], message(1))
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    report = json.loads(report_file.read_text())
    assert report["accepted"]["messages"] == 1
    assert report["config"]["profile"] == "outlook" and report["config"]["rate_stage"] == "rcpt"
