"""Writing the policy table into Redis, where the gateways read it.

The whole table is replaced in one MULTI/EXEC (no gateway ever sees half of an update; the table and
its revision share the ``{fleet}`` hash tag, so this holds on Redis Cluster too), the revision in
``mxg:{fleet}:control`` changes, and then a "policies" event tells every gateway to reload at once
(PUBLISH is never inside a transaction or pipeline: a cluster client refuses that).
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Sequence

from mxgate import keys
from mxgate.limits.effective import Effective
from mxgate.policy import ProviderPolicy
from mxgate.redisconn import RedisClient


def table_revision(policies: Sequence[ProviderPolicy]) -> str:
    digest = hashlib.sha256()
    for policy in sorted(policies, key=lambda p: p.name):
        digest.update(policy.to_json().encode())
    return digest.hexdigest()[:16]


async def publish_policies(redis: RedisClient, policies: Sequence[ProviderPolicy], *,
                           writer: str | None = None) -> str:
    """Replace the policy table in Redis; returns the table's revision."""
    revision = table_revision(policies)
    pipe = redis.pipeline(transaction=True)
    pipe.delete(keys.POLICIES)
    if policies:
        pipe.hset(keys.POLICIES, mapping={p.name: p.to_json() for p in policies})
    pipe.hset(keys.CONTROL, mapping={"rev": revision, "updated_ms": int(time.time() * 1000),
                                     "writer": writer or socket.gethostname()})
    await pipe.execute()
    await redis.publish(keys.EVENTS, keys.EVENT_POLICIES)
    return revision


async def publish_effective_limits(redis: RedisClient, provider: str, effective: Effective) -> None:
    """Put new live limits in force for ``provider`` and tell every gateway at once."""
    pipe = redis.pipeline(transaction=True)
    # redis-py types `mapping` Mapping[FieldT, EncodableT]: Mapping's key type is invariant, so it refuses
    # every dict[str, str] although str is a FieldT.
    pipe.hset(keys.limits(provider), mapping=effective.to_redis())  # type: ignore[arg-type]
    await pipe.execute()
    await redis.publish(keys.EVENTS, f"{keys.EVENT_LIMITS} {provider}")


async def clear_provider_state(redis: RedisClient, provider: str) -> int:
    """Delete a provider's effective limits, leases and rate state (policy deleted). Jobs stay queued."""
    pattern = f"{keys.provider_tag(provider)}:*"
    # The spool's keys: queued mail, who holds it, and the commit records of multi-domain messages.
    spool = (keys.queue(provider), keys.job_prefix(provider), keys.claims(provider), keys.commit(provider, ""))
    doomed = [k async for k in redis.scan_iter(match=pattern, count=500)
              if not k.decode().startswith(spool)]
    if doomed:
        await redis.delete(*doomed)
    await redis.publish(keys.EVENTS, f"{keys.EVENT_LIMITS} {provider}")
    return len(doomed)
