"""Durability with real processes: ``mxgate`` subprocesses, a real redis-server, a recording SMTP sink.

The promise under test: a message answered ``250`` is delivered at least once, whatever dies when --
a gateway killed with SIGKILL mid-delivery, Redis killed with SIGKILL (append-only file, fsync every
second), Redis stopped and started again under a running gateway, a gateway stopped with SIGTERM while
clients are sending. Duplicates are allowed after a crash (at-least-once) and reported; after a graceful
stop there must be none.

Every test counts per message through mxgate's queue ids (see ``support.procs``). Waits are bounded but
generous, and nothing asserts how fast anything went: these run on loaded two-core CI machines.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiosmtplib
import pytest
import redis.asyncio as aioredis

from mxgate import keys
from mxgate.embedded_redis import EmbeddedRedis, free_port
from support.gateway import policy, policy_yaml
from support.procs import (
    LOOPBACK,
    MxgateProcess,
    Processes,
    Sender,
    SlowSinkHandler,
    alive,
    duplicate_count,
    numbered_message,
    readyz,
    received_queue_ids,
    wait_for_queue_ids,
    wait_for_readyz,
    wait_until,
)
from support.sink import Sink

pytestmark = pytest.mark.slow

PROVIDER = "microsoft"
RCPT = "u@outlook.test"


@pytest.fixture
async def slow_sink() -> AsyncIterator[Sink]:
    sink = await Sink(SlowSinkHandler(hold=0.02)).start()
    yield sink
    await sink.stop()


def write_policies(directory: Path, sink: Sink, **limits: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "microsoft.yaml").write_text(policy_yaml(
        policy(PROVIDER, domains=["outlook.test"], route=[f"{LOOPBACK}:{sink.port}"], **limits)))
    return directory


async def publish_policies(procs: Processes, redis: EmbeddedRedis, directory: Path) -> None:
    controller = procs.mxgate("controller", "controller", "--redis-url", redis.url,
                              "--policies", str(directory), "--once")
    assert await controller.wait_exit(timeout=60) == 0, controller.log_tail()


def start_gateway(procs: Processes, name: str, redis: EmbeddedRedis, *, port: int, metrics_port: int,
                  visibility: float = 3.0, grace: float = 10.0) -> MxgateProcess:
    return procs.mxgate(name, "gateway", "--redis-url", redis.url, "--listen", f"{LOOPBACK}:{port}",
                        "--metrics-listen", f"{LOOPBACK}:{metrics_port}", "--hostname", "mxgate.test",
                        "--visibility", str(visibility), "--shutdown-grace", str(grace),
                        # The connection slots a killed gateway held are free again after this.
                        "--connection-lease", "3")


async def spool_depth(redis: EmbeddedRedis) -> int:
    client = aioredis.Redis.from_url(redis.url)
    try:
        return int(await client.zcard(keys.queue(PROVIDER)))
    finally:
        await client.aclose()


async def leased_jobs(redis: EmbeddedRedis) -> list[str]:
    """Jobs not due now (by Redis time), each described: held under a claim lease, or rescheduled (attempts
    and last reply), so that a failure says which. No retries are expected in these tests."""
    client = aioredis.Redis.from_url(redis.url, decode_responses=True)
    try:
        seconds, micros = await client.time()
        now_ms = seconds * 1000 + micros // 1000
        later = await client.zrangebyscore(keys.queue(PROVIDER), f"({now_ms + 100}", "+inf", withscores=True)
        claims = await client.hgetall(keys.claims(PROVIDER))
        described = []
        for job_id, due in later:
            job = await client.hgetall(keys.job(PROVIDER, job_id))
            state = "claimed" if job_id in claims else "not claimed"
            described.append(f"{job_id} due in {int(due) - now_ms} ms, {state}, attempts={job.get('attempts')}"
                             f" last={job.get('last') or '-'}")
        return described
    finally:
        await client.aclose()


async def everything_arrived(sink: Sink, sender: Sender, redis: EmbeddedRedis) -> int:
    """Wait until every queue id that got a 250 reached the sink and the spool is empty; the duplicates."""
    await wait_for_queue_ids(sink, sender.queue_ids, timeout=180)
    await wait_spool_empty(redis, timeout=60)
    return duplicate_count(sink)


async def wait_spool_empty(redis: EmbeddedRedis, *, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (depth := await spool_depth(redis)) > 0:
        assert loop.time() < deadline, f"{depth} jobs still in the spool after {timeout}s"
        await asyncio.sleep(0.2)


RecordProperty = Callable[[str, object], None]


def report(record_property: RecordProperty, **numbers: object) -> None:
    """Numbers worth seeing (``pytest -rA`` output, the junit XML), not assertions."""
    for name, value in numbers.items():
        record_property(name, value)
    print(" ".join(f"{k}={v}" for k, v in numbers.items()))


# -- mxgate dev ------------------------------------------------------------------------------------------


async def test_dev_relays_smtp_source_traffic_exactly_once_and_stops_on_sigterm(
        tmp_path: Path, procs: Processes, record_property: RecordProperty) -> None:
    sink = await Sink().start()
    try:
        policies = write_policies(tmp_path / "policies", sink, maxConnections=5)
        port, metrics_port = free_port(), free_port()
        dev = procs.mxgate("dev", "dev", "--policies", str(policies), "--listen", f"{LOOPBACK}:{port}",
                           "--metrics-listen", f"{LOOPBACK}:{metrics_port}",
                           "--data-dir", str(tmp_path / "data"), "--hostname", "mxgate.test")
        await dev.wait_ready(metrics_port)
        redis_children = dev.children()
        procs.extra_pids += redis_children
        assert len(redis_children) == 1 and alive(redis_children[0])

        source = await asyncio.create_subprocess_exec(
            "smtp-source", "-s", "10", "-m", "500", "-l", "2048", "-f", "a@example.com", "-t", RCPT,
            f"{LOOPBACK}:{port}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(source.communicate(), timeout=120)
        assert source.returncode == 0, output.decode(errors="replace")

        await sink.wait_for(500, timeout=120)
        await asyncio.sleep(1.0)  # anything delivered twice would show up by now
        ids = received_queue_ids(sink)
        assert len(sink.handler.messages) == 500
        assert len(ids) == 500 and "?" not in ids and set(ids.values()) == {1}
        assert all(m.data.count(b"X") >= 1500 for m in sink.handler.messages)  # smtp-source's 2 KB bodies

        started = time.monotonic()
        dev.send_signal(signal.SIGTERM)
        assert await dev.wait_exit(timeout=15) == 0, dev.log_tail()
        report(record_property, dev_stop_seconds=round(time.monotonic() - started, 2))
        await wait_until(lambda: not alive(redis_children[0]), timeout=10, what="dev's redis-server to exit")
        assert "Traceback" not in dev.log()
    finally:
        await sink.stop()


# -- a gateway killed with SIGKILL -----------------------------------------------------------------------


async def test_gateway_killed_mid_delivery_loses_nothing(
        tmp_path: Path, procs: Processes, redis_proc: EmbeddedRedis, slow_sink: Sink,
        record_property: RecordProperty) -> None:
    count = 2000
    await publish_policies(procs, redis_proc, write_policies(tmp_path / "policies", slow_sink,
                                                             maxConnections=5))
    port, metrics_port = free_port(), free_port()
    first = start_gateway(procs, "gateway-1", redis_proc, port=port, metrics_port=metrics_port)
    await first.wait_ready(metrics_port)

    sender = Sender([port], count, concurrency=20, rcpt=RCPT)
    sending = asyncio.create_task(sender.run(timeout=240))
    try:
        await wait_until(lambda: len(slow_sink.handler.messages) >= count // 3, timeout=120,
                         what=f"{count // 3} messages at the sink")
        in_flight = slow_sink.open
        arrived_before = len(slow_sink.handler.messages)
        first.kill_group()                      # kill -9, mid-delivery
        assert first.returncode == -signal.SIGKILL

        second = start_gateway(procs, "gateway-2", redis_proc, port=port, metrics_port=metrics_port)
        await second.wait_ready(metrics_port)
        await sending
    finally:
        sending.cancel()

    assert len(sender.accepted) == count
    duplicates = await everything_arrived(slow_sink, sender, redis_proc)
    report(record_property, accepted=len(sender.accepted), arrived_before_kill=arrived_before,
           sink_connections_at_kill=in_flight, duplicates=duplicates,
           client_retries=sum(sender.failures.values()), client_failures=dict(sender.failures))
    assert in_flight > 0, "the gateway was not delivering when it was killed: the test proved nothing"
    assert second.returncode is None


# -- Redis killed with SIGKILL ---------------------------------------------------------------------------


async def test_redis_killed_keeps_messages_accepted_more_than_a_second_before(
        tmp_path: Path, procs: Processes, redis_proc: EmbeddedRedis, slow_sink: Sink,
        record_property: RecordProperty) -> None:
    count = 1200
    await publish_policies(procs, redis_proc, write_policies(tmp_path / "policies", slow_sink,
                                                             maxConnections=5))
    port, metrics_port = free_port(), free_port()
    gateway = start_gateway(procs, "gateway", redis_proc, port=port, metrics_port=metrics_port)
    await gateway.wait_ready(metrics_port)

    sender = Sender([port], count, concurrency=20, rate=200, rcpt=RCPT)
    sending = asyncio.create_task(sender.run(timeout=240))

    def some_accepted_long_enough_ago() -> bool:
        times = [a.at for a in sender.accepted.values()]
        return len(times) >= count // 3 and time.monotonic() - min(times) > 1.5

    try:
        await wait_until(lambda: some_accepted_long_enough_ago() or sending.done(), timeout=120,
                         what=f"{count // 3} messages accepted")
        assert not sending.done()
        redis_proc.stop(kill=True)             # kill -9 of redis-server itself
        killed_at = time.monotonic()
        accepted_at_kill = dict(sender.accepted)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(redis_proc.start)  # same port, same data directory: replays the AOF
        await sending
    finally:
        sending.cancel()

    assert len(sender.accepted) == count
    safe = {a.queue_id for a in accepted_at_kill.values() if a.at < killed_at - 1.0}
    recent = {a.queue_id for a in accepted_at_kill.values()} - safe
    assert safe, "nothing was accepted more than a second before the kill: the test proved nothing"
    await wait_for_queue_ids(slow_sink, safe, timeout=180)
    # The rest too: messages accepted after the restart, and (with the AOF written before every reply)
    # those of the last second, which only an operating-system crash could take.
    await wait_for_queue_ids(slow_sink, sender.queue_ids, timeout=120)
    report(record_property, accepted=len(sender.accepted), accepted_before_kill=len(accepted_at_kill),
           accepted_in_last_second=len(recent), duplicates=duplicate_count(slow_sink),
           client_failures=dict(sender.failures))
    assert gateway.returncode is None, "the gateway must ride out a Redis restart"
    assert sender.failures, "no client ever saw Redis missing: the kill came too late to prove anything"


# -- Redis stopped and started under a running gateway --------------------------------------------------


async def test_gateway_answers_451_while_redis_is_down_and_recovers_without_restart(
        tmp_path: Path, procs: Processes, redis_proc: EmbeddedRedis) -> None:
    sink = await Sink().start()
    try:
        await publish_policies(procs, redis_proc, write_policies(tmp_path / "policies", sink))
        port, metrics_port = free_port(), free_port()
        gateway = start_gateway(procs, "gateway", redis_proc, port=port, metrics_port=metrics_port)
        await gateway.wait_ready(metrics_port)

        async def send(number: int) -> str:
            async with aiosmtplib.SMTP(hostname=LOOPBACK, port=port, timeout=30) as smtp:
                _, reply = await smtp.sendmail("app@example.com", [RCPT], numbered_message(number, rcpt=RCPT))
                return reply

        assert "queued as" in await send(1)
        await sink.wait_for(1, timeout=60)

        await asyncio.to_thread(redis_proc.stop)
        body = await wait_for_readyz(metrics_port, 503, timeout=30, process=gateway)
        assert "redis unreachable" in body
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await send(2)
        assert refused.value.code == 451 and refused.value.message.startswith("4.3.0")

        await asyncio.to_thread(redis_proc.start)
        await gateway.wait_ready(metrics_port)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:  # a pooled connection from before the restart may fail once; the client retries
            try:
                reply = await send(3)
                break
            except aiosmtplib.SMTPDataError as exc:
                assert exc.code == 451 and loop.time() < deadline, exc
                await asyncio.sleep(0.2)
        await wait_for_queue_ids(sink, {reply.rsplit(" ", 1)[1]}, timeout=60)
        assert gateway.returncode is None
        assert len(sink.handler.messages) == 2   # message 2 was refused, so the client still has it
    finally:
        await sink.stop()


# -- SIGTERM during a steady send ------------------------------------------------------------------------


async def test_sigterm_during_steady_send_turns_unready_exits_0_and_loses_nothing(
        tmp_path: Path, procs: Processes, redis_proc: EmbeddedRedis, slow_sink: Sink,
        record_property: RecordProperty) -> None:
    count, grace = 1500, 10.0
    await publish_policies(procs, redis_proc, write_policies(tmp_path / "policies", slow_sink,
                                                             maxConnections=5))
    port_a, metrics_a, port_b, metrics_b = free_port(), free_port(), free_port(), free_port()
    gateway_a = start_gateway(procs, "gateway-a", redis_proc, port=port_a, metrics_port=metrics_a,
                              visibility=10.0, grace=grace)
    await gateway_a.wait_ready(metrics_a)

    sender = Sender([port_a, port_b], count, concurrency=10, rate=200, rcpt=RCPT)
    sending = asyncio.create_task(sender.run(timeout=240))
    try:
        await wait_until(lambda: len(sender.accepted) >= count // 3 or sending.done(), timeout=120,
                         what=f"{count // 3} messages accepted")
        assert not sending.done()
        signalled = time.monotonic()
        gateway_a.send_signal(signal.SIGTERM)
        # Unready while still running: a load balancer stops sending before the process goes away.
        while (answer := await readyz(metrics_a)) is not None and answer[0] == 200:
            assert time.monotonic() - signalled < 10, "/readyz still 200 ten seconds after SIGTERM"
            await asyncio.sleep(0.02)
        assert answer is not None and answer[0] == 503 and "shutting down" in answer[1], answer
        # Within the grace period (plus slack for a loaded machine: the process bounds itself by ``grace``).
        assert await gateway_a.wait_exit(timeout=grace + 10) == 0, gateway_a.log_tail()
        stop_seconds = time.monotonic() - signalled
        # Every job the stopped gateway had claimed and not finished was handed back: due now, not
        # leased until its visibility timeout runs out.
        assert await leased_jobs(redis_proc) == [], gateway_a.log_tail()

        gateway_b = start_gateway(procs, "gateway-b", redis_proc, port=port_b, metrics_port=metrics_b,
                                  visibility=10.0, grace=grace)
        await gateway_b.wait_ready(metrics_b)
        await sending
    finally:
        sending.cancel()

    assert len(sender.accepted) == count
    duplicates = await everything_arrived(slow_sink, sender, redis_proc)
    report(record_property, stop_seconds=round(stop_seconds, 2), duplicates=duplicates,
           client_failures=dict(sender.failures))
    assert "Traceback" not in gateway_a.log()
    assert duplicates == 0, "a graceful stop finishes or hands back every job: nothing is sent twice"
