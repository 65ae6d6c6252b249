"""Issue 3's acceptance, with real processes: one Redis, the controller, four gateway processes and the
provider simulator. The fleet as a whole must stay within the provider's limits."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest

from mxgate.embedded_redis import EmbeddedRedis, free_port
from mxgate.sim.config import SimConfig
from mxgate.sim.server import ProviderSimulator
from support.gateway import policy, policy_yaml
from support.procs import MxgateProcess, Processes

pytestmark = pytest.mark.slow


async def start_fleet(procs: Processes, redis: EmbeddedRedis, tmp_path: Path, *, gateways: int,
                      extra: tuple[str, ...] = (), **limits: object) -> list[tuple[MxgateProcess, int]]:
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "ms.yaml").write_text(policy_yaml(policy("microsoft", domains=["outlook.test"], **limits)))
    controller = procs.mxgate("controller", "controller", "--redis-url", redis.url, "--policies", str(policies))
    fleet = []
    for i in range(gateways):
        gw, metrics = start_gateway(procs, redis, f"gateway{i}", extra)
        fleet.append((gw, metrics))
    for gw, metrics in fleet:
        await gw.wait_ready(metrics, timeout=60)
    assert controller.returncode is None, controller.log_tail()
    return [(gw, _smtp_port(gw)) for gw, _ in fleet]


def _smtp_port(gateway: MxgateProcess) -> int:
    return int(gateway.argv[gateway.argv.index("--listen") + 1].rsplit(":", 1)[1])


def start_gateway(procs: Processes, redis: EmbeddedRedis, name: str, extra: tuple[str, ...] = ()
                  ) -> tuple[MxgateProcess, int]:
    port, metrics = free_port(), free_port()
    gateway = procs.mxgate(name, "gateway", "--redis-url", redis.url, "--listen", f"127.0.0.1:{port}",
                           "--metrics-listen", f"127.0.0.1:{metrics}", "--hostname", f"{name}.test", *extra)
    return gateway, metrics


async def send(ports: list[int], count: int, *, concurrency: int = 20, tag: str = "m") -> int:
    todo: asyncio.Queue[int] = asyncio.Queue()
    for n in range(count):
        todo.put_nowait(n)
    accepted = 0

    async def client(i: int) -> None:
        nonlocal accepted
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=ports[i % len(ports)], timeout=60) as smtp:
            while not todo.empty():
                n = todo.get_nowait()
                msg = f"Subject: {n}\r\nMessage-ID: <{tag}{n}@example.com>\r\n\r\nbody {n}\r\n".encode()
                await smtp.sendmail("app@example.com", ["u@outlook.test"], msg)
                accepted += 1

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return accepted


async def wait_accepted(sim: ProviderSimulator, count: int, *, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        report = sim.report()
        if report["accepted"]["messages"] >= count or time.monotonic() > deadline:
            return report
        await asyncio.sleep(0.25)


@pytest.fixture
async def sim() -> AsyncIterator[ProviderSimulator]:
    async with ProviderSimulator(SimConfig(profile="outlook", max_connections=5)) as simulator:
        yield simulator


async def test_four_gateways_keep_within_five_connections(procs: Processes, redis_proc: EmbeddedRedis,
                                                          sim: ProviderSimulator, tmp_path: Path) -> None:
    fleet = await start_fleet(procs, redis_proc, tmp_path, gateways=4, route=[f"127.0.0.1:{sim.port}"],
                              maxConnections=5, maxMessagesPerConnection=100)
    assert await send([port for _, port in fleet], 5000) == 5000
    report = await wait_accepted(sim, 5000, timeout=180)
    assert report["accepted"]["messages"] == 5000, report["accepted"]
    assert report["duplicates"]["messages"] == 0
    assert report["deferrals"]["total"] == 0, report["deferrals"]      # the provider refused nothing
    assert report["connections"]["max_concurrency"] <= 5                  # never more than 5 at once
    assert report["connections"]["max_concurrency"] == 5                  # and the fleet used all 5


async def test_kill_9_of_a_lease_holder_the_fleet_regains_full_concurrency(
        procs: Processes, redis_proc: EmbeddedRedis, tmp_path: Path) -> None:
    # A slow provider keeps connections busy. Gateway A starts alone and takes all four connection leases;
    # gateway B joins and waits for leases; then A is killed with every lease held.
    async with ProviderSimulator(SimConfig(profile="outlook", max_connections=4, latency=0.05)) as slow:
        extra = ("--visibility", "5", "--connection-lease", "10")
        [(victim, port_a)] = await start_fleet(procs, redis_proc, tmp_path, gateways=1,
                                               route=[f"127.0.0.1:{slow.port}"], maxConnections=4,
                                               maxMessagesPerConnection=10_000, extra=extra)
        sender = asyncio.create_task(send([port_a], 3000))
        while slow.report()["connections"]["open"] < 4:
            await asyncio.sleep(0.05)
        survivor, metrics_b = start_gateway(procs, redis_proc, "gateway-b", extra)
        await survivor.wait_ready(metrics_b, timeout=60)
        await asyncio.sleep(1.0)         # B's dispatcher has claimed jobs and queued for leases
        assert slow.report()["connections"]["open"] == 4
        victim.kill_group()              # kill -9 while it holds all leases and claimed jobs
        killed_at = time.monotonic()
        assert victim.returncode == -signal.SIGKILL
        # Its sockets close with it ...
        while slow.report()["connections"]["open"] > 0 and time.monotonic() - killed_at < 10:
            await asyncio.sleep(0.05)
        assert slow.report()["connections"]["open"] == 0
        # ... but its leases stay in Redis until they expire: B gets all four slots back within the lease
        # length (10 s here), and not before the first of them could have expired.
        regained = None
        while time.monotonic() - killed_at < 10 + 15:
            if slow.report()["connections"]["open"] == 4:
                regained = time.monotonic() - killed_at
                break
            await asyncio.sleep(0.1)
        assert regained is not None, slow.report()["connections"]
        print(f"full concurrency regained {regained:.1f} s after kill -9 (lease length 10 s)")
        # Leases are renewed every third of their length, so the dead pod's last renewal was at most
        # 3.3 s before the kill: no slot may come back earlier than that leaves (else a lease expired early).
        assert regained >= 10 * 2 / 3 - 0.5
        assert survivor.returncode is None
        # ... and never goes over the limit meanwhile.
        assert slow.report()["connections"]["max_concurrency"] <= 4
        assert slow.report()["deferrals"]["connections"] == 0
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


async def test_fleet_rate_limit_holds_in_every_window(procs: Processes, redis_proc: EmbeddedRedis,
                                                      tmp_path: Path) -> None:
    async with ProviderSimulator(SimConfig(profile="outlook")) as unlimited:
        fleet = await start_fleet(procs, redis_proc, tmp_path, gateways=4, route=[f"127.0.0.1:{unlimited.port}"],
                                  maxConnections=20, messagesPerSecond=50)
        assert await send([port for _, port in fleet], 800) == 800
        report = await wait_accepted(unlimited, 800, timeout=120)
    assert report["accepted"]["messages"] == 800
    series = dict(report["accepted_per_second"])
    seconds = range(min(series), max(series) + 1)
    per_second = [series.get(s, 0) for s in seconds]
    windows = [sum(per_second[i:i + 10]) / 10 for i in range(0, max(1, len(per_second) - 9))]
    assert max(windows) <= 55, windows     # the limit holds over every 10 s window
