"""Recipient domain -> provider, and provider + domain -> next hops.

Classification first tries ``match.domains`` (the domain or a parent), which needs no DNS. Only when
some policy classifies by ``match.mxHosts`` is the domain's MX looked up, so every domain hosted at, say,
Microsoft rolls up to the ``microsoft`` provider and shares its limits. A domain no policy claims gets
its own provider id (``domain:<name>``) with the ``default`` policy's limits.

Ingress classifies with DNS when it must, but never fails a message because DNS is slow or broken: it
queues the job under the domain's own id, and delivery classifies again (``Router.provider_for``) before
sending, moving the job to the right provider queue if the answer changed.
"""

from __future__ import annotations

from dataclasses import dataclass

from mxgate.errors import RoutingError
from mxgate.policy import default_provider_id
from mxgate.policybook import PolicyBook
from mxgate.routing.dns import MxResolver


@dataclass(frozen=True, slots=True)
class NextHop:
    host: str
    port: int = 25

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(slots=True)
class Router:
    book: PolicyBook
    resolver: MxResolver
    mx_port: int = 25
    """Port of MX next hops: 25 on the internet; another port in a lab or behind a port-mapping proxy."""

    async def provider_for(self, domain: str) -> str:
        table = self.book.table
        provider = table.by_domain(domain)
        if provider is not None:
            return provider
        if table.has_mx_rules():
            try:
                answer = await self.resolver.mx(domain)
            except RoutingError:
                return default_provider_id(domain)
            provider = table.by_mx([host.name for host in answer.hosts])
            if provider is not None:
                return provider
        return default_provider_id(domain)

    async def next_hops(self, provider: str, domain: str) -> list[NextHop]:
        """Static route of the provider's policy (or of ``default`` for unmatched domains), else DNS MX.

        Raises DnsTemporaryError / DnsPermanentError from the MX lookup.
        """
        policy = self.book.governing(provider)
        if policy is not None and policy.spec.route is not None:
            return [NextHop(host, port) for host, port in policy.spec.route.next_hops()]
        answer = await self.resolver.mx(domain)
        return [NextHop(host.name, self.mx_port) for host in answer.hosts]
