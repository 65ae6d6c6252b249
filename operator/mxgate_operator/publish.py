"""Writing the policy table into Redis, where the gateways read it.

The whole table is replaced in one MULTI/EXEC (no gateway ever sees half of an update), the revision
in ``mxg:control`` changes, and a "policies" event tells every gateway to reload at once.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Sequence

import redis.asyncio as aioredis

from mxgate import keys
from mxgate.policy import ProviderPolicy


def table_revision(policies: Sequence[ProviderPolicy]) -> str:
    digest = hashlib.sha256()
    for policy in sorted(policies, key=lambda p: p.name):
        digest.update(policy.to_json().encode())
    return digest.hexdigest()[:16]


async def publish_policies(redis: aioredis.Redis, policies: Sequence[ProviderPolicy], *, writer: str | None = None) -> str:
    """Replace the policy table in Redis; returns the table's revision."""
    revision = table_revision(policies)
    pipe = redis.pipeline(transaction=True)
    pipe.delete(keys.POLICIES)
    if policies:
        pipe.hset(keys.POLICIES, mapping={p.name: p.to_json() for p in policies})
    pipe.hset(keys.CONTROL, mapping={"rev": revision, "updated_ms": int(time.time() * 1000),
                                     "writer": writer or socket.gethostname()})
    pipe.publish(keys.EVENTS, keys.EVENT_POLICIES)
    await pipe.execute()
    return revision
