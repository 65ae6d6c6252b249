"""The Helm chart ``deploy/helm/mxgate`` rendered by the real helm, for ``tests/cluster/test_chart*.py``.

``helm_run(helm, *args, values=...)`` runs helm with the values fed on stdin (``-f -``); ``render`` runs
``helm template`` and parses every document into a :class:`Manifests`, which finds objects by kind and name.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from support.kubeapi import COMMAND_TIMEOUT, REPO_ROOT, KubeCommandError

CHART = REPO_ROOT / "deploy" / "helm" / "mxgate"
RELEASE = "mx"
FULLNAME = "mx-mxgate"   # the chart's fullname for release "mx": <release>-<chart>


def helm_run(helm: Path, *args: str, values: Mapping[str, Any] | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [str(helm), *args, "-f", "-"]
    result = subprocess.run(argv, input=yaml.safe_dump(dict(values or {})), capture_output=True, text=True,
                            timeout=COMMAND_TIMEOUT)
    if check and result.returncode != 0:
        raise KubeCommandError(result.returncode, argv, result.stdout, result.stderr)
    return result


@dataclass(frozen=True)
class Manifests:
    """The objects of one rendering."""

    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def names(self, kind: str) -> set[str]:
        return {o["metadata"]["name"] for o in self.of_kind(kind)}

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered; {kind} objects: {sorted(self.names(kind))}"
        return found[0]

    def workloads(self) -> Iterator[dict[str, Any]]:
        """Every object with a pod template."""
        for obj in self.objects:
            if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
                yield obj


def render(helm: Path, values: Mapping[str, Any] | None = None, *, namespace: str = "mail") -> Manifests:
    result = helm_run(helm, "template", RELEASE, str(CHART), "--namespace", namespace, values=values)
    return Manifests([doc for doc in yaml.safe_load_all(result.stdout) if doc])


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Mapping[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(found) == 1, f"container {name} in {workload['metadata']['name']}: {len(found)}"
    return found[0]


def env_of(container: Mapping[str, Any]) -> dict[str, Any]:
    """A container's environment: name -> value, or the valueFrom mapping."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def flag(args: list[str], name: str) -> str:
    """The value after ``name`` in a command line (the last one when repeated, as argparse takes it)."""
    positions = [i for i, arg in enumerate(args) if arg == name]
    assert positions, f"{name} not in {args}"
    return args[positions[-1] + 1]
