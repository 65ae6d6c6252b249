"""aiosmtpd's SMTP protocol, hardened for a relay that must not be smuggled through.

SMTP smuggling (CVE-2023-51764 and friends) hides a second message behind an end-of-data marker that
one server honours and the next does not: ``<LF>.<LF>``, ``<CR>.<CR>``, ``<LF>.<CR><LF>`` and other
bare line endings. Only ``<CR><LF>`` ends a line in SMTP (RFC 5321 §2.3.8), so mxgate refuses every
bare CR or LF, never reinterprets it:

- in a command line: ``500 5.5.2`` and the connection is closed (like Postfix's
  ``smtpd_forbid_bare_newline``), because the client and we no longer agree where commands end;
- in message data: aiosmtpd ends DATA only at ``<CR><LF>.<CR><LF>``, so the stream stays in sync; the
  handler then rejects the message with ``554 5.5.2`` (see ``IngressHandler.handle_DATA``).

AUTH: aiosmtpd calls its authenticator synchronously; password hashes are deliberately slow, so the
PLAIN and LOGIN mechanisms here collect the credentials through aiosmtpd and verify them asynchronously
(``Authenticator.verify`` runs in a worker thread).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from mxgate.ingress.auth import Authenticator


class BareLineEnding(Exception):
    """A command line ended in a bare LF, or held a bare CR."""


class StrictStreamReader(asyncio.StreamReader):
    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        line = await super().readuntil(separator)
        # Command lines are read with the default separator; DATA lines with b"\r\n" (checked later).
        if separator == b"\n" and (not line.endswith(b"\r\n") or b"\r" in line[:-2]):
            raise BareLineEnding()
        return line


_PENDING = object()


class IngressSMTP(SMTP):
    def __init__(self, handler: Any, *, authenticator: Authenticator | None, **kwargs: Any) -> None:
        super().__init__(handler, authenticator=self._collect if authenticator else None, **kwargs)
        self.mx_authenticator = authenticator
        # Make the reader aiosmtpd created refuse bare line endings. StrictStreamReader adds no state, so
        # re-classing the existing object is safe and keeps aiosmtpd's own wiring (limit, transport).
        reader = self._stream_reader
        assert reader is not None
        reader.__class__ = StrictStreamReader
        self._collected: LoginPassword | None = None
        self.smuggling_attempts = 0

    # -- bare line endings in commands ---------------------------------------------------------------

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, BareLineEnding):
            self.smuggling_attempts += 1
            transport = self.transport
            if transport is not None:
                # After the reply is written (push writes before its first await), close.
                self.loop.call_soon(transport.close)
            return "500 5.5.2 Error: bare <CR> or <LF> in command line (use <CR><LF>); closing connection"
        return await super().handle_exception(error)

    # -- asynchronous AUTH ---------------------------------------------------------------------------

    def _collect(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        self._collected = auth_data if isinstance(auth_data, LoginPassword) else None
        return AuthResult(success=False, handled=False)

    async def _verify_collected(self, result: AuthResult) -> AuthResult:
        collected, self._collected = self._collected, None
        if collected is None or self.mx_authenticator is None:
            return result
        login = collected.login.decode("utf-8", "surrogateescape")
        password = collected.password.decode("utf-8", "surrogateescape")
        if await self.mx_authenticator.verify(login, password):
            return AuthResult(success=True, auth_data=collected, message="235 2.7.0 Authentication successful")
        return AuthResult(success=False, handled=False, message="535 5.7.8 Authentication credentials invalid")

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verify_collected(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verify_collected(await super().auth_LOGIN(_, args))
