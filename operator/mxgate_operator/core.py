"""The adaptive controller core: policy + live limits + one window of telemetry -> new live limits.

Pure: no I/O, no clock (``now`` is an argument). The file-mode controller and the Kubernetes operator
run it once per evaluation window per provider and write what it returns to Redis.

Signals, per window, as fractions of recipient outcomes (delivered + failed + deferred):

- connections: replies classified CONNECTIONS (``451 4.7.652``, ``421 4.4.5``) -> cut the connection
  limit: ``min(c * decreaseFactor, c - 1)``, floored.
- rate: replies classified RATE or REPUTATION (``451 4.7.650``, ``421 4.7.28``) -> cut the rate to the
  goodput the provider accepted in the window (the evidence says how far: a small overshoot costs a
  little, a large one a lot), at least 5 % below ``r``, never below a quarter of ``r`` at once (a quiet
  window is weak evidence), floored. A provider without a rate ceiling gets a rate limit from its first
  rate signal on.
  Except when connection deferrals outnumber the rate deferrals: then the goodput was held down by the
  refused connections (each one spent a rate slot and a round trip) and says little about the rate the
  provider accepts. The rate is cut only by the share of the messages that reached the provider's rate
  check and were deferred there (``rate deferred / (delivered + rate deferred)``), at least 5 % and at
  most by ``decreaseFactor``.
- neither, with traffic: one more calm window. After ``calmWindows`` calm windows a limit goes up by
  ``increaseStep`` (additive increase), never above the policy's ceiling, and only if the window used
  it: the connections in use reached the limit, or the goodput reached 80 % of the rate (a limit the
  traffic never touched says nothing about the provider; raising it would only arm a later burst, as
  TCP's congestion-window validation, RFC 7661, avoids too).
- below the known-good level (``*_good``: the highest level of a calm window that used the limit), a
  used limit climbs back faster: after every single calm window, halfway to that level (at least
  ``increaseStep``, never past it), as TCP's slow start climbs to ``ssthresh``. The level was shown to
  be fine, so waiting ``calmWindows`` between additive steps only costs goodput. Above it the additive
  rule applies again.

Damping (why it does not oscillate wildly on noise):

1. A signal must reach ``deferralThreshold`` of the window's outcomes; a stray deferral does nothing.
2. Idle windows (no outcomes) are neither calm nor a signal: silence is not evidence.
3. Each limit remembers the lowest level that drew a signal (``*_bad``). Raising a limit back to that
   level needs ``calmWindows * 2**strikes`` calm windows, and every signal at that level again adds a
   strike (at most 6): probing a known-bad level gets exponentially rarer, so a steady provider limit is
   approached once and then held. A limit that has been calm for ``calmWindows`` at or above its
   known-bad level forgets it, so a provider limit that really moved up is found again.
4. A cut resets the calm count for both limits: recovery starts only after the provider is calm again.
5. The fast climb only goes back to a level that was calm and used, never to or past a known-bad level
   (those follow rule 3), and a signal at or below the known-good level erases it (the provider's limit
   moved down), except a rate signal in a window dominated by connection deferrals (weak evidence about
   the rate). So after a probe above a good level fails, the limit returns there once, not repeatedly.
6. A rate signal in a window dominated by connection deferrals cuts gently (at most ``decreaseFactor``):
   while connections are being cut, the few messages that reached the provider's rate check are not
   enough evidence to cut the rate to the goodput.
7. Suspensions (``suspendedUntil``) expire on their own; the core only carries them forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from mxgate.duration import parse_duration
from mxgate.policy import Adaptive, Limits

MAX_STRIKES = 6
MIN_RATE_CUT = 0.25   # one window never cuts the rate below a quarter
MAX_RATE_CUT = 0.95   # a rate signal always cuts at least 5 %
RATE_USED = 0.8       # goodput at this share of the rate limit counts as "the limit was in use"


@dataclass(frozen=True, slots=True)
class Window:
    """Telemetry of one evaluation window, summed over the fleet."""

    seconds: float
    attempts: int = 0
    delivered: int = 0
    failed: int = 0
    deferred_connections: int = 0
    deferred_rate: int = 0
    deferred_reputation: int = 0
    deferred_other: int = 0
    connection_errors: int = 0
    peak_connections: int | None = None   # most connection leases held at once; None: not measured

    @property
    def deferred(self) -> int:
        return self.deferred_connections + self.deferred_rate + self.deferred_reputation + self.deferred_other

    @property
    def outcomes(self) -> int:
        return self.delivered + self.failed + self.deferred

    @classmethod
    def of(cls, seconds: float, counts: dict[str, int], *, peak_connections: int | None = None) -> Window:
        fields = {k: int(counts.get(k, 0)) for k in (
            "attempts", "delivered", "failed", "deferred_connections", "deferred_rate", "deferred_reputation",
            "deferred_other", "connection_errors")}
        return cls(seconds=seconds, peak_connections=peak_connections, **fields)

    def uses_connections(self, limit: int) -> bool:
        return self.peak_connections is None or self.peak_connections >= limit

    def uses_rate(self, rate: float) -> bool:
        return self.seconds <= 0 or self.delivered / self.seconds >= RATE_USED * rate


@dataclass(frozen=True, slots=True)
class ControlState:
    """What the controller keeps per provider between windows (stored beside the live limits)."""

    connections: int
    rate: float | None
    calm: int = 0
    connections_bad: int | None = None
    rate_bad: float | None = None
    connection_strikes: int = 0
    rate_strikes: int = 0
    suspended_until: float = 0.0
    connections_good: int | None = None   # highest connection limit of a calm window that used it
    rate_good: float | None = None        # highest rate limit of a calm window that used it

    @classmethod
    def at_ceiling(cls, ceiling: Limits) -> ControlState:
        return cls(connections=ceiling.max_connections, rate=ceiling.messages_per_second)


@dataclass(frozen=True, slots=True)
class Adjustment:
    signal: str            # "connections", "rate", "recovery"
    limit: str             # "connections" or "rate"
    old: float | None
    new: float | None


@dataclass(frozen=True, slots=True)
class Decision:
    state: ControlState
    adjustments: tuple[Adjustment, ...]
    reason: str

    @property
    def changed(self) -> bool:
        return bool(self.adjustments)


def decide(adaptive: Adaptive, ceiling: Limits, state: ControlState, window: Window, *, now: float) -> Decision:
    """The new live limits for one provider after one window."""
    state = _clamp_to_ceiling(state, ceiling, adaptive)
    if state.suspended_until and state.suspended_until <= now:
        state = replace(state, suspended_until=0.0)
    if not adaptive.enabled:
        target = ControlState.at_ceiling(ceiling)
        return Decision(replace(target, suspended_until=state.suspended_until),
                        moves_between(state, target, "recovery"), "adaptive control is off")
    total = window.outcomes
    if total == 0:
        return Decision(state, (), "no traffic in the window")

    threshold = adaptive.deferral_threshold
    connection_signal = window.deferred_connections / total > threshold or (
        threshold == 0 and window.deferred_connections > 0)
    rate_deferred = window.deferred_rate + window.deferred_reputation
    rate_signal = rate_deferred / total > threshold or (threshold == 0 and rate_deferred > 0)

    if connection_signal or rate_signal:
        new = replace(state, calm=0)
        moves: list[Adjustment] = []
        reasons = []
        if connection_signal:
            new = _cut_connections(new, adaptive)
            reasons.append(f"{window.deferred_connections}/{total} outcomes deferred for too many connections")
            if new.connections != state.connections:
                moves.append(Adjustment("connections", "connections", state.connections, new.connections))
        if rate_signal:
            new = _cut_rate(new, adaptive, ceiling, window, rate_deferred=rate_deferred)
            reasons.append(f"{rate_deferred}/{total} outcomes deferred for rate or reputation")
            if new.rate != state.rate:
                moves.append(Adjustment("rate", "rate", state.rate, new.rate))
        return Decision(new, tuple(moves), "; ".join(reasons))

    calm = state.calm + 1
    new = replace(state, calm=calm)
    # A calm window that used a limit shows that level is fine: remember the highest such level.
    if window.uses_connections(state.connections):
        new = replace(new, connections_good=max(state.connections_good or 0, state.connections))
    if state.rate is not None and window.uses_rate(state.rate):
        new = replace(new, rate_good=max(state.rate_good or 0.0, state.rate))
    # A level that once drew signals and has now been calm for a while is no longer known-bad.
    if (state.connections_bad is not None and state.connections >= state.connections_bad
            and calm >= adaptive.calm_windows):
        new = replace(new, connections_bad=None, connection_strikes=0)
    if (state.rate_bad is not None and state.rate is not None and state.rate >= state.rate_bad
            and calm >= adaptive.calm_windows):
        new = replace(new, rate_bad=None, rate_strikes=0)
    state = new
    moves = []
    conn_step = adaptive.increase_step.connections
    good_conns = _climb_target(state.connections, state.connections_good, state.connections_bad)
    if good_conns is not None:
        # Back towards a level known to be good: halfway per calm window, at least one step.
        conn_next = min(int(good_conns), max(state.connections + conn_step,
                                             math.ceil((state.connections + good_conns) / 2)))
        needed = 1
    else:
        conn_next = min(ceiling.max_connections, state.connections + conn_step)
        needed = _needed(adaptive, state.connections_bad, conn_next, state.connection_strikes)
    if conn_next > state.connections and window.uses_connections(state.connections) and calm >= needed:
        new = replace(new, connections=conn_next)
        moves.append(Adjustment("recovery", "connections", state.connections, conn_next))
    if (state.rate is not None and window.uses_rate(state.rate)
            and (ceiling.messages_per_second is None or state.rate < ceiling.messages_per_second)):
        rate_step = adaptive.increase_step.messages_per_second
        good_rate = _climb_target(state.rate, state.rate_good, state.rate_bad)
        rate_next: float | None
        if good_rate is not None:
            rate_next = min(good_rate, max(state.rate + rate_step, (state.rate + good_rate) / 2))
            needed = 1
        else:
            rate_next = state.rate + rate_step
            if ceiling.messages_per_second is not None:
                rate_next = min(rate_next, ceiling.messages_per_second)
            elif state.rate_bad is not None and rate_next >= state.rate_bad * 4:
                rate_next = None  # far above anything that was ever a problem: drop the self-imposed limit
            needed = _needed(adaptive, state.rate_bad, rate_next, state.rate_strikes)
        if calm >= needed:
            new = replace(new, rate=_round_rate(rate_next, adaptive, ceiling))
            moves.append(Adjustment("recovery", "rate", state.rate, new.rate))
    if moves:
        new = replace(new, calm=0)
        return Decision(new, tuple(moves), f"calm for {calm} windows")
    return Decision(new, (), f"calm for {calm} windows")


def _climb_target(level: float, good: float | None, bad: float | None) -> float | None:
    """The known-good level a limit climbs back to quickly, when it is below one (and below any known-bad)."""
    if good is None or level >= good or (bad is not None and good >= bad):
        return None
    return good


def _needed(adaptive: Adaptive, bad: float | None, next_value: float | None, strikes: int) -> int:
    """Calm windows needed before raising a limit to ``next_value``."""
    if bad is not None and (next_value is None or next_value >= bad):
        return adaptive.calm_windows * (1 << max(0, min(strikes, MAX_STRIKES)))   # 2**strikes as an int (strikes >= 0)
    return adaptive.calm_windows


def _cut_connections(state: ControlState, adaptive: Adaptive) -> ControlState:
    old = state.connections
    new = max(adaptive.floor.connections, min(old - 1, math.floor(old * adaptive.decrease_factor)))
    bad, strikes = _remember(state.connections_bad, state.connection_strikes, old)
    good = state.connections_good if state.connections_good is not None and state.connections_good < old else None
    return replace(state, connections=new, connections_bad=int(bad), connection_strikes=strikes,
                   connections_good=good)


def _cut_rate(state: ControlState, adaptive: Adaptive, ceiling: Limits, window: Window, *,
              rate_deferred: int) -> ControlState:
    accepted = window.delivered / window.seconds if window.seconds > 0 else 0.0
    old = state.rate
    good = state.rate_good
    if old is None:
        # No rate limit so far: the provider accepted `accepted` per second while deferring the rest.
        new = max(adaptive.floor.messages_per_second, accepted * adaptive.decrease_factor if accepted else 1.0)
        reference = max(accepted, new)
    elif window.deferred_connections > rate_deferred:
        # Mostly connection deferrals: the goodput is not the provider's rate. Cut by the share deferred at
        # the provider's rate check, gently; a known-good level stays known (this is weak evidence).
        share = rate_deferred / (window.delivered + rate_deferred)
        factor = min(MAX_RATE_CUT, max(adaptive.decrease_factor, 1.0 - share))
        new = max(adaptive.floor.messages_per_second, old * factor)
        reference = old
    else:
        new = max(adaptive.floor.messages_per_second, old * MIN_RATE_CUT, min(old * MAX_RATE_CUT, accepted))
        reference = old
        if good is not None and good >= old:
            good = None   # the provider now defers at a level that was fine: it moved down
    bad, strikes = _remember(state.rate_bad, state.rate_strikes, reference)
    return replace(state, rate=_round_rate(new, adaptive, ceiling), rate_bad=bad, rate_strikes=strikes,
                   rate_good=good)


def _remember(bad: float | None, strikes: int, level: float) -> tuple[float, int]:
    """The lowest level that drew a signal; another signal at (or below) it is one more strike."""
    if bad is not None and level <= bad * 1.05:
        return min(bad, level), min(strikes + 1, MAX_STRIKES)
    if bad is not None and level > bad:
        return bad, strikes  # a signal above the known-bad level says nothing new
    return level, 0


def _clamp_to_ceiling(state: ControlState, ceiling: Limits, adaptive: Adaptive) -> ControlState:
    connections = min(max(state.connections, adaptive.floor.connections), ceiling.max_connections)
    rate = state.rate
    if ceiling.messages_per_second is not None:
        rate = ceiling.messages_per_second if rate is None else min(rate, ceiling.messages_per_second)
    return replace(state, connections=connections, rate=rate)


def moves_between(old: ControlState, new: ControlState, signal: str) -> tuple[Adjustment, ...]:
    """The limits that differ between two states, as adjustments attributed to ``signal``."""
    moves = []
    if old.connections != new.connections:
        moves.append(Adjustment(signal, "connections", old.connections, new.connections))
    if old.rate != new.rate:
        moves.append(Adjustment(signal, "rate", old.rate, new.rate))
    return tuple(moves)


def _round_rate(rate: float | None, adaptive: Adaptive, ceiling: Limits) -> float | None:
    """Two decimals (what logs and the status show), but never past the floor or the ceiling: a ceiling of
    1.375 msg/s would otherwise be "raised" to 1.38, a floor of 0.015 cut to 0.01."""
    if rate is None:
        return None
    rate = max(round(rate, 2), adaptive.floor.messages_per_second)
    return rate if ceiling.messages_per_second is None else min(rate, ceiling.messages_per_second)


def window_seconds(adaptive: Adaptive) -> float:
    return parse_duration(adaptive.evaluation_window)
