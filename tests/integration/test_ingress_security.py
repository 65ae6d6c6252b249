"""Ingress security over real sockets: relay control, STARTTLS and AUTH, SMTP smuggling, limits, spool outage.

Every test talks to a real gateway (``support.gateway.running_gateway``) on 127.0.0.1 port 0 backed by a
real redis-server: through aiosmtplib where a well-behaved client is meant, through a raw asyncio socket
where the point is bytes no well-behaved client would send. "Nothing was spooled" is checked in Redis
itself (no key under a provider hash tag, ``mxg:{p:*``); "nothing was delivered" at a recording SMTP sink
that ``outlook.test`` is routed to, after the spool has drained.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import re
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import redis.asyncio as aioredis
import trustme

from mxgate import keys
from mxgate.app import Gateway
from mxgate.embedded_redis import EmbeddedRedis, free_port
from mxgate.errors import ConfigError
from mxgate.ingress.auth import hash_password
from mxgate.ingress.handler import IPNetwork
from mxgate.policy import ProviderPolicy
from support.gateway import policy, publish, running_gateway, settings
from support.sink import Sink

OUTSIDE: tuple[IPNetwork, ...] = (ipaddress.ip_network("10.99.0.0/16"),)
"""An ``allowed_networks`` that excludes 127.0.0.1 and ::1. Only ever a setting: no traffic goes there."""
LOOPBACK_V4_ONLY: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"),)
REPLY_TIMEOUT = 5.0
"""Seconds to wait for one reply: a server that stays silent fails the test instead of hanging it."""
LOGIN, PASSWORD = "orders-app", "correct horse ✓ battery"
SENDER, RCPT = "app@example.com", "user@outlook.test"


def message(name: str) -> bytes:
    return (f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: {name}\r\nMessage-ID: <{name}@example.com>\r\n\r\n"
            f"body of {name}\r\n").encode()


def plain_blob(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


# -- a raw SMTP client ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    code: int
    text: str  # the lines after the code, joined with "\n"

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class RawClient:
    """Writes exactly the bytes it is given; reads replies line by line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> Reply:
        """The next reply; EOFError if the server closed the connection cleanly between replies."""
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), REPLY_TIMEOUT)
            if not raw and not lines:
                raise EOFError
            assert raw.endswith(b"\r\n"), f"torn reply after {lines}: {raw!r}"
            line = raw[:-2].decode()
            lines.append(line[4:])
            if line[3:4] != "-":
                return Reply(int(line[:3]), "\n".join(lines))

    async def command(self, line: str) -> Reply:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def replies_until_closed(self) -> list[Reply]:
        """Every reply still to come; fails (TimeoutError) if the server keeps the connection open."""
        replies = []
        while True:
            try:
                replies.append(await self.reply())
            except EOFError:
                return replies

    async def begin_data(self) -> None:
        """MAIL, RCPT and DATA of a well-formed envelope, up to the 354."""
        for line, code in ((f"MAIL FROM:<{SENDER}>", 250), (f"RCPT TO:<{RCPT}>", 250), ("DATA", 354)):
            reply = await self.command(line)
            assert reply.code == code, (line, str(reply))

    async def transaction(self, name: str) -> Reply:
        """A well-formed message; returns the reply to its end of data."""
        await self.begin_data()
        await self.send(message(name) + b".\r\n")
        return await self.reply()


@contextlib.asynccontextmanager
async def raw_client(port: int, host: str = "127.0.0.1") -> AsyncIterator[RawClient]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        client = RawClient(reader, writer)
        greeting = await client.reply()
        assert greeting.code == 220, str(greeting)
        yield client
    finally:
        writer.close()
        with contextlib.suppress(OSError):  # the server may already have reset the connection
            await writer.wait_closed()


def smtp_client(port: int, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> aiosmtplib.SMTP:
    """aiosmtplib, with STARTTLS only when the test asks for it."""
    return aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, tls_context=tls, timeout=REPLY_TIMEOUT)


# -- fixtures ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_context: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    ca = trustme.CA()
    issued = ca.issue_cert("mxgate.test", "127.0.0.1")
    folder = tmp_path_factory.mktemp("tls")
    for blob in issued.cert_chain_pems:
        blob.write_to_path(folder / "cert.pem", append=True)
    issued.private_key_pem.write_to_path(folder / "key.pem")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return TlsFiles(folder / "cert.pem", folder / "key.pem", context)


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "credentials"
    path.write_text(f"# made with mxgate.ingress.auth.hash_password\n\n{LOGIN}:{hash_password(PASSWORD)}\n",
                    encoding="utf-8")
    return path


@pytest.fixture
def with_auth(tls: TlsFiles, credentials: Path) -> dict[str, Any]:
    """Gateway settings for STARTTLS plus AUTH (AUTH offered only inside TLS, the default)."""
    return {"tls_cert": tls.cert, "tls_key": tls.key, "credentials_file": credentials}


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = await Sink().start()
    yield s
    await s.stop()


def outlook_to(sink: Sink) -> ProviderPolicy:
    return policy("outlook", domains=["outlook.test"], route=[f"127.0.0.1:{sink.port}"])


@pytest.fixture
async def redis_url(redis_server: EmbeddedRedis, redis_client: aioredis.Redis, sink: Sink) -> str:
    """The shared test Redis, flushed, with outlook.test routed to the sink."""
    await publish(redis_server.url, [outlook_to(sink)])
    return str(redis_server.url)


async def spooled(redis_client: aioredis.Redis) -> list[bytes | str]:
    """The spool: every provider's queue and job keys (other keys under a provider's hash tag, such as
    limits and telemetry, belong to delivery and the controller)."""
    found: list[bytes | str] = []
    for pattern in (keys.queue("*"), keys.job_prefix("*") + "*"):
        found += await redis_client.keys(pattern)
    return sorted(found)


async def assert_nothing_spooled(redis_client: aioredis.Redis) -> None:
    """Ingress never reached the spool: no queue, no job, no provider in the index enqueue adds to."""
    assert await spooled(redis_client) == []
    assert [await redis_client.zcard(shard) for shard in keys.due_shards()] == [0] * keys.DUE_SHARDS


async def drained(redis_client: aioredis.Redis, sink: Sink, count: int) -> None:
    """Wait until the sink holds ``count`` messages and the spool holds none: nothing more can arrive."""
    await sink.wait_for(count, timeout=REPLY_TIMEOUT)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REPLY_TIMEOUT
    while await spooled(redis_client):
        assert loop.time() < deadline, f"spool not drained: {await spooled(redis_client)}"
        await asyncio.sleep(0.02)
    assert len(sink.handler.messages) == count, [m.message_id for m in sink.handler.messages]


# -- 1. relay control -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("auth", "code", "enhanced"), [(True, 530, "5.7.0"), (False, 554, "5.7.1")],
                         ids=["auth-configured", "no-auth"])
async def test_unauthenticated_client_outside_allowed_networks_cannot_relay(
        redis_url: str, redis_client: aioredis.Redis, with_auth: dict[str, Any],
        auth: bool, code: int, enhanced: str) -> None:
    async with running_gateway(redis_url, allowed_networks=OUTSIDE, **(with_auth if auth else {})) as gw:
        async with smtp_client(gw.port) as smtp:
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await smtp.sendmail(SENDER, [RCPT], message("refused"))
        assert refused.value.code == code and refused.value.message.startswith(f"{enhanced} "), refused.value
        # A client that pipelines the whole transaction regardless gets no further.
        async with raw_client(gw.port) as client:
            await client.send(f"EHLO x.test\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode())
            replies = [await client.reply() for _ in range(4)]
        assert [r.code for r in replies] == [250, code, 503, 503], [str(r) for r in replies]
    await assert_nothing_spooled(redis_client)


@pytest.mark.parametrize(("host", "allowed", "relays"), [
    ("127.0.0.1", None, True),               # the default allowed_networks: loopback, IPv4 and IPv6
    ("::1", None, True),
    ("127.0.0.1", OUTSIDE, False),
    ("::1", LOOPBACK_V4_ONLY, False),        # an IPv4 network never admits an IPv6 client
    ("::1", (ipaddress.ip_network("::1/128"),), True),
], ids=["v4-default", "v6-default", "v4-outside", "v6-not-in-v4-network", "v6-listed"])
async def test_relay_is_decided_by_the_client_address(
        redis_url: str, redis_client: aioredis.Redis, sink: Sink,
        host: str, allowed: tuple[IPNetwork, ...] | None, relays: bool) -> None:
    overrides: dict[str, Any] = {"listen": (host, 0)}
    if allowed is not None:
        overrides["allowed_networks"] = allowed
    async with running_gateway(redis_url, **overrides) as gw:
        async with smtp_client(gw.port, host=host) as smtp:
            if relays:
                errors, reply = await smtp.sendmail(SENDER, [RCPT], message("inside"))
                assert errors == {} and reply.startswith("2.0.0 Ok: queued as "), reply
            else:
                with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                    await smtp.sendmail(SENDER, [RCPT], message("outside"))
                assert refused.value.code == 554, refused.value
        await drained(redis_client, sink, 1 if relays else 0)
    assert [m.message_id for m in sink.handler.messages] == (["<inside@example.com>"] if relays else [])


# -- 2. STARTTLS and AUTH ---------------------------------------------------------------------------------

async def test_ehlo_offers_auth_only_inside_tls(
        redis_url: str, tls: TlsFiles, with_auth: dict[str, Any]) -> None:
    async with running_gateway(redis_url, max_message_size=4096, **with_auth) as gw:
        async with smtp_client(gw.port, tls.client_context) as smtp:
            await smtp.ehlo()
            plain = smtp.esmtp_extensions
            assert {"starttls", "size", "8bitmime", "pipelining", "enhancedstatuscodes"} <= plain.keys()
            assert plain["size"] == "4096"
            assert "auth" not in plain
            # Even the right password is refused in plain text: it must never travel unencrypted.
            before_tls = await smtp.execute_command(b"AUTH", b"PLAIN", plain_blob(LOGIN, PASSWORD).encode())
            assert (before_tls.code, before_tls.message.split()[0]) == (538, "5.7.11"), before_tls
            await smtp.starttls()
            await smtp.ehlo()
            secure = smtp.esmtp_extensions
            assert set(secure["auth"].split()) == {"PLAIN", "LOGIN"}, secure
            assert {"size", "8bitmime", "pipelining", "enhancedstatuscodes"} <= secure.keys()
            assert "starttls" not in secure


async def test_auth_offered_in_plain_text_when_allowed(
        redis_url: str, redis_client: aioredis.Redis, sink: Sink, credentials: Path) -> None:
    async with running_gateway(redis_url, credentials_file=credentials, auth_without_tls=True,
                               allowed_networks=OUTSIDE) as gw:
        async with smtp_client(gw.port) as smtp:
            await smtp.ehlo()
            assert set(smtp.esmtp_extensions["auth"].split()) == {"PLAIN", "LOGIN"}
            assert "starttls" not in smtp.esmtp_extensions
            response = await smtp.auth_plain(LOGIN, PASSWORD)
            assert (response.code, response.message) == (235, "2.7.0 Authentication successful")
            await smtp.sendmail(SENDER, [RCPT], message("plain-auth"))
        await drained(redis_client, sink, 1)
    assert b" with ESMTPA id " in sink.handler.messages[0].data  # authenticated, not encrypted


async def test_auth_not_offered_without_credentials(
        redis_url: str, redis_client: aioredis.Redis, sink: Sink, tls: TlsFiles) -> None:
    # aiosmtpd would list AUTH (here both before and after STARTTLS) and then fail every login.
    async with running_gateway(redis_url, tls_cert=tls.cert, tls_key=tls.key, auth_without_tls=True) as gw:
        async with smtp_client(gw.port, tls.client_context) as smtp:
            await smtp.ehlo()
            assert "auth" not in smtp.esmtp_extensions and "starttls" in smtp.esmtp_extensions
            await smtp.starttls()
            await smtp.ehlo()
            assert "auth" not in smtp.esmtp_extensions, smtp.esmtp_extensions
            await smtp.sendmail(SENDER, [RCPT], message("by-network"))  # relays by address instead
        await drained(redis_client, sink, 1)
    assert b" with ESMTPS id " in sink.handler.messages[0].data


async def authenticate(smtp: aiosmtplib.SMTP, mechanism: str, login: str, password: str) -> tuple[int, str]:
    method = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
    try:
        response = await method(login, password)
    except aiosmtplib.SMTPAuthenticationError as exc:
        return exc.code, exc.message
    return response.code, response.message


async def test_auth_checks_credentials_and_lets_the_client_relay(
        redis_url: str, redis_client: aioredis.Redis, sink: Sink, tls: TlsFiles,
        with_auth: dict[str, Any]) -> None:
    # One gateway for both mechanisms: every failed check costs an argon2 verification (~0.25 s of CPU).
    async with running_gateway(redis_url, allowed_networks=OUTSIDE, **with_auth) as gw:
        for mechanism in ("PLAIN", "LOGIN"):
            for login, password in ((LOGIN, "wrong password"), ("nobody", PASSWORD)):
                async with smtp_client(gw.port, tls.client_context) as smtp:
                    await smtp.starttls()
                    await smtp.ehlo()
                    assert await authenticate(smtp, mechanism, login, password) == (
                        535, "5.7.8 Authentication credentials invalid"), (mechanism, login, password)
                    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                        await smtp.mail(SENDER)
                    assert refused.value.code == 530
            async with smtp_client(gw.port, tls.client_context) as smtp:
                await smtp.starttls()
                await smtp.ehlo()
                assert await authenticate(smtp, mechanism, LOGIN, PASSWORD) == (
                    235, "2.7.0 Authentication successful"), mechanism
                errors, reply = await smtp.sendmail(SENDER, [RCPT], message(f"auth-{mechanism}"))
                assert errors == {} and reply.startswith("2.0.0 Ok: queued as "), reply
        await drained(redis_client, sink, 2)
    assert all(b" with ESMTPSA id " in m.data for m in sink.handler.messages)


async def test_more_than_three_auth_attempts_are_cut_off(redis_url: str, credentials: Path) -> None:
    async with running_gateway(redis_url, credentials_file=credentials, auth_without_tls=True) as gw:
        async with raw_client(gw.port) as client:
            assert (await client.command("EHLO client.test")).code == 250
            for _ in range(3):
                reply = await client.command(f"AUTH PLAIN {plain_blob(LOGIN, 'guess')}")
                assert str(reply) == "535 5.7.8 Authentication credentials invalid"
            # The fourth attempt is not even checked, though its password is right.
            reply = await client.command(f"AUTH PLAIN {plain_blob(LOGIN, PASSWORD)}")
            assert str(reply).startswith("421 4.7.0 "), str(reply)
            assert await client.replies_until_closed() == []


async def test_bare_lf_in_an_auth_response_closes_the_connection(redis_url: str, credentials: Path) -> None:
    async with running_gateway(redis_url, credentials_file=credentials, auth_without_tls=True) as gw:
        async with raw_client(gw.port) as client:
            assert (await client.command("EHLO client.test")).code == 250
            assert (await client.command("AUTH LOGIN")).code == 334
            await client.send(base64.b64encode(LOGIN.encode()) + b"\n")
            replies = await client.replies_until_closed()
    assert [r.text[:5] for r in replies] == ["5.5.2"] and replies[0].code == 500, [str(r) for r in replies]


async def test_starttls_drops_plaintext_pipelined_behind_it(redis_url: str, tls: TlsFiles) -> None:
    # CVE-2011-0411: commands sent in clear text after STARTTLS must not run inside the TLS session.
    async with running_gateway(redis_url, tls_cert=tls.cert, tls_key=tls.key) as gw:
        async with raw_client(gw.port) as client:
            assert (await client.command("EHLO client.test")).code == 250
            await client.send(f"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<{RCPT}>\r\n".encode())
            assert (await client.reply()).code == 220
            await client.writer.start_tls(tls.client_context, server_hostname="127.0.0.1")
            ehlo = await client.command("EHLO client.test")
            assert ehlo.code == 250 and ehlo.text.startswith("mxgate.test\n"), str(ehlo)
            assert (await client.command(f"RCPT TO:<{RCPT}>")).code == 503  # no MAIL in this session


def test_malformed_credentials_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "credentials"
    path.write_text("# users\n\nbilling-app:hunter2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:3: expected 'user:\$argon2id\$"):
        Gateway(settings("redis://127.0.0.1:1/0", credentials_file=path))


# -- 3. SMTP smuggling ------------------------------------------------------------------------------------

SMUGGLED = (b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@outlook.test>\r\nDATA\r\n"
            b"From: evil@example.com\r\nSubject: smuggled\r\nMessage-ID: <smuggled@example.com>\r\n\r\n"
            b"smuggled body\r\n.\r\n")
"""A second message hidden in the first one's data; its own final dot is the only real end of data."""

END_OF_DATA_TRICKS = {
    "crlf-lf-dot-crlf": b"\r\n\n.\r\n",   # the classic
    "lf-dot-lf": b"\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "cr-dot-cr": b"\r.\r",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-cr": b"\r\n.\r",
    "crlf-dot-lf": b"\r\n.\n",
    "lf-dot-cr": b"\n.\r",
    "crlf-cr-dot-crlf": b"\r\n\r.\r\n",
    "crlf-dot-cr-crlf": b"\r\n.\r\r\n",
    "lf-lf-dot-lf-lf": b"\n\n.\n\n",
}


@pytest.mark.parametrize("trick", END_OF_DATA_TRICKS.values(), ids=END_OF_DATA_TRICKS.keys())
async def test_bare_line_endings_in_data_are_refused_and_the_smuggled_message_never_sent(
        redis_url: str, redis_client: aioredis.Redis, sink: Sink, trick: bytes) -> None:
    async with running_gateway(redis_url) as gw:
        async with raw_client(gw.port) as client:
            assert (await client.command("EHLO client.test")).code == 250
            await client.begin_data()
            await client.send(message("carrier").removesuffix(b"\r\n") + trick + SMUGGLED)
            refused = await client.reply()
            assert (refused.code, refused.text[:5]) == (554, "5.5.2"), str(refused)
            await assert_nothing_spooled(redis_client)
            # The session is still in sync: a proper transaction right after it works, and no reply to a
            # smuggled command is waiting anywhere in the stream.
            accepted = await client.transaction("same-session")
            assert accepted.text.startswith("2.0.0 Ok: queued as "), str(accepted)
            await client.send(b"QUIT\r\n")
            assert [r.code for r in await client.replies_until_closed()] == [221]
        async with smtp_client(gw.port) as smtp:
            await smtp.sendmail(SENDER, [RCPT], message("fresh-connection"))
        await drained(redis_client, sink, 2)
    assert sorted(m.message_id for m in sink.handler.messages) == [
        "<fresh-connection@example.com>", "<same-session@example.com>"]
    assert not any(b"smuggled" in m.data or b"carrier" in m.data for m in sink.handler.messages)
    assert all(m.rcpt_tos == [RCPT] and m.mail_from == SENDER for m in sink.handler.messages)


PIPELINED_TRANSACTION = (f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode()
                         + message("pipelined") + b".\r\n")


@pytest.mark.parametrize(("commands", "codes"), [
    (b"EHLO client.test\r\nMAIL FROM:<app@example.com>\n", [250, 500]),
    (b"EHLO client.test\n", [500]),
    (b"EHLO client.test\r\nMAIL FROM:<app@example.com>\rRCPT TO:<user@outlook.test>\r\n", [250, 500]),
    (b"EHLO client.test\r\nNOOP\r\r\n", [250, 500]),
    (b"EHLO client.test\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<user@outlook.test>\n", [250, 250, 500]),
], ids=["lf-ends-mail", "lf-ends-ehlo", "cr-inside-mail", "cr-before-crlf", "lf-ends-rcpt"])
async def test_bare_line_ending_in_a_command_closes_the_connection(
        redis_url: str, redis_client: aioredis.Redis, sink: Sink, commands: bytes, codes: list[int]) -> None:
    async with running_gateway(redis_url) as gw:
        async with raw_client(gw.port) as client:
            # One write: a whole well-formed transaction pipelined behind the bad line must not run either.
            await client.send(commands + PIPELINED_TRANSACTION)
            replies = await client.replies_until_closed()
        assert [r.code for r in replies] == codes, [str(r) for r in replies]
        assert replies[-1].text.startswith("5.5.2 "), str(replies[-1])
        await assert_nothing_spooled(redis_client)
        async with smtp_client(gw.port) as smtp:  # a well-formed client on a fresh connection is served
            await smtp.sendmail(SENDER, [RCPT], message("fresh-connection"))
        await drained(redis_client, sink, 1)
    assert [m.message_id for m in sink.handler.messages] == ["<fresh-connection@example.com>"]


# -- 4. limits --------------------------------------------------------------------------------------------

def message_of_size(name: str, size: int) -> bytes:
    """A message of exactly ``size`` octets on the wire (CRLF line endings, no line starts with a dot)."""
    padding, missing = [], size - len(message(name))
    while missing:
        octets = min(missing, 80)
        if missing - octets == 1:  # never leave one octet over: every line needs its CRLF
            octets -= 1
        assert octets >= 2
        padding.append(b"x" * (octets - 2) + b"\r\n")
        missing -= octets
    return message(name) + b"".join(padding)


async def test_size_parameter_over_the_limit_is_refused_at_mail(
        redis_url: str, redis_client: aioredis.Redis) -> None:
    async with running_gateway(redis_url, max_message_size=2000) as gw:
        async with smtp_client(gw.port) as smtp:
            await smtp.ehlo()
            assert smtp.esmtp_extensions["size"] == "2000"
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await smtp.mail(SENDER, options=["SIZE=2001"])
            assert refused.value.code == 552, refused.value
            assert (await smtp.mail(SENDER, options=["SIZE=2000"])).code == 250
    await assert_nothing_spooled(redis_client)


async def test_message_data_over_the_limit_is_refused(
        redis_url: str, redis_client: aioredis.Redis, sink: Sink) -> None:
    async with running_gateway(redis_url, max_message_size=2000) as gw:
        async with raw_client(gw.port) as client:
            assert (await client.command("EHLO client.test")).code == 250
            for name, size, code in (("over-limit", 2001, 552), ("at-limit", 2000, 250)):
                data = message_of_size(name, size)
                assert len(data) == size
                await client.begin_data()
                await client.send(data + b".\r\n")
                reply = await client.reply()
                assert reply.code == code, (name, str(reply))
        await drained(redis_client, sink, 1)
    assert [m.message_id for m in sink.handler.messages] == ["<at-limit@example.com>"]


async def test_too_many_recipients_get_452(redis_url: str, redis_client: aioredis.Redis, sink: Sink) -> None:
    rcpts = [f"user{n}@outlook.test" for n in range(4)]
    async with running_gateway(redis_url, max_recipients=3) as gw:
        async with smtp_client(gw.port) as smtp:
            errors, reply = await smtp.sendmail(SENDER, rcpts, message("three-of-four"))
        assert reply.startswith("2.0.0 Ok: queued as ")
        assert {rcpt: (r.code, r.message) for rcpt, r in errors.items()} == {
            "user3@outlook.test": (452, "4.5.3 Error: too many recipients")}
        await drained(redis_client, sink, 1)
    assert sink.handler.messages[0].rcpt_tos == rcpts[:3]


BAD_ADDRESSES = ["no-at-sign", "someone@localhost", "someone@[192.0.2.1]", "someone@-bad.test",
                 "someone@bad-.test", "someone@bad_label.test", ""]
"""Addresses aiosmtpd's parser lets through and mxgate's own syntax check refuses."""
UNPARSABLE_ADDRESSES = ["someone@outlook..test", "a@b@outlook.test"]
"""Addresses aiosmtpd's parser refuses itself, before mxgate sees them: ``553 5.1.3`` (even for a sender)."""


@pytest.mark.parametrize(("address", "reply"), [
    *((a, "501 5.1.3 Bad recipient address syntax") for a in BAD_ADDRESSES),
    *((a, "553 5.1.3 Error: malformed address") for a in UNPARSABLE_ADDRESSES),
])
async def test_bad_recipient_syntax_is_refused(
        redis_url: str, redis_client: aioredis.Redis, address: str, reply: str) -> None:
    async with running_gateway(redis_url) as gw:
        async with raw_client(gw.port) as client:
            assert (await client.command("EHLO client.test")).code == 250
            assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
            assert str(await client.command(f"RCPT TO:<{address}>")) == reply
            # Nothing was recorded and the transaction goes on: DATA still needs a good recipient.
            assert (await client.command("DATA")).code == 503
            assert (await client.command(f"RCPT TO:<{RCPT}>")).code == 250
    await assert_nothing_spooled(redis_client)


@pytest.mark.parametrize(("address", "reply"), [
    *((a, "501 5.1.7 Bad sender address syntax") for a in BAD_ADDRESSES if a),
    *((a, "553 5.1.3 Error: malformed address") for a in UNPARSABLE_ADDRESSES),
])
async def test_bad_sender_syntax_is_refused(redis_url: str, address: str, reply: str) -> None:
    async with running_gateway(redis_url) as gw:
        async with raw_client(gw.port) as client:
            assert (await client.command("EHLO client.test")).code == 250
            assert str(await client.command(f"MAIL FROM:<{address}>")) == reply
            # Nothing was recorded: RCPT still needs a MAIL, and a good MAIL is not a "nested MAIL".
            assert (await client.command(f"RCPT TO:<{RCPT}>")).code == 503
            assert str(await client.command(f"MAIL FROM:<{SENDER}>")) == "250 2.1.0 Ok"


CONTROL = "control characters are not allowed"
HOSTILE_PATHS: dict[str, tuple[bytes, str]] = {
    # What aiosmtpd's parser hands over but no next hop could ever be sent (aiosmtplib raises on a control
    # character in a command), nor a notification to such a sender be written: was 250, then a job no
    # attempt could finish. id -> (the path between "<" and ">", the reason the 501 names).
    "nul": (b"a\x00b@outlook.test", CONTROL),
    "nul-quoted": (b'"a\x00b"@outlook.test', CONTROL),
    "soh": (b"a\x01b@outlook.test", CONTROL),
    "esc": (b"a\x1bb@outlook.test", CONTROL),
    "us": (b"a\x1fb@outlook.test", CONTROL),
    "del": (b"a\x7fb@outlook.test", CONTROL),
    "not-utf8": (b"j\xffrg@outlook.test", "not valid UTF-8"),
    "line-separator": ('"a\u2028 b"@outlook.test'.encode(), "line separators (U+0085, U+2028, U+2029) are not allowed"),
    "nel": ('"a\x85 b"@outlook.test'.encode(), "line separators (U+0085, U+2028, U+2029) are not allowed"),
    "local-part-65": (b"a" * 65 + b"@outlook.test", "local part longer than 64 octets (RFC 5321 section 4.5.3.1.1)"),
    "domain-256": (b"u@" + b"d" * 243 + b".outlook.test", "domain longer than 255 octets (RFC 5321 section 4.5.3.1.2)"),
    "path-257": (b"u@" + b"d" * 240 + b".outlook.test", "path longer than 256 octets (RFC 5321 section 4.5.3.1.3)"),
}


def at_limits(local: str) -> str:
    """An address in outlook.test whose path is exactly 256 octets (RFC 5321's limit), domain labels <= 63."""
    room = 254 - len(local) - len("@outlook.test")
    labels = []
    while room > 0:
        label = min(63, room - 1)
        labels.append("s" * label)
        room -= label + 1
    return f"{local}@{'.'.join(labels)}.outlook.test"


async def command_bytes(client: RawClient, line: bytes) -> Reply:
    await client.send(line + b"\r\n")
    return await client.reply()


@pytest.mark.parametrize(("path", "reason"), HOSTILE_PATHS.values(), ids=HOSTILE_PATHS.keys())
async def test_a_sender_no_next_hop_could_be_sent_is_refused_at_mail(
        redis_url: str, redis_client: aioredis.Redis, path: bytes, reason: str) -> None:
    async with running_gateway(redis_url) as gw:
        async with raw_client(gw.port) as client:
            assert (await client.command("EHLO client.test")).code == 250
            assert str(await command_bytes(client, b"MAIL FROM:<" + path + b">")) == (
                f"501 5.1.7 Bad sender address: {reason}")
            assert (await client.command(f"RCPT TO:<{RCPT}>")).code == 503   # nothing was recorded
            assert str(await client.command(f"MAIL FROM:<{SENDER}>")) == "250 2.1.0 Ok"
    await assert_nothing_spooled(redis_client)


@pytest.mark.parametrize(("path", "reason"), HOSTILE_PATHS.values(), ids=HOSTILE_PATHS.keys())
async def test_a_recipient_no_next_hop_could_be_sent_is_refused_at_rcpt(
        redis_url: str, redis_client: aioredis.Redis, path: bytes, reason: str) -> None:
    async with running_gateway(redis_url) as gw:
        async with raw_client(gw.port) as client:
            assert (await client.command("EHLO client.test")).code == 250
            assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
            assert str(await command_bytes(client, b"RCPT TO:<" + path + b">")) == (
                f"501 5.1.3 Bad recipient address: {reason}")
            assert (await client.command("DATA")).code == 503                # nothing was recorded
    await assert_nothing_spooled(redis_client)


async def test_addresses_at_the_rfc_5321_limits_are_accepted_and_relayed(
        redis_url: str, redis_client: aioredis.Redis, sink: Sink) -> None:
    sender, rcpt = "s" * 64 + "@example.com", at_limits("r" * 64)
    assert len(rcpt) + 2 == 256
    async with running_gateway(redis_url) as gw:
        async with raw_client(gw.port) as client:
            assert (await client.command("EHLO client.test")).code == 250
            assert str(await client.command(f"MAIL FROM:<{sender}>")) == "250 2.1.0 Ok"
            assert str(await client.command(f"RCPT TO:<{rcpt}>")) == "250 2.1.5 Ok"
            assert (await client.command("DATA")).code == 354
            await client.send(message("at-limits") + b".\r\n")
            assert (await client.reply()).text.startswith("2.0.0 Ok: queued as ")
        await drained(redis_client, sink, 1)
    delivered = sink.handler.messages[0]
    assert (delivered.mail_from, delivered.rcpt_tos) == (sender, [rcpt])


async def test_null_sender_is_accepted_and_relayed(
        redis_url: str, redis_client: aioredis.Redis, sink: Sink) -> None:
    async with running_gateway(redis_url) as gw:
        async with raw_client(gw.port) as client:
            assert (await client.command("EHLO client.test")).code == 250
            assert str(await client.command("MAIL FROM:<>")) == "250 2.1.0 Ok"
            assert str(await client.command(f"RCPT TO:<{RCPT}>")) == "250 2.1.5 Ok"
            assert (await client.command("DATA")).code == 354
            await client.send(message("bounce") + b".\r\n")
            assert (await client.reply()).text.startswith("2.0.0 Ok: queued as ")
        await drained(redis_client, sink, 1)
    delivered = sink.handler.messages[0]
    assert (delivered.mail_from, delivered.message_id) == ("<>", "<bounce@example.com>")


async def test_idle_connection_is_closed_with_421(redis_url: str) -> None:
    async with running_gateway(redis_url, command_timeout=0.5) as gw:
        loop = asyncio.get_running_loop()
        async with raw_client(gw.port) as client:
            assert (await client.command("EHLO client.test")).code == 250
            started = loop.time()
            replies = await client.replies_until_closed()
            idle = loop.time() - started
    assert [str(r)[:10] for r in replies] == ["421 4.4.2 "]
    assert idle >= 0.45, idle  # the timeout, not something else (reply() gives up after REPLY_TIMEOUT)


async def test_client_still_sending_data_is_not_timed_out(
        redis_url: str, redis_client: aioredis.Redis, sink: Sink) -> None:
    async with running_gateway(redis_url, command_timeout=0.5) as gw:
        async with raw_client(gw.port) as client:
            assert (await client.command("EHLO client.test")).code == 250
            await client.begin_data()
            await client.send(message("slow-upload"))
            for n in range(8):  # 1.2 s of upload in all, never 0.5 s without a byte
                await asyncio.sleep(0.15)
                await client.send(f"more text {n}\r\n".encode())
            await client.send(b".\r\n")
            assert (await client.reply()).text.startswith("2.0.0 Ok: queued as ")
        await drained(redis_client, sink, 1)


# -- 5. spool outage --------------------------------------------------------------------------------------

@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of this test alone, on a fixed port, so it can be stopped and started again."""
    server = EmbeddedRedis(tmp_path / "redis", port=free_port())
    yield server.start()
    server.stop()


async def test_spool_outage_answers_451_and_recovers_without_restart(
        own_redis: EmbeddedRedis, sink: Sink) -> None:
    await publish(own_redis.url, [outlook_to(sink)])
    async with running_gateway(own_redis.url) as gw:
        async with smtp_client(gw.port) as smtp:  # one session across the outage
            await smtp.sendmail(SENDER, [RCPT], message("before"))
            async with aioredis.Redis.from_url(own_redis.url) as spool:
                await drained(spool, sink, 1)  # delivered and acknowledged: nothing in flight in the outage
            own_redis.stop()
            with pytest.raises(aiosmtplib.SMTPDataError) as failed:
                await smtp.sendmail(SENDER, [RCPT], message("during"))
            assert (failed.value.code, failed.value.message.split()[0]) == (451, "4.3.0"), failed.value
            own_redis.start()  # same port, same data directory
            # As any MTA does after a 4xx, the client tries again (the first write after a Redis restart
            # may meet a pooled connection that died with the old server); it must succeed within a few
            # attempts, with no gateway restart.
            for attempt in range(5):
                try:
                    await smtp.sendmail(SENDER, [RCPT], message("after-same-session"))
                    break
                except aiosmtplib.SMTPDataError as exc:
                    assert exc.code == 451 and attempt < 4, exc
                    await asyncio.sleep(0.05)
        async with smtp_client(gw.port) as smtp:
            await smtp.sendmail(SENDER, [RCPT], message("after-new-session"))
        async with aioredis.Redis.from_url(own_redis.url) as spool:
            await drained(spool, sink, 3)
    assert sorted(m.message_id for m in sink.handler.messages) == [
        "<after-new-session@example.com>", "<after-same-session@example.com>", "<before@example.com>"]
