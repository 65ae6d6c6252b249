"""The simulator's I/O: an aiosmtpd server that asks :class:`~mxgate.sim.provider.ProviderModel` what to
answer, an aiohttp control endpoint, and the report and sink-log files.

aiosmtpd parses SMTP; its two per-message costs (line-by-line DATA, the RFC 5322 address parser) are
replaced by the fast paths in :mod:`mxgate.smtpwire`, because the simulator has to outrun the relays it
measures (thousands of messages a second on one core, see ``docs/simulator.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from aiohttp import web
from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from mxgate.sim.config import SimConfig
from mxgate.sim.outputs import SinkLog, write_report
from mxgate.sim.provider import Connection, Deferral, ProviderModel
from mxgate.smtpwire import FastPathsMixin, writable

__all__ = ["ProviderSimulator", "SimSMTP"]

log = logging.getLogger("mxgate.sim")


# Seconds stop() waits for shut-down connections to finish closing.
_CLOSE_GRACE = 2.0


class _Handler:
    """aiosmtpd hooks for MAIL and RCPT: ask the model, then accept the address or send its deferral."""

    async def handle_MAIL(self, server: SimSMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        deferral = server.model.at_mail(server.connection)
        if deferral is not None:
            return server.refuse(deferral)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SimSMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        deferral = server.model.at_rcpt(server.connection)
        if deferral is not None:
            return server.refuse(deferral)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"


_HANDLER = _Handler()


class SimSMTP(FastPathsMixin, SMTP):
    """One client connection of the simulator."""

    def __init__(self, simulator: ProviderSimulator, *, loop: asyncio.AbstractEventLoop) -> None:
        config = simulator.config
        super().__init__(_HANDLER, data_size_limit=config.max_message_size or None, enable_SMTPUTF8=True,
                         hostname=config.hostname, ident="mxgate sim", timeout=config.command_timeout,
                         loop=loop)
        self.simulator = simulator
        self.model: ProviderModel = simulator.model
        self.connection: Connection = Connection("", None)  # replaced in connection_made
        self.refused_at_connect = False

    # -- connection lifecycle ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        self.connection = self.model.open(ip)
        self.simulator.sessions.add(self)
        deferral = self.model.at_connect(self.connection)
        if deferral is not None:
            # The refusal replaces the greeting; aiosmtpd never starts for this connection.
            self.refused_at_connect = True
            writable(transport).write(deferral.line.encode() + b"\r\n")
            transport.close()
            return
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.model.close(self.connection)
        self.simulator.session_closed(self)
        if not self.refused_at_connect:
            super().connection_lost(error)

    def refuse(self, deferral: Deferral) -> str:
        """Return the deferral's line; for a 421, close once it is written (push writes before it awaits)."""
        if deferral.closes and self.transport is not None:
            self.loop.call_soon(self.transport.close)
        return deferral.line

    def shut_down(self) -> None:
        """The simulator stops: say 421 and close (RFC 5321 §3.8)."""
        transport = self.transport
        if self.refused_at_connect or transport is None or transport.is_closing():
            return
        writable(transport).write(self.model.shutdown(self.connection).line.encode() + b"\r\n")
        transport.close()

    # -- the per-message path ------------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        content = await self.receive_data(arg)
        if content is None:
            return
        envelope = self.envelope
        assert envelope is not None
        model = self.model
        deferral = model.at_data_end(self.connection)
        delay = model.data_reply_delay()
        if delay:
            await asyncio.sleep(delay)
        if deferral is None:
            line, message_id = model.accept(content, len(envelope.rcpt_tos))
            sink = self.simulator.sink_log
            if sink is not None:
                sink.record(message_id, envelope.rcpt_tos, len(content))
        else:
            line = self.refuse(deferral)
        self.envelope = self._create_envelope()
        await self.push(line)


class ProviderSimulator:
    """A throttling mailbox provider on a local port: ``async with ProviderSimulator(config) as sim: ...``.

    ``clock`` drives the token buckets and the report's times (inject a fake one to test rates without
    waiting). :meth:`report` and :meth:`reset` may be called at any time, also through the HTTP endpoint.
    """

    def __init__(self, config: SimConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.model = ProviderModel(config, clock=clock, epoch_offset=time.time() - clock(),
                                   rng=random.Random(config.seed))
        self.sessions: set[SimSMTP] = set()
        """Open connections (for shutdown)."""
        self.sink_log: SinkLog | None = None
        self._server: asyncio.Server | None = None
        self._http: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._all_closed: asyncio.Event | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> ProviderSimulator:
        loop = asyncio.get_running_loop()
        # Fail now, not at exit, if the report cannot be written; watchers also get a file at once.
        self.write_report()
        if self.config.sink_log is not None:
            self.sink_log = SinkLog(self.config.sink_log)
            self._tasks.append(loop.create_task(self._every(1.0, self.sink_log.flush)))
        try:
            self._server = await loop.create_server(lambda: SimSMTP(self, loop=loop), self.config.host,
                                                    self.config.port, backlog=1024)
            if self.config.http_host is not None:
                await self._start_http()
        except BaseException:
            await self.stop()
            raise
        if self.config.report_interval is not None:
            self._tasks.append(loop.create_task(self._every(self.config.report_interval, self.write_report)))
        return self

    async def stop(self) -> None:
        """Stop listening, send 421 to open connections, write the report file, close the sink log."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._server is not None:
            self._server.close()
            if self.sessions:
                self._all_closed = asyncio.Event()
                for session in list(self.sessions):
                    session.shut_down()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._all_closed.wait(), _CLOSE_GRACE)
            await self._server.wait_closed()
            self._server = None
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        if self.config.report_file is not None:
            self.write_report()
        if self.sink_log is not None:
            self.sink_log.close()
            self.sink_log = None

    async def __aenter__(self) -> ProviderSimulator:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def session_closed(self, session: SimSMTP) -> None:
        self.sessions.discard(session)
        if not self.sessions and self._all_closed is not None:
            self._all_closed.set()

    @property
    def port(self) -> int:
        """The SMTP port (the one picked if the config said 0)."""
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def http_port(self) -> int:
        """The HTTP control port (the one picked if the config said 0)."""
        assert self._http is not None, "no HTTP endpoint"
        return int(self._http.addresses[0][1])

    # -- reporting -----------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Everything recorded since the last reset, as plain JSON data (see docs/simulator.md)."""
        return self.model.report()

    def reset(self) -> None:
        """Zero the counters (a new benchmark phase); the limits' state and open connections stay."""
        self.model.reset()

    def write_report(self) -> None:
        """Write the report to ``config.report_file`` (atomically)."""
        if self.config.report_file is not None:
            write_report(self.config.report_file, self.report())

    async def _every(self, seconds: float, action: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                action()
            except OSError as exc:
                log.warning("periodic write failed: %s", exc)

    # -- HTTP control endpoint -----------------------------------------------------------------------

    async def _start_http(self) -> None:
        app = web.Application()
        app.router.add_get("/report", self._get_report)
        app.router.add_post("/reset", self._post_reset)
        self._http = web.AppRunner(app, access_log=None)
        await self._http.setup()
        assert self.config.http_host is not None
        await web.TCPSite(self._http, self.config.http_host, self.config.http_port).start()

    async def _get_report(self, _: web.Request) -> web.Response:
        return web.json_response(self.report())

    async def _post_reset(self, _: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"status": "reset"})
