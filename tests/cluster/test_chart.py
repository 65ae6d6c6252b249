"""The Helm chart ``deploy/helm/mxgate`` through the real helm: lint, render, and what the objects say.

No API server here (``test_chart_install.py`` installs the chart into one). The chart's command lines are
parsed by mxgate's real CLI parser, the dashboard's metric names are checked against the exposition of the
real metrics code, and the chart's copies of the CRDs and example policies against the top-level files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from mxgate.cli import build_parser
from support.chart import CHART, FULLNAME, Manifests, container, env_of, flag, helm_run, pod_spec, render
from support.kubeapi import REPO_ROOT, find_bin_dir

GATEWAY = f"{FULLNAME}-gateway"
OPERATOR = f"{FULLNAME}-operator"
REDIS = f"{FULLNAME}-redis"

SIDECAR = {"operator": {"mode": "sidecar"}}
EXTERNAL_REDIS = {"redis": {"external": {"url": "rediss://redis.example.net:6380/2",
                                         "existingSecret": "corp-redis", "key": "redis-password"}}}
HPA = {"gateway": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12}}}
SERVICE_MONITOR = {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}
DEFAULT_POLICIES = {"defaultPolicies": {"enabled": True, "names": ["microsoft", "yahoo", "gmail", "default"]}}
SECRETS = {"gateway": {"tls": {"existingSecret": "smtp-tls"}, "auth": {"existingSecret": "smtp-users"},
                       "allowedNetworks": ["10.0.0.0/8", "fd00::/8"], "hostname": "mx1.example.com"}}

VALUE_SETS = {"defaults": {}, "sidecar": SIDECAR, "external-redis": EXTERNAL_REDIS, "hpa": HPA,
              "service-monitor": SERVICE_MONITOR, "default-policies": DEFAULT_POLICIES, "tls-and-auth": SECRETS,
              "sidecar-external-redis-no-netpol": {**SIDECAR, **EXTERNAL_REDIS, "networkPolicy": {"enabled": False}}}


@pytest.fixture(scope="session")
def helm() -> Path:
    return find_bin_dir() / "helm"


@pytest.fixture(scope="session")
def default(helm: Path) -> Manifests:
    return render(helm)


@pytest.fixture(scope="session")
def sidecar(helm: Path) -> Manifests:
    return render(helm, SIDECAR)


# ---- lint, and values the schema or the templates refuse ----

@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint_strict(helm: Path, values: dict[str, Any]) -> None:
    result = helm_run(helm, "lint", "--strict", str(CHART), values=values)
    assert "0 chart(s) failed" in result.stdout, result.stdout


@pytest.mark.parametrize(("values", "complaint"), [
    ({"gateway": {"replcas": 3}}, "additional properties 'replcas' not allowed"),
    ({"operator": {"mode": "daemonset"}}, "/operator/mode"),
    ({"redis": {"appendfsync": "no"}}, "/redis/appendfsync"),
    ({"gateway": {"allowedNetworks": ["10.0.0.0"]}}, "/gateway/allowedNetworks/0"),
    ({"gateway": {"service": {"ports": {"smtp": 0, "submission": 587}}}}, "/gateway/service/ports/smtp"),
    ({"redis": {"external": {"url": "http://redis:6379"}}}, "/redis/external/url"),
    ({"defaultPolicies": {"enabled": True, "names": ["hotmail"]}}, "/defaultPolicies/names/0"),
], ids=["typo", "mode", "appendfsync-no", "cidr", "port", "url-scheme", "policy-name"])
def test_values_schema_refuses(helm: Path, values: dict[str, Any], complaint: str) -> None:
    for command in (["lint", "--strict", str(CHART)], ["template", "mx", str(CHART)]):
        result = helm_run(helm, *command, values=values, check=False)
        assert result.returncode != 0, f"helm {command[0]} accepted {values}"
        assert complaint in result.stdout + result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize(("values", "complaint"), [
    ({"gateway": {"terminationGracePeriodSeconds": 20}}, "must exceed preStopSleepSeconds + shutdownGraceSeconds"),
    ({"gateway": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}, "must not exceed"),
], ids=["termination", "hpa-range"])
def test_templates_refuse(helm: Path, values: dict[str, Any], complaint: str) -> None:
    # Relations between two values, which JSON Schema cannot state: the templates `fail`. (helm lint only
    # logs a template's fail as INFO, by design; template and install refuse.)
    result = helm_run(helm, "template", "mx", str(CHART), values=values, check=False)
    assert result.returncode != 0, f"helm template accepted {values}"
    assert complaint in result.stderr, result.stderr


# ---- what every workload shares ----

@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_container_is_non_root_with_a_read_only_root(helm: Path, values: dict[str, Any]) -> None:
    manifests = render(helm, values)
    workloads = list(manifests.workloads())
    assert workloads
    for workload in workloads:
        spec = pod_spec(workload)
        pod_context = spec.get("securityContext", {})
        assert pod_context.get("runAsNonRoot") is True
        assert pod_context.get("runAsUser", 0) > 0
        assert pod_context.get("seccompProfile") == {"type": "RuntimeDefault"}
        for c in spec["containers"] + spec.get("initContainers", []):
            where = f"{workload['metadata']['name']}/{c['name']}"
            context = c["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context.get("runAsUser", pod_context["runAsUser"]) > 0, where
            assert c["resources"]["requests"], where
            # Writable: emptyDirs (scratch space) and the bundled Redis's claim; Secrets and config read-only.
            volumes = {v["name"]: v for v in spec["volumes"]}
            claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
            for mount in c.get("volumeMounts", []):
                if not mount.get("readOnly"):
                    assert mount["name"] in claims or "emptyDir" in volumes[mount["name"]], (where, mount)


def test_the_image_runs_as_the_user_the_chart_expects(default: Manifests) -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users, "Dockerfile has no USER"
    uid = users[-1].split(":")[0]
    for name in (GATEWAY, OPERATOR):
        assert pod_spec(default.get("Deployment", name))["securityContext"]["runAsUser"] == int(uid)
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", dockerfile, re.MULTILINE) for p in line.split()}
    ports = {p["containerPort"] for d in default.of_kind("Deployment") for c in pod_spec(d)["containers"]
             for p in c["ports"]}
    assert ports <= exposed
    assert re.search(r'^ENTRYPOINT \["mxgate"\]$', dockerfile, re.MULTILINE)


def test_chart_app_version_is_mxgates_version(default: Manifests) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert chart["appVersion"] == project["project"]["version"]
    image = container(default.get("Deployment", GATEWAY), "gateway")["image"]
    assert image == f"mxgate:{project['project']['version']}"


# ---- the gateway ----

def test_gateway_service_maps_25_and_587_to_the_smtp_listener(default: Manifests) -> None:
    gateway = container(default.get("Deployment", GATEWAY), "gateway")
    assert flag(gateway["args"], "--listen") == "0.0.0.0:2525"
    named = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    service = default.get("Service", FULLNAME)
    assert {p["port"]: named[p["targetPort"]] for p in service["spec"]["ports"]} == {25: 2525, 587: 2525}
    assert service["spec"]["selector"] == default.get("Deployment", GATEWAY)["spec"]["selector"]["matchLabels"]


def test_gateway_probes_use_the_metrics_listener(default: Manifests) -> None:
    gateway = container(default.get("Deployment", GATEWAY), "gateway")
    port = int(flag(gateway["args"], "--metrics-listen").rsplit(":", 1)[1])
    assert {p["name"]: p["containerPort"] for p in gateway["ports"]}["metrics"] == port == 9325
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


@pytest.mark.parametrize("values", [{}, {"gateway": {"shutdownGraceSeconds": 60, "preStopSleepSeconds": 10}},
                                    {"gateway": {"terminationGracePeriodSeconds": 31}}])
def test_termination_grace_covers_prestop_and_shutdown_grace(helm: Path, values: dict[str, Any]) -> None:
    deployment = render(helm, values).get("Deployment", GATEWAY)
    gateway = container(deployment, "gateway")
    command = gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    grace = float(flag(gateway["args"], "--shutdown-grace"))
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > int(command[1]) + grace


def test_gateway_needs_no_kubernetes_api(default: Manifests) -> None:
    deployment = default.get("Deployment", GATEWAY)
    spec = pod_spec(deployment)
    account = default.get("ServiceAccount", spec["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    assert spec["automountServiceAccountToken"] is False
    bound = {s["name"] for b in default.of_kind("RoleBinding") + default.of_kind("ClusterRoleBinding")
             for s in b["subjects"]}
    assert spec["serviceAccountName"] not in bound


def test_rolling_update_and_disruption_budget_keep_gateways_serving(default: Manifests) -> None:
    deployment = default.get("Deployment", GATEWAY)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = default.get("PodDisruptionBudget", GATEWAY)
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert not default.of_kind("HorizontalPodAutoscaler")


def test_hpa_owns_the_replica_count(helm: Path) -> None:
    manifests = render(helm, HPA)
    deployment = manifests.get("Deployment", GATEWAY)
    assert "replicas" not in deployment["spec"]
    hpa = manifests.get("HorizontalPodAutoscaler", GATEWAY)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": GATEWAY}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)


def test_tls_and_auth_come_from_secrets_mounted_read_only(helm: Path, tmp_path: Path) -> None:
    deployment = render(helm, SECRETS).get("Deployment", GATEWAY)
    gateway = container(deployment, "gateway")
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "smtp-tls"
    assert volumes["auth"]["secret"]["secretName"] == "smtp-users"
    mounts = {m["name"]: m for m in gateway["volumeMounts"]}
    for name, option in (("tls", "--tls-cert"), ("tls", "--tls-key"), ("auth", "--credentials-file")):
        assert mounts[name]["readOnly"] is True
        assert flag(gateway["args"], option).startswith(mounts[name]["mountPath"] + "/")
    assert flag(gateway["args"], "--allowed-networks") == "10.0.0.0/8,fd00::/8"
    assert flag(gateway["args"], "--hostname") == "mx1.example.com"


# ---- the chart's command lines are ones mxgate accepts ----

def _parse(container_spec: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Parse a container's args with mxgate's real parser, its environment set and its files in tmp_path."""
    assert "command" not in container_spec, "the image's ENTRYPOINT (mxgate) runs the args"
    args = []
    for arg in container_spec["args"]:
        if arg.startswith("/var/run/secrets/"):   # --tls-cert etc. must exist: stand-ins in tmp_path
            stand_in = tmp_path / arg.lstrip("/")
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.write_text("x")
            arg = str(stand_in)
        args.append(arg)
    for name, value in env_of(container_spec).items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("POD_NAMESPACE", "mail")
    return build_parser().parse_args(args)


@pytest.mark.parametrize("values", [{}, SECRETS, EXTERNAL_REDIS], ids=["defaults", "tls-and-auth", "external"])
def test_gateway_command_line_parses(helm: Path, values: dict[str, Any], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    gateway = container(render(helm, values).get("Deployment", GATEWAY), "gateway")
    parsed = _parse(gateway, tmp_path, monkeypatch)
    assert parsed.command == "gateway"
    assert parsed.listen == ("0.0.0.0", 2525) and parsed.metrics_listen == ("0.0.0.0", 9325)
    assert parsed.redis_url == env_of(gateway)["MXGATE_REDIS_URL"]
    assert str(parsed.redis_password_file) == "/var/run/secrets/mxgate/redis/password"
    if values is SECRETS:
        assert parsed.tls_cert and parsed.tls_key and parsed.credentials_file
        assert [str(n) for n in parsed.allowed_networks] == ["10.0.0.0/8", "fd00::/8"]


@pytest.mark.parametrize("values", [{}, SIDECAR], ids=["deployment", "sidecar"])
def test_operator_command_line_parses(helm: Path, values: dict[str, Any], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = render(helm, values)
    workload = manifests.get("Deployment", GATEWAY if values else OPERATOR)
    operator = container(workload, "operator")
    parsed = _parse(operator, tmp_path, monkeypatch)
    assert parsed.command == "operator"
    assert parsed.namespace == "mail"
    assert parsed.redis_url == f"redis://{REDIS}:6379/0"
    assert str(parsed.redis_password_file) == "/var/run/secrets/mxgate/redis/password"
    assert parsed.priority is None, "mxgate operator picks a random priority per replica"
    assert parsed.health_listen == ("0.0.0.0", 8080)
    assert {p["name"]: p["containerPort"] for p in operator["ports"]}["operator-health"] == 8080
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "operator-health"}
    # The peering object the replicas share exists, named as they are told.
    assert manifests.get("KopfPeering", parsed.peering)["apiVersion"] == "kopf.dev/v1"
    assert env_of(operator)["POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}


# ---- the operator ----

def test_operator_deployment_has_two_peering_replicas(default: Manifests) -> None:
    deployment = default.get("Deployment", OPERATOR)
    assert deployment["spec"]["replicas"] == 2
    spec = pod_spec(deployment)
    assert spec["serviceAccountName"] == OPERATOR and spec["automountServiceAccountToken"] is True
    assert [c["name"] for c in spec["containers"]] == ["operator"]
    assert [c["name"] for c in pod_spec(default.get("Deployment", GATEWAY))["containers"]] == ["gateway"]


def test_operator_role_is_namespaced_and_minimal(default: Manifests) -> None:
    assert not default.of_kind("ClusterRole") and not default.of_kind("ClusterRoleBinding")
    role = default.get("Role", OPERATOR)
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r.get("resourceNames", ()))): set(r["verbs"])
             for r in role["rules"]}
    assert rules == {
        (("mxgate.io",), ("providerpolicies",), ()): {"get", "list", "watch", "patch"},
        (("mxgate.io",), ("providerpolicies/status",), ()): {"get", "patch"},
        (("kopf.dev",), ("kopfpeerings",), ()): {"list", "watch"},
        (("kopf.dev",), ("kopfpeerings",), (FULLNAME,)): {"get", "patch"},
        (("",), ("events",), ()): {"create"},
    }
    binding = default.get("RoleBinding", OPERATOR)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": OPERATOR}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR, "namespace": "mail"}]


def test_sidecar_mode_runs_the_operator_in_every_gateway_pod(sidecar: Manifests) -> None:
    assert sidecar.names("Deployment") == {GATEWAY}
    deployment = sidecar.get("Deployment", GATEWAY)
    spec = pod_spec(deployment)
    assert [c["name"] for c in spec["containers"]] == ["gateway", "operator"]
    # The pod runs as the operator's account, but only the operator container gets its token.
    assert spec["serviceAccountName"] == OPERATOR and spec["automountServiceAccountToken"] is False
    token_path = "/var/run/secrets/kubernetes.io/serviceaccount"
    mounts = {c["name"]: {m["mountPath"]: m["name"] for m in c["volumeMounts"]} for c in spec["containers"]}
    assert token_path not in mounts["gateway"]
    volume = {v["name"]: v for v in spec["volumes"]}[mounts["operator"][token_path]]
    assert {"serviceAccountToken"} <= {key for source in volume["projected"]["sources"] for key in source}
    assert GATEWAY not in sidecar.names("ServiceAccount")
    assert sidecar.get("KopfPeering", FULLNAME)
    # Gateway pods now talk to the API server: their NetworkPolicy lets them.
    egress_ports = {p["port"] for rule in sidecar.get("NetworkPolicy", GATEWAY)["spec"]["egress"]
                    for p in rule.get("ports", [])}
    assert {443, 6443} <= egress_ports
    assert OPERATOR not in sidecar.names("NetworkPolicy")


# ---- Redis ----

def test_bundled_redis_is_durable_and_password_protected(default: Manifests) -> None:
    statefulset = default.get("StatefulSet", REDIS)
    assert statefulset["spec"]["serviceName"] == f"{REDIS}-headless"
    assert default.get("Service", f"{REDIS}-headless")["spec"]["clusterIP"] == "None"
    assert default.get("Service", REDIS)["spec"]["ports"][0]["port"] == 6379
    claims = statefulset["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["data"]
    config = default.get("ConfigMap", REDIS)["data"]["redis.conf"]
    settings = dict(line.split(None, 1) for line in config.splitlines() if line and not line.startswith("#"))
    assert settings["appendonly"] == "yes"
    assert settings["appendfsync"] == "everysec"
    assert settings["maxmemory-policy"] == "noeviction"
    assert settings["include"] == "/run/redis/auth.conf"
    script = container(statefulset, "redis")["args"][0]
    assert "requirepass" in script and "exec redis-server /etc/redis/redis.conf" in script
    secret = default.get("Secret", REDIS)
    assert set(secret["data"]) == {"password"}
    # Every mxgate process gets the Service's URL and the same Secret.
    for workload, name in ((GATEWAY, "gateway"), (OPERATOR, "operator")):
        deployment = default.get("Deployment", workload)
        env = env_of(container(deployment, name))
        assert env["MXGATE_REDIS_URL"] == f"redis://{REDIS}:6379/0"
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        assert volumes["redis-password"]["secret"]["secretName"] == REDIS


def test_appendfsync_always_and_no_persistence(helm: Path) -> None:
    manifests = render(helm, {"redis": {"appendfsync": "always", "maxmemory": "1gb",
                                        "persistence": {"enabled": False}}})
    config = manifests.get("ConfigMap", REDIS)["data"]["redis.conf"]
    assert "appendfsync always" in config.splitlines() and "maxmemory 1gb" in config.splitlines()
    statefulset = manifests.get("StatefulSet", REDIS)
    assert "volumeClaimTemplates" not in statefulset["spec"]
    assert {"name": "data", "emptyDir": {}} in pod_spec(statefulset)["volumes"]


def test_external_redis_replaces_the_bundled_one(helm: Path) -> None:
    manifests = render(helm, EXTERNAL_REDIS)
    assert not manifests.of_kind("StatefulSet") and not manifests.of_kind("Secret")
    assert REDIS not in manifests.names("Service") and REDIS not in manifests.names("NetworkPolicy")
    for workload, name in ((GATEWAY, "gateway"), (OPERATOR, "operator")):
        deployment = manifests.get("Deployment", workload)
        assert env_of(container(deployment, name))["MXGATE_REDIS_URL"] == "rediss://redis.example.net:6380/2"
        secret = {v["name"]: v for v in pod_spec(deployment)["volumes"]}["redis-password"]["secret"]
        assert secret["secretName"] == "corp-redis"
        assert secret["items"] == [{"key": "redis-password", "path": "password"}]
        policy = manifests.get("NetworkPolicy", workload)
        redis_rules = [r for r in policy["spec"]["egress"] if {"port": 6380, "protocol": "TCP"} in r.get("ports", [])]
        assert redis_rules and redis_rules[0]["to"] == [{"ipBlock": {"cidr": "0.0.0.0/0"}}]


def test_external_redis_without_password(helm: Path) -> None:
    deployment = render(helm, {"redis": {"external": {"url": "unix:///var/run/redis.sock"}}}).get(
        "Deployment", GATEWAY)
    env = env_of(container(deployment, "gateway"))
    assert env["MXGATE_REDIS_URL"] == "unix:///var/run/redis.sock"
    assert "MXGATE_REDIS_PASSWORD_FILE" not in env
    assert "redis-password" not in {v["name"] for v in pod_spec(deployment)["volumes"]}


# ---- NetworkPolicy ----

def _selects(peer: dict[str, Any], labels: dict[str, str]) -> bool:
    """Does a NetworkPolicy peer select pods with these labels (in the policy's namespace)?"""
    return "podSelector" in peer and peer["podSelector"].get("matchLabels", {}).items() <= labels.items()


def test_network_policies(default: Manifests) -> None:
    labels = {name: default.get(kind, name)["spec"]["template"]["metadata"]["labels"]
              for kind, name in (("Deployment", GATEWAY), ("Deployment", OPERATOR), ("StatefulSet", REDIS))}
    # Redis: only gateway and operator pods come in, on 6379; nothing goes out.
    redis = default.get("NetworkPolicy", REDIS)["spec"]
    assert redis["policyTypes"] == ["Ingress", "Egress"] and not redis.get("egress")
    [rule] = redis["ingress"]
    allowed = [name for name, pod in labels.items() if any(_selects(p, pod) for p in rule["from"])]
    assert sorted(allowed) == sorted([GATEWAY, OPERATOR])
    # Gateway: SMTP from the configured peers, metrics from the monitoring namespace; out: DNS, Redis, port 25.
    gateway = default.get("NetworkPolicy", GATEWAY)["spec"]
    ingress = {p["port"]: rule.get("from") for rule in gateway["ingress"] for p in rule["ports"]}
    assert ingress["smtp"] == [{"namespaceSelector": {}}]
    assert ingress["metrics"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    egress = {(p["port"], p["protocol"]): rule.get("to") for rule in gateway["egress"] for p in rule["ports"]}
    assert set(egress) == {(53, "UDP"), (53, "TCP"), (6379, "TCP"), (25, "TCP")}
    assert any(_selects(p, labels[REDIS]) for p in egress[(6379, "TCP")])
    # Operator: DNS, Redis and the API server.
    operator = default.get("NetworkPolicy", OPERATOR)["spec"]
    assert not operator.get("ingress")
    ports = {(p["port"], p["protocol"]) for rule in operator["egress"] for p in rule["ports"]}
    assert ports == {(53, "UDP"), (53, "TCP"), (6379, "TCP"), (443, "TCP"), (6443, "TCP")}


# ---- monitoring ----

def test_service_monitor_only_when_enabled(default: Manifests, helm: Path) -> None:
    assert not default.of_kind("ServiceMonitor")
    manifests = render(helm, SERVICE_MONITOR)
    monitor = manifests.get("ServiceMonitor", f"{FULLNAME}-gateway")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    selected = [s for s in manifests.of_kind("Service")
                if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == [f"{FULLNAME}-metrics"]
    assert [p["name"] for p in selected[0]["spec"]["ports"]] == [monitor["spec"]["endpoints"][0]["port"]]


def _exposition() -> dict[str, set[str]]:
    """Metric family -> label names, from the real metrics code with every instrument recorded once."""
    code = """
from prometheus_client import REGISTRY, generate_latest
from mxgate.telemetry.metrics import Metrics
from mxgate.telemetry.redis_cost import register_round_trips
m = Metrics()
m.received(); m.rejected("size"); m.spool_error(); m.delivered("p"); m.failed("p"); m.deferred("p", "rate")
m.connection_error("p"); m.attempt_done("p", 0.1); m.lease_wait("p", 0.1); m.reflex("p", "rate")
register_round_trips()
print(generate_latest(REGISTRY).decode())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": ""}).stdout
    families: dict[str, set[str]] = {}
    for line in out.splitlines():
        if match := re.match(r"^(mxgate_\w+)(?:\{(.*)\})? ", line):
            families.setdefault(match[1], set()).update(re.findall(r'(\w+)="', match[2] or ""))
    return families


def test_grafana_dashboard_queries_real_metrics(default: Manifests) -> None:
    configmap = default.get("ConfigMap", f"{FULLNAME}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["mxgate.json"])
    assert dashboard == json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    families = _exposition()
    assert {"mxgate_messages_received_total", "mxgate_recipients_total", "mxgate_lease_wait_seconds_bucket",
            "mxgate_redis_roundtrips_total"} <= set(families)
    panels = dashboard["panels"]
    assert len(panels) >= 10 and len({p["id"] for p in panels}) == len(panels)
    used = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            names = set(re.findall(r"\bmxgate_\w+", expr))
            unknown = names - set(families)
            assert not unknown, f"panel {panel['title']!r} queries metrics mxgate does not export: {unknown}"
            used |= names
            if names:
                labels = set().union(*(families[n] for n in names))
                for clause in re.findall(r"by \(([^)]*)\)", expr):
                    for label in (x.strip() for x in clause.split(",")):
                        assert label in labels, f"panel {panel['title']!r}: no label {label!r} on {names}"
    # Every counter the gateway exports has a panel.
    assert {f for f in families if f.endswith("_total")} <= used


# ---- copies kept identical: CRDs and the default policies ----

@pytest.mark.parametrize("name", ["providerpolicies.mxgate.io.yaml", "kopfpeerings.kopf.dev.yaml"])
def test_chart_crds_are_the_top_level_crds(name: str) -> None:
    top_level = REPO_ROOT / "crds" / name
    assert (CHART / "crds" / name).read_bytes() == top_level.read_bytes(), (
        f"deploy/helm/mxgate/crds/{name} differs from crds/{name}: cp crds/{name} deploy/helm/mxgate/crds/")


def test_chart_crds_directory_holds_only_those() -> None:
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted(p.name for p in (REPO_ROOT / "crds").iterdir())


def test_chart_policies_are_the_example_policies() -> None:
    examples = {p.name: p.read_bytes() for p in (REPO_ROOT / "examples" / "policies").glob("*.yaml")}
    copies = {p.name: p.read_bytes() for p in (CHART / "files" / "policies").glob("*.yaml")}
    assert copies == examples, "cp examples/policies/*.yaml deploy/helm/mxgate/files/policies/"
    schema = json.loads((CHART / "values.schema.json").read_text())
    offered = schema["properties"]["defaultPolicies"]["properties"]["names"]["items"]["enum"]
    assert sorted(f"{name}.yaml" for name in offered) == sorted(examples)


def test_default_policies_render_the_example_files(default: Manifests, helm: Path) -> None:
    assert not default.of_kind("ProviderPolicy")
    rendered = {p["metadata"]["name"]: p for p in render(helm, DEFAULT_POLICIES).of_kind("ProviderPolicy")}
    assert set(rendered) == {"microsoft", "yahoo", "gmail", "default"}
    for name, policy in rendered.items():
        example = yaml.safe_load((REPO_ROOT / "examples" / "policies" / f"{name}.yaml").read_text())
        assert policy["apiVersion"] == example["apiVersion"] == "mxgate.io/v1alpha1"
        assert policy["spec"] == example["spec"]
        assert policy["metadata"]["labels"]["app.kubernetes.io/instance"] == "mx"
    chosen = render(helm, {"defaultPolicies": {"enabled": True, "names": ["yahoo"]}})
    assert chosen.names("ProviderPolicy") == {"yahoo"}
