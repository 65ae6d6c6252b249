"""A next hop that stalls: it holds no other mail while the limits allow another connection, and every SMTP
stage gives up after its own timeout (spec.timeouts) with a deferral that names the stage."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from mxgate.embedded_redis import EmbeddedRedis
from mxgate.policy import parse_policy
from support.gateway import publish, running_gateway
from support.procs import eventually
from support.sink import Sink, SinkHandler


@dataclass
class StallingHandler(SinkHandler):
    """Holds the end of DATA of every message whose subject says "stall" until ``release`` is set; the
    first ``stall_once`` such messages are held, later ones pass."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    stalled: int = 0
    stall_once: int = 1_000_000

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if b"Subject: stall" in (envelope.original_content or b"") and self.stalled < self.stall_once:
            self.stalled += 1
            await self.release.wait()
            return "451 4.3.0 released (not recorded)"
        return await super().handle_DATA(server, session, envelope)


def message(subject: str) -> bytes:
    return f"From: app@example.com\r\nTo: u@slow.test\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()


def slow_policy(port: int, **spec: Any) -> Any:
    return parse_policy({"apiVersion": "mxgate.io/v1alpha1", "kind": "ProviderPolicy", "metadata": {"name": "slow"},
                         "spec": {"match": {"domains": ["slow.test"]}, "route": {"hosts": [f"127.0.0.1:{port}"]},
                                  **spec}}, source="test:slow")


async def send(port: int, subject: str) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as smtp:
        await smtp.sendmail("app@example.com", ["u@slow.test"], message(subject))


async def test_a_stalled_delivery_does_not_hold_the_message_behind_it(redis_server: EmbeddedRedis) -> None:
    handler = StallingHandler()
    sink = await Sink(handler).start()
    try:
        await publish(redis_server.url, [slow_policy(sink.port, limits={"maxConnections": 3})])
        async with running_gateway(redis_server.url) as gw:
            await send(gw.port, "stall")
            await eventually(lambda: handler.stalled == 1, timeout=10, what="the first message stalled in DATA")
            await send(gw.port, "next")
            # Delivered over a second connection while the first still hangs in DATA.
            await sink.wait_for(1, timeout=10)
            assert handler.stalled == 1 and not handler.release.is_set()
            assert sink.max_open == 2
            handler.release.set()
    finally:
        await sink.stop()


async def test_the_connection_limit_still_holds_while_one_stalls(redis_server: EmbeddedRedis) -> None:
    handler = StallingHandler(stall_once=1)
    sink = await Sink(handler).start()
    try:
        await publish(redis_server.url, [slow_policy(sink.port, limits={"maxConnections": 1},
                                                     retry={"initialDelay": "1s"})])
        async with running_gateway(redis_server.url) as gw:
            await send(gw.port, "stall")
            await eventually(lambda: handler.stalled == 1, timeout=10, what="the first message stalled in DATA")
            await send(gw.port, "next")
            await asyncio.sleep(2)
            assert handler.messages == [] and sink.max_open == 1   # one connection allowed: "next" waits
            handler.release.set()
            await sink.wait_for(2, timeout=20)    # "next", and "stall" retried after its 451
            assert sink.max_open == 1
    finally:
        await sink.stop()


@pytest.mark.parametrize(("stage", "timeouts", "expected"), [
    ("end of DATA", {"dataDone": "1s"}, "timed out waiting for the next hop (end of DATA)"),
    ("greeting", {"greeting": "1s"}, "no greeting within 1 s"),
])
async def test_each_stage_times_out_on_its_own(redis_server: EmbeddedRedis, caplog: pytest.LogCaptureFixture,
                                               stage: str, timeouts: dict[str, str], expected: str) -> None:
    handler = StallingHandler(stall_once=1)
    sink = await Sink(handler).start()
    silent = await asyncio.start_server(lambda r, w: asyncio.sleep(3600), "127.0.0.1", 0)  # accepts, never greets
    port = sink.port if stage == "end of DATA" else silent.sockets[0].getsockname()[1]
    caplog.set_level(logging.INFO, logger="mxgate.delivery")
    try:
        await publish(redis_server.url, [slow_policy(port, timeouts=timeouts, retry={"initialDelay": "1s"})])
        async with running_gateway(redis_server.url) as gw:
            loop = asyncio.get_running_loop()
            sent = loop.time()
            await send(gw.port, "stall")

            def deferred() -> list[str]:
                return [str(getattr(r, "reply", "")) for r in caplog.records if r.getMessage() == "deferred"]

            await eventually(lambda: any(expected in reply for reply in deferred()), timeout=15,
                             what=f"a deferral naming {stage}")
            assert loop.time() - sent < 10   # the stage's 1 s, not the 5-10 minute default
            assert all(reply.startswith("451 4.4.") for reply in deferred())
            if stage == "end of DATA":
                handler.release.set()
                await sink.wait_for(1, timeout=20)   # the retry goes through (the sink holds only the first)
    finally:
        handler.release.set()
        silent.close()
        await sink.stop()


async def stalls_at(command: bytes) -> asyncio.Server:
    """A next hop that greets, answers every command with the usual reply, and never answers ``command``."""
    replies = {b"EHLO": b"250 stalls.test\r\n", b"MAIL": b"250 2.1.0 Ok\r\n", b"RCPT": b"250 2.1.5 Ok\r\n",
               b"DATA": b"354 go ahead\r\n", b"RSET": b"250 Ok\r\n", b"QUIT": b"221 Bye\r\n"}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 stalls.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == command:
                await asyncio.sleep(3600)
            writer.write(replies.get(verb, b"502 5.5.2 no\r\n"))
            await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


@pytest.mark.parametrize(("command", "timeouts", "expected"), [
    (b"MAIL", {"mail": "1s"}, "timed out waiting for the next hop (MAIL)"),
    (b"RCPT", {"rcpt": "1s"}, "timed out waiting for the next hop (RCPT)"),
    (b"DATA", {"dataInit": "1s"}, "timed out waiting for the next hop (DATA)"),
    (b"EHLO", {"helo": "1s"}, "no next hop reachable"),
])
async def test_the_transaction_stages_time_out_too(redis_server: EmbeddedRedis, caplog: pytest.LogCaptureFixture,
                                                   command: bytes, timeouts: dict[str, str], expected: str) -> None:
    server = await stalls_at(command)
    caplog.set_level(logging.INFO, logger="mxgate.delivery")
    try:
        await publish(redis_server.url, [slow_policy(server.sockets[0].getsockname()[1], timeouts=timeouts,
                                                     retry={"initialDelay": "1h"})])
        async with running_gateway(redis_server.url) as gw:
            await send(gw.port, "stalls")

            def deferred() -> list[str]:
                return [str(getattr(r, "reply", "")) for r in caplog.records if r.getMessage() == "deferred"]

            await eventually(lambda: deferred(), timeout=15, what=f"a deferral after {command!r} stalled")
            assert expected in deferred()[0] and deferred()[0].startswith("451 4.4.")
            assert not [r for r in caplog.records if "internal error" in r.getMessage()]
    finally:
        server.close()
