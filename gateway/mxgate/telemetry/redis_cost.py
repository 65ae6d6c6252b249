"""Round trips to Redis as a metric: ``mxgate_redis_roundtrips_total``.

Every command or pipeline redis-py sends is one round trip; ``mxgate.redisconn``'s connections count
them, this module exports the count, and ``bench/redis_cost.py`` reads it to report round trips per
delivered message (the target is at most 3, amortised).
"""

from __future__ import annotations

from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Observation

from mxgate.redisconn import ROUND_TRIPS

_registered = False


def _observe(_: CallbackOptions) -> list[Observation]:
    return [Observation(ROUND_TRIPS[0])]


def register_round_trips() -> None:
    """Export the round-trip count (once per process)."""
    global _registered
    if not _registered:
        otel_metrics.get_meter("mxgate").create_observable_counter(
            "mxgate_redis_roundtrips", callbacks=[_observe],
            description="Requests sent to Redis (commands or pipelines)")
        _registered = True
