"""One outbound SMTP connection (aiosmtplib), reused for many messages to one next hop.

``OutboundSession.open`` walks the next hops in order (MX preference, or the policy's static route) and
each host's addresses until one greets with 220; ``deliver`` runs MAIL / RCPT... / DATA for one job and
returns each recipient's reply, so partial acceptance is honoured per recipient. STARTTLS is
opportunistic, like Postfix's ``smtp_tls_security_level = may``: used when offered, certificates not
verified (nothing to verify them against for arbitrary MX hosts), and if the TLS handshake fails the
session reconnects in plain text rather than deferring the mail.

A refusal in the greeting (``421 4.7.652 ... maximum number of connections``) is not a broken next hop
but a throttling signal: it surfaces as ``GreetingRefused`` carrying the reply for classification.

Every stage has its own timeout (``StageTimeouts``, from the policy's ``spec.timeouts``; RFC 5321 §4.5.3.2
defaults): the TCP connection, the greeting, EHLO and STARTTLS, MAIL, each RCPT, DATA's 354 and the final
reply after the message. A stage that times out defers the attempt (``451 4.4.2 timed out ...``, naming the
stage) and closes the connection: its state is unknown.

An address no command line can carry (``mxgate.envelope.unsendable``: a job spooled before ingress
refused such paths) is never handed to aiosmtplib, which would raise: ``deliver`` answers it itself with
a permanent ``553 5.1.7`` (the sender: every recipient fails) or ``553 5.1.3`` (that recipient only).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib import SMTPResponseException, SMTPServerDisconnected, SMTPTimeoutError

from mxgate.egress.replies import SmtpReply
from mxgate.egress.timeouts import StageTimeouts
from mxgate.envelope import unsendable
from mxgate.errors import DeliveryError
from mxgate.routing.dns import MxResolver
from mxgate.routing.router import NextHop
from mxgate.smtpwire import has_bare_line_ending
from mxgate.spool.store import Job


class GreetingRefused(DeliveryError):
    """The next hop answered the connection with a refusal (often a connection-limit signal)."""

    def __init__(self, hop: NextHop, reply: SmtpReply) -> None:
        super().__init__(f"{hop} refused the connection: {reply}")
        self.hop = hop
        self.reply = reply


# Replies we synthesise when the remote never answered: they classify as ordinary deferrals.
LOST_CONNECTION = SmtpReply(451, "4.4.2", "connection to the next hop lost")


def timed_out(stage: str) -> SmtpReply:
    """The reply an attempt ends with when the next hop did not answer ``stage`` in time."""
    return SmtpReply(451, "4.4.2", f"timed out waiting for the next hop ({stage})")


# RFC 5321 §4.5.2: a line starting with "." gets one more; a bare CR or LF becomes CRLF on the wire.
_LONE_EOL = re.compile(rb"\r(?!\n)|(?<!\r)\n")
END_OF_DATA = b".\r\n"


def data_on_the_wire(body: bytes, *, crlf: bool = False) -> bytes:
    """``body`` as DATA sends it, before the final ``.CRLF`` (``END_OF_DATA``): CRLF line ends, ending in
    CRLF, dot-stuffed. A 100 KB message is the common case to make cheap: ``crlf`` says the body is known
    to have CRLF line ends only (ingress refused the others: ``Job.crlf``); otherwise that is checked with
    three counts, and a regular expression runs only for a body with bare line ends. The stuffing is one
    ``bytes.replace``."""
    if not crlf and has_bare_line_ending(body):
        body = _LONE_EOL.sub(b"\r\n", body)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


async def _hello(smtp: aiosmtplib.SMTP, *, timeout: float) -> None:
    """EHLO, or HELO when the next hop refuses EHLO."""
    try:
        await smtp.ehlo(timeout=timeout)
    except SMTPResponseException:
        await smtp.helo(timeout=timeout)


def _insecure_tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(slots=True)
class DeliveryReport:
    """Each recipient's final reply for one attempt at one job."""

    replies: dict[str, SmtpReply]
    remote: str


class OutboundSession:
    def __init__(self, *, helo_name: str, resolver: MxResolver | None,
                 timeouts: StageTimeouts = StageTimeouts(), starttls: bool = True) -> None:
        self.helo_name = helo_name
        self.resolver = resolver
        self.timeouts = timeouts
        self.starttls = starttls
        self.smtp: aiosmtplib.SMTP | None = None
        self.hop: NextHop | None = None
        self.messages = 0

    @property
    def usable(self) -> bool:
        return self.smtp is not None and self.smtp.is_connected

    async def open(self, hops: Sequence[NextHop]) -> None:
        """Connect to the first next hop that greets us; raise DeliveryError if none does."""
        failures: list[str] = []
        for hop in hops:
            if _is_ip(hop.host) or self.resolver is None:
                addresses: Sequence[str] = [hop.host]
            else:
                try:
                    addresses = await self.resolver.addresses(hop.host)
                except DeliveryError as exc:  # DNS errors are RoutingErrors; record and try the next hop
                    failures.append(f"{hop}: {exc}")
                    continue
                except Exception as exc:
                    failures.append(f"{hop}: {exc}")
                    continue
            for address in addresses:
                try:
                    await self._connect(hop, address, tls=self.starttls)
                    return
                except GreetingRefused:
                    raise
                except _TlsFailed:
                    try:
                        await self._connect(hop, address, tls=False)
                        return
                    except GreetingRefused:
                        raise
                    except (OSError, aiosmtplib.SMTPException, TimeoutError) as exc:
                        failures.append(f"{hop} ({address}): {exc}")
                except (OSError, aiosmtplib.SMTPException, TimeoutError) as exc:
                    failures.append(f"{hop} ({address}): {exc}")
        raise DeliveryError("no next hop reachable: " + "; ".join(failures or ["no next hops"]))

    async def _connect(self, hop: NextHop, address: str, *, tls: bool) -> None:
        t = self.timeouts
        sock = await self._tcp(address, hop.port)
        smtp = aiosmtplib.SMTP(sock=sock, local_hostname=self.helo_name, timeout=t.helo, start_tls=False)
        try:
            await smtp.connect(timeout=t.greeting)
        except aiosmtplib.SMTPConnectResponseError as exc:
            smtp.close()
            raise GreetingRefused(hop, SmtpReply.parse(exc.code, exc.message)) from exc
        except SMTPTimeoutError:
            smtp.close()
            sock.close()
            raise TimeoutError(f"no greeting within {t.greeting:g} s") from None
        except BaseException:
            smtp.close()
            sock.close()
            raise
        try:
            await _hello(smtp, timeout=t.helo)
            if tls and smtp.supports_extension("starttls"):
                try:
                    await smtp.starttls(tls_context=_insecure_tls_context(), server_hostname=hop.host,
                                        timeout=t.helo)
                except (ssl.SSLError, OSError, aiosmtplib.SMTPException) as exc:
                    smtp.close()
                    raise _TlsFailed(str(exc)) from exc
                # RFC 3207 §4.2: both sides forget what they knew; the server wants EHLO again (aiosmtplib
                # forgets the extensions but sends nothing, and MAIL then gets "503 send HELO first").
                await _hello(smtp, timeout=t.helo)
        except BaseException:
            smtp.close()
            raise
        self.smtp = smtp
        self.hop = hop
        self.messages = 0

    async def _tcp(self, address: str, port: int) -> socket.socket:
        """A TCP connection to ``address``, opened within ``timeouts.connect`` (aiosmtplib's own connect has
        one timeout for the connection and the greeting together)."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (address, port)),
                                   self.timeouts.connect)
        except TimeoutError:
            sock.close()
            raise TimeoutError(f"no TCP connection within {self.timeouts.connect:g} s") from None
        except BaseException:
            sock.close()
            raise
        return sock

    async def deliver(self, job: Job) -> DeliveryReport:
        """One MAIL/RCPT/DATA transaction. Never raises for remote replies; the session may end up unusable."""
        assert self.smtp is not None and self.hop is not None
        smtp = self.smtp
        remote = self.hop.host
        problem = unsendable(job.sender)
        if problem is not None:
            refused = SmtpReply(553, "5.1.7", f"the sender address cannot be sent to any next hop: {problem}")
            return DeliveryReport(dict.fromkeys(job.recipients, refused), "")
        replies: dict[str, SmtpReply] = {}
        for rcpt in job.recipients:
            problem = unsendable(rcpt)
            if problem is not None:
                replies[rcpt] = SmtpReply(553, "5.1.3",
                                          f"the recipient address cannot be sent to any next hop: {problem}")
        sendable = [rcpt for rcpt in job.recipients if rcpt not in replies]
        if not sendable:
            return DeliveryReport(replies, "")
        self.messages += 1
        t = self.timeouts
        stage = "MAIL"
        accepted: list[str] = []
        try:
            mail_args = [b"FROM:<" + job.sender.encode("utf-8", "surrogateescape") + b">"]
            if smtp.supports_extension("8bitmime") and not job.body.isascii():
                mail_args.append(b"BODY=8BITMIME")
            if smtp.supports_extension("smtputf8") and not (job.sender + "".join(job.recipients)).isascii():
                mail_args.append(b"SMTPUTF8")
            response = await smtp.execute_command(b"MAIL", *mail_args, timeout=t.mail)
            if response.code != 250:
                reply = SmtpReply.parse(response.code, response.message)
                await self._reset()
                return DeliveryReport({r: replies.get(r, reply) for r in job.recipients}, remote)
            stage = "RCPT"
            for rcpt in sendable:
                response = await smtp.execute_command(b"RCPT", b"TO:<" + rcpt.encode("utf-8", "surrogateescape") + b">",
                                                      timeout=t.rcpt)
                replies[rcpt] = SmtpReply.parse(response.code, response.message)
                if 200 <= response.code < 300:
                    accepted.append(rcpt)
                elif response.code == 421:
                    break
            for rcpt in job.recipients:
                replies.setdefault(rcpt, LOST_CONNECTION)
            if not accepted:
                await self._reset()
                return DeliveryReport(replies, remote)
            stage = "DATA"
            response = await smtp.execute_command(b"DATA", timeout=t.data_init)
            if response.code == 354:
                stage = "end of DATA"
                protocol = smtp.protocol
                assert protocol is not None
                # No await between the write and the read: the reply cannot arrive unexpected.
                protocol.write(data_on_the_wire(job.body, crlf=job.crlf))
                protocol.write(END_OF_DATA)
                response = await protocol.read_response(timeout=t.data_done)
            final = SmtpReply.parse(response.code, response.message)
            if response.code == 421:
                self.close()
            elif (stage == "DATA" and 200 <= response.code < 300) or (stage != "DATA" and response.code == 354):
                # A 2xx to DATA itself (no body sent yet) or a 354 to the final dot: a broken next hop. The
                # message is not delivered by such an answer; the session is not trusted further.
                self.close()
                final = SmtpReply(451, "4.4.2", f"the next hop answered {stage} with {response.code}")
            elif not 200 <= response.code < 300 and stage == "DATA":
                await self._reset()
            for rcpt in accepted:
                replies[rcpt] = final
            return DeliveryReport(replies, remote)
        except SMTPTimeoutError:
            self.close()
            late = timed_out(stage)
            return DeliveryReport({r: late if r in accepted or r not in replies else replies[r]
                                   for r in job.recipients}, remote)
        except (SMTPServerDisconnected, OSError):
            self.close()
            # A recipient already refused keeps its reply; the others are retried.
            return DeliveryReport(
                {r: replies[r] if r in replies and replies[r].code >= 500 else LOST_CONNECTION
                 for r in job.recipients}, remote)

    async def _reset(self) -> None:
        if self.usable:
            try:
                assert self.smtp is not None
                await self.smtp.rset(timeout=self.timeouts.rset)
            except (aiosmtplib.SMTPException, OSError):
                self.close()

    async def quit(self) -> None:
        if self.usable:
            assert self.smtp is not None
            try:
                await self.smtp.quit(timeout=self.timeouts.quit)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                pass
        self.close()

    def close(self) -> None:
        if self.smtp is not None:
            self.smtp.close()
        self.smtp = None


class _TlsFailed(Exception):
    pass
