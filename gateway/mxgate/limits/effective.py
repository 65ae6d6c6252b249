"""Effective limits: what is in force for a provider right now, under the policy's ceiling.

The policy's ``spec.limits`` is the ceiling. The controller (file mode or the Kubernetes operator)
tightens and relaxes the live values and writes them to ``mxg:{p:<provider>}:limits``; gateways
read them from there. A missing hash or field means "the ceiling". A live value is never allowed
above the ceiling, whoever wrote it.

Fields of the hash (strings, as Redis stores them):

    maxConnections      int     connections fleet-wide now
    messagesPerSecond   float   message rate fleet-wide now ("" = no rate limit)
    suspendedUntil      int     epoch ms; no delivery attempts before it (e.g. Yahoo [TSS04])
    reason              str     why the controller last changed them (shown by `mxgate status`)
    suspendReason       str     why the provider was suspended (the reply that matched a Suspend rule);
                                written by the suspend script only, so a controller window keeps it
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mxgate.policy import Limits


def rate_text(rate: float) -> str:
    """A rate as the hash stores it: short ("40", not "40.0"), but exact: ``:g`` alone keeps six digits, so
    a floor of 100000.5 msg/s came back from Redis as 100000, below the floor."""
    short = f"{rate:g}"
    return short if float(short) == rate else repr(rate)


@dataclass(frozen=True, slots=True)
class Effective:
    max_connections: int
    messages_per_second: float | None
    suspended_until_ms: int = 0
    reason: str = ""
    suspend_reason: str = ""

    @classmethod
    def ceiling(cls, limits: Limits) -> Effective:
        return cls(limits.max_connections, limits.messages_per_second)

    @classmethod
    def from_redis(cls, raw: Mapping[bytes, bytes], ceiling: Limits) -> Effective:
        """Parse the hash; unusable fields fall back to the ceiling rather than stop delivery."""
        conns = ceiling.max_connections
        rate = ceiling.messages_per_second
        try:
            if raw.get(b"maxConnections"):
                conns = max(1, min(conns, int(raw[b"maxConnections"])))
            if raw.get(b"messagesPerSecond"):
                live = float(raw[b"messagesPerSecond"])
                if live > 0:
                    rate = live if rate is None else min(rate, live)
            suspended = int(raw.get(b"suspendedUntil") or 0)
        except ValueError:
            return cls.ceiling(ceiling)
        return cls(conns, rate, suspended, (raw.get(b"reason") or b"").decode("utf-8", "replace"),
                   (raw.get(b"suspendReason") or b"").decode("utf-8", "replace"))

    def to_redis(self) -> dict[str, str]:
        return {"maxConnections": str(self.max_connections),
                "messagesPerSecond": "" if self.messages_per_second is None else rate_text(self.messages_per_second),
                "suspendedUntil": str(self.suspended_until_ms), "reason": self.reason}

    def below(self, ceiling: Limits) -> tuple[str, ...]:
        """Which live limits are under the policy's ceiling: "connections", "rate" (a live rate under a
        ceiling without one is, too: the controller imposed it). Empty: at the ceiling."""
        rate = self.messages_per_second
        return (*(("connections",) if self.max_connections < ceiling.max_connections else ()),
                *(("rate",) if rate is not None and (ceiling.messages_per_second is None
                                                   or rate < ceiling.messages_per_second) else ()))

    def applied_to(self, limits: Limits) -> Limits:
        return limits.model_copy(update={"max_connections": self.max_connections,
                                         "messages_per_second": self.messages_per_second})
