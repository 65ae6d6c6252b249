"""The adaptive loop: telemetry from Redis -> controller core -> live limits in Redis.

Used by ``mxgate controller`` (file mode), ``mxgate dev`` and the Kubernetes operator alike. Every
``evaluationWindow`` of a policy, the loop reads the fleet's telemetry for the last window, runs
``core.decide`` and, when anything changed, writes the new live limits and the controller's state to
``mxg:{p:<provider>}:limits`` (one hash: the gateways read the limits, the loop its state) and
announces them; every change is also appended to ``mxg:{p:<provider>}:adjustments`` (last 200), which
``mxgate status`` and the demonstration's plot read.

Each tick (once a second) also samples how many connection leases each provider has: the most held at
once during a window tells the core whether the fleet used its connection limit (a limit nobody used is
never raised).

The window read is shifted two seconds into the past: gateways flush each second's counters about a
second after it ends, so the newest complete second is ``now - 2``. That lag puts the seconds just
before a change into the next window; they are left out (the window starts the second after the
change, and a window with no complete second after it is empty and changes nothing), or deferrals
drawn by the old limits would cut the new ones again (run 3 of the demonstration: connections 4 -> 2
on refusals seen while the limit was still 6).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from typing import cast

from mxgate import keys
from mxgate.limits.effective import Effective, rate_text
from mxgate.policy import DEFAULT_POLICY_NAME, ProviderPolicy
from mxgate.redisconn import RedisClient
from mxgate.telemetry.fleet import read_window
from mxgate_operator.core import Adjustment, ControlState, Decision, Window, decide, moves_between, window_seconds

log = logging.getLogger("mxgate.adaptive")

FLUSH_LAG = 2           # seconds: the newest complete telemetry second is now - FLUSH_LAG
ADJUSTMENTS_KEPT = keys.ADJUSTMENTS_KEPT


adjustments_key = keys.adjustments   # named in mxgate.keys (mxgate status reads it too)


def _state_from_redis(raw: Mapping[bytes, bytes], policy: ProviderPolicy) -> ControlState:
    ceiling = policy.spec.limits
    if not raw:
        return ControlState.at_ceiling(ceiling)
    effective = Effective.from_redis(raw, ceiling)

    def number(name: str) -> float | None:
        value = raw.get(name.encode())
        return float(value) if value not in (None, b"") else None

    bad_conns, good_conns = number("connectionsBad"), number("connectionsGood")
    return ControlState(
        connections=effective.max_connections, rate=effective.messages_per_second,
        calm=int(number("calm") or 0),
        connections_bad=int(bad_conns) if bad_conns is not None else None, rate_bad=number("rateBad"),
        connection_strikes=int(number("connectionStrikes") or 0), rate_strikes=int(number("rateStrikes") or 0),
        suspended_until=effective.suspended_until_ms / 1000,
        connections_good=int(good_conns) if good_conns is not None else None, rate_good=number("rateGood"))


def _state_to_redis(state: ControlState, reason: str) -> dict[str, str]:
    effective = Effective(state.connections, state.rate, int(state.suspended_until * 1000), reason).to_redis()
    # Gateways set suspendedUntil themselves (atomically, never shortening it); writing back the value read
    # a moment ago could undo a suspension that happened in between.
    del effective["suspendedUntil"]
    return {**effective, "calm": str(state.calm),
            "connectionsBad": "" if state.connections_bad is None else str(state.connections_bad),
            "rateBad": "" if state.rate_bad is None else rate_text(state.rate_bad),
            "connectionStrikes": str(state.connection_strikes), "rateStrikes": str(state.rate_strikes),
            "connectionsGood": "" if state.connections_good is None else str(state.connections_good),
            "rateGood": "" if state.rate_good is None else rate_text(state.rate_good)}


def relaxes(move: Adjustment) -> bool:
    """Whether a move relaxes the limit (a rate of None is no limit at all)."""
    if move.new is None:
        return True
    return move.old is not None and move.new > move.old


@dataclass(frozen=True, slots=True)
class Evaluation:
    provider: str
    at: float
    window: Window
    decision: Decision


class AdaptiveLoop:
    def __init__(self, redis: RedisClient, policies: Callable[[], Mapping[str, ProviderPolicy]], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.policies = policies
        self.clock = clock
        self._next: dict[str, float] = {}
        self._peak: dict[str, int] = {}
        self._changed: dict[str, float] = {}   # when each provider's live limits last changed
        self._write_script = redis.register_script(
            resources.files("mxgate.limits").joinpath("lua", "limits_write.lua").read_text(encoding="utf-8"))

    async def _sample_leases(self, providers: list[str], now: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for provider in providers:
            pipe.zcount(keys.leases(provider), int(now * 1000), "+inf")
        for provider, held in zip(providers, await pipe.execute(), strict=True):
            self._peak[provider] = max(self._peak.get(provider, 0), int(held))

    def _due(self, name: str, policy: ProviderPolicy, now: float) -> bool:
        window = window_seconds(policy.spec.adaptive)
        due = self._next.get(name)
        if due is None:
            self._next[name] = now + window   # first window: collect evidence first
            return False
        if now < due:
            return False
        self._next[name] = due + window if due + window > now else now + window
        return True

    async def tick(self) -> list[Evaluation]:
        """Evaluate every provider whose window has elapsed; returns what was evaluated."""
        now = self.clock()
        done = []
        policies = {n: p for n, p in self.policies().items() if n != DEFAULT_POLICY_NAME}
        if policies:
            await self._sample_leases(list(policies), now)
        for name, policy in policies.items():
            if self._due(name, policy, now):
                done.append(await self.evaluate(name, policy, now=now, seconds=window_seconds(policy.spec.adaptive),
                                                since=self._changed.get(name)))
        return done

    async def tick_one(self, policy: ProviderPolicy) -> Evaluation | None:
        """``tick`` for one provider (the operator runs one timer per ProviderPolicy object)."""
        if policy.name == DEFAULT_POLICY_NAME:
            return None
        now = self.clock()
        await self._sample_leases([policy.name], now)
        if not self._due(policy.name, policy, now):
            return None
        return await self.evaluate(policy.name, policy, now=now, seconds=window_seconds(policy.spec.adaptive),
                                   since=self._changed.get(policy.name))

    def forget(self, provider: str) -> None:
        """Drop the loop's memory of a provider (its policy was deleted)."""
        self._next.pop(provider, None)
        self._peak.pop(provider, None)
        self._changed.pop(provider, None)

    async def _read_limits(self, provider: str) -> dict[bytes, bytes]:
        """The provider's live-limits hash. Our clients leave ``decode_responses`` off, so it is bytes;
        redis-py types HGETALL's reply ``bytes | str`` whatever that setting is."""
        return cast("dict[bytes, bytes]", await self.redis.hgetall(keys.limits(provider)))

    async def evaluate(self, provider: str, policy: ProviderPolicy, *, now: float, seconds: float,
                       since: float | None = None) -> Evaluation:
        """Run the core on the telemetry of the ``seconds`` before ``now - FLUSH_LAG``, leaving out the
        seconds up to ``since`` (the ticks pass the time of the last change: evidence about older limits)
        and up to a gateway's last refusal cut (``refusedAt``: the limit it set is the provider's word, the
        deferrals before it were drawn by the old limit)."""
        raw = await self._read_limits(provider)
        refused_at = raw.get(b"refusedAt") or b""
        if refused_at:
            try:
                since = max(since or 0.0, int(refused_at) / 1000)
            except ValueError:
                pass
        end = int(now) - FLUSH_LAG + 1
        start = end - max(1, round(seconds))
        if since is not None:
            start = max(start, int(since) + 1)
        if start >= end:
            # No complete second since the last change yet: nothing is known about the limits now in force
            # (the seconds before it are the old limits' refusals). An empty window changes nothing.
            window = Window(seconds=0.0)
        else:
            counts = (await read_window(self.redis, [provider], start=start, end=end))[provider]
            window = Window.of(float(end - start), counts, peak_connections=self._peak.pop(provider, None))
        state = _state_from_redis(raw, policy)
        decision = decide(policy.spec.adaptive, policy.spec.limits, state, window, now=now)
        log.debug("evaluated %s conns=%s -> %s: %s", window, state.connections, decision.state.connections,
                  decision.reason)
        if decision.state != state or not raw:
            await self._write(provider, decision, now=now, refused_at=refused_at.decode())
        return Evaluation(provider, now, window, decision)

    async def put_in_force(self, policy: ProviderPolicy) -> Decision:
        """After a policy was created or changed: live limits within its (new) ceiling, at once.

        A lowered ceiling lowers the live limits, adaptive control turned off puts the ceiling in force,
        a raised ceiling leaves the live limits where the controller had them (recovery climbs there).
        """
        now = self.clock()
        raw = await self._read_limits(policy.name)
        state = _state_from_redis(raw, policy)   # already within the new ceiling
        # An empty window: decide() only clamps to the ceiling, expires suspensions, honours `enabled`.
        decision = decide(policy.spec.adaptive, policy.spec.limits, state, Window(seconds=0.0), now=now)
        try:   # what the hash said before, unclamped, for the record of the move
            stored = ControlState(connections=int(raw.get(b"maxConnections") or state.connections),
                                  rate=float(raw[b"messagesPerSecond"]) if raw.get(b"messagesPerSecond") else None)
        except ValueError:
            stored = state
        moves = moves_between(stored, decision.state, "policy") if raw else ()
        decision = Decision(decision.state, moves, "policy changed" if moves else decision.reason)
        if moves or not raw:
            await self._write(policy.name, decision, now=now, refused_at="*")
        return decision

    async def _write(self, provider: str, decision: Decision, *, now: float, refused_at: str) -> bool:
        """Write the decision (``limits_write.lua``), unless a gateway cut the connection limit after a
        refusal since the hash was read (``refused_at``: its ``refusedAt`` then; "*": write anyway); whether
        it was written."""
        fields = _state_to_redis(decision.state, decision.reason)
        entries = [json.dumps({"time": now, **asdict(move), "reason": decision.reason})
                   for move in decision.adjustments]
        written = await self._write_script(
            keys=[keys.limits(provider), adjustments_key(provider)],
            args=[refused_at, ADJUSTMENTS_KEPT, len(fields), *(x for kv in fields.items() for x in kv), *entries])
        if not int(written):
            log.debug("%s: a gateway lowered the limits meanwhile; this window's decision is dropped", provider)
            return False
        for move in decision.adjustments:
            log.info("limit %s", "raised" if relaxes(move) else "lowered",
                     extra={"provider": provider, "limit": move.limit, "from": move.old, "to": move.new,
                            "signal": move.signal, "reason": decision.reason})
        if decision.adjustments:
            self._changed[provider] = now
            # After the script, not in it: the operator's Redis client may be a cluster client, which routes
            # PUBLISH on its own.
            await self.redis.publish(keys.EVENTS, f"{keys.EVENT_LIMITS} {provider}")
        return True
