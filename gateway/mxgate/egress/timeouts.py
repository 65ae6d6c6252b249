"""How long an outbound session waits at each SMTP stage: plain data, read from the policies by
``PolicyBook.timeouts`` and used by ``egress.session``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class StageTimeouts:
    """Seconds to wait at each stage of an outbound session (RFC 5321 §4.5.3.2; ``connect`` as Postfix's
    ``smtp_connect_timeout``). The policy's ``spec.timeouts`` (``PolicyBook.timeouts``) fills them in."""

    connect: float = 30.0
    greeting: float = 300.0
    helo: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_done: float = 600.0
    rset: float = 20.0      # Postfix's smtp_rset_timeout: a connection that cannot reset is not reused
    quit: float = 5.0       # nothing depends on the answer
