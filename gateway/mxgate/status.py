"""``mxgate status``: each provider's limits, recent traffic, queue and the controller's latest moves, from Redis.

Reading is separate from formatting: ``collect`` returns plain rows (also what ``--json`` prints),
``render_table`` turns them into the table people read, at most ``width`` columns wide (120 by
default): the last column and the log lines are cut to fit, never wrapped, so ``--watch`` redraws in
place. The adjustments come from the adaptive loop's list (``keys.adjustments``: time, signal, limit,
old, new, reason), so the table shows a tightening within one refresh of the loop making it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from pydantic import ValidationError

from mxgate import keys
from mxgate.limits.effective import Effective
from mxgate.limits.warmup import daily_cap, utc_date
from mxgate.policy import DEFAULT_POLICY_NAME, Limits, ProviderPolicy
from mxgate.redisconn import RedisClient
from mxgate.spool.store import due_providers
from mxgate.telemetry.fleet import read_window

WINDOW_SECONDS = 60
ADJUSTMENTS_SHOWN = 20     # per provider, in --json (the loop keeps 200)
WIDTH = 120


@dataclass(frozen=True, slots=True)
class LimitChange:
    """One entry of the adaptive loop's adjustments list."""

    time: float
    signal: str            # connections, rate (a cut), recovery (a raise), policy (the ceiling changed), refused
    limit: str             # connections or rate
    old: float | None      # a rate of None is "no rate limit"
    new: float | None
    reason: str

    @classmethod
    def parse(cls, raw: bytes | str) -> LimitChange | None:
        try:
            entry = json.loads(raw)
            return cls(float(entry["time"]), str(entry["signal"]), str(entry["limit"]), entry.get("old"),
                       entry.get("new"), str(entry.get("reason", "")))
        except (ValueError, KeyError, TypeError):
            return None   # an entry some other version wrote: not worth failing the whole status for

    def move(self) -> str:
        """``conns 20→14 (connections)``."""
        name = "conns" if self.limit == "connections" else self.limit
        return f"{name} {_number(self.old)}→{_number(self.new)} ({self.signal})"


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
    state: str                       # ok, throttled, suspended, capped
    reason: str
    suspended_until: float | None = None     # epoch seconds, while suspended
    suspend_reason: str = ""                 # the reply that matched a Suspend rule
    day_cap: int | None = None               # today's cap (UTC day): limits.messagesPerDay or the warm-up's
    sent_today: int | None = None            # messages counted against it so far
    adjustments: list[LimitChange] = field(default_factory=list)   # newest first

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


async def collect(redis: RedisClient, *, window: int = WINDOW_SECONDS) -> list[ProviderRow]:
    policies: dict[str, ProviderPolicy] = {}
    for name, doc in (await redis.hgetall(keys.POLICIES)).items():
        try:
            policies[_text(name)] = ProviderPolicy.from_json(doc)
        except ValidationError:
            continue   # written by a newer controller: its provider is shown with the default limits
    known = await due_providers(redis)
    providers = sorted((set(policies) - {DEFAULT_POLICY_NAME}) | known)
    seconds, micros = await redis.time()    # Redis's clock decides the day, as for the gateways' caps
    now_ms = seconds * 1000 + micros // 1000
    day = seconds // 86400
    fallback = policies.get(DEFAULT_POLICY_NAME)
    pipe = redis.pipeline(transaction=False)
    for provider in providers:
        pipe.hgetall(keys.limits(provider))
        pipe.zcard(keys.queue(provider))
        pipe.zcount(keys.leases(provider), now_ms, "+inf")
        pipe.lrange(keys.adjustments(provider), 0, ADJUSTMENTS_SHOWN - 1)
        pipe.get(keys.day_count(provider, day))
    answers = await pipe.execute()
    now = int(time.time())
    traffic = await read_window(redis, providers, start=now - window, end=now + 1)
    rows = []
    for i, provider in enumerate(providers):
        raw_limits, queued, open_leases, raw_changes, day_count = answers[5 * i:5 * i + 5]
        policy = policies.get(provider) or fallback
        ceiling = policy.spec.limits if policy else Limits()
        effective = Effective.from_redis(raw_limits, ceiling) if raw_limits else Effective.ceiling(ceiling)
        counts = traffic[provider]
        deferred = sum(v for k, v in counts.items() if k.startswith("deferred_"))
        outcomes = counts["delivered"] + counts["failed"] + deferred
        cap = daily_cap(ceiling.messages_per_day, policy.spec.warmup if policy else None, utc_date(day))
        sent = int(day_count or 0) if cap is not None else None
        suspended = effective.suspended_until_ms > now_ms
        rows.append(ProviderRow(
            provider=provider, ceiling_connections=ceiling.max_connections,
            connections=effective.max_connections, open_connections=int(open_leases),
            ceiling_rate=ceiling.messages_per_second, rate=effective.messages_per_second, queued=int(queued),
            attempts=counts["attempts"], delivered=counts["delivered"], deferred=deferred,
            deferral_percent=round(100.0 * deferred / outcomes, 1) if outcomes else 0.0,
            state=_state(effective, ceiling, suspended=suspended, capped=cap is not None and (sent or 0) >= cap),
            reason=effective.reason, suspended_until=effective.suspended_until_ms / 1000 if suspended else None,
            suspend_reason=effective.suspend_reason if suspended else "",
            day_cap=cap, sent_today=sent,
            adjustments=[c for c in map(LimitChange.parse, raw_changes) if c is not None]))
    return rows


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _state(effective: Effective, ceiling: Limits, *, suspended: bool, capped: bool) -> str:
    if suspended:
        return "suspended"
    if capped:
        return "capped"     # the day's cap (a warm-up day's volume) is sent: the rest waits for tomorrow
    if effective.below(ceiling):
        return "throttled"
    return "ok"


# -- rendering (pure) ------------------------------------------------------------------------------------


def _number(value: float | None) -> str:
    """Limits as people read them: 14, 200, 46.1, 0.25 (``--json`` has the exact values); None: no limit."""
    if value is None:
        return "-"
    if value >= 100 or value == int(value):
        return str(round(value))
    return f"{value:.2g}" if value < 1 else f"{value:.1f}".removesuffix(".0")


def _span(seconds: float) -> str:
    """``42s``, ``4m05s``, ``2h03m``, ``3d04h``: short enough for a table cell."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M:%SZ")


def _state_cell(row: ProviderRow) -> str:
    return f"capped {row.day_cap}/day" if row.state == "capped" else row.state


def _fit(line: str, width: int) -> str:
    return line if len(line) <= width else line[:width - 1] + "…"


def render_table(rows: list[ProviderRow], *, window: int = WINDOW_SECONDS, now: float | None = None,
                 log: int = 0, width: int = WIDTH) -> str:
    """The table; with ``log`` > 0, the newest ``log`` adjustments across providers under it."""
    now = time.time() if now is None else now
    headers = [["PROVIDER", "CONNS", "RATE/s", "QUEUED", "DELIVERED", "DEFER%", "STATE", "LAST ADJUSTMENT"],
               ["", "open/now/max", "now/max", "", f"last {window}s", f"{window}s", "", ""]]
    body = []
    for r in rows:
        last = r.adjustments[0] if r.adjustments else None
        body.append([
            r.provider, f"{r.open_connections}/{r.connections}/{r.ceiling_connections}",
            f"{_number(r.rate)}/{_number(r.ceiling_rate)}", str(r.queued), str(r.delivered),
            f"{r.deferral_percent:.1f}", _state_cell(r),
            f"{last.move()} {_span(now - last.time)} ago" if last else "-"])
    table = headers + body
    widths = [max(len(row[i]) for row in table) for i in range(len(headers[0]))]
    lines = [_fit("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip(), width) for row in table]
    if not rows:
        lines.append("(no providers yet: is a controller publishing policies to this Redis?)")
    for r in rows:
        if r.state == "suspended" and r.suspended_until is not None:
            lines.append(_fit(f"{r.provider} suspended until {_clock(r.suspended_until)} "
                              f"({_span(r.suspended_until - now)} more): {r.suspend_reason or r.reason}", width))
    if log > 0:
        recent = sorted(((c, r.provider) for r in rows for c in r.adjustments), key=lambda x: x[0].time,
                        reverse=True)[:log]
        lines += ["", "RECENT ADJUSTMENTS (newest first)"]
        lines += [_fit(f"{_clock(c.time)}  {provider:<{widths[0]}}  {c.move():<28}  {c.reason}", width)
                  for c, provider in recent] or ["(none yet)"]
    return "\n".join(lines)

