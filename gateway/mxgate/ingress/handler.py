"""The SMTP transaction hooks: who may relay, what is accepted, and the durable hand-off to the spool.

Relay is allowed only to authenticated clients and to clients inside ``allowed_networks``; everyone
else gets ``530 5.7.0`` (when AUTH is on offer) or ``554 5.7.1``. A message is answered
``250 2.0.0 Ok: queued as <ID>`` only after every one of its jobs (one per recipient domain) is stored
in Redis; if Redis is unreachable the answer is ``451 4.3.0`` and the client keeps the message.

A path delivery could never send (control characters, octets that are not UTF-8, longer than RFC 5321
allows: ``mxgate.envelope``) is refused at MAIL (``501 5.1.7``) or RCPT (``501 5.1.3``) with the reason,
before the address syntax is looked at.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate

from aiosmtpd.smtp import SMTP, Envelope, Session

from mxgate.envelope import path_problem
from mxgate.errors import SpoolError
from mxgate.routing.router import Router
from mxgate.smtpwire import has_bare_line_ending
from mxgate.spool.store import NewJob, Spool, new_queue_id
from mxgate.telemetry.logs import queue_id_var
from mxgate.telemetry.metrics import Metrics

log = logging.getLogger("mxgate.ingress")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Deliberately strict: the local part may be quoted or dot-atom (UTF-8 allowed for SMTPUTF8); the
# domain is a host name (or an address literal, which a relay never needs and refuses).
_LOCAL = r'(?:"(?:[^"\\\r\n]|\\.)*"|[^\s@<>()\[\]\\,;:"]+)'
_ADDRESS_RE = re.compile(rf"^{_LOCAL}@(?P<domain>[^\s@<>()\[\]\\,;:\"]+)$")
# A label: letters and digits of any script with inner hyphens (RFC 5321 Let-dig / Ldh-str); no underscore.
_LABEL = r"[^\W_](?:(?:[^\W_]|-){0,61}[^\W_])?"
_DOMAIN_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})+$", re.UNICODE)


@dataclass(frozen=True, slots=True, kw_only=True)
class IngressPolicy:
    hostname: str
    allowed_networks: Sequence[IPNetwork] = ()
    max_recipients: int = 1000
    max_message_size: int = 25 * 1024 * 1024
    auth_offered: bool = False


def recipient_domain(address: str) -> str | None:
    match = _ADDRESS_RE.fullmatch(address)  # not match(): "$" also matches before a trailing newline
    if not match:
        return None
    domain = match.group("domain").rstrip(".").lower()
    return domain if _DOMAIN_RE.fullmatch(domain) else None


# No slots=True here: aiosmtpd runs inspect.getmembers() on the handler for every connection, and on
# Debian 12's CPython 3.11.2 that raises TypeError on a slots dataclass (the slotted class keeps the
# original class's __weakref__ descriptor; a CPython bug fixed in later 3.11 releases).
# tests/unit/test_handler_introspection.py holds the rule; CI also runs on Debian's own python3.
@dataclass
class IngressHandler:
    policy: IngressPolicy
    spool: Spool
    router: Router
    metrics: Metrics
    accepting: bool = True

    def may_relay(self, session: Session) -> bool:
        if session.authenticated:
            return True
        peer = session.peer
        host = peer[0] if isinstance(peer, tuple) else None
        if host is None:
            return False
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.policy.allowed_networks)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        # aiosmtpd already lists SIZE, 8BITMIME, STARTTLS and AUTH; we also pipeline and speak enhanced codes.
        # Without a credentials file aiosmtpd still lists AUTH (after STARTTLS) and then fails every login:
        # don't offer it, so clients relay by network instead of failing on AUTH.
        extensions = [line for line in responses[:-1]
                      if self.policy.auth_offered or not line.startswith("250-AUTH")]
        return [*extensions, "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        if not self.accepting:
            return "421 4.3.2 Service shutting down, try another server"
        if not self.may_relay(session):
            self.metrics.rejected("relay_denied")
            if self.policy.auth_offered:
                return "530 5.7.0 Authentication required"
            return "554 5.7.1 Relay access denied: client not in allowed networks"
        # The null reverse-path (bounces) arrives as "<>" and stays so in the envelope: aiosmtpd answers RCPT
        # with "503 need MAIL" while mail_from is falsy. It becomes "" in the spooled job (handle_DATA).
        if address != "<>":
            problem = path_problem(address)
            if problem is not None:
                return f"501 5.1.7 Bad sender address: {problem}"
            if recipient_domain(address) is None:
                return "501 5.1.7 Bad sender address syntax"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.policy.max_recipients:
            return "452 4.5.3 Error: too many recipients"
        problem = path_problem(address)
        if problem is not None:
            return f"501 5.1.3 Bad recipient address: {problem}"
        if recipient_domain(address) is None:
            return "501 5.1.3 Bad recipient address syntax"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        bare = getattr(server, "data_has_bare_line_ending", None)   # IngressSMTP found it already
        if bare is None:
            bare = has_bare_line_ending(data)
        if bare:
            self.metrics.rejected("bare_line_ending")
            log.warning("message refused: bare CR or LF in data (SMTP smuggling protection)",
                        extra={"peer": str(session.peer)})
            return "554 5.5.2 Message refused: bare <CR> or <LF> in message data (only <CR><LF> ends a line)"
        if len(data) > self.policy.max_message_size:
            return "552 5.3.4 Message size exceeds fixed maximum message size"
        queue_id = new_queue_id()
        token = queue_id_var.set(queue_id)
        try:
            body = self._received_header(server, session, envelope, queue_id) + data
            by_domain: dict[str, list[str]] = {}
            for rcpt in envelope.rcpt_tos:
                domain = recipient_domain(rcpt)
                assert domain is not None  # checked at RCPT
                by_domain.setdefault(domain, []).append(rcpt)
            jobs = []
            for index, (domain, rcpts) in enumerate(by_domain.items()):
                provider = await self.router.provider_for(domain)
                jobs.append(NewJob(provider=provider, job_id=f"{queue_id}.{index}", queue_id=queue_id,
                                   sender=_reverse_path(envelope), recipients=rcpts, domain=domain,
                                   body=body, crlf=True))   # bare line ends were refused above
            try:
                await self.spool.enqueue(jobs)
            except SpoolError as exc:
                self.metrics.spool_error()
                log.error("message not queued: %s", exc)
                return "451 4.3.0 Temporary failure storing the message, try again later"
            self.metrics.received()
            log.info("queued", extra={"from": envelope.mail_from, "rcpts": len(envelope.rcpt_tos),
                                      "size": len(body), "jobs": len(jobs), "peer": str(session.peer)})
            return f"250 2.0.0 Ok: queued as {queue_id}"
        finally:
            queue_id_var.reset(token)

    def _received_header(self, server: SMTP, session: Session, envelope: Envelope, queue_id: str) -> bytes:
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if session.ssl is not None or getattr(server, "_tls_protocol", None) is not None:
            protocol += "S"
        if session.authenticated:
            protocol += "A"
        helo = _header_safe(session.host_name or "unknown")
        rcpt = f"\r\n\tfor <{envelope.rcpt_tos[0]}>" if len(envelope.rcpt_tos) == 1 else ""
        header = (f"Received: from {helo} ([{peer}])\r\n\tby {self.policy.hostname} (mxgate) with {protocol} "
                  f"id {queue_id}{rcpt};\r\n\t{formatdate(time.time())}\r\n")
        return header.encode("utf-8", "surrogateescape")


def _reverse_path(envelope: Envelope) -> str:
    sender = envelope.mail_from
    return "" if sender is None or sender == "<>" else sender


def _header_safe(text: str) -> str:
    return re.sub(r"[^\x21-\x7e]", "?", text)[:255]

