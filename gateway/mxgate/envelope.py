"""What an envelope address (a MAIL FROM or RCPT TO path) must be for every hop after ingress to carry it.

Ingress refuses at MAIL and RCPT what delivery could never send, so such mail never gets a ``250`` and
never sits in the spool as a job no attempt can finish:

* **Control characters** (C0, including NUL, and DEL) end or split an SMTP command line; aiosmtplib
  refuses to write a command that holds one (``ValueError``), and the DSN builder refuses them in an
  address.
* **Octets that are not UTF-8** (aiosmtpd hands them over as surrogate escapes): the spool cannot store
  them as text, and neither RFC 5321 (ASCII) nor RFC 6531 (UTF-8) can name such a mailbox.
* **Unicode line separators** (U+0085, U+2028, U+2029) in a quoted local part: aiosmtplib sends them, but
  no header field can carry them (the email package raises), so a notification to such a sender could
  never be written.
* **The size limits of RFC 5321 §4.5.3.1**: a local part of at most 64 octets, a domain of at most 255,
  a path of at most 256 *including* its angle brackets. A next hop may refuse anything longer, and the
  delivery status notification to such a sender could not be written (``egress.dsn`` caps an address
  at 256 octets).

Delivery checks the same control characters again before it sends (``unsendable``): a job spooled by an
older gateway must end in a permanent failure, not in an exception. Address *syntax* (dot-atoms, domain
labels) is ingress's business alone (``ingress.handler.recipient_domain``).
"""

from __future__ import annotations

import re

__all__ = ["MAX_DOMAIN_OCTETS", "MAX_LOCAL_PART_OCTETS", "MAX_PATH_OCTETS", "path_problem", "unsendable"]

MAX_LOCAL_PART_OCTETS = 64
"""RFC 5321 §4.5.3.1.1: the longest local part (the part before the last "@")."""
MAX_DOMAIN_OCTETS = 255
"""RFC 5321 §4.5.3.1.2: the longest domain."""
MAX_PATH_OCTETS = 256
"""RFC 5321 §4.5.3.1.3: the longest reverse-path or forward-path, "including the punctuation and element
separators": ``<`` + address + ``>``, so an address of at most 254 octets."""

# The characters aiosmtplib refuses in a command argument (its COMMAND_INJECTION_REGEX): C0 and DEL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The other characters str.splitlines() breaks at (the C0 ones are in _CONTROL): the email package refuses
# a header value that holds one.
_LINE_SEPARATOR = re.compile("[\x85\u2028\u2029]")


def unsendable(address: str) -> str | None:
    """Why ``address`` can never be written on an SMTP command line, or None if it can."""
    if _CONTROL.search(address):
        return "control characters are not allowed"
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes: octets that were never UTF-8
        return "not valid UTF-8"
    return None


def path_problem(address: str) -> str | None:
    """Why ``address`` (without angle brackets) must be refused at MAIL or RCPT, or None.

    The reason is a short English phrase naming the limit, for the text of the ``501`` reply.
    """
    problem = unsendable(address)
    if problem is not None:
        return problem
    if _LINE_SEPARATOR.search(address):
        return "line separators (U+0085, U+2028, U+2029) are not allowed"
    local, at, domain = address.rpartition("@")
    if at and len(local.encode("utf-8")) > MAX_LOCAL_PART_OCTETS:
        return f"local part longer than {MAX_LOCAL_PART_OCTETS} octets (RFC 5321 section 4.5.3.1.1)"
    if at and len(domain.encode("utf-8")) > MAX_DOMAIN_OCTETS:
        return f"domain longer than {MAX_DOMAIN_OCTETS} octets (RFC 5321 section 4.5.3.1.2)"
    if len(address.encode("utf-8")) + 2 > MAX_PATH_OCTETS:
        return f"path longer than {MAX_PATH_OCTETS} octets (RFC 5321 section 4.5.3.1.3)"
    return None
