"""MxResolver against a real DNS server on 127.0.0.1 (tests/support/dnsserver.py); only the clock is fake."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxgate.errors import DnsPermanentError, DnsTemporaryError
from mxgate.routing.dns import MxAnswer, MxHost, MxResolver, normalise_domain, order_mx, usable_mx
from support.dnsserver import DnsServer, Zone, start_dns_server


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    async with start_dns_server({}) as running:
        yield running


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def resolver_for(
    server: DnsServer,
    clock: FakeClock,
    *,
    timeout: float = 1.0,
    min_ttl: float = 5.0,
    max_ttl: float = 3600.0,
    negative_ttl: float = 60.0,
    max_entries: int = 10_000,
) -> MxResolver:
    return MxResolver(
        nameservers=["127.0.0.1"],
        port=server.port,
        timeout=timeout,
        clock=clock,
        min_ttl=min_ttl,
        max_ttl=max_ttl,
        negative_ttl=negative_ttl,
        rng=random.Random(5321),
        max_entries=max_entries,
    )


def serve(server: DnsServer, zone: Zone) -> None:
    server.records.clear()
    server.records.update(zone)


# --- MX ------------------------------------------------------------------------------------------


async def test_mx_hosts_are_ordered_by_preference_and_normalised(server: DnsServer, clock: FakeClock) -> None:
    serve(
        server,
        {
            "example.test": [
                ("MX", 300, "20 MX2.Example.TEST."),
                ("MX", 300, "10 mx1.example.test."),
                ("MX", 300, "30 backup.example.net."),
            ]
        },
    )
    answer = await resolver_for(server, clock).mx("Example.TEST.")
    assert answer == MxAnswer(
        domain="example.test",
        hosts=(
            MxHost("mx1.example.test", 10),
            MxHost("mx2.example.test", 20),
            MxHost("backup.example.net", 30),
        ),
        implicit=False,
    )


async def test_equal_preference_hosts_are_shuffled_on_every_call(server: DnsServer, clock: FakeClock) -> None:
    serve(
        server,
        {
            "example.test": [("MX", 300, "5 primary.example.test.")]
            + [("MX", 300, f"10 mx{i}.example.test.") for i in range(4)]
        },
    )
    resolver = resolver_for(server, clock)
    orders = set()
    for _ in range(40):
        hosts = (await resolver.mx("example.test")).hosts
        assert hosts[0] == MxHost("primary.example.test", 5)
        assert sorted(host.name for host in hosts[1:]) == [f"mx{i}.example.test" for i in range(4)]
        orders.add(hosts)
    assert len(orders) > 1, "equal-preference order must not be frozen in the cache"
    assert server.count("example.test", "MX") == 1


async def test_null_mx_mixed_with_real_mx_uses_the_real_hosts(server: DnsServer, clock: FakeClock) -> None:
    serve(server, {"example.test": [("MX", 300, "0 ."), ("MX", 300, "10 mx.example.test.")]})
    answer = await resolver_for(server, clock).mx("example.test")
    assert answer.hosts == (MxHost("mx.example.test", 10),)


@pytest.mark.parametrize(
    "records",
    [
        [("A", 300, "192.0.2.10")],
        [("AAAA", 300, "2001:db8::10")],
        [("A", 300, "192.0.2.10"), ("AAAA", 300, "2001:db8::10")],
    ],
    ids=["A only", "AAAA only", "A and AAAA"],
)
async def test_no_mx_makes_the_domain_its_own_implicit_mx(
    server: DnsServer, clock: FakeClock, records: list[tuple[str, int, str]]
) -> None:
    serve(server, {"example.test": records})
    answer = await resolver_for(server, clock).mx("example.test")
    assert answer == MxAnswer(domain="example.test", hosts=(MxHost("example.test", 0),), implicit=True)


async def test_null_mx_bounces_with_5_1_10(server: DnsServer, clock: FakeClock) -> None:
    serve(server, {"example.test": [("MX", 300, "0 ."), ("A", 300, "192.0.2.10")]})
    with pytest.raises(DnsPermanentError, match=r"example\.test.*null MX") as caught:
        await resolver_for(server, clock).mx("example.test")
    assert (caught.value.code, caught.value.enhanced) == (550, "5.1.10")


async def test_nxdomain_bounces_with_5_1_2(server: DnsServer, clock: FakeClock) -> None:
    serve(server, {"other.test": [("A", 300, "192.0.2.10")]})
    with pytest.raises(DnsPermanentError, match=r"nowhere\.test.*NXDOMAIN") as caught:
        await resolver_for(server, clock).mx("nowhere.test")
    assert (caught.value.code, caught.value.enhanced) == (550, "5.1.2")
    assert isinstance(caught.value, DnsPermanentError)


async def test_no_mx_and_no_address_bounces_with_5_1_2(server: DnsServer, clock: FakeClock) -> None:
    serve(server, {"example.test": [("TXT", 300, '"v=spf1 -all"')]})
    with pytest.raises(DnsPermanentError, match=r"example\.test has no MX and no A or AAAA") as caught:
        await resolver_for(server, clock).mx("example.test")
    assert caught.value.enhanced == "5.1.2"


async def test_servfail_is_temporary_and_not_cached(server: DnsServer, clock: FakeClock) -> None:
    serve(server, {"example.test": [("MX", 300, "10 mx.example.test.")]})
    server.answer_servfail("example.test")
    resolver = resolver_for(server, clock)
    for attempt in (1, 2):
        with pytest.raises(DnsTemporaryError, match=r"MX lookup for example\.test failed") as caught:
            await resolver.mx("example.test")
        assert caught.value.enhanced == "4.4.3"
        assert caught.value.__cause__ is not None, "the dnspython error is chained"
        assert server.count("example.test", "MX") == attempt
    server.servfail.clear()
    assert (await resolver.mx("example.test")).hosts == (MxHost("mx.example.test", 10),)


async def test_timeout_is_temporary_and_not_cached(server: DnsServer, clock: FakeClock) -> None:
    serve(server, {"example.test": [("MX", 300, "10 mx.example.test.")]})
    server.drop_queries("example.test")
    resolver = resolver_for(server, clock, timeout=0.2)
    with pytest.raises(DnsTemporaryError, match=r"MX lookup for example\.test timed out after 0\.2s"):
        await resolver.mx("example.test")
    server.drop.clear()
    assert (await resolver.mx("example.test")).hosts == (MxHost("mx.example.test", 10),)


async def test_temporary_failure_on_the_implicit_mx_path_defers(server: DnsServer, clock: FakeClock) -> None:
    serve(server, {"example.test": [("TXT", 300, '"hello"')]})
    server.answer_servfail("example.test", "A")
    with pytest.raises(DnsTemporaryError, match=r"A lookup for example\.test"):
        await resolver_for(server, clock).mx("example.test")


async def test_no_nameservers_is_temporary(clock: FakeClock) -> None:
    with pytest.raises(DnsTemporaryError, match=r"example\.test"):
        await MxResolver(nameservers=[], clock=clock).mx("example.test")


# --- caching -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttl", "still_cached_at", "expired_at"),
    [(300, 299, 301), (0, 4.9, 5.1), (86_400, 3599, 3601)],
    ids=["record TTL", "clamped up to min_ttl", "clamped down to max_ttl"],
)
async def test_answers_are_cached_for_the_clamped_ttl(
    server: DnsServer, clock: FakeClock, ttl: int, still_cached_at: float, expired_at: float
) -> None:
    serve(server, {"example.test": [("MX", ttl, "10 mx.example.test.")]})
    resolver = resolver_for(server, clock, min_ttl=5.0, max_ttl=3600.0)
    await resolver.mx("example.test")
    clock.advance(still_cached_at)
    await resolver.mx("example.test")
    assert server.count("example.test", "MX") == 1
    clock.advance(expired_at - still_cached_at)
    await resolver.mx("example.test")
    assert server.count("example.test", "MX") == 2


async def test_permanent_negatives_are_cached_for_negative_ttl(server: DnsServer, clock: FakeClock) -> None:
    resolver = resolver_for(server, clock, negative_ttl=60.0)
    for _ in range(2):
        with pytest.raises(DnsPermanentError):
            await resolver.mx("new.test")
    assert server.count("new.test", "MX") == 1
    serve(server, {"new.test": [("MX", 300, "10 mx.new.test.")]})
    clock.advance(61)
    assert (await resolver.mx("new.test")).hosts == (MxHost("mx.new.test", 10),)


async def test_implicit_mx_answers_are_cached(server: DnsServer, clock: FakeClock) -> None:
    serve(server, {"example.test": [("A", 300, "192.0.2.10")]})
    resolver = resolver_for(server, clock)
    first = await resolver.mx("example.test")
    assert await resolver.mx("example.test") == first
    assert await resolver.addresses("example.test") == ("192.0.2.10",)
    assert server.total_queries() == 3  # MX, A, AAAA: once each


async def test_concurrent_lookups_share_one_query(server: DnsServer, clock: FakeClock) -> None:
    serve(server, {"example.test": [("MX", 300, "10 mx.example.test.")]})
    server.delay = 0.05
    resolver = resolver_for(server, clock)
    answers = await asyncio.gather(*(resolver.mx("example.test") for _ in range(50)))
    assert {answer.hosts for answer in answers} == {(MxHost("mx.example.test", 10),)}
    assert server.count("example.test", "MX") == 1


async def test_a_cancelled_waiter_does_not_cancel_the_shared_query(
    server: DnsServer, clock: FakeClock
) -> None:
    serve(server, {"example.test": [("MX", 300, "10 mx.example.test.")]})
    server.delay = 0.05
    resolver = resolver_for(server, clock)
    first = asyncio.create_task(resolver.mx("example.test"))
    second = asyncio.create_task(resolver.mx("example.test"))
    await asyncio.sleep(0.01)
    first.cancel()
    assert (await second).hosts == (MxHost("mx.example.test", 10),)
    assert first.cancelled()
    assert server.count("example.test", "MX") == 1


async def test_cache_is_bounded_and_evicts_the_oldest(server: DnsServer, clock: FakeClock) -> None:
    serve(server, {f"d{i}.test": [("MX", 300, f"10 mx.d{i}.test.")] for i in range(3)})
    resolver = resolver_for(server, clock, max_entries=2)
    for i in range(3):
        await resolver.mx(f"d{i}.test")
    await resolver.mx("d2.test")
    await resolver.mx("d0.test")
    assert [server.count(f"d{i}.test", "MX") for i in range(3)] == [2, 1, 1]


# --- addresses -----------------------------------------------------------------------------------


async def test_addresses_lists_ipv4_first_and_is_cached(server: DnsServer, clock: FakeClock) -> None:
    serve(
        server,
        {
            "MX.example.test": [
                ("AAAA", 300, "2001:db8:0:0::25"),
                ("A", 300, "192.0.2.25"),
                ("A", 300, "192.0.2.26"),
            ]
        },
    )
    resolver = resolver_for(server, clock)
    addresses = await resolver.addresses("mx.example.test.")
    assert sorted(addresses[:2]) == ["192.0.2.25", "192.0.2.26"]
    assert addresses[2:] == ("2001:db8::25",)
    assert await resolver.addresses("mx.example.test") == addresses
    assert server.count("mx.example.test", "A") == server.count("mx.example.test", "AAAA") == 1


async def test_addresses_follow_a_cname(server: DnsServer, clock: FakeClock) -> None:
    serve(
        server,
        {
            "mx.example.test": [("CNAME", 300, "real.example.net.")],
            "real.example.net": [("A", 60, "192.0.2.7")],
        },
    )
    assert await resolver_for(server, clock).addresses("mx.example.test") == ("192.0.2.7",)


async def test_addresses_of_a_missing_host_fail_permanently(server: DnsServer, clock: FakeClock) -> None:
    with pytest.raises(DnsPermanentError, match=r"gone\.example\.test does not exist") as caught:
        await resolver_for(server, clock).addresses("gone.example.test")
    assert caught.value.enhanced == "5.4.4"


async def test_addresses_use_one_family_when_the_other_fails_temporarily(
    server: DnsServer, clock: FakeClock
) -> None:
    serve(server, {"mx.example.test": [("A", 300, "192.0.2.25"), ("AAAA", 300, "2001:db8::25")]})
    server.answer_servfail("mx.example.test", "AAAA")
    resolver = resolver_for(server, clock)
    assert await resolver.addresses("mx.example.test") == ("192.0.2.25",)
    server.servfail.clear()
    assert await resolver.addresses("mx.example.test") == ("192.0.2.25", "2001:db8::25")
    assert server.count("mx.example.test", "A") == 1, "the good family stays cached"
    assert server.count("mx.example.test", "AAAA") == 2, "the failed family is asked again"


# --- names ---------------------------------------------------------------------------------------


async def test_unicode_domain_is_asked_in_idna_form(server: DnsServer, clock: FakeClock) -> None:
    serve(server, {"xn--strae-oqa.test": [("MX", 300, "10 mx.xn--strae-oqa.test.")]})
    answer = await resolver_for(server, clock).mx("Straße.Test.")
    assert answer.domain == "xn--strae-oqa.test"
    assert answer.hosts == (MxHost("mx.xn--strae-oqa.test", 10),)
    assert server.count("xn--strae-oqa.test", "MX") == 1


@pytest.mark.parametrize(
    ("domain", "normalised"),
    [
        ("Example.COM.", "example.com"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("straße.de", "xn--strae-oqa.de"),  # IDNA 2008: not "strasse.de"
        ("BÜCHER。DE", "xn--bcher-kva.de"),  # ideographic full stop is a label separator (UTS #46)
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("123.example", "123.example"),
    ],
)
def test_normalise_domain(domain: str, normalised: str) -> None:
    assert normalise_domain(domain) == normalised


@pytest.mark.parametrize(
    "domain",
    [
        "",
        ".",
        "a..b",
        "exa mple.com",
        "under_score.test",
        "-dash.test",
        "dash-.test",
        "x" * 64 + ".test",
        ("a" * 60 + ".") * 5 + "test",
        "☃.com",
        "[192.0.2.1]",
        "a\\.b.test",
    ],
)
async def test_invalid_domains_bounce_without_a_query(
    server: DnsServer, clock: FakeClock, domain: str
) -> None:
    resolver = resolver_for(server, clock)
    with pytest.raises(DnsPermanentError, match="invalid domain name") as caught:
        await resolver.mx(domain)
    assert caught.value.enhanced == "5.1.2"
    assert server.total_queries() == 0


# --- pure decisions ------------------------------------------------------------------------------

mx_hosts = st.lists(
    st.builds(MxHost, st.sampled_from(["a.test", "b.test", "c.test", "d.test", "."]), st.integers(0, 65535)),
    max_size=12,
)


@given(mx_hosts, st.randoms(use_true_random=False))
def test_order_mx_is_a_preference_sorted_permutation(hosts: list[MxHost], rng: random.Random) -> None:
    ordered = order_mx(hosts, rng)
    assert sorted(ordered, key=repr) == sorted(hosts, key=repr)
    assert [host.preference for host in ordered] == sorted(host.preference for host in hosts)


@given(mx_hosts)
def test_usable_mx_keeps_each_real_host_once_at_its_best_preference(hosts: list[MxHost]) -> None:
    usable = usable_mx(hosts)
    real = {host.name for host in hosts} - {"."}
    assert {host.name for host in usable} == real
    assert len(usable) == len(real)
    for host in usable:
        assert host.preference == min(h.preference for h in hosts if h.name == host.name)


async def test_an_mx_set_too_large_for_udp_is_fetched_over_tcp(server: DnsServer, clock: FakeClock) -> None:
    many = [
        ("MX", 300, f"{i} mail-exchanger-{i:03}.a-rather-long-provider-name.example.net.") for i in range(40)
    ]
    serve(server, {"big.test": many})
    answer = await resolver_for(server, clock).mx("big.test")
    assert len(answer.hosts) == 40
    assert answer.hosts[0] == MxHost("mail-exchanger-000.a-rather-long-provider-name.example.net", 0)
    assert server.count("big.test", "MX") == 2  # truncated over UDP, then again over TCP
