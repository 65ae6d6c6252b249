"""What the simulated provider saw: counters, a per-second series and duplicate detection.

The per-message path (:meth:`Recorder.accepted`) is a few integer updates, one regular-expression search
over the header block and one set lookup, because the simulator must record thousands of messages a second
on one core.

Duplicates are what a relay must never produce: the same message accepted twice. A message is identified
by its Message-ID header or, if it has none, by a hash of its body (the part after the header block), so a
copy that a relay re-sent with a new ``Received:`` header or a new ``Date:`` still matches. Only a 64-bit
hash of each identity is kept (about 60 bytes a message; a false duplicate needs a 64-bit collision).
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import re
from collections import deque
from typing import Any

__all__ = ["DeferralKind", "Recorder", "message_key"]


class DeferralKind(enum.StrEnum):
    """Why the simulator answered 4xx: the cause, whatever the reply text says."""

    CONNECTIONS = "connections"
    """The client had more than ``max_connections`` connections open."""
    RATE = "rate"
    """The client's token bucket was empty."""
    RANDOM = "random"
    """A random temporary failure (``temp_fail_rate``)."""
    OTHER = "other"
    """Anything else, e.g. the 421 sent to connections still open when the simulator stops."""


# The header field, possibly folded onto continuation lines (RFC 5322 §2.2.3), in the header block only.
_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_FOLDING = re.compile(rb"\s+")


def message_key(content: bytes) -> tuple[str | None, bytes]:
    """``(message_id, identity)``: the Message-ID (None if absent) and the bytes that identify the message."""
    end = content.find(b"\r\n\r\n")
    header = content[: end + 2] if end >= 0 else content
    match = _MESSAGE_ID.search(header)
    if match is not None:
        value = _FOLDING.sub(b" ", match.group(1)).strip()
        if value:
            return value.decode("utf-8", "replace"), b"id:" + value
    body = content[end + 4 :] if end >= 0 else content
    return None, b"body:" + hashlib.blake2b(body, digest_size=16).digest()


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="milliseconds")


class Recorder:
    """Counters since the last :meth:`reset`, on the caller's clock (``epoch_offset`` maps it to Unix)."""

    def __init__(self, *, now: float, epoch_offset: float, series_seconds: int,
                 duplicate_sample: int) -> None:
        self._epoch_offset = epoch_offset
        self._series_seconds = series_seconds
        self._duplicate_sample = duplicate_sample
        self.started = now
        self.reset(now)

    def reset(self, now: float) -> None:
        """Zero every counter and forget every message seen (a new benchmark phase starts at ``now``)."""
        self.since = now
        self.messages = 0
        self.recipients = 0
        self.bytes = 0
        self.without_message_id = 0
        self.duplicates = 0
        self.duplicate_ids: list[str] = []
        self.connections_opened = 0
        self.deferrals = dict.fromkeys(DeferralKind, 0)
        self._seen: set[int] = set()
        self._series: deque[tuple[int, int]] = deque(maxlen=self._series_seconds)
        self._second = -1
        self._second_count = 0

    def deferred(self, kind: DeferralKind) -> None:
        self.deferrals[kind] += 1

    def accepted(self, now: float, content: bytes, recipients: int) -> str | None:
        """Count one accepted message; returns its Message-ID (None if it has none)."""
        self.messages += 1
        self.recipients += recipients
        self.bytes += len(content)
        second = int(now + self._epoch_offset)
        if second != self._second:
            if self._second_count:
                self._series.append((self._second, self._second_count))
            self._second = second
            self._second_count = 0
        self._second_count += 1
        message_id, identity = message_key(content)
        if message_id is None:
            self.without_message_id += 1
        digest = hash(identity)
        if digest in self._seen:
            self.duplicates += 1
            if len(self.duplicate_ids) < self._duplicate_sample:
                self.duplicate_ids.append(message_id or f"(no Message-ID, body {identity[5:13].hex()})")
        else:
            self._seen.add(digest)
        return message_id

    def per_second(self) -> list[list[int]]:
        """``[[unix_second, accepted], ...]``, oldest first; seconds with no accepted message are left out."""
        out = [[second, count] for second, count in self._series]
        if self._second_count:
            out.append([self._second, self._second_count])
        return out[-self._series_seconds :]

    def snapshot(self, now: float) -> dict[str, Any]:
        """The recorded part of a report, as plain JSON data."""
        elapsed = max(0.0, now - self.since)
        series = self.per_second()
        return {
            "started_at": _iso(self.started + self._epoch_offset),
            "since": _iso(self.since + self._epoch_offset),
            "now": _iso(now + self._epoch_offset),
            "elapsed_s": round(elapsed, 3),
            "accepted": {
                "messages": self.messages,
                "recipients": self.recipients,
                "bytes": self.bytes,
                "average_per_s": round(self.messages / elapsed, 1) if elapsed > 0 else None,
                "peak_per_s": max((count for _, count in series), default=0),
            },
            "deferrals": {**{str(kind): n for kind, n in self.deferrals.items()},
                          "total": sum(self.deferrals.values())},
            "duplicates": {"messages": self.duplicates, "sample": list(self.duplicate_ids)},
            "without_message_id": self.without_message_id,
            "accepted_per_second": series,
        }
