"""A real single-node Kubernetes cluster on this machine, for ``tests/e2e``: pods run, Services route, DNS answers.

``KubeNode.start(bin_dir, workdir, images=[...])`` (a context manager) runs, each from the binaries of
``.ci/provision-kube`` and each logging to ``<workdir>/logs/<component>.log``:

- **containerd** (Debian's 1.6) with its own root, state, socket and config: runc, cgroupfs
  (``SystemdCgroup = false``), ``restrict_oom_score_adj = true`` (without it every sandbox fails here: no
  CAP_SYS_RESOURCE), the imported pause image as ``sandbox_image``, CNI from ``/usr/lib/cni`` with one
  bridge network (bridge :data:`BRIDGE`, pods in :data:`POD_CIDR`);
- **etcd** and **kube-apiserver** (as ``kubeapi.py`` starts them, plus ServiceAccount admission, the node
  address and ``--kubelet-preferred-address-types=InternalIP``: the host name resolves to 127.0.0.1);
- **kube-controller-manager** (service-account tokens, the root CA ConfigMap, every controller) and
  **kube-scheduler**;
- **kubelet** (``cgroupDriver: cgroupfs``, ``failCgroupV1: false``, its pods under the cgroup
  :data:`CGROUP`, image garbage collection off: images come from archives, there is no registry);
- **kube-proxy** in iptables mode, and **CoreDNS** as a host process on the node address, behind the
  ``kube-dns`` Service (:data:`DNS_IP`) through a hand-made EndpointSlice.

The images in ``images`` (OCI archives) are imported into containerd's ``k8s.io`` namespace while the API
server starts; pods use them with ``imagePullPolicy: Never``.

Teardown (:meth:`KubeNode.stop`) puts the host back: pods deleted (so the kubelet tears their networks down
through CNI), every process stopped (SIGTERM, SIGKILL after a bounded grace), containers and sandboxes
removed, then whatever is left is removed by force (``nodehost.py``): mounts under the node's directories,
``KUBE-*``/``CNI-*`` iptables chains, the bridge and its veths, pod network namespaces, cgroups, the sysctls
the kubelet and the bridge plugin change. It then checks that nothing is left (``nodehost.leftovers``) and
raises :class:`NodeTeardownError` if something is.

One node per host: a lock (:data:`LOCK_PATH`) is held while it runs, and a second start is refused with
the owner's details. A run that died without its teardown (kill -9, a crashed pytest) leaves its state
file in :data:`RUN_DIR`; the next start finds it and cleans up what that run left (saved sysctls included).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import ssl
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import kubernetes
import yaml

from support import nodehost
from support.kubeapi import COMMAND_TIMEOUT, KubeCommandError, _Credentials, _Server, _wait_ready
from support.kubenode_config import (
    API_SERVICE_IP,
    BRIDGE,
    CGROUP,
    CLUSTER_DOMAIN,
    DNS_IP,
    NODE_NAME,
    POD_CIDR,
    SERVICE_CIDR,
    NodePlan,
)

RUN_DIR = Path("/run/mxgate-e2e")          # containerd's state and socket, runc's root, the state file
LOCK_PATH = Path("/run/mxgate-e2e.lock")
CONTAINER_LOG_LINKS = Path("/var/log/containers")   # the kubelet's symlinks; the path is fixed in the kubelet
NODE_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet",
                 "kube-proxy", "coredns", "helm")
HOST_TOOLS = {"containerd": "containerd", "ctr": "containerd", "runc": "runc", "iptables": "iptables",
              "ip6tables": "iptables", "nft": "nftables", "conntrack": "conntrack", "ip": "iproute2",
              "umount": "mount"}

#: Seconds a component gets between SIGTERM and SIGKILL at teardown (kube-apiserver once ignored SIGTERM 40 s).
STOP_GRACE = 10.0
#: Seconds for the whole start-up (measured 9-10 s on an idle 2-core machine; the lead's tests share it).
START_TIMEOUT = 120.0
#: Seconds the kubelet gets to take the pods down (CNI DEL included) before the rest is removed by force.
POD_DRAIN_TIMEOUT = 20.0


class NodeStartError(RuntimeError):
    """A prerequisite is missing or a component did not come up; the message names it and holds its log tail."""


class NodeBusyError(NodeStartError):
    """Another node runs on this host (it holds :data:`LOCK_PATH`)."""


class NodeTeardownError(RuntimeError):
    """The teardown left something on the host; the message lists it."""


def check_prerequisites(bin_dir: Path) -> None:
    """Fail, saying what to install, if a binary or host tool is missing or the process is not root."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the node needs root (containerd, kubelet, iptables, mounts)")
    missing_bins = [name for name in NODE_BINARIES if not os.access(bin_dir / name, os.X_OK)]
    if missing_bins:
        problems.append(f"{', '.join(missing_bins)} missing in {bin_dir}: run `bash .ci/provision-kube`")
    missing_tools = {tool: pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None}
    if missing_tools:
        problems.append(f"not on PATH: {', '.join(missing_tools)}; install the Debian packages "
                        f"{' '.join(sorted(set(missing_tools.values())))}")
    if not Path("/usr/lib/cni/bridge").exists() or not Path("/usr/lib/cni/host-local").exists():
        problems.append("CNI plugins missing in /usr/lib/cni: apt-get install containernetworking-plugins")
    if not Path("/proc/sys/net/bridge").exists():
        problems.append("br_netfilter is not loaded (modprobe br_netfilter)")
    if problems:
        raise NodeStartError("cannot start a Kubernetes node here:\n- " + "\n- ".join(problems))


def node_address() -> str:
    """The host's address on its default route: the node's InternalIP, where pods reach the API server."""
    result = subprocess.run(["ip", "-j", "route", "get", "192.0.2.255"], capture_output=True, text=True, timeout=10)
    with contextlib.suppress(ValueError, IndexError, KeyError):
        return str(json.loads(result.stdout)[0]["prefsrc"])
    raise NodeStartError(f"no address on a default route (`ip route get`: {result.stdout} {result.stderr})")


def oci_archive_tag(archive: Path) -> str:
    """The image name an OCI archive carries (``org.opencontainers.image.ref.name`` in its index)."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None, f"{archive}: no index.json"
        index = json.load(member)
    names = [m.get("annotations", {}).get("org.opencontainers.image.ref.name") for m in index.get("manifests", [])]
    found = [n for n in names if n]
    if not found:
        raise NodeStartError(f"{archive} has no image name (org.opencontainers.image.ref.name)")
    return str(found[0])


@dataclass(frozen=True)
class ImageArchives:
    """The OCI archives ``.ci/image`` writes: mxgate's image, the pod sandbox (pause) and the Redis image."""

    mxgate: Path
    pause: Path
    redis: Path

    @property
    def mxgate_ref(self) -> str:
        return oci_archive_tag(self.mxgate)

    @property
    def redis_ref(self) -> str:
        return oci_archive_tag(self.redis)


def _free_port(host: str, *, udp_too: bool = False) -> int:
    while True:
        with socket.socket() as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            if not udp_too:
                return port
            with socket.socket(type=socket.SOCK_DGRAM) as udp:
                with contextlib.suppress(OSError):
                    udp.bind((host, port))
                    return port


# -- the lock and the state file -------------------------------------------------------------------------


@dataclass
class _HostClaim:
    """The one-node-per-host lock, and the state file that lets the next run clean up after a crashed one."""

    lock: TextIO

    @classmethod
    def take(cls) -> _HostClaim:
        lock = LOCK_PATH.open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "unknown"
            lock.close()
            raise NodeBusyError(f"another Kubernetes node of the e2e tests runs on this host ({owner}); it holds "
                                f"{LOCK_PATH}. Only one may run at a time: wait for it to finish.") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}, started {time.strftime('%H:%M:%S')}\n")
        lock.flush()
        return cls(lock)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            LOCK_PATH.unlink()
        self.lock.close()


def _state_path() -> Path:
    return RUN_DIR / "state.json"


def clean_leftovers(log: Callable[[str], None] = print) -> None:
    """Remove what a node that died without its teardown left (call with the host claim held)."""
    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(_state_path().read_text())
    if not state and not RUN_DIR.exists() and not nodehost.link_exists(BRIDGE) \
            and not nodehost.cgroup_dirs(CGROUP):
        return
    log(f"kubenode: cleaning up after a previous run that did not tear down (state: {state or 'none'})")
    workdir = Path(state["workdir"]) if state.get("workdir") else None
    _force_cleanup(workdir, state)


def _force_cleanup(workdir: Path | None, host: Mapping[str, Any]) -> None:
    """Everything the node may have left, removed by force; idempotent."""
    nodehost.kill_processes(nodehost.processes_mentioning(str(RUN_DIR)))
    nodehost.kill_cgroup_processes(CGROUP)
    dirs = [RUN_DIR] + ([workdir] if workdir else [])
    nodehost.unmount_under(dirs)
    nodehost.remove_cgroups(CGROUP)
    nodehost.remove_idle_cri_netns()
    nodehost.remove_bridge(BRIDGE)
    nodehost.remove_node_chains()
    nodehost.write_sysctls(host.get("sysctls", {}))
    nodehost.remove_new_empty_tables(host.get("nft_tables", nodehost.nft_tables()))
    nodehost.remove_paths(host.get("absent_paths", []))
    if workdir is not None:
        with contextlib.suppress(OSError):
            for link in CONTAINER_LOG_LINKS.glob("*.log"):
                if os.readlink(link).startswith(str(workdir)):
                    link.unlink()
        for state_dir in ("containerd", "kubelet", "etcd-data", "cni", "volumes"):
            shutil.rmtree(workdir / state_dir, ignore_errors=True)
    shutil.rmtree(RUN_DIR, ignore_errors=True)


# -- the node --------------------------------------------------------------------------------------------


@dataclass
class KubeNode:
    """A running single-node cluster (see the module docstring)."""

    bin_dir: Path
    workdir: Path
    node_ip: str
    server: str
    kubeconfig: Path
    images: dict[Path, str]                  # archive -> image name in containerd
    timings: dict[str, float]                # seconds, start-up phases and (after stop) teardown
    _claim: _HostClaim = field(repr=False)
    _host: dict[str, Any] = field(repr=False)     # the state file's content
    _servers: dict[str, _Server] = field(repr=False)
    _creds: _Credentials = field(repr=False)
    _stopped: bool = False

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def containerd_socket(self) -> Path:
        return RUN_DIR / "containerd.sock"

    @classmethod
    def start(cls, bin_dir: Path, workdir: Path, *, pause: Path, images: Sequence[Path]) -> KubeNode:
        """``pause``: the OCI archive of the sandbox image; ``images``: more archives to import."""
        check_prerequisites(bin_dir)
        claim = _HostClaim.take()
        began = time.monotonic()
        try:
            clean_leftovers()
            RUN_DIR.mkdir(mode=0o700)
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "logs").mkdir(exist_ok=True)
            # What the teardown must put back: the sysctls, and which fixed host paths and nftables tables
            # did not exist yet (the node creates them; they go with it).
            host = {"workdir": str(workdir), "pid": os.getpid(), "sysctls": nodehost.read_sysctls(),
                    "absent_paths": nodehost.absent_paths(), "nft_tables": nodehost.nft_tables()}
            _state_path().write_text(json.dumps(host))
            nodehost.create_cgroups(CGROUP)
        except BaseException:
            claim.release()
            raise
        node_ip = node_address()
        creds = _Credentials.generate(workdir / "certs", serving_names=(
            node_ip, "127.0.0.1", API_SERVICE_IP, "localhost", "kubernetes", "kubernetes.default",
            "kubernetes.default.svc", f"kubernetes.default.svc.{CLUSTER_DOMAIN}"))
        api_port = _free_port(node_ip)
        server = f"https://{node_ip}:{api_port}"
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(creds.kubeconfig(server)))
        kubeconfig.chmod(0o600)
        node = cls(bin_dir=bin_dir, workdir=workdir, node_ip=node_ip, server=server, kubeconfig=kubeconfig,
                   images={}, timings={}, _claim=claim, _host=host, _servers={}, _creds=creds)
        try:
            plan = NodePlan(bin_dir=bin_dir, workdir=workdir, run_dir=RUN_DIR, node_ip=node_ip,
                            api_port=api_port, creds=creds, kubeconfig=kubeconfig,
                            pause_image=oci_archive_tag(pause), free_port=_free_port)
            node._start_components(plan, [pause, *images])
        except BaseException:
            node.timings["failed_after"] = round(time.monotonic() - began, 1)
            node.stop(check=False)
            raise
        node.timings["start"] = round(time.monotonic() - began, 1)
        return node

    def _start_components(self, plan: NodePlan, images: Sequence[Path]) -> None:
        began = time.monotonic()

        def mark(phase: str) -> None:
            self.timings[phase] = round(time.monotonic() - began, 1)

        for name, argv in plan.first_wave():          # containerd, etcd, kube-apiserver
            self._launch(name, argv)
        self._wait(lambda: self._ctr("version", check=False).returncode == 0, "containerd answers on its socket",
                   ("containerd",))
        for archive in images:
            self._ctr("images", "import", "--no-unpack=false", str(archive), timeout=300)
            self.images[archive] = oci_archive_tag(archive)
        mark("images_imported")
        try:
            _wait_ready(self.server, self._creds.ssl_context(),
                        [self._servers["etcd"], self._servers["kube-apiserver"]])
        except Exception as exc:
            raise NodeStartError(f"kube-apiserver did not become ready: {exc}") from exc
        mark("apiserver_ready")
        for name, argv in plan.second_wave():         # kcm, scheduler, kubelet, kube-proxy, coredns
            self._launch(name, argv)
        with self.api_client() as api:
            core = kubernetes.client.CoreV1Api(api)
            plan.create_dns_service(api)
            self._wait(lambda: _node_ready(core), "the node to be Ready", ("kubelet", "containerd"))
            mark("node_ready")
            self._wait(lambda: _has_default_service_account(core), "the default ServiceAccount",
                       ("kube-controller-manager",))
        for name, url in plan.health_urls().items():
            self._wait(lambda url=url: _http_ok(url), f"{name} healthy ({url})", (name,))
        mark("all_ready")

    # -- processes --------------------------------------------------------------------------------------

    def _launch(self, name: str, argv: Sequence[str]) -> None:
        self._servers[name] = _Server.start(name, argv, self.logs / f"{name}.log")

    def _wait(self, check: Callable[[], bool], what: str, components: Sequence[str],
              timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            exited = [s for s in self._servers.values() if s.popen.poll() is not None]
            if exited:
                raise NodeStartError(f"{exited[0].name} exited with {exited[0].popen.returncode} while waiting for "
                                     f"{what}\n{exited[0].log_tail()}")
            with contextlib.suppress(Exception):
                if check():
                    return
            if time.monotonic() > deadline:
                tails = "\n".join(self._servers[c].log_tail() for c in components if c in self._servers)
                raise NodeStartError(f"timed out after {timeout:.0f}s waiting for {what} "
                                     f"(component: {', '.join(components)})\n{tails}")
            time.sleep(0.2)

    def _ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = ["ctr", "-a", str(self.containerd_socket), "-n", "k8s.io", *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise NodeStartError(f"`{' '.join(argv)}` failed: {result.stderr.strip()}\n"
                                 + (self._servers["containerd"].log_tail() if "containerd" in self._servers else ""))
        return result

    def log_tail(self, component: str, lines: int = 40) -> str:
        server = self._servers.get(component)
        return server.log_tail(lines) if server else f"(no {component} running)"

    # -- teardown ---------------------------------------------------------------------------------------

    def stop(self, *, check: bool = True) -> None:
        """Tear the node down completely (see the module docstring); with ``check``, raise if anything is left."""
        if self._stopped:
            return
        self._stopped = True
        began = time.monotonic()
        try:
            self._stop_servers("kube-scheduler", "kube-controller-manager")   # nothing recreates the pods now
            if "kubelet" in self._servers and self._servers["kubelet"].popen.poll() is None:
                with contextlib.suppress(Exception):
                    self._drain_pods()
            self._stop_servers("kubelet", "kube-proxy", "coredns")
            if "containerd" in self._servers:
                self._remove_containers()
            self._stop_servers("containerd")
            self._stop_servers("kube-apiserver")
            self._stop_servers("etcd")
            _force_cleanup(self.workdir, self._host)
            left = nodehost.leftovers(bridge=BRIDGE, cgroup=CGROUP, dirs=[RUN_DIR, self.workdir],
                                      saved_sysctls=self._host["sysctls"], process_marker=str(RUN_DIR),
                                      absent_before=self._host["absent_paths"],
                                      tables_before=self._host["nft_tables"])
        finally:
            self._claim.release()
        self.timings["teardown"] = round(time.monotonic() - began, 1)
        print(f"kubenode: teardown {self.timings['teardown']} s")
        if check and left:
            raise NodeTeardownError("the node's teardown left:\n- " + "\n- ".join(left))

    def _stop_servers(self, *names: str) -> None:
        """SIGTERM all of ``names`` at once, SIGKILL those still running after :data:`STOP_GRACE`."""
        running = [self._servers[n] for n in names if n in self._servers]
        for server in running:
            if server.popen.poll() is None:
                server.popen.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for server in running:
            server.stop(grace=max(0.0, deadline - time.monotonic()))

    def _drain_pods(self) -> None:
        """Delete every pod (grace 0) and wait until containerd runs no task: the kubelet then stopped each
        sandbox through CRI, which runs CNI DEL (veth, IP address) and removes its network namespace."""
        with self.api_client() as api:
            core = kubernetes.client.CoreV1Api(api)
            for pod in core.list_pod_for_all_namespaces().items:
                with contextlib.suppress(kubernetes.client.ApiException):
                    core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
        deadline = time.monotonic() + POD_DRAIN_TIMEOUT
        while time.monotonic() < deadline and self._running_tasks():
            time.sleep(0.25)

    def _running_tasks(self) -> list[str]:
        result = self._ctr("tasks", "ls", "-q", check=False)
        return result.stdout.split() if result.returncode == 0 else []

    def running_containers(self) -> set[str]:
        """The ids of the containers whose process runs (``ctr tasks ls``: TASK PID STATUS)."""
        result = self._ctr("tasks", "ls", check=False)
        rows = [line.split() for line in result.stdout.splitlines()[1:]]
        return {row[0] for row in rows if len(row) >= 3 and row[2] == "RUNNING"}

    def wait_container_gone(self, container_id: str, *, timeout: float = 30) -> None:
        """Wait until a container's process has ended (``containerd://ID`` as a pod's status gives it, or ID):
        a pod deleted by force is gone from the API at once, while the kubelet kills its containers after."""
        task = container_id.removeprefix("containerd://")
        deadline = time.monotonic() + timeout
        while task in self.running_containers():
            if time.monotonic() > deadline:
                raise AssertionError(f"container {task} still runs {timeout:.0f} s later")
            time.sleep(0.1)

    def _remove_containers(self) -> None:
        for task in self._running_tasks():
            self._ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
            self._ctr("tasks", "delete", "-f", task, check=False)
        containers = self._ctr("containers", "ls", "-q", check=False).stdout.split()
        if containers:
            self._ctr("containers", "delete", *containers, check=False)

    def __enter__(self) -> KubeNode:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop(check=exc is None)

    # -- talking to it ----------------------------------------------------------------------------------

    def api_client(self) -> kubernetes.client.ApiClient:
        return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))

    def helm(self, *args: str, values: Mapping[str, Any] | None = None,
             timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """The provisioned helm against this node; ``values`` go in on stdin (``-f -``)."""
        home = self.workdir / "helm"
        env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
               "HELM_DATA_HOME": str(home / "data")}
        argv = [str(self.bin_dir / "helm"), f"--kubeconfig={self.kubeconfig}", *args]
        if values is not None:
            argv += ["-f", "-"]
        result = subprocess.run(argv, input=yaml.safe_dump(dict(values)) if values is not None else None,
                                capture_output=True, text=True, timeout=timeout, env=env,
                                stdin=subprocess.DEVNULL if values is None else None)
        if result.returncode != 0:
            raise KubeCommandError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def tag_image(self, ref: str, new_ref: str) -> None:
        """Give an imported image a second name (``ctr images tag``): a "new" tag to roll out without a registry."""
        self._ctr("images", "tag", "--force", ref, new_ref)

    def add_host_volume(self, name: str, *, claim_namespace: str, claim_name: str, capacity: str = "8Gi") -> Path:
        """A PersistentVolume on a directory of the node, bound in advance to one claim (there is no
        provisioner): a StatefulSet's volumeClaimTemplate claim gets it. The directory is world-writable
        because the kubelet applies no fsGroup to hostPath volumes."""
        path = self.workdir / "volumes" / name
        path.mkdir(parents=True)
        path.chmod(0o777)
        with self.api_client() as api:
            kubernetes.client.CoreV1Api(api).create_persistent_volume({
                "metadata": {"name": name},
                "spec": {"capacity": {"storage": capacity}, "accessModes": ["ReadWriteOnce"],
                         "persistentVolumeReclaimPolicy": "Retain",
                         "claimRef": {"namespace": claim_namespace, "name": claim_name},
                         "hostPath": {"path": str(path), "type": "Directory"}}})
        return path

    def component_logs(self, lines: int = 30) -> str:
        """The tails of every component's log (for a failing test's message)."""
        return "\n".join(s.log_tail(lines) for s in self._servers.values())


def _node_ready(core: kubernetes.client.CoreV1Api) -> bool:
    node = core.read_node(NODE_NAME)
    return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])


def _has_default_service_account(core: kubernetes.client.CoreV1Api) -> bool:
    core.read_namespaced_service_account("default", "default")
    return True


def _http_ok(url: str) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE   # the components' self-signed serving certificates; health only
    try:
        with urllib.request.urlopen(url, context=context, timeout=3) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


__all__ = ["DNS_IP", "NODE_NAME", "POD_CIDR", "SERVICE_CIDR", "ImageArchives", "KubeNode", "NodeBusyError",
           "NodeStartError", "NodeTeardownError", "oci_archive_tag"]
