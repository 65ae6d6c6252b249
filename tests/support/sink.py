"""A real SMTP server for tests: records every message it accepts (Message-ID, envelope, body).

It can be told to answer a given reply at a given stage (``fail_rcpt``, ``fail_data``), to refuse
connections in the greeting, and it counts concurrent connections, so tests can check what a
provider would have seen.
"""

from __future__ import annotations

import asyncio
import email
import ssl
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    @property
    def message_id(self) -> str:
        return str(email.message_from_bytes(self.data).get("Message-ID", ""))


@dataclass
class SinkHandler:
    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)   # recipient -> reply to RCPT
    data_reply: str | None = None                                 # reply to the end of DATA
    delay: float = 0.0                                            # seconds before answering DATA
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.data_reply:
            return self.data_reply
        self.messages.append(Received(envelope.mail_from or "", list(envelope.rcpt_tos),
                                      envelope.original_content or b""))
        self.arrived.set()
        return "250 2.0.0 Ok: delivered"

    def message_ids(self) -> Counter[str]:
        return Counter(m.message_id for m in self.messages)


class Sink:
    def __init__(self, handler: SinkHandler | None = None, *, greeting_reply: str | None = None,
                 tls_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler or SinkHandler()
        self.greeting_reply = greeting_reply
        self.tls_context = tls_context   # offer STARTTLS with it (as real MTAs do)
        self.server: asyncio.Server | None = None
        self.open = 0
        self.max_open = 0
        self.connections = 0   # every connection accepted

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def _protocol(self) -> Any:
        sink = self

        class Counting(SMTP):
            def connection_made(self, transport: Any) -> None:
                sink.open += 1
                sink.connections += 1
                sink.max_open = max(sink.max_open, sink.open)
                if sink.greeting_reply:
                    transport.write(sink.greeting_reply.encode() + b"\r\n")
                    transport.close()
                    return
                super().connection_made(transport)

            def connection_lost(self, exc: Exception | None) -> None:
                sink.open -= 1
                if not sink.greeting_reply:
                    super().connection_lost(exc)

        return Counting(self.handler, hostname="sink.test", enable_SMTPUTF8=True, tls_context=self.tls_context)

    async def start(self) -> Sink:
        self.server = await asyncio.get_running_loop().create_server(self._protocol, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def wait_for(self, count: int, *, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.handler.messages) < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"sink got {len(self.handler.messages)} of {count} messages")
            self.handler.arrived.clear()
            try:
                await asyncio.wait_for(self.handler.arrived.wait(), timeout=min(remaining, 0.5))
            except TimeoutError:
                pass
