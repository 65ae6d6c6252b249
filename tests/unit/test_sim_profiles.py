"""Profile replies: the texts providers send, with the client IP, classified the way mxgate must react."""

from __future__ import annotations

import pytest

from mxgate.egress.replies import DeferralClass, SmtpReply, classify
from mxgate.errors import ConfigError
from mxgate.sim.config import SimConfig
from mxgate.sim.profiles import PROFILES, Stage, check_reply, render_reply

YAHOO = ("421 4.7.0 [TSS04] Messages from 192.0.2.7 temporarily deferred due to unexpected volume or user "
         "complaints")
GMAIL = ("421 4.7.28 [192.0.2.7] Our system has detected an unusual rate of unsolicited mail originating "
         "from your IP address.")


def reply_of(line: str) -> SmtpReply:
    code, _, text = line.partition(" ")
    return SmtpReply.parse(int(code), text)


@pytest.mark.parametrize(("profile", "connection_line", "rate_line"), [
    ("outlook",
     "451 4.7.652 The mail server [192.0.2.7] has exceeded the maximum number of connections.",
     "451 4.7.650 The mail server [192.0.2.7] has been temporarily rate limited due to IP reputation."),
    ("yahoo", YAHOO, YAHOO),
    ("gmail", GMAIL, GMAIL),
    ("generic", "421 4.4.5 Too many connections from your host.",
     "451 4.7.1 Rate limit exceeded, try again later"),
])
def test_profile_replies_with_the_client_ip(profile: str, connection_line: str, rate_line: str) -> None:
    p = PROFILES[profile]
    assert render_reply(p.connection_reply, "192.0.2.7") == connection_line
    assert render_reply(p.rate_reply, "192.0.2.7") == rate_line


@pytest.mark.parametrize(("profile", "connections", "rate"), [
    ("outlook", DeferralClass.CONNECTIONS, DeferralClass.RATE),  # 4.7.650: a rate limit set by reputation
    ("yahoo", DeferralClass.REPUTATION, DeferralClass.REPUTATION),
    ("gmail", DeferralClass.RATE, DeferralClass.RATE),
    ("generic", DeferralClass.CONNECTIONS, DeferralClass.RATE),
])
def test_mxgate_classifies_what_the_simulator_sends(profile: str, connections: DeferralClass,
                                                     rate: DeferralClass) -> None:
    p = PROFILES[profile]
    assert classify(reply_of(render_reply(p.connection_reply, "192.0.2.7"))).deferral is connections
    assert classify(reply_of(render_reply(p.rate_reply, "192.0.2.7"))).deferral is rate


@pytest.mark.parametrize(("profile", "connection_stage", "rate_stage"), [
    ("outlook", Stage.MAIL, Stage.RCPT),
    ("yahoo", Stage.MAIL, Stage.MAIL),
    ("gmail", Stage.CONNECT, Stage.DATA),
    ("generic", Stage.CONNECT, Stage.DATA),
])
def test_stage_defaults_follow_the_profile_unless_set(profile: str, connection_stage: Stage,
                                                      rate_stage: Stage) -> None:
    config = SimConfig(profile=profile)
    assert (config.effective_connection_stage, config.effective_rate_stage) == (connection_stage, rate_stage)
    overridden = SimConfig(profile=profile, connection_stage=Stage.RCPT, rate_stage=Stage.DATA)
    assert overridden.effective_connection_stage is Stage.RCPT
    assert overridden.effective_rate_stage is Stage.DATA


def test_render_replaces_only_the_ip_placeholder() -> None:
    assert render_reply("451 4.7.1 {ip} over {limit}", "::1") == "451 4.7.1 ::1 over {limit}"


@pytest.mark.parametrize("bad", ["250 ok", "451", "451-4.7.1 multi", "451 a\r\n250 injected", "45x nope", ""])
def test_check_reply_refuses_what_is_not_one_4xx_or_5xx_line(bad: str) -> None:
    with pytest.raises(ValueError):
        check_reply(bad)


def test_default_burst_is_the_rate_but_at_least_one() -> None:
    assert SimConfig(rate=50).effective_burst == 50
    assert SimConfig(rate=0.2).effective_burst == 1
    assert SimConfig(rate=50, burst=5).effective_burst == 5


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"profile": "hotmail"}, "profile 'hotmail'"),
    ({"connection_stage": Stage.DATA}, "connection stage data"),
    ({"rate_stage": Stage.CONNECT}, "rate stage connect"),
    ({"max_connections": -1}, "max connections -1"),
    ({"rate": 10, "burst": 0.5}, "burst 0.5"),
    ({"temp_fail_rate": 1.5}, "temp fail rate 1.5"),
    ({"latency": -1}, "latency"),
    ({"report_interval": 5}, "needs a report file"),
    ({"rate_reply": "250 fine"}, "rate reply"),
])
def test_config_rejects_nonsense_with_a_readable_message(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SimConfig(**kwargs)  # type: ignore[arg-type]


def test_config_rejects_unknown_fields() -> None:
    with pytest.raises(TypeError):
        SimConfig(max_conections=3)  # type: ignore[call-arg]
