"""The image runs in a pod of the real cluster as the chart runs it (read-only root, uid 10001), and a pod
finds and reaches a Service by its DNS name (CoreDNS, kube-proxy, the CNI bridge); a second node on the same
host is refused."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
from kubernetes.client import CoreV1Api

from support.kubeapi import REPO_ROOT, find_bin_dir
from support.kubenode import ImageArchives, KubeNode, NodeBusyError
from support.kubenode_config import API_SERVICE_IP, CLUSTER_DOMAIN, NODE_NAME
from support.pods import restricted, run_to_completion

VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]

# Resolves the kubernetes Service's name and opens a TCP connection to it (kube-proxy's DNAT to the API server).
_REACH_KUBERNETES = f"""
import socket
address = socket.gethostbyname("kubernetes.default.svc.{CLUSTER_DOMAIN}")
with socket.create_connection((address, 443), timeout=10):
    print("reached", address)
"""


def _pod(name: str, image: str, *, args: list[str], command: list[str] | None = None) -> dict[str, object]:
    container: dict[str, object] = {"name": "main", "image": image, "imagePullPolicy": "Never", "args": args,
                                    "securityContext": restricted(10001)}
    if command:
        container["command"] = command
    return {"metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False, "containers": [container]}}


def test_mxgate_version_runs_in_a_pod(cluster: KubeNode, mxgate_image: ImageArchives, namespace: str) -> None:
    with cluster.api_client() as api:
        log = run_to_completion(CoreV1Api(api), namespace, _pod("version", mxgate_image.mxgate_ref,
                                                                args=["--version"]))
    assert log.strip() == f"mxgate {VERSION}"


def test_a_pod_resolves_and_reaches_the_kubernetes_service(cluster: KubeNode, mxgate_image: ImageArchives,
                                                           namespace: str) -> None:
    with cluster.api_client() as api:
        log = run_to_completion(CoreV1Api(api), namespace, _pod(
            "dns", mxgate_image.mxgate_ref, command=["python3", "-c"], args=[_REACH_KUBERNETES]))
    assert log.strip() == f"reached {API_SERVICE_IP}"


def test_a_second_node_on_the_host_is_refused(cluster: KubeNode, mxgate_image: ImageArchives,
                                              tmp_path: Path) -> None:
    """One node per host: a second start names the running one and touches nothing of it."""
    with pytest.raises(NodeBusyError, match=f"pid {os.getpid()}"):
        KubeNode.start(find_bin_dir(), tmp_path / "second", pause=mxgate_image.pause, images=[])
    assert not (tmp_path / "second").exists()
    with cluster.api_client() as api:
        nodes = CoreV1Api(api).list_node().items
    assert [n.metadata.name for n in nodes] == [NODE_NAME]
    assert all(c.status == "True" for c in nodes[0].status.conditions if c.type == "Ready")
