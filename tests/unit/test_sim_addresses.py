"""The simulator's fast MAIL/RCPT path parser agrees with aiosmtpd's own on every form."""

from __future__ import annotations

import asyncio

import pytest
from aiosmtpd.smtp import SMTP

from mxgate.sim.config import SimConfig
from mxgate.sim.server import ProviderSimulator, SimSMTP

PATHS = [
    "<>", "<a@b.com>", "<a@b.com> SIZE=10 BODY=8BITMIME", "<a.b+c@x-y.example.org>  SIZE=1",
    "<a@b.com>SIZE=1",
    "<o'neil&co=1@example.com>", "a@b.com", '<"q x"@b.com>', "<a@[192.0.2.1]>", "<@r.example:a@b.com>",
    "<postmaster>", "<a..b@c.com>", "<.a@c.com>", "<a@b.com", "<a@-b.com>", "<ünï@exämple.com>", "",
]


@pytest.fixture(scope="module")
def parsers() -> tuple[SimSMTP, SMTP]:
    loop = asyncio.new_event_loop()
    try:
        ours = SimSMTP(ProviderSimulator(SimConfig()), loop=loop)
        theirs = SMTP(object(), hostname="x", loop=loop)
        return ours, theirs
    finally:
        loop.close()


@pytest.mark.parametrize("path", PATHS)
def test_fast_path_parser_matches_aiosmtpd(parsers: tuple[SimSMTP, SMTP], path: str) -> None:
    ours, theirs = parsers
    assert ours._getaddr(path) == theirs._getaddr(path)
