"""The two limits a provider enforces per client IP, as pure state machines over an injected time.

* :class:`TokenBucket` — the message rate. A bucket of ``burst`` tokens refilled at ``rate`` tokens per
  second; a message takes one token or is deferred. It starts full, so a quiet client may send ``burst``
  messages at once and then ``rate`` per second: what "N messages per second" means to a sender.
* :class:`ConcurrencyTracker` — concurrent connections. It does two separate jobs: it *observes* (open
  connections overall and per IP, and the maxima since the last reset, the figures a benchmark checks) and
  it *enforces* (``limit`` admission slots per IP). A connection takes a slot when it first passes the
  enforcement stage and keeps it until it closes; a connection that found no free slot is refused at that
  stage and tries again at the next command, so it gets through once another connection of the same IP
  has closed. Thus exactly the connections above the limit are refused, never the ones already sending.

Time is a float of seconds passed in by the caller (``time.monotonic()`` in production, a fake in tests);
nothing here reads a clock, sleeps or does I/O.
"""

from __future__ import annotations

__all__ = ["ConcurrencyTracker", "TokenBucket"]

# Refills are sums of float products (0.3 - 0.25 = 0.04999...), so a token that is due can come out a few
# ulps short of 1. A billionth of a token is far below any rate a test or a provider could tell apart.
_EPSILON = 1e-9


class TokenBucket:
    """A token bucket: ``burst`` tokens, refilled continuously at ``rate`` tokens per second."""

    __slots__ = ("burst", "rate", "_tokens", "_updated")

    def __init__(self, *, rate: float, burst: float, now: float) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1 (else no message ever passes), got {burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._updated = now

    def take(self, now: float) -> bool:
        """Take one token at time ``now``: True if there was one (the message may pass)."""
        # A clock that steps back (a fake one, or a caller mixing clocks) must not drain the bucket.
        elapsed = now - self._updated
        if elapsed > 0:
            tokens = self._tokens + elapsed * self.rate
            self._tokens = tokens if tokens < self.burst else self.burst
            self._updated = now
        if self._tokens >= 1 - _EPSILON:
            self._tokens -= 1
            return True
        return False

    def tokens(self, now: float) -> float:
        """Tokens available at ``now`` (for reports and tests; changes nothing)."""
        elapsed = max(0.0, now - self._updated)
        return min(self.burst, self._tokens + elapsed * self.rate)


class ConcurrencyTracker:
    """Open connections per client IP: observed maxima, and ``limit`` slots per IP (0 = no limit)."""

    __slots__ = ("limit", "open_total", "open_by_ip", "max_total", "max_by_ip", "_admitted")

    def __init__(self, *, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.limit = limit
        self.open_total = 0
        """Connections open now."""
        self.open_by_ip: dict[str, int] = {}
        """Connections open now, per client IP (IPs with none are removed)."""
        self.max_total = 0
        """Most connections open at once since the last :meth:`reset_observed`."""
        self.max_by_ip: dict[str, int] = {}
        """Most connections open at once per client IP since the last :meth:`reset_observed`."""
        self._admitted: dict[str, int] = {}

    def opened(self, ip: str) -> None:
        """A connection from ``ip`` was accepted (counted whether or not it is refused later)."""
        self.open_total += 1
        count = self.open_by_ip.get(ip, 0) + 1
        self.open_by_ip[ip] = count
        if self.open_total > self.max_total:
            self.max_total = self.open_total
        if count > self.max_by_ip.get(ip, 0):
            self.max_by_ip[ip] = count

    def closed(self, ip: str, *, admitted: bool) -> None:
        """A connection from ``ip`` closed; ``admitted`` says whether it held a slot."""
        self.open_total -= 1
        count = self.open_by_ip[ip] - 1
        if count:
            self.open_by_ip[ip] = count
        else:
            del self.open_by_ip[ip]
        if admitted and self.limit:
            held = self._admitted[ip] - 1
            if held:
                self._admitted[ip] = held
            else:
                del self._admitted[ip]

    def admit(self, ip: str) -> bool:
        """Try to give a connection from ``ip`` a slot: True if it got one (the caller must remember that)."""
        if not self.limit:
            return True
        held = self._admitted.get(ip, 0)
        if held >= self.limit:
            return False
        self._admitted[ip] = held + 1
        return True

    def admitted(self, ip: str) -> int:
        """Slots held now by connections from ``ip``."""
        return self._admitted.get(ip, 0) if self.limit else self.open_by_ip.get(ip, 0)

    def reset_observed(self) -> None:
        """Start observing afresh: the maxima become what is open now (open connections are not forgotten)."""
        self.max_total = self.open_total
        self.max_by_ip = dict(self.open_by_ip)
