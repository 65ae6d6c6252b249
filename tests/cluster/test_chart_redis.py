"""The bundled Redis's start scripts as the chart renders them, run for real (no kubelet needed).

``helm template`` renders the Redis ConfigMap; its files (redis.conf, common.sh, start-redis.sh, start-sentinel.sh,
ready.sh) are written to a directory and run with the environment the StatefulSet gives its containers, except
for where things are: three loopback addresses (127.0.0.2-4) stand in for the three pods' DNS names, each pod
listening on its own address (REDIS_BIND) and having its own run and data directories. The processes are the
system's real redis-server and redis-sentinel, started by those scripts: the replicated mode forms a primary with
two replicas and three sentinels that agree, fails over when the primary's pod dies, and the restarted pod asks
the sentinels and comes back as a replica of the new primary instead of as a second primary. When all three pods
stop after a failover and start together, no sentinel is running to ask: what each pod remembers on its data
volume (the sentinel's probe, ready.sh, records it) makes the newest primary the primary again, with the writes it
took after the failover, even when the old primary's pod never came back in between and still remembers itself.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from support.chart import FULLNAME, render
from support.kubeapi import find_bin_dir
from support.procs import MxgateProcess, Processes, eventually

NODES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
MASTER = "mxgate"
REPLICATED = {"redis": {"mode": "replicated",
                        # The schema's smallest values: the failover in this test takes seconds, not a minute.
                        "replicated": {"downAfterMilliseconds": 1000, "failoverTimeout": 2000}}}


@pytest.fixture(scope="module")
def helm() -> Path:
    return find_bin_dir() / "helm"


def ports_free_on_every_node() -> tuple[int, int]:
    """A Redis port and a sentinel port that are free on all three loopback addresses."""
    chosen: list[int] = []
    while len(chosen) < 2:
        with socket.socket() as probe:
            probe.bind((NODES[0], 0))
            port = probe.getsockname()[1]
        try:
            for address in NODES:
                with socket.socket() as sock:
                    sock.bind((address, port))
        except OSError:
            continue
        if port not in chosen:
            chosen.append(port)
    return chosen[0], chosen[1]


def write_config(helm: Path, values: dict[str, Any], directory: Path) -> Path:
    """The Redis ConfigMap's files, as rendered, in ``directory``."""
    configmap = render(helm, values).get("ConfigMap", f"{FULLNAME}-redis")
    directory.mkdir()
    for name, text in configmap["data"].items():
        (directory / name).write_text(text)
    return directory


@dataclass
class Pod:
    """One Redis pod of the StatefulSet: its address (its DNS name), directories and containers."""

    index: int
    root: Path
    env: dict[str, str]
    password: str
    procs: Processes

    @property
    def address(self) -> str:
        return NODES[self.index]

    def start(self, container: str) -> MxgateProcess:
        """Run a container's command (the StatefulSet's: /bin/sh <script>) until the test ends."""
        script = "start-redis.sh" if container == "redis" else "start-sentinel.sh"
        argv = ["/bin/sh", str(Path(self.env["REDIS_CONFIG_DIR"]) / script)]
        log_path = self.root / f"{container}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={"PATH": os.environ["PATH"], **self.env})
        process = MxgateProcess(f"{container}-{self.index}", argv, log_path, popen)
        self.procs.started.append(process)
        return process

    def ready(self, container: str) -> bool:
        """The readiness probe's verdict (ready.sh, as the kubelet runs it)."""
        probe = subprocess.run(["/bin/sh", str(Path(self.env["REDIS_CONFIG_DIR"]) / "ready.sh"), container],
                               env={"PATH": os.environ["PATH"], **self.env}, capture_output=True, timeout=10)
        return probe.returncode == 0

    def redis(self) -> redis.Redis:
        return redis.Redis(self.address, int(self.env["REDIS_PORT"]), password=self.password,
                           socket_timeout=2, decode_responses=True)

    def sentinel(self) -> redis.Redis:
        return redis.Redis(self.address, int(self.env["SENTINEL_PORT"]), password=self.password,
                           socket_timeout=2, decode_responses=True)

    @property
    def memory_path(self) -> Path:
        return Path(self.env["REDIS_DATA_DIR"]) / "last-primary"

    def memory(self) -> str | None:
        """What the pod remembers on its data volume: "EPOCH PRIMARY", or None when nothing."""
        with contextlib.suppress(FileNotFoundError):
            return self.memory_path.read_text().strip()
        return None

    def running(self) -> list[MxgateProcess]:
        return [p for p in self.procs.started if p.name.endswith(f"-{self.index}") and p.returncode is None]

    def stop(self) -> None:
        """Both containers die (SIGKILL, as when the node goes)."""
        for process in self.running():
            process.kill_group()

    def log(self, container: str) -> str:
        return (self.root / f"{container}.log").read_text()


def make_pods(tmp_path: Path, config: Path, procs: Processes, count: int, *, password: str) -> list[Pod]:
    redis_port, sentinel_port = ports_free_on_every_node()
    password_file = tmp_path / "password"
    password_file.write_text(password)
    pods = []
    for index in range(count):
        root = tmp_path / f"pod-{index}"
        (root / "run").mkdir(parents=True)
        (root / "data").mkdir()
        env = {"REDIS_CONFIG_DIR": str(config), "REDIS_RUN_DIR": str(root / "run"),
               "REDIS_DATA_DIR": str(root / "data"), "REDIS_PASSWORD_FILE": str(password_file),
               "REDIS_BIND": NODES[index], "REDIS_PORT": str(redis_port), "SENTINEL_PORT": str(sentinel_port),
               "REDIS_SELF": NODES[index], "REDIS_NODES": " ".join(NODES[:count])}
        pods.append(Pod(index, root, env, password, procs))
    return pods


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_text()


def replication(pod: Pod) -> dict[str, Any]:
    with contextlib.suppress(redis.RedisError):
        return pod.redis().info("replication")
    return {}


def primary_says(pod: Pod) -> str | None:
    """Whom this pod's sentinel names as the primary (None when it does not answer)."""
    with contextlib.suppress(redis.RedisError):
        answer = pod.sentinel().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
        return str(answer[0]) if answer else None
    return None


def replica_of(pod: Pod, primary: Pod) -> bool:
    info = replication(pod)
    return (info.get("role") == "slave" and info.get("master_host") == primary.address
            and info.get("master_link_status") == "up")


async def form(pods: list[Pod], procs: Processes) -> None:
    """Wait for the replicated set: pod 0 the primary, the others its replicas, every container ready, and the
    three sentinels knowing each other (a failover needs them)."""
    first, *others = pods
    await eventually(lambda: all(replica_of(p, first) for p in others), timeout=30,
                     what="both replicas in sync with pod 0", processes=procs.started)
    assert replication(first)["role"] == "master" and replication(first)["connected_slaves"] == 2
    await eventually(lambda: all(p.ready("redis") and p.ready("sentinel") for p in pods), timeout=30,
                     what="every container ready", processes=procs.started)
    await eventually(lambda: all(len(p.sentinel().execute_command("SENTINEL", "SENTINELS", MASTER)) == 2
                                 for p in pods), timeout=30, what="each sentinel seeing the other two")
    # A sentinel learns the replicas from the primary's INFO, every 10 s: until then it has none to promote.
    await eventually(lambda: all(len(p.sentinel().execute_command("SENTINEL", "REPLICAS", MASTER)) == 2
                                 for p in pods), timeout=30, what="each sentinel knowing both replicas")


async def fail_over_from(first: Pod, others: list[Pod]) -> tuple[Pod, Pod]:
    """Pod ``first``, the primary, dies (both containers, as when its node goes); the two other sentinels promote
    a replica. Returns the new primary and the pod that now replicates it."""
    first.stop()
    promoted = await eventually(
        lambda: (answers := {primary_says(p) for p in others}) and len(answers) == 1
        and (name := answers.pop()) != first.address and name,
        timeout=60, what="a failover to pod 1 or 2")
    new_primary = next(p for p in others if p.address == promoted)
    remaining = next(p for p in others if p is not new_primary)
    await eventually(lambda: replication(new_primary).get("role") == "master" and replica_of(remaining, new_primary),
                     timeout=60, what="the other replica following the new primary")
    return new_primary, remaining


async def test_replicated_mode_elects_fails_over_and_rejoins(helm: Path, tmp_path: Path, procs: Processes) -> None:
    config = write_config(helm, REPLICATED, tmp_path / "etc-redis")
    pods = make_pods(tmp_path, config, procs, 3, password=secrets.token_hex(16))
    first, *others = pods

    # The replicas' pods come up before pod 0 (the StatefulSet starts them in parallel). A Redis starts only once
    # two sentinels answer: with pod 1 alone, its Redis waits.
    pod_1, pod_2 = others
    pod_1.start("redis")
    pod_1.start("sentinel")
    await eventually(lambda: "1 of the 3 sentinels answer; waiting for two" in pod_1.log("redis"), timeout=30,
                     what="pod 1's Redis waiting for a second sentinel", processes=procs.started)
    assert not replication(pod_1), "pod 1's Redis started with one sentinel's word"
    # With pod 2 there are two sentinels, neither with anything to remember (fresh volumes): they name pod 0, and
    # the replicas follow it, not ready until it is there and they have its data.
    pod_2.start("redis")
    pod_2.start("sentinel")
    await eventually(lambda: all(replication(p).get("role") == "slave" for p in others), timeout=30,
                     what="pods 1 and 2 as replicas", processes=procs.started)
    assert all(replication(p)["master_host"] == first.address for p in others)
    assert not any(p.ready("redis") for p in others), "a replica without its primary reported ready"
    first.start("redis")
    first.start("sentinel")
    await form(pods, procs)

    # The three sentinels agree on pod 0, and have the quorum and the majority for a failover.
    assert {primary_says(p) for p in pods} == {first.address}
    assert all(p.sentinel().execute_command("SENTINEL", "CKQUORUM", MASTER).startswith("OK 3 usable")
               for p in pods)
    # Their probes have written down what they know, on each pod's data volume: epoch 0 (no failover yet), pod 0.
    assert {p.memory() for p in pods} == {f"0 {first.address}"}
    # Rewritten only when it changes: another probe leaves the file alone.
    inode = first.memory_path.stat().st_ino
    assert first.ready("sentinel") and first.memory_path.stat().st_ino == inode
    # A client must log in to a sentinel, with the Redis password.
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(first.address, int(first.env["SENTINEL_PORT"]), socket_timeout=2).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)

    primary = first.redis()
    primary.set("mxg:test", "before the failover")
    assert primary.execute_command("WAIT", 2, 2000) == 2
    settings = primary.config_get("*")
    assert (settings["appendonly"], settings["maxmemory-policy"]) == ("yes", "noeviction")
    assert 0 < int(settings["maxmemory"])

    new_primary, remaining = await fail_over_from(first, others)

    # Pod 0 restarts: its scripts ask the sentinels (its own is not up yet) and it comes back as a replica of the
    # new primary, with the data, instead of as a second primary (which the sentinels would turn into a replica
    # with a REPLICAOF, after it had taken writes for a while).
    before_restart = len((first.root / "redis.log").read_text())
    first.start("redis")
    first.start("sentinel")
    await eventually(lambda: replica_of(first, new_primary), timeout=30, what="pod 0 as a replica of the new primary",
                     processes=[p for p in procs.started if p.name.endswith("-0") and p.returncode is None])
    assert first.redis().get("mxg:test") == "before the failover"
    log = (first.root / "redis.log").read_text()[before_restart:]
    assert f"the primary is {new_primary.address} (epoch " in log
    assert "enabled (user request" not in log, "pod 0 started as a primary and was demoted by the sentinels"
    await eventually(lambda: primary_says(first) == new_primary.address, timeout=30,
                     what="pod 0's sentinel naming the new primary")
    assert replication(new_primary)["connected_slaves"] == 2


@pytest.mark.parametrize("pod_0_rejoined", [False, True], ids=["old-primary-missed-the-failover",
                                                                 "old-primary-rejoined-in-between"])
async def test_all_pods_restarting_together_after_a_failover_keep_the_newest_primary(
        helm: Path, tmp_path: Path, procs: Processes, pod_0_rejoined: bool) -> None:
    config = write_config(helm, REPLICATED, tmp_path / "etc-redis")
    pods = make_pods(tmp_path, config, procs, 3, password=secrets.token_hex(16))
    first, *others = pods
    for pod in pods:
        pod.start("redis")
        pod.start("sentinel")
    await form(pods, procs)
    first.redis().set("mxg:before", "written before the failover")
    assert first.redis().execute_command("WAIT", 2, 2000) == 2

    new_primary, remaining = await fail_over_from(first, others)
    # Accepted after the failover: the new primary and the other replica have it, pod 0 does not.
    new_primary.redis().set("mxg:after", "written after the failover")
    assert new_primary.redis().execute_command("WAIT", 1, 2000) == 1
    # The probes run (as the kubelet runs them every few seconds) and the two pods that saw the failover remember
    # it: a higher epoch, and the new primary.
    await eventually(lambda: new_primary.ready("sentinel") and remaining.ready("sentinel")
                     and new_primary.memory() == remaining.memory() != f"0 {first.address}",
                     timeout=30, what="the new primary remembered by the pods that saw the failover")
    remembered = new_primary.memory()
    assert remembered is not None
    epoch, name = remembered.split()
    assert name == new_primary.address and int(epoch) > 0
    if pod_0_rejoined:
        first.start("redis")
        first.start("sentinel")
        await eventually(lambda: replica_of(first, new_primary) and first.ready("sentinel")
                         and first.memory() == remembered, timeout=30,
                         what="pod 0 back as a replica, remembering the new primary", processes=first.running())
    else:
        # Pod 0 never came back: it still remembers itself as the primary, with the old epoch.
        assert first.memory() == f"0 {first.address}"

    # Every pod stops, then all three start at once: no sentinel is running to ask.
    for pod in pods:
        pod.stop()
    offsets = {pod.index: len(pod.log("redis")) for pod in pods}
    for pod in pods:
        pod.start("redis")
        pod.start("sentinel")
    # The newest primary is the primary again; the others replicate it, pod 0 included.
    await eventually(lambda: replica_of(first, new_primary) and replica_of(remaining, new_primary),
                     timeout=60, what="pods replicating the newest primary after the full restart",
                     processes=procs.started[-6:])
    assert replication(new_primary)["role"] == "master" and replication(new_primary)["connected_slaves"] == 2
    for pod in pods:
        log = pod.log("redis")[offsets[pod.index]:]
        assert f"the primary is {new_primary.address} (epoch {epoch}:" in log, log
        # Each started in its role: none was made a primary, or demoted, by the sentinels afterwards.
        assert "enabled (user request" not in log, (pod.index, log)
    # The write accepted after the failover is there, on the primary and, once it resynced, on pod 0.
    assert new_primary.redis().get("mxg:after") == "written after the failover"
    assert first.redis().get("mxg:after") == "written after the failover"
    assert first.redis().get("mxg:before") == "written before the failover"
    # Pod 0's sentinel, if it started from the old memory, takes the newer epoch from the others, and its probe
    # then rewrites the memory.
    await eventually(lambda: {primary_says(p) for p in pods} == {new_primary.address}, timeout=30,
                     what="every sentinel naming the newest primary")
    await eventually(lambda: first.ready("sentinel") and first.memory() == remembered, timeout=30,
                     what="pod 0 remembering the newest primary")


async def test_standalone_start_script(helm: Path, tmp_path: Path, procs: Processes) -> None:
    config = write_config(helm, {}, tmp_path / "etc-redis")
    assert not (config / "start-sentinel.sh").exists()
    [pod] = make_pods(tmp_path, config, procs, 1, password=secrets.token_hex(16))
    del pod.env["SENTINEL_PORT"], pod.env["REDIS_SELF"], pod.env["REDIS_NODES"]
    pod.start("redis")
    await eventually(lambda: pod.ready("redis"), timeout=30, what="the standalone Redis ready",
                     processes=procs.started)
    info = replication(pod)
    assert info["role"] == "master"
    settings = pod.redis().config_get("*")
    assert (settings["appendonly"], settings["appendfsync"], settings["maxmemory-policy"]) == (
        "yes", "everysec", "noeviction")
    assert int(settings["maxmemory"]) == 1024 ** 3 * 75 // 100
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(pod.address, int(pod.env["REDIS_PORT"]), socket_timeout=2).set("k", "v")
    # The password is in the generated file in the run directory, not on the command line.
    assert pod.password not in command_line(procs.started[0].pid)


async def test_start_script_refuses_a_password_it_cannot_quote(helm: Path, tmp_path: Path, procs: Processes) -> None:
    config = write_config(helm, {}, tmp_path / "etc-redis")
    [pod] = make_pods(tmp_path, config, procs, 1, password='has "quotes"')
    process = pod.start("redis")
    assert await process.wait_exit(timeout=10) == 1
    assert f"redis password (Secret {FULLNAME}-redis): empty, or contains whitespace, quotes" in process.log()
