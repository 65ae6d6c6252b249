"""Task helpers for a clean shutdown on Python 3.11."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], *, timeout: float = 5.0) -> None:
    """Cancel ``tasks`` and wait until they have ended, cancelling again until they do.

    Once is not enough on Python 3.11: ``asyncio.wait_for`` (redis-py wraps every socket write in it)
    swallows a cancellation that arrives just as the write completes (CPython gh-86296, fixed in 3.12),
    and a ``while True`` loop that survives its cancellation keeps the process from ever exiting.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {task for task in tasks if not task.done()}
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
