"""A small, real authoritative DNS server for tests, built on dnspython's message codec.

It listens on 127.0.0.1, UDP and TCP on the same ephemeral port, and answers from ``records``, a plain
mutable dict a test may change at any time::

    {"example.test": [("MX", 300, "10 mx1.example.test."), ("A", 300, "192.0.2.1")]}

Names are matched case-insensitively, with or without the trailing dot; relative names inside rdata
text are taken as absolute. CNAMEs are followed within the data. A name that has no records but is the
parent of one that has is an empty non-terminal (NOERROR, no answer), anything else is NXDOMAIN.

Faults are per name, optionally per record type: ``answer_servfail(name)`` makes the server answer
SERVFAIL, ``drop_queries(name)`` makes it stay silent so the client times out, and ``delay`` holds every
answer back that many seconds (to make concurrent lookups overlap). Every query, dropped or not, is
counted in ``queries[(name, type)]``, with the name lower-case and without the trailing dot.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Record = tuple[str, int, str]
"""(record type, TTL, rdata in presentation form), e.g. ("MX", 300, "10 mx1.example.test.")."""

Zone = dict[str, list[Record]]

_Sender = Callable[[bytes], None]

#: RFC 1035 §4.2.1: a UDP answer without EDNS is at most 512 octets; larger ones are truncated (TC).
_CLASSIC_UDP_SIZE = 512

#: CNAME chains longer than this are answered as they stand (a loop in the test data, not a hang).
_MAX_CNAME_CHAIN = 8


def _key(name: str) -> str:
    return name.lower().removesuffix(".")


class DnsServer:
    """Answers queries from ``records``; see the module docstring."""

    def __init__(self, records: Zone) -> None:
        self.records = records
        self.queries: Counter[tuple[str, str]] = Counter()
        #: (name, record type or None for every type) that are answered SERVFAIL / not answered at all.
        self.servfail: set[tuple[str, str | None]] = set()
        self.drop: set[tuple[str, str | None]] = set()
        self.delay = 0.0
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_clients: set[asyncio.StreamWriter] = set()
        self._pending: set[asyncio.Task[None]] = set()

    def answer_servfail(self, name: str, rdtype: str | None = None) -> None:
        self.servfail.add((_key(name), rdtype))

    def drop_queries(self, name: str, rdtype: str | None = None) -> None:
        self.drop.add((_key(name), rdtype))

    def count(self, name: str, rdtype: str) -> int:
        return self.queries[(_key(name), rdtype)]

    def total_queries(self) -> int:
        return sum(self.queries.values())

    # --- answering --------------------------------------------------------------------------------

    def respond(self, wire: bytes, *, udp: bool) -> bytes | None:
        """The wire answer to one query, or None when the query is dropped (or unparseable)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None
        question = query.question[0]
        name = _key(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries[(name, rdtype)] += 1
        if {(name, None), (name, rdtype)} & self.drop:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if {(name, None), (name, rdtype)} & self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        else:
            rcode, answer = self._lookup(name, question.rdtype)
            response.set_rcode(rcode)
            response.answer.extend(answer)
        max_size = 65535
        if udp:
            max_size = max(query.payload, _CLASSIC_UDP_SIZE) if query.edns >= 0 else _CLASSIC_UDP_SIZE
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            # Too large for this transport: an empty, truncated answer tells the client to use TCP.
            response.answer.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()

    def _lookup(
        self, name: str, rdtype: dns.rdatatype.RdataType
    ) -> tuple[dns.rcode.Rcode, list[dns.rrset.RRset]]:
        zone = {_key(owner): records for owner, records in self.records.items()}
        chain: list[dns.rrset.RRset] = []
        for _ in range(_MAX_CNAME_CHAIN):
            records = zone.get(name, [])
            wanted = dns.rdatatype.to_text(rdtype)
            matching = [record for record in records if record[0].upper() == wanted]
            if matching:
                chain.append(_rrset(name, rdtype, matching))
                return dns.rcode.NOERROR, chain
            cnames = [record for record in records if record[0].upper() == "CNAME"]
            if cnames and rdtype != dns.rdatatype.CNAME:
                chain.append(_rrset(name, dns.rdatatype.CNAME, cnames[:1]))
                name = _key(cnames[0][2])
                continue
            exists = bool(records) or any(owner.endswith("." + name) for owner in zone)
            return (dns.rcode.NOERROR if exists else dns.rcode.NXDOMAIN), chain
        return dns.rcode.NOERROR, chain

    # --- transports -------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # UDP takes an ephemeral port, TCP then binds the same number; retry if another process has it.
        for _ in range(20):
            transport, _protocol = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=("127.0.0.1", 0)
            )
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, "127.0.0.1", port)
            except OSError:
                transport.close()
                continue
            self._udp = transport
            self.port = port
            return
        raise OSError("no port free for both UDP and TCP on 127.0.0.1")

    async def stop(self) -> None:
        for task in self._pending:
            task.cancel()
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        # Connections whose query was dropped are still open; close them so wait_closed returns.
        for writer in self._tcp_clients:
            writer.close()
        if self._tcp is not None:
            await self._tcp.wait_closed()

    async def _answer_later(self, wire: bytes, udp: bool, send: _Sender) -> None:
        await asyncio.sleep(self.delay)
        reply = self.respond(wire, udp=udp)
        if reply is not None:
            send(reply)

    def _schedule(self, wire: bytes, udp: bool, send: _Sender) -> None:
        task = asyncio.get_running_loop().create_task(self._answer_later(wire, udp, send))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tcp_clients.add(writer)

        def send(reply: bytes) -> None:
            if not writer.is_closing():
                writer.write(struct.pack("!H", len(reply)) + reply)

        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                self._schedule(await reader.readexactly(length), False, send)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_clients.discard(writer)
            writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not isinstance: before Python 3.12 the selector loop's UDP transport does not subclass it.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        transport = self._transport
        if transport is None:
            return

        def send(reply: bytes) -> None:
            if not transport.is_closing():
                transport.sendto(reply, addr)

        self._server._schedule(data, True, send)


def _rrset(name: str, rdtype: dns.rdatatype.RdataType, records: list[Record]) -> dns.rrset.RRset:
    rdatas = [
        dns.rdata.from_text(dns.rdataclass.IN, rdtype, text, origin=dns.name.root, relativize=False)
        for _type, _ttl, text in records
    ]
    ttl = min(ttl for _type, ttl, _text in records)
    return dns.rrset.from_rdata_list(dns.name.from_text(name), ttl, rdatas)


@contextlib.asynccontextmanager
async def start_dns_server(records: Zone | None = None) -> AsyncIterator[DnsServer]:
    """A running DnsServer on 127.0.0.1 (``.port``), stopped on exit even if the test fails."""
    server = DnsServer(records if records is not None else {})
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
