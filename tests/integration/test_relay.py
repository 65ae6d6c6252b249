"""End to end inside one event loop: SMTP client -> gateway -> Redis spool -> delivery -> SMTP sink."""

from __future__ import annotations

import asyncio
import email
import ssl

import aiohttp
import aiosmtplib
import pytest
import trustme

from mxgate.embedded_redis import EmbeddedRedis
from mxgate.policy import Retry
from support.gateway import policy, publish, running_gateway
from support.procs import eventually
from support.sink import Sink, SinkHandler


def message(n: int, rcpts: str = "user@outlook.test") -> bytes:
    return (f"From: app@example.com\r\nTo: {rcpts}\r\nSubject: test {n}\r\nMessage-ID: <m{n}@example.com>\r\n\r\n"
            f"body {n}\r\n.leading dot line\r\n").encode()


@pytest.fixture
async def sink() -> Sink:
    s = await Sink().start()
    yield s
    await s.stop()


async def test_relays_each_message_exactly_once(redis_server: EmbeddedRedis, redis_client, sink: Sink) -> None:
    await publish(redis_server.url, [policy("microsoft", domains=["outlook.test"], route=[f"127.0.0.1:{sink.port}"],
                                            maxConnections=3)])
    async with running_gateway(redis_server.url) as gw:
        async def send(n: int) -> None:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port) as smtp:
                reply = await smtp.sendmail("app@example.com", ["user@outlook.test"], message(n))
                assert reply[1].startswith("2.0.0 Ok: queued as ")
        await asyncio.gather(*(send(n) for n in range(60)))
        await sink.wait_for(60)
        await asyncio.sleep(0.3)
    ids = sink.handler.message_ids()
    assert len(ids) == 60 and set(ids.values()) == {1}
    first = sink.handler.messages[0]
    assert first.data.startswith(b"Received: from ") and b"by mxgate.test (mxgate) with ESMTP" in first.data
    assert b"\r\n.leading dot line\r\n" in first.data  # dot-stuffing undone and redone correctly
    assert sink.max_open <= 3


async def test_one_job_per_domain_and_partial_recipient_failure_bounces_only_the_refused(
        redis_server: EmbeddedRedis, redis_client) -> None:
    a = await Sink(SinkHandler(rcpt_replies={"gone@a.test": "550 5.1.1 User unknown"})).start()
    b = await Sink().start()
    back = await Sink().start()   # the sender's domain: receives the delivery status notification
    try:
        await publish(redis_server.url, [
            policy("a", domains=["a.test"], route=[f"127.0.0.1:{a.port}"]),
            policy("b", domains=["b.test"], route=[f"127.0.0.1:{b.port}"]),
            policy("back", domains=["example.com"], route=[f"127.0.0.1:{back.port}"]),
        ])
        async with running_gateway(redis_server.url) as gw:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port) as smtp:
                errors, _ = await smtp.sendmail("app@example.com", ["x@a.test", "gone@a.test", "y@b.test"], message(1))
                assert errors == {}
            await a.wait_for(1)
            await b.wait_for(1)
            await back.wait_for(1)
        assert a.handler.messages[0].rcpt_tos == ["x@a.test"]
        assert b.handler.messages[0].rcpt_tos == ["y@b.test"]
        dsn = back.handler.messages[0]
        assert dsn.mail_from == "<>" and dsn.rcpt_tos == ["app@example.com"]
        parsed = email.message_from_bytes(dsn.data)
        assert parsed.get_content_type() == "multipart/report"
        report_parts = dsn.data.split(b"\r\n\r\n", 1)[1].split(b"Content-Type: text/rfc822-headers")[0]
        assert b"gone@a.test" in dsn.data and b"5.1.1" in dsn.data
        assert b"x@a.test" not in report_parts   # the delivered recipient is not reported as failed
    finally:
        for s in (a, b, back):
            await s.stop()


async def test_temporary_failure_is_retried(redis_server: EmbeddedRedis, redis_client) -> None:
    handler = SinkHandler(data_reply="451 4.7.500 Server busy")
    sink = await Sink(handler).start()
    try:
        p = policy("p", domains=["outlook.test"], route=[f"127.0.0.1:{sink.port}"])
        p = p.model_copy(update={"spec": p.spec.model_copy(update={"retry": Retry(initial_delay="300ms")})})
        await publish(redis_server.url, [p])
        async with running_gateway(redis_server.url) as gw:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port) as smtp:
                await smtp.sendmail("app@example.com", ["u@outlook.test"], message(7))
            await asyncio.sleep(0.5)
            assert handler.messages == []
            handler.data_reply = None           # the provider recovers
            await sink.wait_for(1, timeout=10)
        assert handler.messages[0].message_id == "<m7@example.com>"
    finally:
        await sink.stop()


async def test_readyz_and_metrics(redis_server: EmbeddedRedis, redis_client, sink: Sink) -> None:
    async with running_gateway(redis_server.url) as gw:
        assert gw.health is not None
        url = f"http://127.0.0.1:{gw.health.bound_port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/readyz") as r:
                assert r.status == 503 and "no policies" in (await r.text())
            await publish(redis_server.url, [policy("p", domains=["outlook.test"], route=[f"127.0.0.1:{sink.port}"])])
            for _ in range(50):
                async with http.get(url + "/readyz") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.05)
            assert r.status == 200
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port) as smtp:
                await smtp.sendmail("app@example.com", ["u@outlook.test"], message(1))
            await sink.wait_for(1)
            async with http.get(url + "/healthz") as r:
                assert r.status == 200
            async with http.get(url + "/metrics") as r:
                text = await r.text()
            assert "mxgate_messages_received_total" in text
            delivered = [line for line in text.splitlines() if line.startswith("mxgate_recipients_total{")
                         and 'outcome="delivered"' in line and 'provider="p"' in line]
            assert delivered and float(delivered[0].rsplit(" ", 1)[1]) >= 1



async def _readyz(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url + "/readyz") as r:
        return r.status, await r.text()


async def test_readyz_fails_when_smtp_sessions_die(redis_server: EmbeddedRedis, sink: Sink,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis and policies fine, but every SMTP connection dropped (Debian 3.11.2's crash): never ready."""
    from mxgate.ingress.smtp import IngressSMTP

    await publish(redis_server.url, [policy("p", domains=["outlook.test"], route=[f"127.0.0.1:{sink.port}"])])
    async with running_gateway(redis_server.url) as gw, aiohttp.ClientSession() as http:
        assert gw.health is not None
        url = f"http://127.0.0.1:{gw.health.bound_port}"

        async def ready() -> bool:
            return (await _readyz(http, url))[0] == 200

        await eventually(ready, timeout=10, what="/readyz 200")

        def crash(self: IngressSMTP, *args: object, **kwargs: object) -> None:
            raise TypeError("descriptor '__weakref__' for 'IngressHandler' objects doesn't apply")

        with monkeypatch.context() as patch:
            patch.setattr(IngressSMTP, "__init__", crash)
            status, body = await _readyz(http, url)
            assert status == 503 and "SMTP self-check" in body, body
            # The client is told, and the listener survives it (on uvloop an exception from the protocol
            # factory stopped it for good).
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port, timeout=5)
            with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
                await client.connect()
            assert refused.value.code == 421
        assert await ready()

        # EHLO answered with an error (a handler hook that raises): not ready either.
        async def broken_ehlo(server: object, session: object, envelope: object, hostname: str,
                              responses: list[str]) -> list[str]:
            raise RuntimeError("hook broke")

        with monkeypatch.context() as patch:
            patch.setattr(gw.handler, "handle_EHLO", broken_ehlo)
            status, body = await _readyz(http, url)
            assert status == 503 and "EHLO answered 5" in body, body

        assert await ready()
        assert gw.server is not None
        gw.server.close()  # the listener closed by mistake
        status, body = await _readyz(http, url)
        assert status == 503 and "SMTP listener not open" in body, body


async def test_relays_to_a_next_hop_that_offers_starttls(redis_server: EmbeddedRedis) -> None:
    # As real MTAs do: STARTTLS offered, and after it the client must say EHLO again (RFC 3207 4.2), or
    # MAIL is refused ("503 send HELO first") and the mail bounces.
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("sink.test", "127.0.0.1").configure_cert(context)
    tls_sink = await Sink(tls_context=context).start()
    try:
        await publish(redis_server.url, [policy("microsoft", domains=["outlook.test"],
                                                route=[f"127.0.0.1:{tls_sink.port}"])])
        async with running_gateway(redis_server.url) as gw:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port) as smtp:
                await smtp.sendmail("app@example.com", ["user@outlook.test"], message(1) + "é".encode())
            await tls_sink.wait_for(1, timeout=20)
        received = tls_sink.handler.messages[0]
        assert received.rcpt_tos == ["user@outlook.test"] and received.message_id == "<m1@example.com>"
    finally:
        await tls_sink.stop()
