"""``mxgate status``: each provider's limits, recent traffic and queue, read from Redis.

Reading is separate from formatting: ``collect`` returns plain rows (also what ``--json`` prints),
``render_table`` turns them into the table people read.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis

from mxgate import keys
from mxgate.limits.effective import Effective
from mxgate.policy import DEFAULT_POLICY_NAME, Limits, ProviderPolicy
from mxgate.telemetry.fleet import read_window

WINDOW_SECONDS = 60


@dataclass(frozen=True, slots=True)
class ProviderRow:
    provider: str
    ceiling_connections: int
    connections: int
    open_connections: int
    ceiling_rate: float | None
    rate: float | None
    queued: int
    attempts: int
    delivered: int
    deferred: int
    deferral_percent: float
    state: str
    reason: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


async def collect(redis: aioredis.Redis, *, window: int = WINDOW_SECONDS) -> list[ProviderRow]:
    raw_policies = await redis.hgetall(keys.POLICIES)
    policies = {name.decode(): ProviderPolicy.from_json(doc) for name, doc in raw_policies.items()}
    known = {m.decode() for m in await redis.smembers(keys.PROVIDERS)}
    providers = sorted((set(policies) - {DEFAULT_POLICY_NAME}) | known)
    pipe = redis.pipeline(transaction=False)
    now_ms = int(time.time() * 1000)
    for provider in providers:
        pipe.hgetall(keys.limits(provider))
        pipe.zcard(keys.queue(provider))
        pipe.zcount(keys.leases(provider), now_ms, "+inf")
    answers = await pipe.execute()
    now = int(time.time())
    traffic = await read_window(redis, providers, start=now - window, end=now + 1)
    fallback = policies.get(DEFAULT_POLICY_NAME)
    rows = []
    for i, provider in enumerate(providers):
        raw_limits, queued, open_leases = answers[3 * i:3 * i + 3]
        policy = policies.get(provider) or fallback
        ceiling = policy.spec.limits if policy else Limits()
        effective = Effective.from_redis(raw_limits, ceiling) if raw_limits else Effective.ceiling(ceiling)
        counts = traffic[provider]
        deferred = sum(v for k, v in counts.items() if k.startswith("deferred_"))
        outcomes = counts["delivered"] + counts["failed"] + deferred
        if effective.suspended_until_ms > now_ms:
            state = "suspended"
        elif (effective.max_connections < ceiling.max_connections
              or (ceiling.messages_per_second or 0) > (effective.messages_per_second or 0) > 0):
            state = "throttled"
        else:
            state = "ok"
        rows.append(ProviderRow(
            provider=provider, ceiling_connections=ceiling.max_connections,
            connections=effective.max_connections, open_connections=int(open_leases),
            ceiling_rate=ceiling.messages_per_second, rate=effective.messages_per_second, queued=int(queued),
            attempts=counts["attempts"], delivered=counts["delivered"], deferred=deferred,
            deferral_percent=round(100.0 * deferred / outcomes, 1) if outcomes else 0.0,
            state=state, reason=effective.reason))
    return rows


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:g}/s"


def render_table(rows: list[ProviderRow], *, window: int = WINDOW_SECONDS) -> str:
    headers = ["PROVIDER", "CONNS (OPEN/NOW/MAX)", "RATE (NOW/MAX)", "QUEUED",
               f"DELIVERED/{window}s", "DEFERRED", "DEFER %", "STATE", "REASON"]
    table = [headers] + [[
        r.provider, f"{r.open_connections}/{r.connections}/{r.ceiling_connections}",
        f"{_rate(r.rate)} / {_rate(r.ceiling_rate)}", str(r.queued), str(r.delivered), str(r.deferred),
        f"{r.deferral_percent:.1f}", r.state, r.reason or "-"] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in table]
    if not rows:
        lines.append("(no providers yet: is a controller publishing policies to this Redis?)")
    return "\n".join(lines)
