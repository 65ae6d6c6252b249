"""What a throttling mailbox provider answers, and at which stage: the profile table of ``mxgate sim``.

Each :class:`Profile` holds two reply templates (too many connections, too many messages) and the stage at
which the provider sends each, taken from delivery logs that name the command the reply answered
(Postfix's ``(in reply to MAIL FROM command)``). Where no public log shows the stage, the profile uses the
generic behaviour and says so in ``evidence``. The reply texts are those of ``shared/reference.md`` §1;
``{ip}`` in a template is replaced by the client's IP address.

Pure data and string work: no I/O, importable from anywhere.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "CONNECTION_STAGES",
    "PROFILES",
    "RATE_STAGES",
    "SHUTDOWN_REPLY",
    "TEMP_FAIL_REPLY",
    "Profile",
    "Stage",
    "check_reply",
    "render_reply",
]


class Stage(enum.StrEnum):
    """The point of an SMTP session at which a limit is enforced."""

    CONNECT = "connect"
    """The greeting: the 220 banner is replaced by the reply and the connection is closed."""
    MAIL = "mail"
    """The reply to MAIL FROM."""
    RCPT = "rcpt"
    """The reply to each RCPT TO."""
    DATA = "data"
    """The final reply after the message data (``<CRLF>.<CRLF>``)."""


CONNECTION_STAGES: tuple[Stage, ...] = (Stage.CONNECT, Stage.MAIL, Stage.RCPT)
"""Where a connection over the limit can be refused."""
RATE_STAGES: tuple[Stage, ...] = (Stage.MAIL, Stage.RCPT, Stage.DATA)
"""Where a message over the rate can be deferred (and where the rate counts it)."""

TEMP_FAIL_REPLY = "451 4.3.0 Temporary failure"
"""The reply of a random temporary failure (``--temp-fail-rate``)."""
SHUTDOWN_REPLY = "421 4.3.2 Service shutting down"
"""Sent to every connection still open when the simulator stops (RFC 5321 §3.8)."""


@dataclass(frozen=True, slots=True)
class Profile:
    """One provider's throttling replies and the stages it sends them at."""

    name: str
    """The ``--profile`` name."""
    connection_reply: str
    """Reply to a connection over ``--max-connections``; ``{ip}`` becomes the client's IP."""
    rate_reply: str
    """Reply to a message over ``--rate``; ``{ip}`` becomes the client's IP."""
    connection_stage: Stage
    """Default ``--connection-stage``."""
    rate_stage: Stage
    """Default ``--rate-stage``."""
    evidence: str
    """Where the stage defaults come from (shown in ``docs/simulator.md``)."""


# Microsoft: 4.7.652 observed "(in reply to MAIL FROM command)" (postfix-users, Aug 2020, hotmail-com.olc
# .protection.outlook.com); 4.7.651, the same reputation rate limit as 4.7.650, observed "(in reply to RCPT TO
# command)" once per recipient (Mailu/Mailu#3013, Oct 2023). Both are 451: the connection stays open.
_OUTLOOK = Profile(
    name="outlook",
    connection_reply="451 4.7.652 The mail server [{ip}] has exceeded the maximum number of connections.",
    rate_reply="451 4.7.650 The mail server [{ip}] has been temporarily rate limited due to IP reputation.",
    connection_stage=Stage.MAIL,
    rate_stage=Stage.RCPT,
    evidence="4.7.652 seen in reply to MAIL FROM (postfix-users, 2020); 4.7.651 (same limit as 4.7.650) "
    "in reply to each RCPT TO (Mailu/Mailu#3013, 2023)",
)

# Yahoo/AOL: TSS04 observed "(in reply to MAIL FROM command)" followed by "lost connection ... while sending
# RCPT TO" (Mailu/Mailu#1458) and by Exim as "after pipelined MAIL FROM" (cPanel KB): 421 at MAIL, then close.
_YAHOO_REPLY = (
    "421 4.7.0 [TSS04] Messages from {ip} temporarily deferred due to unexpected volume or user complaints"
)
_YAHOO = Profile(
    name="yahoo",
    connection_reply=_YAHOO_REPLY,
    rate_reply=_YAHOO_REPLY,
    connection_stage=Stage.MAIL,
    rate_stage=Stage.MAIL,
    evidence="TSS04 seen in reply to MAIL FROM, then the connection closed (Mailu/Mailu#1458; Exim log "
    "'after pipelined MAIL FROM', cPanel KB)",
)

# Gmail: 4.7.28 observed "(in reply to end of DATA command)" (mail-in-a-box/mailinabox#1771 and others).
# Gmail publishes no concurrent-connection reply; the connection stage is the generic one (greeting).
_GMAIL_REPLY = (
    "421 4.7.28 [{ip}] Our system has detected an unusual rate of unsolicited mail originating from your "
    "IP address."
)
_GMAIL = Profile(
    name="gmail",
    connection_reply=_GMAIL_REPLY,
    rate_reply=_GMAIL_REPLY,
    connection_stage=Stage.CONNECT,
    rate_stage=Stage.DATA,
    evidence="4.7.28 seen in reply to end of DATA (mail-in-a-box/mailinabox#1771); no public "
    "connection-limit reply, so connections use the generic greeting stage",
)

# Postfix (smtpd_client_connection_count_limit, via anvil) and Exim (smtp_accept_max_per_host) refuse an
# extra connection in the greeting with a 421.
_GENERIC = Profile(
    name="generic",
    connection_reply="421 4.4.5 Too many connections from your host.",
    rate_reply="451 4.7.1 Rate limit exceeded, try again later",
    connection_stage=Stage.CONNECT,
    rate_stage=Stage.DATA,
    evidence="Postfix and Exim refuse connections over a per-client limit with 421 in the greeting; "
    "rate at end of DATA",
)

PROFILES: Mapping[str, Profile] = MappingProxyType({p.name: p for p in (_OUTLOOK, _YAHOO, _GMAIL, _GENERIC)})
"""All profiles by name."""

# A reply line the simulator may send: a 4xx or 5xx code, a space, text, and no line break (a CR or LF in
# a reply would let a template inject further SMTP lines).
_REPLY = re.compile(r"[45]\d\d [^\r\n]+")


def check_reply(template: str) -> str:
    """Return ``template`` if it is a single-line 4xx/5xx reply, else raise ValueError."""
    if not _REPLY.fullmatch(template):
        raise ValueError(f"{template!r}: a reply must be one line: a 4xx or 5xx code, a space, text")
    return template


def render_reply(template: str, ip: str) -> str:
    """The reply for a client: ``{ip}`` replaced by its address (other braces stay as they are)."""
    return template.replace("{ip}", ip)
