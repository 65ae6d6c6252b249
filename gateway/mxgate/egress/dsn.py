"""Delivery status notifications: the bounce (or delay warning) mxgate sends back to a message's sender.

The result is one complete RFC 5322 message as bytes with CRLF line endings, ready for the spool:

    multipart/report; report-type=delivery-status              RFC 6522
     ├── text/plain                 for the human: each recipient and why
     ├── message/delivery-status    for software: RFC 3464 per-message and per-recipient fields
     └── text/rfc822-headers        the original message's header section, never its body

Trade-offs and limits:

* **Header section only.** Returning the body would make mxgate a reflector: anyone who forges a sender
  could have us deliver arbitrary content to it (backscatter). The headers identify the message; they are
  cut at :data:`MAX_ORIGINAL_HEADERS_OCTETS`, at a field boundary, so a hostile header block cannot make
  the DSN large either. Header bytes that are not 7-bit ASCII are sent quoted-printable (RFC 6522 allows it
  for broken headers), so the DSN body is always 7-bit and needs neither 8BITMIME nor SMTPUTF8.
* **Line length.** RFC 5322 §2.1.1: lines MUST stay within 998 octets and SHOULD within 78. Fields are folded
  at spaces to 78 columns here rather than by :mod:`email`, whose folder turns any word longer than a line
  into RFC 2047 encoded-words, which a Diagnostic-Code must never contain. A word that cannot be folded
  still fits: diagnostics are cut to :data:`MAX_DIAGNOSTIC_CHARS` and addresses are limited to
  :data:`MAX_ADDRESS_OCTETS`.
* **Internationalised addresses.** A non-ASCII recipient is written ``utf-8; <addr>`` in the
  utf-8-addr-xtext form of RFC 6533 §3 (``\\x{HEX}`` escapes), which keeps message/delivery-status 7-bit,
  and as plain UTF-8 in the quoted-printable human part. Only a non-ASCII *sender* makes the message itself
  SMTPUTF8 (RFC 6532 raw UTF-8 in ``To:``); :func:`needs_smtputf8` tells the adapter that sends it.
* **Pure and reproducible.** Times are parameters; the Message-ID and the MIME boundary are derived from
  the queue id and ``now`` instead of the random ones :mod:`email` would make, so the same inputs give the
  same bytes and a retried bounce keeps its Message-ID.
* **Never bounce a bounce** (RFC 5321 §4.5.5): callers check :func:`should_notify`; :func:`build_dsn`
  refuses the null sender.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage, Message, MIMEPart
from email.policy import SMTP, SMTPUTF8, Policy, compat32
from email.utils import format_datetime
from typing import Any

__all__ = [
    "MAX_ADDRESS_OCTETS",
    "MAX_DIAGNOSTIC_CHARS",
    "MAX_ORIGINAL_HEADERS_OCTETS",
    "RecipientFailure",
    "build_dsn",
    "needs_smtputf8",
    "should_notify",
]

MAX_LINE_OCTETS = 998
"""RFC 5322 §2.1.1: the hard limit on a line, excluding CRLF."""
_FOLD_WIDTH = 78
"""RFC 5322 §2.1.1: the recommended limit, used for folding and for wrapping the human-readable text."""
MAX_DIAGNOSTIC_CHARS = 900
"""A diagnostic is cut to this many characters so that even one unbreakable word plus
``Diagnostic-Code: smtp; `` stays within 998 octets."""
MAX_ADDRESS_OCTETS = 256
"""RFC 5321 §4.5.3.1.3: the longest path. Its utf-8-addr-xtext form is checked separately: escaping turns
one octet ("+") into up to six characters, so a pathological address can still outgrow a line."""
MAX_ORIGINAL_HEADERS_OCTETS = 64 * 1024
"""Bounds the returned header section: enough for any honest message (Postfix's header_size_limit is 100 KiB
for the whole header), small enough that a bounce never carries bulk."""

_ACTIONS = frozenset({"failed", "delayed"})
_STATUS = re.compile(r"([245])\.\d{1,3}\.\d{1,3}")
# A host as an MTA names it: a DNS name, or an address literal such as [192.0.2.1] or [IPv6:2001:db8::1].
_HOST = re.compile(r"[A-Za-z0-9._:\[\]-]{1,255}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Characters a utf-8-addr-xtext may carry as themselves (RFC 6533 §3 QCHAR): printable ASCII except
# "+", "=" and "\", which, like every non-ASCII character, are written as \x{HEX}.
_QCHAR = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"+", "=", "\\"}
# RFC 5322 §3.6.8: field-name = 1*ftext (printable ASCII except ":"); obsolete syntax allows WSP before ":".
_HEADER_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipientFailure:
    """One recipient the notification reports on."""

    recipient: str
    """The envelope recipient (RCPT TO address, without angle brackets)."""
    status: str
    """RFC 3463 status, e.g. ``"5.1.1"``; a 4.x.x status with action "failed" means a temporary error
    outlived the queue lifetime (e.g. ``"4.4.7"``)."""
    action: str = "failed"
    """``"failed"`` (given up) or ``"delayed"`` (still being retried)."""
    remote_mta: str | None
    """Host name (or address literal) of the next hop that answered, or None if none did."""
    diagnostic: str | None
    """The remote reply, e.g. ``"550 5.1.1 User unknown"``; written as ``Diagnostic-Code: smtp; <reply>``."""
    last_attempt: datetime | None = None
    """When this recipient was last tried; None means ``now`` of the notification."""

    def __post_init__(self) -> None:
        _check_address("recipient", self.recipient)
        if self.action not in _ACTIONS:
            raise ValueError(f"action must be 'failed' or 'delayed', got {self.action!r}")
        status = _STATUS.fullmatch(self.status)
        if status is None:
            raise ValueError(f"status must be an RFC 3463 code such as '5.1.1', got {self.status!r}")
        allowed = "45" if self.action == "failed" else "4"
        if status.group(1) not in allowed:
            raise ValueError(f"status {self.status!r} does not fit action {self.action!r}")
        # Final-Recipient is one unbreakable word: it must fit a line with its field name.
        if len(_typed_address(self.recipient)) > MAX_LINE_OCTETS - len("Final-Recipient: "):
            raise ValueError(f"recipient is too long to report once escaped (RFC 6533): {self.recipient!r}")
        if self.remote_mta is not None:
            _check_host("remote_mta", self.remote_mta)
        if self.last_attempt is not None:
            _check_aware("last_attempt", self.last_attempt)


def should_notify(sender: str) -> bool:
    """False for the null reverse-path (``""`` or ``"<>"``): never bounce a bounce (RFC 5321 §4.5.5)."""
    return sender.strip() not in ("", "<>")


def needs_smtputf8(sender: str) -> bool:
    """True if the DSN to ``sender`` has raw UTF-8 in its header and must be sent with SMTPUTF8."""
    return not _bare(sender).isascii()


def build_dsn(
    *,
    reporting_mta: str,
    sender: str,
    queue_id: str,
    arrival: datetime,
    now: datetime,
    failures: Sequence[RecipientFailure],
    original: bytes,
    original_envelope_id: str | None = None,
    message_id_domain: str | None = None,
    will_retry_until: datetime | None = None,
) -> bytes:
    """Build the notification for the recipients in ``failures`` of the message ``original``.

    ``reporting_mta`` is this gateway's host name; ``arrival`` when the message was accepted; ``now`` the
    notification's date. ``will_retry_until`` (when the queue lifetime ends) is reported for "delayed"
    recipients. All datetimes must be timezone-aware. Raises ValueError for the null sender, for no
    failures, or for a field that could not be written safely (control characters, over-long values).
    """
    sender = _bare(sender)
    if not sender:
        raise ValueError("the null sender gets no notification: never bounce a bounce (RFC 5321 §4.5.5)")
    _check_address("sender", sender)
    _check_host("reporting_mta", reporting_mta)
    if message_id_domain is not None:
        _check_host("message_id_domain", message_id_domain)
    if re.fullmatch(r"[\x21-\x7e]{1,128}", queue_id) is None:
        raise ValueError(f"queue_id must be 1-128 printable ASCII characters, got {queue_id!r}")
    # RFC 3461 §4.4: an ENVID is at most 100 characters.
    if original_envelope_id is not None and re.fullmatch(r"[\x20-\x7e]{1,100}", original_envelope_id) is None:
        raise ValueError(
            f"original_envelope_id must be 1-100 printable ASCII characters, got {original_envelope_id!r}"
        )
    for name, moment in (("arrival", arrival), ("now", now), ("will_retry_until", will_retry_until)):
        if moment is not None:
            _check_aware(name, moment)
    if not failures:
        raise ValueError("a delivery status notification needs at least one recipient")

    bounced = any(failure.action == "failed" for failure in failures)
    base_policy = SMTPUTF8 if needs_smtputf8(sender) else SMTP
    # Generated at 998 so the email package never refolds (and RFC 2047-encodes) the fields folded here.
    output_policy = base_policy.clone(max_line_length=MAX_LINE_OCTETS)

    parts: list[MIMEPart] = [
        _text_part(
            _human_text(
                reporting_mta=reporting_mta,
                queue_id=queue_id,
                arrival=arrival,
                failures=failures,
                bounced=bounced,
                will_retry_until=will_retry_until,
            ),
            subtype="plain",
            policy=base_policy,
        ),
        _status_part(
            reporting_mta=reporting_mta,
            queue_id=queue_id,
            arrival=arrival,
            now=now,
            failures=failures,
            original_envelope_id=original_envelope_id,
            will_retry_until=will_retry_until,
            policy=base_policy,
        ),
    ]
    header_section = _header_section(original)
    if header_section:
        parts.append(_headers_part(header_section, policy=base_policy))

    token = re.sub(r"[^A-Za-z0-9_-]", "-", queue_id)
    stamp = now.strftime("%Y%m%d%H%M%S")
    message = EmailMessage(policy=base_policy)
    message["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    message["To"] = sender
    message["Subject"] = (
        "Undelivered Mail Returned to Sender" if bounced else "Delayed Mail (still being retried)"
    )
    message["Date"] = format_datetime(now)
    kind = "bounce" if bounced else "delay"
    message["Message-ID"] = f"<{stamp}.{token}.{kind}@{message_id_domain or reporting_mta}>"
    message["Auto-Submitted"] = "auto-replied"  # RFC 3834: autoresponders must not answer this
    message["MIME-Version"] = "1.0"
    boundary = _boundary(f"=_mxgate-dsn-{token}-{stamp}", parts, output_policy)
    message["Content-Type"] = f'multipart/report; report-type=delivery-status; boundary="{boundary}"'
    payload: list[Message | str] = [*parts]
    message.set_payload(payload)
    return message.as_bytes(policy=output_policy)


# --- parts ----------------------------------------------------------------------------------------------


def _human_text(
    *,
    reporting_mta: str,
    queue_id: str,
    arrival: datetime,
    failures: Sequence[RecipientFailure],
    bounced: bool,
    will_retry_until: datetime | None,
) -> str:
    if bounced:
        lead = (
            f"This is the mail system at {reporting_mta}. Your message could not be delivered to one or "
            "more recipients and has been given up on. The headers of your message are attached; its "
            "body is not."
        )
    else:
        until = f" until {format_datetime(will_retry_until)}" if will_retry_until is not None else ""
        lead = (
            f"This is the mail system at {reporting_mta}. Your message has not yet been delivered to one "
            f"or more recipients. It will be retried{until}; you do not need to send it again."
        )
    lines = [*_wrap(lead), "", f"Queue ID: {queue_id}", f"Arrived: {format_datetime(arrival)}", ""]
    for failure in failures:
        state = "delivery failed" if failure.action == "failed" else "delivery delayed"
        lines.append(f"<{failure.recipient}>: {state} (status {failure.status})")
        if failure.remote_mta is not None:
            lines.append(f"    Remote server: {failure.remote_mta}")
        if failure.diagnostic is not None:
            lines.extend(_wrap(f"Reason: {_diagnostic(failure.diagnostic)}", indent="    "))
        lines.append("")
    return "\n".join(lines)


def _status_part(
    *,
    reporting_mta: str,
    queue_id: str,
    arrival: datetime,
    now: datetime,
    failures: Sequence[RecipientFailure],
    original_envelope_id: str | None,
    will_retry_until: datetime | None,
    policy: Policy[Any],
) -> MIMEPart:
    """message/delivery-status: one per-message block, then one block per recipient (RFC 3464 §2)."""
    per_message: list[tuple[str, str]] = [
        ("Reporting-MTA", f"dns; {reporting_mta}"),
        ("X-Mxgate-Queue-ID", queue_id),
    ]
    if original_envelope_id is not None:
        per_message.append(("Original-Envelope-Id", original_envelope_id))
    per_message.append(("Arrival-Date", format_datetime(arrival)))
    blocks: list[Message | str] = [_field_block(per_message)]
    for failure in failures:
        fields: list[tuple[str, str]] = [
            ("Final-Recipient", _typed_address(failure.recipient)),
            ("Action", failure.action),
            ("Status", failure.status),
        ]
        if failure.remote_mta is not None:
            fields.append(("Remote-MTA", f"dns; {failure.remote_mta}"))
        if failure.diagnostic is not None:
            fields.append(("Diagnostic-Code", f"smtp; {_diagnostic(failure.diagnostic)}"))
        fields.append(("Last-Attempt-Date", format_datetime(failure.last_attempt or now)))
        if failure.action == "delayed" and will_retry_until is not None:
            fields.append(("Will-Retry-Until", format_datetime(will_retry_until)))
        blocks.append(_field_block(fields))
    part = MIMEPart(policy=policy)
    part["Content-Type"] = "message/delivery-status"
    # The email package writes a message/delivery-status payload as a list of header blocks.
    part.set_payload(blocks)
    return part


def _field_block(fields: Sequence[tuple[str, str]]) -> Message:
    # compat32 stores values as given, so the folding done here (CRLF + space) survives generation.
    block = Message(policy=compat32)
    for name, value in fields:
        block[name] = _fold(name, value)
    return block


def _headers_part(header_section: bytes, *, policy: Policy[Any]) -> MIMEPart:
    """text/rfc822-headers, 7-bit when the original allows it, quoted-printable otherwise (RFC 6522 §4)."""
    lines = header_section.splitlines()
    if header_section.isascii() and all(len(line) <= MAX_LINE_OCTETS for line in lines):
        return _text_part(header_section.decode("ascii"), subtype="rfc822-headers", policy=policy)
    part = MIMEPart(policy=policy)
    # Undecodable octets become U+FFFD: the part identifies the message, it need not reproduce it exactly.
    text = header_section.decode("utf-8", errors="replace")
    part.set_content(text, subtype="rfc822-headers", charset="utf-8", cte="quoted-printable")
    return part


def _text_part(text: str, *, subtype: str, policy: Policy[Any]) -> MIMEPart:
    part = MIMEPart(policy=policy)
    if text.isascii():
        part.set_content(text, subtype=subtype, charset="us-ascii", cte="7bit")
    else:
        # Quoted-printable, not 8bit: the DSN body then needs no 8BITMIME at the sender's server.
        part.set_content(text, subtype=subtype, charset="utf-8", cte="quoted-printable")
    return part


def _boundary(candidate: str, parts: Sequence[MIMEPart], policy: Policy[Any]) -> str:
    """The first of ``candidate``, ``candidate.1``, ... that occurs in no part (RFC 2046 §5.1.1)."""
    rendered = [part.as_bytes(policy=policy) for part in parts]
    boundary, attempt = candidate, 0
    while any(boundary.encode("ascii") in body for body in rendered):
        attempt += 1
        boundary = f"{candidate}.{attempt}"
    return boundary


# --- values ---------------------------------------------------------------------------------------------


def _header_section(original: bytes) -> bytes:
    """The original's header fields up to the first empty line (or first line that is not a header field),
    cut at a field boundary to at most MAX_ORIGINAL_HEADERS_OCTETS; CRLF line endings."""
    kept: list[bytes] = []
    size = 0
    field: list[bytes] = []
    for raw in original.split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line[:1] in (b" ", b"\t") and field:
            field.append(line)
            continue
        if field:
            field_size = sum(len(part) + 2 for part in field)
            if size + field_size > MAX_ORIGINAL_HEADERS_OCTETS:
                field = []
                break
            kept.extend(field)
            size += field_size
            field = []
        if _HEADER_FIELD.match(line) is None:
            break  # the empty line before the body, or something that is not a header: stop either way
        field = [line]
    if field and size + sum(len(part) + 2 for part in field) <= MAX_ORIGINAL_HEADERS_OCTETS:
        kept.extend(field)  # a message that ends inside its header section
    return b"".join(line + b"\r\n" for line in kept)


def _diagnostic(reply: str) -> str:
    """A remote reply as one ASCII line of at most MAX_DIAGNOSTIC_CHARS characters."""
    # aiosmtplib decodes replies with surrogateescape: recover the octets, then escape what is not ASCII.
    text = reply.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    text = re.sub(r"[\x00-\x20\x7f]+", " ", text).strip()
    if len(text) > MAX_DIAGNOSTIC_CHARS:
        text = text[: MAX_DIAGNOSTIC_CHARS - 3] + "..."
    return text


def _typed_address(address: str) -> str:
    """``rfc822; addr`` for ASCII; otherwise RFC 6533 ``utf-8; addr`` in its 7-bit utf-8-addr-xtext form."""
    if address.isascii():
        return f"rfc822; {address}"
    return "utf-8; " + "".join(c if c in _QCHAR else f"\\x{{{ord(c):02X}}}" for c in address)


def _fold(name: str, value: str) -> str:
    """Fold ``value`` at spaces (CRLF before the space) so lines stay within 78 columns where a space allows."""
    words = value.split(" ")
    out = [words[0]]
    column = len(name) + 2 + len(words[0])
    for word in words[1:]:
        if column + 1 + len(word) > _FOLD_WIDTH and word:
            out.append("\r\n " + word)
            column = 1 + len(word)
        else:
            out.append(" " + word)
            column += 1 + len(word)
    return "".join(out)


def _wrap(text: str, *, indent: str = "") -> list[str]:
    return textwrap.wrap(
        text,
        width=_FOLD_WIDTH - 2,
        initial_indent=indent,
        subsequent_indent=indent + "  " if indent else "",
        break_long_words=False,
        break_on_hyphens=False,
    )


def _bare(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


def _check_address(name: str, address: str) -> None:
    if not address or _CONTROL.search(address) or address != address.strip():
        raise ValueError(f"{name} must be a non-empty address without control characters, got {address!r}")
    try:
        octets = len(address.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: octets that were never UTF-8 (surrogateescape)
        raise ValueError(f"{name} is not valid UTF-8: {address!r}") from None
    if octets > MAX_ADDRESS_OCTETS:
        raise ValueError(f"{name} is longer than {MAX_ADDRESS_OCTETS} octets (RFC 5321 §4.5.3.1.3)")


def _check_host(name: str, host: str) -> None:
    if _HOST.fullmatch(host) is None:
        raise ValueError(f"{name} must be a host name or address literal in ASCII, got {host!r}")


def _check_aware(name: str, moment: datetime) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {moment!r}")
