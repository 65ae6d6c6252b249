"""A policy file broken after start-up, against real processes and a real Redis.

``mxgate controller`` and the controller inside ``mxgate dev`` must log the file and the problem, keep the
last good table in ``mxg:policies`` (the gateways keep working with it), keep running, and pick up the
next good change. A bad file at start-up stays an error (exit 2, one line: tests/integration/test_cli.py).
Before this was fixed, a file that was not UTF-8 ended ``mxgate controller`` with a traceback (exit 1)
and silently ended the controller task of ``mxgate dev`` (no more reloads, no adaptive loop).

The loop also survives a defect of our own: one of its steps made to raise (``FileController.run``
against a real Redis); and should the controller task of ``mxgate dev`` end all the same, dev stops its
gateway and fails loudly (``serve_with_controller``, with a real gateway).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from mxgate import keys
from mxgate.app import Gateway
from mxgate.cli import serve_with_controller
from mxgate.embedded_redis import EmbeddedRedis, free_port
from mxgate.errors import MxgateError
from mxgate.policy import ProviderPolicy
from mxgate.tasks import cancel_and_wait
from mxgate_operator.filemode import FileController
from support.gateway import policy, policy_yaml, settings
from support.procs import LOOPBACK, MxgateProcess, Processes, eventually

NOT_UTF8 = (b"apiVersion: mxgate.io/v1alpha1\nkind: ProviderPolicy\nmetadata: {name: yahoo}\n"
            b"spec:\n  match: {domains: [caf\xe9.test]}\n")   # Latin-1 for "cafe" with an accent: 0xe9 on line 5


def microsoft(connections: int) -> str:
    return policy_yaml(policy("microsoft", domains=["outlook.test"], maxConnections=connections))


def log_records(process: MxgateProcess) -> list[dict[str, Any]]:
    out = []
    for line in process.log().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


async def published(redis: aioredis.Redis) -> dict[str, ProviderPolicy]:
    raw = await redis.hgetall(keys.POLICIES)
    return {name.decode(): ProviderPolicy.from_json(doc) for name, doc in raw.items()}


async def break_and_mend(process: MxgateProcess, redis: aioredis.Redis, directory: Path) -> None:
    """The scenario both controllers go through; ``process`` has published ``directory`` once."""
    table = await eventually(lambda: published(redis), timeout=30, what="the first table", processes=[process])
    assert set(table) == {"microsoft"} and table["microsoft"].spec.limits.max_connections == 5
    before = await redis.hgetall(keys.POLICIES)
    revision = await redis.hget(keys.CONTROL, "rev")

    bad = directory / "yahoo.yaml"
    bad.write_bytes(NOT_UTF8)
    expected = f"{bad}: line 5: not UTF-8 (byte 0xe9 at offset {NOT_UTF8.index(0xE9)})"

    def refusal_logged() -> list[dict[str, Any]]:
        return [r for r in log_records(process) if r["level"] == "error" and expected in r["msg"]]

    (record,) = await eventually(refusal_logged, timeout=30, what="the refusal in the log", processes=[process])
    assert record["msg"].startswith("policy files not reloaded, keeping the last good ones: ")
    assert await redis.hgetall(keys.POLICIES) == before
    assert await redis.hget(keys.CONTROL, "rev") == revision
    assert process.returncode is None

    # The next good change: the file mended and another file changed. Both are picked up together.
    bad.write_text(policy_yaml(policy("yahoo", domains=["yahoo.test"], maxConnections=3)))
    (directory / "microsoft.yaml").write_text(microsoft(7))

    async def mended() -> bool:
        table = await published(redis)
        return set(table) == {"microsoft", "yahoo"} and table["microsoft"].spec.limits.max_connections == 7

    await eventually(mended, timeout=30, what="the mended table", processes=[process])
    assert "Traceback" not in process.log() and not any(r["level"] == "critical" for r in log_records(process))


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "microsoft.yaml").write_text(microsoft(5))
    return directory


async def test_controller_keeps_the_last_good_table_when_a_file_breaks(
        procs: Processes, redis_server: EmbeddedRedis, redis_client: aioredis.Redis, policies: Path) -> None:
    controller = procs.mxgate("controller", "controller", "--redis-url", redis_server.url,
                              "--policies", str(policies))
    await break_and_mend(controller, redis_client, policies)


async def test_dev_controller_keeps_the_last_good_table_when_a_file_breaks(
        procs: Processes, policies: Path, tmp_path: Path) -> None:
    redis_port = free_port()
    dev = procs.mxgate("dev", "dev", "--policies", str(policies), "--data-dir", str(tmp_path / "dev-data"),
                       "--redis-port", str(redis_port), "--listen", f"{LOOPBACK}:{free_port()}",
                       "--metrics-listen", f"{LOOPBACK}:{free_port()}")
    await eventually(lambda: "mxgate dev: SMTP on" in dev.log(), timeout=60, what="dev to start",
                     processes=[dev])
    procs.extra_pids += dev.children()   # its redis-server, should the test fail before dev stops it
    redis = aioredis.Redis.from_url(f"redis://{LOOPBACK}:{redis_port}/0")
    try:
        await break_and_mend(dev, redis, policies)
    finally:
        await redis.aclose()


async def test_an_unexpected_error_in_a_step_is_logged_and_the_loop_goes_on(
        redis_client: aioredis.Redis, policies: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    controller = FileController(redis_client, policies, poll_interval=0.1)
    ticks = 0

    async def broken_tick() -> list[object]:
        # A defect of ours injected into one step: the policy loop must go on regardless.
        nonlocal ticks
        ticks += 1
        raise RuntimeError("injected defect")

    monkeypatch.setattr(controller.adaptive, "tick", broken_tick)
    monkeypatch.setattr("mxgate_operator.filemode.ADAPTIVE_TICK", 0.05)
    caplog.set_level(logging.ERROR, logger="mxgate.controller")
    task = asyncio.get_running_loop().create_task(controller.run())
    try:
        await eventually(lambda: ticks >= 3, timeout=10, what="three failed ticks")
        assert not task.done()
        (policies / "microsoft.yaml").write_text(microsoft(9))

        async def reloaded() -> bool:
            table = await published(redis_client)
            return "microsoft" in table and table["microsoft"].spec.limits.max_connections == 9

        await eventually(reloaded, timeout=10, what="the change published despite the failing tick")
        failures = [r for r in caplog.records if "adaptive loop: unexpected error" in r.getMessage()]
        assert len(failures) >= 3 and all(r.exc_info for r in failures)
    finally:
        await cancel_and_wait([task], timeout=5.0)


async def test_dev_stops_its_gateway_and_fails_when_the_controller_task_ends(
        redis_server: EmbeddedRedis, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    # serve_with_controller is what `mxgate dev` waits on; the controller task is made to die (a defect of
    # ours, injected), the gateway is a real one.
    gateway = Gateway(settings(redis_server.url))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    run_task = loop.create_task(gateway.run(stop))
    await eventually(lambda: gateway.server is not None, timeout=30, what="the gateway to listen")

    async def dying_controller() -> None:
        await asyncio.sleep(0.2)
        raise RuntimeError("injected defect")

    control_task = loop.create_task(dying_controller())
    caplog.set_level(logging.CRITICAL, logger="mxgate.cli")
    with pytest.raises(MxgateError, match=r"the in-process controller stopped: RuntimeError\('injected defect'\)"):
        await asyncio.wait_for(serve_with_controller(run_task, control_task, stop), timeout=30)
    assert run_task.done() and run_task.exception() is None   # the gateway shut down in order
    (record,) = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert "the in-process controller stopped" in record.getMessage() and record.exc_info
