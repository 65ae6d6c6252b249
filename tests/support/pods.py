"""Pods on a real cluster (``kubenode.py``), through the Kubernetes API: run one to completion, wait until
pods are Ready, and say why they are not (statuses, events, log tails) when a wait times out.

Every wait polls the API until a deadline and fails with what the cluster showed last, never a bare timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import kubernetes
from kubernetes.client import CoreV1Api


#: What the chart puts on every mxgate container: non-root, read-only root filesystem, no capabilities.
def restricted(uid: int) -> dict[str, Any]:
    return {"runAsUser": uid, "runAsGroup": uid, "runAsNonRoot": True, "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def describe(core: CoreV1Api, namespace: str, *, log_lines: int = 20) -> str:
    """Each pod's phase, conditions and container states, the namespace's recent events and log tails."""
    out = []
    for pod in core.list_namespaced_pod(namespace).items:
        name = pod.metadata.name
        out.append(f"pod {name}: {pod.status.phase} on {pod.spec.node_name}")
        for condition in pod.status.conditions or []:
            if condition.status != "True":
                out.append(f"  {condition.type}={condition.status} {condition.reason or ''} {condition.message or ''}")
        for status in pod.status.container_statuses or []:
            out.append(f"  {status.name}: ready={status.ready} restarts={status.restart_count} {_state(status)}")
            try:
                logs = core.read_namespaced_pod_log(name, namespace, container=status.name, tail_lines=log_lines)
            except kubernetes.client.ApiException as exc:
                logs = f"(no logs: {exc.reason})"
            out += [f"    | {line}" for line in logs.splitlines()]
    events = sorted(core.list_namespaced_event(namespace).items,
                    key=lambda e: e.last_timestamp or e.event_time or e.metadata.creation_timestamp)
    out += [f"event {e.involved_object.kind}/{e.involved_object.name}: {e.reason}: {e.message}" for e in events[-25:]]
    return "\n".join(out)


def _state(status: Any) -> str:
    state = status.state
    if state.waiting:
        return f"waiting ({state.waiting.reason}: {state.waiting.message or ''})"
    if state.terminated:
        return f"terminated ({state.terminated.reason}, exit {state.terminated.exit_code})"
    return "running"


def wait_for(core: CoreV1Api, namespace: str, check: Callable[[], Any], *, what: str, timeout: float) -> Any:
    """Poll ``check`` until it returns something truthy (API errors count as not yet) and return it."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except kubernetes.client.ApiException as exc:
            last = f"API error {exc.status} {exc.reason}"
        else:
            if last:
                return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})\n"
                         + describe(core, namespace))


def run_to_completion(core: CoreV1Api, namespace: str, manifest: dict[str, Any], *, timeout: float = 90) -> str:
    """Create the pod (``restartPolicy: Never``), wait until it has Succeeded, return its log."""
    name = manifest["metadata"]["name"]
    core.create_namespaced_pod(namespace, manifest)

    def finished() -> str | None:
        phase = core.read_namespaced_pod(name, namespace).status.phase
        if phase == "Failed":
            raise AssertionError(f"pod {name} failed\n{describe(core, namespace)}")
        return phase if phase == "Succeeded" else None

    wait_for(core, namespace, finished, what=f"pod {name} to succeed", timeout=timeout)
    return str(core.read_namespaced_pod_log(name, namespace))


def ready_pods(core: CoreV1Api, namespace: str, selector: str = "") -> list[Any]:
    """The pods (matching ``selector``) that are Ready and not being deleted."""
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    return [p for p in pods if p.metadata.deletion_timestamp is None
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]


def wait_all_ready(core: CoreV1Api, namespace: str, *, count: int, timeout: float = 120) -> list[Any]:
    """Wait until exactly ``count`` pods that should run (not deleted, not finished) exist in ``namespace`` and
    every one of them is Ready."""
    def all_ready() -> list[Any] | None:
        pods = [p for p in core.list_namespaced_pod(namespace).items
                if p.metadata.deletion_timestamp is None and p.status.phase not in ("Succeeded", "Failed")]
        ready = ready_pods(core, namespace)
        return ready if len(pods) == count and len(ready) == count else None

    result: list[Any] = wait_for(core, namespace, all_ready, what=f"{count} pods Ready", timeout=timeout)
    return result
