"""Routing against a real DNS server: MX classification, MX order and fallback, re-routing at delivery."""

from __future__ import annotations

import asyncio

import aiosmtplib

from mxgate.embedded_redis import EmbeddedRedis
from mxgate.policy import ProviderTable, Retry
from mxgate.policybook import PolicyBook
from mxgate.routing.dns import MxResolver
from mxgate.routing.router import NextHop, Router
from support.dnsserver import start_dns_server
from support.gateway import policy, publish, running_gateway
from support.sink import Sink

MS = policy("microsoft", domains=["outlook.test"], mx_hosts=["*.protection.outlook.test"])


async def test_domains_hosted_at_a_provider_roll_up_to_it(redis_connection) -> None:
    zone = {
        "contoso.test": [("MX", 300, "10 contoso-test.mail.protection.outlook.test.")],
        "fabrikam.test": [("MX", 300, "10 mx.fabrikam.test."), ("MX", 300, "20 backup.protection.outlook.test.")],
        "broken.test": [("MX", 300, "10 mx.broken.test.")],
    }
    async with start_dns_server(zone) as dns:
        book = PolicyBook(redis_connection)
        book.table = ProviderTable.of([MS])
        router = Router(book, MxResolver(nameservers=["127.0.0.1"], port=dns.port, timeout=1.0))
        assert await router.provider_for("outlook.test") == "microsoft"        # by domain, no DNS
        assert await router.provider_for("eu.outlook.test") == "microsoft"     # parent domain
        assert dns.total_queries() == 0
        assert await router.provider_for("contoso.test") == "microsoft"        # by MX glob
        # Only the most preferred MX decides: a backup MX at Microsoft does not make it Microsoft's.
        assert await router.provider_for("fabrikam.test") == "domain:fabrikam.test"
        dns.answer_servfail("broken.test")
        assert await router.provider_for("broken.test") == "domain:broken.test"  # DNS trouble never fails ingest
        assert await router.provider_for("nowhere.test") == "domain:nowhere.test"  # NXDOMAIN


async def test_next_hops_follow_mx_preference(redis_connection) -> None:
    zone = {"multi.test": [("MX", 300, "20 second.multi.test."), ("MX", 300, "10 first.multi.test.")]}
    async with start_dns_server(zone) as dns:
        book = PolicyBook(redis_connection)
        router = Router(book, MxResolver(nameservers=["127.0.0.1"], port=dns.port), mx_port=2525)
        assert await router.next_hops("domain:multi.test", "multi.test") == [
            NextHop("first.multi.test", 2525), NextHop("second.multi.test", 2525)]


async def test_delivery_falls_back_to_the_next_mx_and_reroutes_when_dns_recovers(
        redis_server: EmbeddedRedis, redis_client) -> None:
    sink = await Sink().start()
    zone = {
        # The first MX resolves to an address nobody listens on (connection refused), the second to the sink.
        "contoso.test": [("MX", 300, "10 dead.protection.outlook.test."),
                         ("MX", 300, "20 live.protection.outlook.test.")],
        "dead.protection.outlook.test": [("A", 300, "127.0.0.2")],
        "live.protection.outlook.test": [("A", 300, "127.0.0.1")],
    }
    fast_retry = {"retry": Retry(initial_delay="200ms", max_delay="1s")}
    ms = MS.model_copy(update={"spec": MS.spec.model_copy(update=fast_retry)})
    default = policy("default")
    default = default.model_copy(update={"spec": default.spec.model_copy(update=fast_retry)})
    try:
        async with start_dns_server(zone) as dns:
            await publish(redis_server.url, [ms, default])
            dns.answer_servfail("contoso.test")   # ingest cannot classify: the job waits under domain:contoso.test
            async with running_gateway(redis_server.url, dns_servers=("127.0.0.1",), dns_port=dns.port,
                                       mx_port=sink.port) as gw:
                async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port) as smtp:
                    await smtp.sendmail("app@example.com", ["u@contoso.test"],
                                        b"Subject: x\r\nMessage-ID: <r1@example.com>\r\n\r\nhi\r\n")
                assert await redis_client.exists("mxg:{p:domain:contoso.test}:q") == 1
                await asyncio.sleep(0.5)
                assert sink.handler.messages == []     # deferred while DNS fails
                dns.servfail.clear()                   # DNS recovers: delivery classifies again and moves the job
                await sink.wait_for(1, timeout=30)
        assert sink.handler.messages[0].rcpt_tos == ["u@contoso.test"]
        assert await redis_client.zcard("mxg:{p:domain:contoso.test}:q") == 0
        assert await redis_client.zcard("mxg:{p:microsoft}:q") == 0
    finally:
        await sink.stop()
