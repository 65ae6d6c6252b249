"""Next-hop resolution for outbound mail: MX, implicit MX and the addresses of a mail exchanger.

``MxResolver.mx(domain)`` answers "which hosts accept mail for this domain, in which order" following
RFC 5321 §5.1 and RFC 7505; ``MxResolver.addresses(host)`` answers "where do I connect" (IPv4 first).
Both are built on dnspython's asyncio stub resolver and translate its exceptions at this boundary:

    NXDOMAIN, null MX, no MX and no A/AAAA   -> DnsPermanentError (the job bounces: 5.1.2 / 5.1.10)
    timeout, SERVFAIL, no usable nameserver  -> DnsTemporaryError (the job is deferred: 4.4.3)

Trade-offs worth knowing:

* **Own cache, per question.** Answers are cached per (name, record type) against the injected clock, so
  tests and the scheduler agree on time. Positive answers live for their TTL clamped to
  [min_ttl, max_ttl]: the floor stops TTL-0 records from turning every job into a query, the ceiling
  bounds how long a withdrawn MX keeps receiving mail. Negative answers (NXDOMAIN, no records) live for
  ``negative_ttl`` rather than the SOA minimum: one knob the operator understands. Temporary failures
  are never cached, so the next job retries at once.
* **Shared in-flight queries.** A burst of jobs for one domain (a newsletter to 50,000 gmail.com
  recipients) asks the nameserver once; the query runs in its own task so a waiter that is cancelled
  does not cancel it for the others.
* **Order is decided per call.** The cache keeps MX hosts unshuffled; hosts of equal preference are
  shuffled on every ``mx()`` call so load spreads across them (RFC 5321 §5.1) instead of the first
  answer's order being frozen for a TTL.
* **Partial address answers are used.** When one family fails temporarily and the other has addresses,
  ``addresses()`` returns what it has (some broken authoritative servers SERVFAIL only on AAAA); the
  failed family is not cached and is asked again next time.
* **IDNA 2008.** Unicode domains are encoded with the ``idna`` package (UTS #46, non-transitional), not
  dnspython's default codec: dnspython falls back to IDNA 2003 when the installed ``idna`` is older than
  it wants, and IDNA 2003 maps "straße.de" to "strasse.de", a different domain.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.rdtypes.mxbase
import dns.resolver
import idna

from mxgate.errors import ConfigError, DnsPermanentError, DnsTemporaryError

#: Bounds memory: one entry per (name, record type) asked recently; the oldest entry is evicted first.
MAX_CACHE_ENTRIES = 10_000

#: dnspython's default per-attempt timeout. The overall ``timeout`` is the lifetime of one lookup, so
#: with several nameservers a dropped packet to the first still leaves time to ask the next.
_PER_ATTEMPT_TIMEOUT = 2.0

#: EDNS buffer size recommended by DNS Flag Day 2020: large MX sets fit in one UDP answer, yet the
#: datagram stays below common path MTUs so it is not fragmented (and dropped) on the way.
_EDNS_PAYLOAD = 1232

#: RFC 1035 §2.3.4: 255 octets on the wire is 253 characters of text without the final dot.
_MAX_DOMAIN_LENGTH = 253

#: RFC 5321 §4.1.2 sub-domain: letters, digits and hyphens, starting and ending with a letter or digit.
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

#: Record types asked by addresses(), IPv4 first.
_A = dns.rdatatype.A
_AAAA = dns.rdatatype.AAAA

#: How a null MX target (RFC 7505: the root name ".") is kept in MxHost.name.
_NULL_MX_TARGET = "."


@dataclass(frozen=True, slots=True)
class MxHost:
    """One mail exchanger of a domain."""

    name: str
    """Host name, lower-case, without the trailing dot."""
    preference: int
    """MX preference: lower is tried first."""


@dataclass(frozen=True, slots=True)
class MxAnswer:
    """The next hops for a domain, in the order to try them."""

    domain: str
    """The domain asked for, normalised (lower-case, IDNA A-labels, no trailing dot)."""
    hosts: tuple[MxHost, ...]
    """By preference ascending; hosts of equal preference in random order (RFC 5321 §5.1)."""
    implicit: bool
    """True when the domain has no MX and is its own implicit MX (it has A or AAAA records)."""


# --- Pure decisions -------------------------------------------------------------------------------


def normalise_domain(domain: str) -> str:
    """The DNS form of a mail domain: IDNA A-labels, lower-case, no trailing dot.

    Raises DnsPermanentError (5.1.2) when ``domain`` is not a syntactically valid mail domain, so a bad
    recipient domain bounces instead of being asked of a nameserver.
    """
    text = domain
    if not text.isascii():
        try:
            text = idna.encode(text, uts46=True, transitional=False).decode("ascii")
        except UnicodeError as exc:  # idna.IDNAError is a UnicodeError
            raise DnsPermanentError(f"invalid domain name {domain!r}: {exc}", enhanced="5.1.2") from exc
    text = text.lower()
    text = text.removesuffix(".")
    if not text:
        raise DnsPermanentError(f"invalid domain name {domain!r}: empty", enhanced="5.1.2")
    if len(text) > _MAX_DOMAIN_LENGTH:
        raise DnsPermanentError(
            f"invalid domain name {domain!r}: longer than {_MAX_DOMAIN_LENGTH} characters", enhanced="5.1.2"
        )
    for label in text.split("."):
        if not _LDH_LABEL.fullmatch(label):
            raise DnsPermanentError(
                f"invalid domain name {domain!r}: label {label!r} is not letters, digits and hyphens",
                enhanced="5.1.2",
            )
    return text


def usable_mx(hosts: Iterable[MxHost]) -> tuple[MxHost, ...]:
    """The MX hosts one can connect to: null MX targets dropped, each host once at its lowest preference.

    A lone null MX therefore yields ``()``. RFC 7505 forbids mixing a null MX with other MX records; if a
    domain does it anyway the real hosts are used, since "." can never be connected to.
    """
    best: dict[str, int] = {}
    for host in hosts:
        if host.name != _NULL_MX_TARGET and host.preference < best.get(host.name, host.preference + 1):
            best[host.name] = host.preference
    return tuple(MxHost(name, preference) for name, preference in best.items())


def order_mx(hosts: Iterable[MxHost], rng: random.Random) -> tuple[MxHost, ...]:
    """Hosts by preference ascending, equal preferences shuffled (RFC 5321 §5.1 spreads the load)."""
    groups: dict[int, list[MxHost]] = {}
    for host in hosts:
        groups.setdefault(host.preference, []).append(host)
    ordered: list[MxHost] = []
    for preference in sorted(groups):
        group = groups[preference]
        rng.shuffle(group)
        ordered.extend(group)
    return tuple(ordered)


# --- Cache ----------------------------------------------------------------------------------------

_R = TypeVar("_R")
_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


@dataclass(frozen=True, slots=True)
class _Outcome(Generic[_R]):
    """What the nameservers said about one (name, type) question, as plain data."""

    records: tuple[_R, ...]
    """Empty for NODATA and NXDOMAIN."""
    ttl: float = 0.0
    """Smallest TTL along the answer's CNAME chain; 0 for negative answers."""
    nxdomain: bool = False


class _AnswerCache(Generic[_K, _V]):
    """A TTL- and size-bounded cache that also lets concurrent askers share one in-flight lookup."""

    def __init__(
        self, *, clock: Callable[[], float], max_entries: int, lifetime: Callable[[_V], float]
    ) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._lifetime = lifetime
        # Insertion-ordered so the first entry is the oldest: eviction is popitem(last=False).
        self._entries: OrderedDict[_K, tuple[float, _V]] = OrderedDict()
        self._inflight: dict[_K, asyncio.Task[_V]] = {}

    async def get(self, key: _K, fetch: Callable[[], Awaitable[_V]]) -> _V:
        entry = self._entries.get(key)
        if entry is not None:
            expires_at, value = entry
            if self._clock() < expires_at:
                return value
            del self._entries[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch_and_store(key, fetch))
            self._inflight[key] = task
            # Added before any waiter's callback, so the entry is gone by the time a waiter resumes:
            # a failed lookup is never handed to someone who asks after it finished.
            task.add_done_callback(functools.partial(self._settle, key))
        # shield: a cancelled waiter must not cancel the lookup the other waiters share.
        return await asyncio.shield(task)

    async def _fetch_and_store(self, key: _K, fetch: Callable[[], Awaitable[_V]]) -> _V:
        value = await fetch()
        self._entries[key] = (self._clock() + self._lifetime(value), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return value

    def _settle(self, key: _K, task: asyncio.Task[_V]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            # Marks the exception retrieved: every waiter may have been cancelled before it arrived.
            task.exception()


# --- Resolver -------------------------------------------------------------------------------------


class MxResolver:
    """Resolves the next hops of outbound mail, with TTL caching and shared in-flight queries."""

    def __init__(
        self,
        *,
        nameservers: Sequence[str] | None = None,
        port: int = 53,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        min_ttl: float = 5.0,
        max_ttl: float = 3600.0,
        negative_ttl: float = 60.0,
        rng: random.Random | None = None,
        max_entries: int = MAX_CACHE_ENTRIES,
    ) -> None:
        """Use the system's resolv.conf when ``nameservers`` is None, else those servers on ``port``.

        ``timeout`` bounds one lookup (all attempts and nameservers together); ``clock`` drives cache
        expiry; ``max_entries`` bounds each of the MX and address caches.
        """
        if not 0 <= min_ttl <= max_ttl:
            raise ValueError(f"need 0 <= min_ttl <= max_ttl, got min_ttl={min_ttl}, max_ttl={max_ttl}")
        try:
            if nameservers is None:
                resolver = dns.asyncresolver.Resolver(configure=True)
            else:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.port = port
                resolver.nameservers = list(nameservers)
        except (dns.resolver.NoResolverConfiguration, ValueError) as exc:
            raise ConfigError(f"cannot set up the DNS resolver: {exc}") from exc
        resolver.lifetime = timeout
        resolver.timeout = min(timeout, _PER_ATTEMPT_TIMEOUT)
        resolver.use_edns(0, 0, _EDNS_PAYLOAD)
        self._resolver = resolver
        self._timeout = timeout
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._negative_ttl = negative_ttl
        self._rng = rng if rng is not None else random.Random()
        self._mx_cache: _AnswerCache[str, _Outcome[MxHost]] = _AnswerCache(
            clock=clock, max_entries=max_entries, lifetime=self._cache_seconds
        )
        self._address_cache: _AnswerCache[tuple[str, dns.rdatatype.RdataType], _Outcome[str]] = _AnswerCache(
            clock=clock, max_entries=max_entries, lifetime=self._cache_seconds
        )

    async def mx(self, domain: str) -> MxAnswer:
        """The hosts accepting mail for ``domain``, in the order to try them."""
        name = normalise_domain(domain)
        outcome = await self._mx_cache.get(name, functools.partial(self._fetch_mx, name))
        if outcome.nxdomain:
            raise DnsPermanentError(f"{name} does not exist (NXDOMAIN)", enhanced="5.1.2")
        if outcome.records:
            hosts = usable_mx(outcome.records)
            if not hosts:
                raise DnsPermanentError(
                    f"{name} publishes a null MX (RFC 7505): it accepts no mail", enhanced="5.1.10"
                )
            return MxAnswer(domain=name, hosts=order_mx(hosts, self._rng), implicit=False)
        # No MX records: RFC 5321 §5.1 makes the domain its own MX, if it has an address at all.
        v4, v6 = await self._both_families(name)
        if _has_addresses(v4, v6):
            return MxAnswer(domain=name, hosts=(MxHost(name, 0),), implicit=True)
        _raise_if_temporary(v4, v6)
        raise DnsPermanentError(f"{name} has no MX and no A or AAAA records", enhanced="5.1.2")

    async def addresses(self, host: str) -> tuple[str, ...]:
        """The IPv4 then IPv6 addresses of a mail exchanger.

        Raises DnsPermanentError (5.4.4, unable to route) when the host does not exist or has no address.
        """
        name = normalise_domain(host)
        v4, v6 = await self._both_families(name)
        if _has_addresses(v4, v6):
            families = (outcome for outcome in (v4, v6) if isinstance(outcome, _Outcome))
            return tuple(address for outcome in families for address in outcome.records)
        _raise_if_temporary(v4, v6)
        if isinstance(v4, _Outcome) and v4.nxdomain:
            raise DnsPermanentError(f"mail exchanger {name} does not exist (NXDOMAIN)", enhanced="5.4.4")
        raise DnsPermanentError(f"mail exchanger {name} has no A or AAAA records", enhanced="5.4.4")

    def _cache_seconds(self, outcome: _Outcome[MxHost] | _Outcome[str]) -> float:
        if not outcome.records:
            return self._negative_ttl
        return min(max(outcome.ttl, self._min_ttl), self._max_ttl)

    async def _both_families(
        self, name: str
    ) -> tuple[_Outcome[str] | DnsTemporaryError, _Outcome[str] | DnsTemporaryError]:
        """A and AAAA asked concurrently; a temporary failure of one is returned, not raised."""
        v4, v6 = await asyncio.gather(
            self._address_cache.get((name, _A), functools.partial(self._fetch_addresses, name, _A)),
            self._address_cache.get((name, _AAAA), functools.partial(self._fetch_addresses, name, _AAAA)),
            return_exceptions=True,
        )
        return _family(v4), _family(v6)

    async def _fetch_mx(self, name: str) -> _Outcome[MxHost]:
        answer = await self._query(name, dns.rdatatype.MX)
        if answer is None:
            return _Outcome(records=(), nxdomain=True)
        if answer.rrset is None:
            return _Outcome(records=())
        hosts = tuple(
            MxHost(rdata.exchange.to_text(omit_final_dot=True).lower(), rdata.preference)
            for rdata in answer.rrset
            if isinstance(rdata, dns.rdtypes.mxbase.MXBase)
        )
        return _Outcome(records=hosts, ttl=answer.chaining_result.minimum_ttl)

    async def _fetch_addresses(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Outcome[str]:
        answer = await self._query(name, rdtype)
        if answer is None:
            return _Outcome(records=(), nxdomain=True)
        if answer.rrset is None:
            return _Outcome(records=())
        # For A and AAAA the presentation form is the address (AAAA in RFC 5952 compressed form).
        addresses = tuple(rdata.to_text() for rdata in answer.rrset)
        return _Outcome(records=addresses, ttl=answer.chaining_result.minimum_ttl)

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.resolver.Answer | None:
        """One question to the nameservers; None means NXDOMAIN. The dnspython boundary."""
        question = f"{dns.rdatatype.to_text(rdtype)} lookup for {name}"
        try:
            return await self._resolver.resolve(
                dns.name.from_text(name), rdtype, raise_on_no_answer=False, search=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.YXDOMAIN):
            # YXDOMAIN: a DNAME rewrote the name past 255 octets; it cannot exist either.
            return None
        except dns.exception.Timeout as exc:
            raise DnsTemporaryError(f"{question} timed out after {self._timeout:g}s") from exc
        except dns.resolver.NoNameservers as exc:
            raise DnsTemporaryError(f"{question} failed: no nameserver gave a usable answer ({exc})") from exc
        except (dns.exception.DNSException, OSError) as exc:
            raise DnsTemporaryError(f"{question} failed: {exc}") from exc


def _family(result: _Outcome[str] | BaseException) -> _Outcome[str] | DnsTemporaryError:
    if isinstance(result, (_Outcome, DnsTemporaryError)):
        return result
    raise result  # cancellation or a bug: not ours to swallow


def _has_addresses(*families: _Outcome[str] | DnsTemporaryError) -> bool:
    return any(isinstance(outcome, _Outcome) and outcome.records for outcome in families)


def _raise_if_temporary(*families: _Outcome[str] | DnsTemporaryError) -> None:
    """Without addresses, one family failing temporarily means "ask again later", not "no address"."""
    for outcome in families:
        if isinstance(outcome, DnsTemporaryError):
            # A fresh exception per caller: the failed lookup, and so this error, may be shared.
            raise DnsTemporaryError(str(outcome)) from outcome
