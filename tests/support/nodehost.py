"""What a Kubernetes node changes on its host, read back and undone: the other half of ``kubenode.py``.

A kubelet, kube-proxy, containerd and the CNI bridge plugin leave marks outside their own directories:
sysctls (kubelet writes vm.overcommit_memory, kernel.panic and kernel.panic_on_oops; the bridge plugin
turns on ip_forward), iptables chains (``KUBE-*`` from kubelet and kube-proxy, ``CNI-*`` from the plugins),
a bridge and one veth per pod, network namespaces in ``/run/netns``, cgroups under the kubelet's cgroup
root in every hierarchy, and mounts (overlay root filesystems, shm, tmpfs volumes) under their state
directories. Each function here undoes one kind of mark and is safe to run when there is nothing to undo,
so the same code cleans up after a normal run and after a crashed one (``kubenode.KubeNode`` runs it from
its state file). :func:`leftovers` lists what is still there, for the teardown check.

Everything goes through the host's own tools (``ip``, ``iptables``/``ip6tables``, ``umount``) or /proc and
/sys, as an operator would clean a node by hand.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

#: The sysctls a node run may change: kubelet's (it "fixes" them at start-up unless protectKernelDefaults),
#: the bridge plugin's ip_forward, and br_netfilter's switch that lets iptables see bridged traffic.
SYSCTLS = (
    "vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables",
    "net.ipv4.conf.all.route_localnet",
)
#: iptables chain name prefixes of Kubernetes components and CNI plugins.
CHAIN_PREFIXES = ("KUBE-", "CNI-")
_TABLES = ("filter", "nat", "mangle", "raw")
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_NETNS_DIR = Path("/run/netns")
_MNT_DETACH = 2


# -- sysctls ---------------------------------------------------------------------------------------------


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls(names: Iterable[str] = SYSCTLS) -> dict[str, str]:
    """The current values of those of ``names`` this kernel has."""
    values: dict[str, str] = {}
    for name in names:
        with contextlib.suppress(OSError):
            values[name] = _sysctl_path(name).read_text().strip()
    return values


def write_sysctls(values: Mapping[str, str]) -> list[str]:
    """Put ``values`` back; returns the ones that could not be written (with why)."""
    failed = []
    for name, value in values.items():
        try:
            _sysctl_path(name).write_text(value + "\n")
        except OSError as exc:
            failed.append(f"{name}={value}: {exc}")
    return failed


def changed_sysctls(saved: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``name -> (saved, now)`` for each sysctl that differs from ``saved``."""
    now = read_sysctls(saved)
    return {name: (value, now.get(name, "?")) for name, value in saved.items() if now.get(name) != value}


# -- iptables --------------------------------------------------------------------------------------------


def _ours(chain: str) -> bool:
    return chain.startswith(CHAIN_PREFIXES)


def _rules(tool: str, table: str) -> list[str]:
    result = subprocess.run([tool, "-w", "5", "-t", table, "-S"], capture_output=True, text=True, timeout=30)
    return result.stdout.splitlines() if result.returncode == 0 else []


def node_chains(tools: Iterable[str] = ("iptables", "ip6tables")) -> list[str]:
    """``tool/table/chain`` of every KUBE-*/CNI-* chain, and of every built-in chain rule jumping to one."""
    found = []
    for tool in tools:
        for table in _TABLES:
            for line in _rules(tool, table):
                words = shlex.split(line)
                if words[:1] == ["-N"] and _ours(words[1]):
                    found.append(f"{tool}/{table}/{words[1]}")
                elif words[:1] == ["-A"] and not _ours(words[1]) and _jumps_to_ours(words):
                    found.append(f"{tool}/{table}/{words[1]}: {line}")
    return found


def _jumps_to_ours(words: list[str]) -> bool:
    return any(flag in ("-j", "-g") and i + 1 < len(words) and _ours(words[i + 1]) for i, flag in enumerate(words))


def remove_node_chains(tools: Iterable[str] = ("iptables", "ip6tables")) -> None:
    """Delete the rules in built-in (and other foreign) chains that jump to KUBE-*/CNI-* chains, then flush
    and delete those chains. Other rules and chains are left alone."""
    for tool in tools:
        for table in _TABLES:
            lines = _rules(tool, table)
            ours = []
            for line in lines:
                words = shlex.split(line)
                if words[:1] == ["-A"] and not _ours(words[1]) and _jumps_to_ours(words):
                    subprocess.run([tool, "-w", "5", "-t", table, "-D", *words[1:]], capture_output=True, timeout=30)
                elif words[:1] == ["-N"] and _ours(words[1]):
                    ours.append(words[1])
            for chain in ours:
                subprocess.run([tool, "-w", "5", "-t", table, "-F", chain], capture_output=True, timeout=30)
            for chain in ours:
                subprocess.run([tool, "-w", "5", "-t", table, "-X", chain], capture_output=True, timeout=30)


def nft_tables() -> list[str]:
    """``family name`` of every nftables table (iptables-nft makes ``ip filter`` and the like on first use)."""
    result = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=30)
    lines = result.stdout.splitlines()
    return sorted(line.removeprefix("table ").strip() for line in lines if line.startswith("table "))


def _table_is_empty(family_table: str) -> bool:
    family, table = family_table.split()
    tool = {"ip": "iptables", "ip6": "ip6tables"}.get(family)
    if tool is None or table not in _TABLES:
        return False
    return all(line.startswith("-P ") for line in _rules(tool, table))


def remove_new_empty_tables(before: Iterable[str]) -> None:
    """Delete the iptables-nft tables that did not exist ``before`` and hold no rule or chain of anyone's."""
    for family_table in set(nft_tables()) - set(before):
        if _table_is_empty(family_table):
            subprocess.run(["nft", "delete", "table", *family_table.split()], capture_output=True, timeout=30)


# -- host directories ------------------------------------------------------------------------------------

#: Places the kubelet, containerd's shims and libcni use whatever their configuration says: the kubelet's
#: device-plugin socket, the shims' sockets (/run/containerd/s), the CNI result cache, the log symlinks.
FIXED_HOST_PATHS = ("/var/lib/kubelet", "/run/containerd", "/var/lib/cni", "/var/log/containers")


def absent_paths(paths: Iterable[str] = FIXED_HOST_PATHS) -> list[str]:
    return [path for path in paths if not os.path.lexists(path)]


def remove_paths(paths: Iterable[str]) -> None:
    """Remove the directories of :data:`FIXED_HOST_PATHS` that the node created (``absent_paths`` before it)."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


# -- links -----------------------------------------------------------------------------------------------


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def bridge_ports(bridge: str) -> list[str]:
    """The interfaces enslaved to ``bridge`` (the host ends of the pods' veths)."""
    with contextlib.suppress(OSError):
        return sorted(p.name for p in Path("/sys/class/net", bridge, "brif").iterdir())
    return []


def remove_bridge(bridge: str) -> None:
    """Delete every veth on ``bridge`` (their pod ends go with them), then the bridge."""
    for port in bridge_ports(bridge):
        subprocess.run(["ip", "link", "delete", port], capture_output=True, timeout=30)
    if link_exists(bridge):
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True, timeout=30)


# -- network namespaces ----------------------------------------------------------------------------------


def _netns_inodes_in_use() -> set[int]:
    inodes = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                inodes.add(os.stat(proc / "ns" / "net").st_ino)
    return inodes


def idle_cri_netns() -> list[Path]:
    """containerd's pod network namespaces (``/run/netns/cni-*``) that no process is in any more."""
    if not _NETNS_DIR.is_dir():
        return []
    in_use = _netns_inodes_in_use()
    idle = []
    for path in sorted(_NETNS_DIR.glob("cni-*")):
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino not in in_use:
                idle.append(path)
    return idle


def remove_idle_cri_netns() -> None:
    for path in idle_cri_netns():
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)
        with contextlib.suppress(OSError):
            path.unlink()


# -- mounts ----------------------------------------------------------------------------------------------


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    return field.encode().decode("unicode_escape")


def mounts_under(roots: Iterable[Path]) -> list[str]:
    """Mount points at or below any of ``roots``, deepest first."""
    prefixes = [str(Path(root).resolve()) for root in roots]
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape(line.split()[4])
        if any(point == p or point.startswith(p + "/") for p in prefixes):
            found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def unmount_under(roots: Iterable[Path]) -> None:
    """Unmount everything below ``roots``, deepest first; a busy mount is detached (``umount -l``)."""
    roots = list(roots)
    for _ in range(3):   # a mount hidden under another shows up once the upper one is gone
        points = mounts_under(roots)
        if not points:
            return
        for point in points:
            if subprocess.run(["umount", point], capture_output=True, timeout=30).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


# -- cgroups and processes -------------------------------------------------------------------------------


def cgroup_dirs(name: str) -> list[Path]:
    """``/sys/fs/cgroup/<hierarchy>/<name>`` in every hierarchy that has it (the kubelet's cgroup root)."""
    return sorted(p / name for p in _CGROUP_ROOT.iterdir() if (p / name).is_dir())


def create_cgroups(name: str) -> None:
    """``/sys/fs/cgroup/<hierarchy>/<name>`` in every hierarchy: the kubelet refuses a cgroupRoot that does
    not exist. A cgroup v1 cpuset starts with no CPUs and no memory nodes: it gets its parent's."""
    for hierarchy in sorted(p for p in _CGROUP_ROOT.iterdir() if p.is_dir()):
        if not (hierarchy / "cgroup.procs").exists():
            continue
        directory = hierarchy / name
        directory.mkdir(exist_ok=True)
        for setting in ("cpuset.cpus", "cpuset.mems"):
            if (hierarchy / setting).exists():
                (directory / setting).write_text((hierarchy / setting).read_text())


def _procs_in(tree: Path) -> set[int]:
    pids: set[int] = set()
    for procs in tree.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(pid) for pid in procs.read_text().split())
    return pids


def processes_in_cgroups(name: str) -> set[int]:
    return {pid for tree in cgroup_dirs(name) for pid in _procs_in(tree)}


def kill_cgroup_processes(name: str, *, timeout: float = 10.0) -> None:
    """SIGKILL every process in the ``name`` cgroup trees (the pods' containers) until none is left."""
    deadline = time.monotonic() + timeout
    while (pids := processes_in_cgroups(name)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def remove_cgroups(name: str) -> None:
    """rmdir the ``name`` cgroup trees, leaves first (a cgroup with processes in it stays)."""
    for tree in cgroup_dirs(name):
        for directory in sorted((p for p in tree.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                                reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            tree.rmdir()


def processes_mentioning(needle: str) -> list[int]:
    """Pids whose command line contains ``needle`` (containerd's shims carry its socket path)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
    return found


def kill_processes(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# -- all together ----------------------------------------------------------------------------------------


def leftovers(*, bridge: str, cgroup: str, dirs: Iterable[Path], saved_sysctls: Mapping[str, str],
              process_marker: str, absent_before: Iterable[str], tables_before: Iterable[str]) -> list[str]:
    """What a node left on the host: an empty list after a complete teardown."""
    dirs = list(dirs)
    found = [f"path {path} (absent before)" for path in absent_before if os.path.lexists(path)]
    found += [f"nftables table {table} (absent before)" for table in sorted(set(nft_tables()) - set(tables_before))]
    found += [f"process {pid}: {_cmdline(pid)}" for pid in processes_mentioning(process_marker)]
    found += [f"process {pid} in cgroup {cgroup}" for pid in sorted(processes_in_cgroups(cgroup))]
    found += [f"cgroup {path}" for path in cgroup_dirs(cgroup)]
    found += [f"mount {point}" for point in mounts_under(dirs)]
    found += [f"iptables {chain}" for chain in node_chains()]
    if link_exists(bridge):
        found.append(f"bridge {bridge} (ports: {', '.join(bridge_ports(bridge)) or 'none'})")
    found += [f"network namespace {path}" for path in idle_cri_netns()]
    found += [f"sysctl {name}: {was} before, {now} now" for name, (was, now) in changed_sysctls(saved_sysctls).items()]
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200])
    except OSError:
        return "?"
