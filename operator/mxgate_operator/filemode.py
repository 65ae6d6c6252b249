"""``mxgate controller``: the control plane without Kubernetes.

Loads ProviderPolicy files from a directory into Redis and keeps them there: the directory is checked
every ``poll_interval`` seconds and republished when a file changes. A broken file (invalid, not YAML,
not UTF-8: ``mxgate.policy_files``) is logged, naming the file and the problem, and the last good table
stays in force until the directory is good again (at start-up a broken file is an error: nothing good
exists yet). No exception ends the loop: a failed step is logged, with its traceback if it is not one of
the expected ones (a broken file, Redis away), and tried again on the next tick.
It also runs the adaptive loop (``adaptive.py``): live limits tighten on deferrals and recover.
The table is also republished periodically, so a Redis that lost its data (or a flushed test Redis)
gets it back without a restart.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from mxgate.errors import PolicyError
from mxgate.policy import ProviderPolicy
from mxgate.policy_files import load_policy_dir
from mxgate.redisconn import REDIS_ERRORS, RedisClient
from mxgate_operator.adaptive import AdaptiveLoop
from mxgate_operator.publish import publish_policies

ADAPTIVE_TICK = 1.0  # seconds between checks for elapsed evaluation windows

log = logging.getLogger("mxgate.controller")


def _snapshot(directory: Path) -> tuple[tuple[str, float, int], ...]:
    files = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
    out = []
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            continue
        out.append((path.name, stat.st_mtime, stat.st_size))
    return tuple(out)


class FileController:
    def __init__(self, redis: RedisClient, directory: Path, *, poll_interval: float = 2.0,
                 republish_interval: float = 30.0) -> None:
        self.redis = redis
        self.directory = directory
        self.poll_interval = poll_interval
        self.republish_interval = republish_interval
        self.policies: list[ProviderPolicy] = load_policy_dir(directory)  # errors surface at start-up
        self._seen = _snapshot(directory)
        self.adaptive = AdaptiveLoop(redis, lambda: {p.name: p for p in self.policies})

    async def publish(self) -> str:
        revision = await publish_policies(self.redis, self.policies, writer="mxgate-controller")
        log.info("policies published", extra={"revision": revision, "policies": [p.name for p in self.policies]})
        return revision

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_publish = 0.0
        next_poll = 0.0
        while True:
            if loop.time() >= next_poll:
                next_poll = loop.time() + self.poll_interval
                try:
                    next_publish = await self._poll_files(next_publish)
                except Exception:
                    # A defect of ours, not of the files (those are PolicyErrors): the last good table stays in
                    # force and is republished; a silently dead loop would stop both.
                    log.exception("policy files: unexpected error; keeping the last good policies")
            try:
                await self.adaptive.tick()
            except REDIS_ERRORS as exc:
                log.warning("adaptive loop: %s", exc)
            except Exception:
                log.exception("adaptive loop: unexpected error; trying again next tick")
            await asyncio.sleep(ADAPTIVE_TICK)

    async def _poll_files(self, next_publish: float) -> float:
        loop = asyncio.get_running_loop()
        seen = _snapshot(self.directory)
        changed = seen != self._seen
        if changed:
            self._seen = seen
            try:
                self.policies = load_policy_dir(self.directory)
            except PolicyError as exc:
                log.error("policy files not reloaded, keeping the last good ones: %s", exc)
                changed = False
        if changed or loop.time() >= next_publish:
            try:
                await self.publish()
                return loop.time() + self.republish_interval
            except REDIS_ERRORS as exc:
                log.warning("cannot publish policies: %s", exc)
        return next_publish
