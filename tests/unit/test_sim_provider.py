"""The simulated provider's decisions, event by event, on a fake clock (no sockets)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from mxgate.sim.config import SimConfig
from mxgate.sim.profiles import Stage
from mxgate.sim.provider import Connection, Deferral, ProviderModel
from mxgate.sim.record import DeferralKind

IP = "192.0.2.1"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def model(clock: FakeClock | None = None, **settings: Any) -> ProviderModel:
    return ProviderModel(SimConfig(**settings), clock=clock or FakeClock(), epoch_offset=1_700_000_000.0,
                         rng=random.Random(1))


def message(n: int) -> bytes:
    return f"Message-ID: <m{n}@example.com>\r\nSubject: {n}\r\n\r\nbody {n}\r\n".encode()


def at(m: ProviderModel, stage: Stage, connection: Connection) -> Deferral | None:
    return {Stage.CONNECT: m.at_connect, Stage.MAIL: m.at_mail, Stage.RCPT: m.at_rcpt,
            Stage.DATA: m.at_data_end}[stage](connection)


@pytest.mark.parametrize("stage", [Stage.CONNECT, Stage.MAIL, Stage.RCPT])
def test_only_the_connection_above_the_limit_is_refused_at_its_stage(stage: Stage) -> None:
    m = model(profile="outlook", max_connections=2, connection_stage=stage)
    first, second, third = (m.open(IP) for _ in range(3))
    for earlier in (Stage.CONNECT, Stage.MAIL, Stage.RCPT):
        for connection in (first, second):
            assert at(m, earlier, connection) is None
        if earlier is not stage:
            assert at(m, earlier, third) is None
            continue
        deferral = at(m, stage, third)
        assert deferral is not None and deferral.kind is DeferralKind.CONNECTIONS
        assert deferral.line == (f"451 4.7.652 The mail server [{IP}] has exceeded the maximum number of "
                                 "connections.")
        assert deferral.closes is (stage is Stage.CONNECT)   # a 451 keeps the connection; a greeting not
        break
    report = m.report()
    assert report["deferrals"]["connections"] == 1
    assert report["connections"]["max_concurrency"] == 3
    assert report["connections"]["max_concurrency_by_ip"] == {IP: 3}


def test_a_refused_connection_gets_through_once_another_one_closes() -> None:
    m = model(max_connections=1, connection_stage=Stage.MAIL)
    a, b = m.open(IP), m.open(IP)
    assert m.at_mail(a) is None
    assert m.at_mail(b) is not None
    m.close(a)
    m.close(a)                     # idempotent: the slot is released once
    assert m.at_mail(b) is None
    c = m.open(IP)
    assert m.at_mail(c) is not None


def test_connections_from_other_ips_have_their_own_slots() -> None:
    m = model(max_connections=1)
    assert m.at_connect(m.open("192.0.2.1")) is None
    assert m.at_connect(m.open("192.0.2.2")) is None
    refused = m.at_connect(m.open("192.0.2.1"))
    assert refused is not None and refused.closes
    assert refused.line == "421 4.4.5 Too many connections from your host."


@pytest.mark.parametrize(("profile", "closes"), [("generic", True), ("outlook", False)])
def test_421_closes_the_connection_and_451_keeps_it(profile: str, closes: bool) -> None:
    m = model(profile=profile, max_connections=1, connection_stage=Stage.RCPT)
    m.open(IP)
    m.at_rcpt(m.open(IP))
    second = m.open(IP)
    deferral = m.at_rcpt(second)
    assert deferral is not None and deferral.closes is closes


def test_rate_at_data_allows_the_burst_then_the_rate() -> None:
    clock = FakeClock()
    m = model(clock, rate=2, burst=3)
    c = m.open(IP)
    verdicts = [m.at_data_end(c) for _ in range(4)]
    assert verdicts[:3] == [None, None, None]
    assert verdicts[3] is not None and verdicts[3].line == "451 4.7.1 Rate limit exceeded, try again later"
    assert verdicts[3].kind is DeferralKind.RATE and not verdicts[3].closes
    clock.now += 0.5
    assert m.at_data_end(c) is None
    assert m.at_data_end(c) is not None
    assert m.report()["deferrals"] == {"connections": 0, "rate": 2, "random": 0, "other": 0, "total": 2}


def test_rate_at_rcpt_counts_recipients_and_the_bucket_is_shared_by_an_ips_connections() -> None:
    m = model(profile="outlook", rate=1, burst=2)
    a, b = m.open(IP), m.open(IP)
    assert m.at_mail(a) is None and m.at_mail(b) is None       # outlook's rate stage is RCPT
    assert m.at_rcpt(a) is None and m.at_rcpt(b) is None
    refused = m.at_rcpt(a)
    assert refused is not None and "rate limited due to IP reputation" in refused.line
    assert m.at_data_end(a) is None                            # DATA is not counted again


def test_yahoo_defers_at_mail_and_closes() -> None:
    m = model(profile="yahoo", rate=1, burst=1)
    c = m.open("198.51.100.9")
    assert m.at_mail(c) is None
    refused = m.at_mail(c)
    assert refused is not None and refused.closes
    assert refused.line.startswith("421 4.7.0 [TSS04] Messages from 198.51.100.9 temporarily deferred")


def test_a_refused_connection_spends_no_token() -> None:
    m = model(max_connections=1, connection_stage=Stage.MAIL, rate=1, burst=1, rate_stage=Stage.MAIL)
    a, b = m.open(IP), m.open(IP)
    assert m.at_mail(a) is None
    deferral = m.at_mail(b)
    assert deferral is not None and deferral.kind is DeferralKind.CONNECTIONS
    assert m.at_mail(a) is not None and m.report()["deferrals"]["rate"] == 1


def test_random_temporary_failures_at_the_configured_probability() -> None:
    assert model(temp_fail_rate=0.0).at_data_end(model().open(IP)) is None
    m = model(temp_fail_rate=1.0)
    deferral = m.at_data_end(m.open(IP))
    assert deferral == Deferral("451 4.3.0 Temporary failure", DeferralKind.RANDOM, False)
    m = model(temp_fail_rate=0.3, seed=7)
    c = m.open(IP)
    failures = sum(m.at_data_end(c) is not None for _ in range(2000))
    assert 450 < failures < 750
    assert m.report()["deferrals"]["random"] == failures


def test_latency_with_jitter_stays_in_bounds_and_never_goes_negative() -> None:
    m = model(latency=0.1, latency_jitter=0.05)
    delays = [m.data_reply_delay() for _ in range(500)]
    assert min(delays) >= 0.05 and max(delays) <= 0.15 and len(set(delays)) > 100
    m = model(latency=0.01, latency_jitter=1.0)
    assert min(m.data_reply_delay() for _ in range(500)) == 0.0
    assert model().data_reply_delay() == 0.0


def test_accept_counts_and_reset_zeroes_counters_but_keeps_the_providers_state() -> None:
    clock = FakeClock()
    m = model(clock, max_connections=1, rate=1, burst=1)
    c = m.open(IP)
    assert m.at_connect(c) is None and m.at_data_end(c) is None
    line, message_id = m.accept(message(1), 2)
    assert line.startswith("250 2.0.0 Ok: queued as ") and message_id == "<m1@example.com>"
    m.at_connect(m.open(IP))                                   # refused, still open
    report = m.report()
    assert report["accepted"]["messages"] == 1 and report["accepted"]["recipients"] == 2
    assert report["connections"]["opened"] == 2 and report["connections"]["max_concurrency"] == 2
    m.reset()
    report = m.report()
    assert report["accepted"]["messages"] == 0 and report["deferrals"]["total"] == 0
    assert report["connections"]["opened"] == 0
    assert report["connections"]["max_concurrency"] == 2       # both are still open
    assert m.at_data_end(c) is not None                        # the reset refilled no bucket
    assert m.at_connect(m.open(IP)) is not None                # nor was the slot freed


def test_shutdown_is_counted_as_other() -> None:
    m = model()
    deferral = m.shutdown(m.open(IP))
    assert deferral.line.startswith("421 ") and deferral.closes and deferral.kind is DeferralKind.OTHER
    assert m.report()["deferrals"]["other"] == 1
