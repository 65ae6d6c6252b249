"""``mxgate sim``: a local SMTP server that throttles like a mailbox provider, and records what it saw.

It is both a user feature (rehearse a ProviderPolicy against Outlook-, Yahoo- or Gmail-like throttling
before meeting the real thing) and the destination of mxgate's integration tests and benchmarks.

    profiles   reply texts and stage defaults per provider (pure data)
    limits     token bucket and concurrency tracker (pure, injected time)
    record     counters, per-second series, duplicate detection (pure)
    provider   the decision at each SMTP event, composed of the three above (pure)
    config     SimConfig, the validated settings
    server     aiosmtpd + aiohttp adapters: ProviderSimulator
    outputs    report file and sink log
    command    the ``mxgate sim`` flags

``ProviderSimulator`` is imported lazily so that the pure modules (and the CLI's flag parsing) do not load
aiosmtpd or aiohttp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mxgate.sim.config import SimConfig
from mxgate.sim.limits import ConcurrencyTracker, TokenBucket
from mxgate.sim.profiles import PROFILES, Profile, Stage
from mxgate.sim.record import DeferralKind

if TYPE_CHECKING:
    from mxgate.sim.server import ProviderSimulator

__all__ = [
    "PROFILES",
    "ConcurrencyTracker",
    "DeferralKind",
    "Profile",
    "ProviderSimulator",
    "SimConfig",
    "Stage",
    "TokenBucket",
]


def __getattr__(name: str) -> Any:
    if name == "ProviderSimulator":
        from mxgate.sim.server import ProviderSimulator

        return ProviderSimulator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
