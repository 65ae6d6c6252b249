"""Files the simulator writes: the sink log (one JSON line per accepted message) and the report file."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["SinkLog", "write_report"]

# Lines are collected in the file object's buffer and reach the disk about once a second (and on close):
# a write(2) per message would cost more than the rest of the message's path, and fsync is pointless for a
# benchmark's record.
_BUFFER_BYTES = 1 << 20

# [second, count] pairs of the per-second series, one per line instead of four.
_PAIR = re.compile(r"\[\s+(-?\d+),\s+(-?\d+)\s+\]")


class SinkLog:
    """``{"time": ..., "message_id": ..., "rcpts": [...], "size": ...}`` per line, appended to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO = path.open("a", buffering=_BUFFER_BYTES, encoding="utf-8")

    def record(self, message_id: str | None, rcpts: list[str], size: int) -> None:
        self._file.write(json.dumps({"time": round(time.time(), 6), "message_id": message_id,
                                     "rcpts": rcpts, "size": size}) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` to ``path`` atomically (a reader sees the old file or the new one, never half)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(_PAIR.sub(r"[\1, \2]", json.dumps(report, indent=2)) + "\n", encoding="utf-8")
    os.replace(tmp, path)
