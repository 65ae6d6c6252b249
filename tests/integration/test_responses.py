"""spec.responses rules decide what a reply means; Suspend stops the whole fleet for a while."""

from __future__ import annotations

import asyncio

import aiosmtplib

from mxgate import keys
from mxgate.egress.outcome import classify_with, compile_rules
from mxgate.egress.replies import DeferralClass, Outcome, SmtpReply
from mxgate.embedded_redis import EmbeddedRedis
from mxgate.policy import ResponseRule
from support.gateway import policy, publish, running_gateway
from support.sink import Sink, SinkHandler

RULES = compile_rules([
    ResponseRule(match=r"\[TSS04\]", action="Suspend", duration="1h"),
    ResponseRule(match=r"4\.2\.1 .*too fast", action="Retry"),
    ResponseRule(match=r"mailbox (is )?full", action="Bounce"),
    ResponseRule(match=r"^451 4\.7\.500", action="TightenConnections"),
])


def test_rules_come_before_the_built_in_table() -> None:
    def outcome(code: int, text: str) -> tuple[Outcome, DeferralClass | None, str | None]:
        classification, rule = classify_with(SmtpReply.parse(code, text), RULES)
        return classification.outcome, classification.deferral, rule.action if rule else None

    assert outcome(421, "4.7.0 [TSS04] Messages temporarily deferred") == (Outcome.DEFERRED,
                                                                           DeferralClass.REPUTATION, "Suspend")
    # Built in, "too fast" is a rate signal; the rule says it is only that recipient's problem.
    assert outcome(450, "4.2.1 The user is receiving mail too fast") == (Outcome.DEFERRED, DeferralClass.OTHER,
                                                                         "Retry")
    assert outcome(452, "4.2.2 Mailbox full") == (Outcome.FAILED, None, "Bounce")
    assert outcome(451, "4.7.500 Server busy") == (Outcome.DEFERRED, DeferralClass.CONNECTIONS,
                                                   "TightenConnections")
    # A permanent reply stays permanent; unmatched replies use the built-in table.
    assert outcome(550, "5.7.1 [TSS04] blocked") == (Outcome.FAILED, None, None)
    assert outcome(451, "4.7.652 too many connections") == (Outcome.DEFERRED, DeferralClass.CONNECTIONS, None)
    assert outcome(250, "2.0.0 ok [TSS04]") == (Outcome.DELIVERED, None, None)


async def test_a_suspend_rule_stops_delivery_fleet_wide(redis_server: EmbeddedRedis, redis_client) -> None:
    sink = await Sink(SinkHandler(data_reply="421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred")).start()
    try:
        p = policy("yahoo", domains=["yahoo.test"], route=[f"127.0.0.1:{sink.port}"])
        rules = [ResponseRule(match=r"\[TSS04\]", action="Suspend", duration="1h")]
        p = p.model_copy(update={"spec": p.spec.model_copy(update={"responses": rules})})
        await publish(redis_server.url, [p])
        async with running_gateway(redis_server.url) as a, running_gateway(redis_server.url) as b:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=a.port) as smtp:
                await smtp.sendmail("app@example.com", ["u@yahoo.test"], b"Subject: 1\r\n\r\nx\r\n")
            for _ in range(100):
                if b.book.suspended_until_ms("yahoo"):
                    break
                await asyncio.sleep(0.05)
            until = int(await redis_client.hget(keys.limits("yahoo"), "suspendedUntil"))
            assert b.book.suspended_until_ms("yahoo") == until == a.book.suspended_until_ms("yahoo")
            redis_now = (await redis_client.time())[0]
            assert 3500 <= until / 1000 - redis_now <= 3601   # one hour from (Redis) now
            sink.handler.data_reply = None          # the provider would accept now, but we are suspended
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=b.port) as smtp:
                await smtp.sendmail("app@example.com", ["u@yahoo.test"], b"Subject: 2\r\n\r\nx\r\n")
            await asyncio.sleep(1.5)
            assert sink.handler.messages == []
            assert await redis_client.zcard(keys.queue("yahoo")) == 2   # both wait in Redis, nothing lost
    finally:
        await sink.stop()


async def test_no_connection_sits_out_a_suspension_open(redis_server: EmbeddedRedis, redis_client) -> None:
    # Two connections, jobs claimed for both; the second message draws [TSS04]. The other connection
    # finishes its message and must then close, not wait out the hour holding the next claimed job.
    handler = SinkHandler(rcpt_replies={"tss@yahoo.test": "421 4.7.0 [TSS04] Messages from 127.0.0.1 deferred"},
                          delay=0.5)
    sink = await Sink(handler).start()
    try:
        p = policy("yahoo", domains=["yahoo.test"], route=[f"127.0.0.1:{sink.port}"], maxConnections=2)
        rules = [ResponseRule(match=r"\[TSS04\]", action="Suspend", duration="1h")]
        await publish(redis_server.url, [p.model_copy(update={"spec": p.spec.model_copy(update={"responses": rules})})])
        async with running_gateway(redis_server.url) as gw:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port) as smtp:
                for rcpt in ["a@yahoo.test", "tss@yahoo.test", "b@yahoo.test", "c@yahoo.test", "d@yahoo.test"]:
                    await smtp.sendmail("app@example.com", [rcpt], b"Subject: x\r\n\r\nx\r\n")
            await sink.wait_for(1)
            await asyncio.sleep(1.5)
            assert gw.book.suspended_until_ms("yahoo") > 0
            assert len(sink.handler.messages) == 1 and sink.open == 0    # nothing held open ...
            assert await redis_client.zcard(keys.queue("yahoo")) == 4   # ... and nothing lost
    finally:
        await sink.stop()
