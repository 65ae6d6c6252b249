"""One exception tree for mxgate.

    MxgateError
     ├── ConfigError                 bad settings, flags or files; the CLI prints the message and exits 2
     │    └── PolicyError            a ProviderPolicy that fails validation (names the file and the field)
     ├── SpoolError                  Redis unreachable or a spool write failed: ingress answers 451 4.3.0
     ├── RoutingError                the next hop could not be determined
     │    ├── DnsTemporaryError      SERVFAIL, timeout: the job is deferred (4.4.3)
     │    └── DnsPermanentError      NXDOMAIN, null MX (RFC 7505): the job bounces (5.1.2 / 5.1.10)
     ├── DeliveryError               the remote side could not be reached or spoke nonsense (deferred)
     ├── LimiterUnavailable          (limits.fleet) Redis could not grant a lease or permit: send later
     └── CapReached                  (limits.fleet) the hour's or day's cap (a warm-up day) is used up:
                                     the mail stays queued until it resets

Errors that end up in an SMTP reply carry ``code`` and ``enhanced`` so the adapter that speaks SMTP never
has to guess. Library errors (redis, dnspython, aiosmtplib) are translated at the boundary and chained
with ``raise ... from exc``.
"""

from __future__ import annotations


class MxgateError(Exception):
    """Base of every error mxgate raises on purpose."""

    code: int = 451
    enhanced: str = "4.3.0"

    def smtp_reply(self) -> str:
        """The reply line an SMTP client sees for this error."""
        return f"{self.code} {self.enhanced} {self}"


class ConfigError(MxgateError):
    """Bad settings, command-line flags or files."""


class PolicyError(ConfigError):
    """A ProviderPolicy that fails validation; the message names the source and the field."""


class SpoolError(MxgateError):
    """The spool (Redis) could not durably store or update a message."""

    code = 451
    enhanced = "4.3.0"


class RoutingError(MxgateError):
    """The next hop for a domain could not be determined."""


class DnsTemporaryError(RoutingError):
    """A DNS lookup failed in a way that may succeed later (timeout, SERVFAIL)."""

    code = 451
    enhanced = "4.4.3"


class DnsPermanentError(RoutingError):
    """The domain cannot receive mail: it does not exist, or it publishes a null MX."""

    code = 550

    def __init__(self, message: str, *, enhanced: str = "5.1.2") -> None:
        super().__init__(message)
        self.enhanced = enhanced


class DeliveryError(MxgateError):
    """The next hop could not be reached, or broke the protocol."""

    code = 451
    enhanced = "4.4.1"
