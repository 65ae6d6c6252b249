"""aiosmtpd's SMTP protocol, hardened for a relay that must not be smuggled through.

SMTP smuggling (CVE-2023-51764 and friends) hides a second message behind an end-of-data marker that
one server honours and the next does not: ``<LF>.<LF>``, ``<CR>.<CR>``, ``<LF>.<CR><LF>`` and other
bare line endings. Only ``<CR><LF>`` ends a line in SMTP (RFC 5321 §2.3.8), so mxgate refuses every
bare CR or LF, never reinterprets it:

- in a command line: ``500 5.5.2`` and the connection is closed (like Postfix's
  ``smtpd_forbid_bare_newline``), because the client and we no longer agree where commands end;
- in message data: aiosmtpd ends DATA only at ``<CR><LF>.<CR><LF>``, so the stream stays in sync; the
  handler then rejects the message with ``554 5.5.2`` (see ``IngressHandler.handle_DATA``).

DATA and MAIL/RCPT paths go through the fast paths of :mod:`mxgate.smtpwire` (one read per message
instead of one per line; a regular expression for plain addresses), with aiosmtpd's limits kept: the
size limit (552), the 998-octet line limit (500), and the handler's hook decides the reply.

AUTH: aiosmtpd calls its authenticator synchronously; password hashes are deliberately slow, so the
PLAIN and LOGIN mechanisms here collect the credentials through aiosmtpd and verify them asynchronously
(``Authenticator.verify`` runs in a worker thread).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, syntax

from mxgate.ingress.auth import Authenticator
from mxgate.smtpwire import FastPathsMixin, scan_lines, writable

if TYPE_CHECKING:
    from asyncio.streams import _ReaduntilBuffer  # the separator type of StreamReader.readuntil (typeshed)

MAX_LINE = 998  # octets per line without CRLF (RFC 5322 §2.1.1)


class BareLineEnding(Exception):
    """A command line ended in a bare LF, or held a bare CR."""


class StrictStreamReader(asyncio.StreamReader):
    # A class attribute, so re-classing an existing reader needs no per-instance set-up.
    refused = False

    async def readuntil(self, separator: _ReaduntilBuffer = b"\n") -> bytes:
        if self.refused:
            # After a bare line ending the connection is closing: commands the client pipelined behind it
            # are already in the buffer and would otherwise run (even a whole transaction) before the close.
            # connection_lost cancels this wait.
            await asyncio.get_running_loop().create_future()
        line = await super().readuntil(separator)
        # Command lines are read with the default separator; DATA lines with b"\r\n" (checked later).
        if separator == b"\n" and (not line.endswith(b"\r\n") or b"\r" in line[:-2]):
            self.refused = True
            raise BareLineEnding()
        return line


_PENDING = object()


class IngressSMTP(FastPathsMixin, SMTP):
    def __init__(self, handler: Any, *, authenticator: Authenticator | None, **kwargs: Any) -> None:
        super().__init__(handler, authenticator=self._collect if authenticator else None, **kwargs)
        self.mx_authenticator = authenticator
        # Make the reader aiosmtpd created refuse bare line endings. StrictStreamReader adds no state but a
        # flag with a class default, so re-classing the existing object is safe and keeps aiosmtpd's own
        # wiring (limit, transport).
        reader = self._stream_reader  # type: ignore[attr-defined]  # asyncio's private attribute: not in typeshed
        assert reader is not None
        reader.__class__ = StrictStreamReader
        self._collected: LoginPassword | None = None
        self.smuggling_attempts = 0
        # Whether the data just received holds a bare CR or LF, found with the line-length check (scan_lines)
        # and read by the handler's DATA hook; None outside that hook.
        self.data_has_bare_line_ending: bool | None = None

    # -- timeouts -------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # aiosmtpd restarts its timer only when a command arrives, so a message still streaming in after
        # DATA was cut off ``timeout`` seconds after the DATA command. Any bytes from the client count as
        # activity (RFC 5321 §4.5.3.2 times out each read, not the whole transfer).
        if self._timeout_handle is not None:
            self._reset_timeout()
        super().data_received(data)

    def _timeout_cb(self) -> None:
        # RFC 5321 §4.5.3.2: tell the client why before closing; aiosmtpd closes silently.
        transport = self.transport
        if transport is not None and not transport.is_closing():
            writable(transport).write(f"421 4.4.2 {self.hostname} Error: timeout exceeded, closing\r\n".encode())
        super()._timeout_cb()  # type: ignore[no-untyped-call]  # aiosmtpd leaves it unannotated

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

    def say_goodbye(self) -> None:
        """Shutdown of an idle session: RFC 5321 §3.8 lets a server send 421 at any time, then close."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            writable(transport).write(b"421 4.3.2 Service shutting down, try another server\r\n")
            transport.close()

    @property
    def in_transaction(self) -> bool:
        """A message is being submitted (MAIL given, not yet answered after DATA)."""
        return self.envelope is not None and self.envelope.mail_from is not None

    # -- fast paths (see mxgate.smtpwire) ------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        content = await self.receive_data(arg)
        if content is None:
            return
        envelope = self.envelope
        assert envelope is not None
        longest, bare = scan_lines(content)
        if longest > MAX_LINE:
            self._set_post_data_state()  # type: ignore[no-untyped-call]  # aiosmtpd leaves it unannotated
            await self.push("500 5.5.2 Line too long (see RFC 5321 4.5.3.1.6)")
            return
        envelope.content = envelope.original_content = content
        self.data_has_bare_line_ending = bare
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            self.data_has_bare_line_ending = None
        self._set_post_data_state()  # type: ignore[no-untyped-call]  # aiosmtpd leaves it unannotated
        await self.push(status)

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
