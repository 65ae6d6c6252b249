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

REPLICATED = {"redis": {"mode": "replicated"}}
EXTERNAL_SENTINEL = {"redis": {"external": {"url": "redis+sentinel://s1.corp.example:26379,s2.corp.example:26380,"
                                                   "s3.corp.example:26379/corp-mail/2",
                                            "existingSecret": "corp-redis"}}}
EXTERNAL_CLUSTER = {"redis": {"external": {"url": "rediss+cluster://n1.corp.example:7000,n2.corp.example:7001",
                                           "existingSecret": "corp-redis", "networkPolicyPorts": [7002]}}}

VALUE_SETS = {"defaults": {}, "sidecar": SIDECAR, "external-redis": EXTERNAL_REDIS, "hpa": HPA,
              "service-monitor": SERVICE_MONITOR, "default-policies": DEFAULT_POLICIES, "tls-and-auth": SECRETS,
              "sidecar-external-redis-no-netpol": {**SIDECAR, **EXTERNAL_REDIS, "networkPolicy": {"enabled": False}},
              "replicated": REPLICATED, "replicated-sidecar": {**REPLICATED, **SIDECAR},
              "external-sentinel": EXTERNAL_SENTINEL, "external-cluster": EXTERNAL_CLUSTER}


@pytest.fixture(scope="session")
def helm() -> Path:
    return find_bin_dir() / "helm"


@pytest.fixture(scope="session")
def default(helm: Path) -> Manifests:
    return render(helm)


@pytest.fixture(scope="session")
def sidecar(helm: Path) -> Manifests:
    return render(helm, SIDECAR)


@pytest.fixture(scope="session")
def replicated(helm: Path) -> Manifests:
    return render(helm, REPLICATED)


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
    ({"redis": {"mode": "cluster"}}, "/redis/mode"),
    ({"redis": {"external": {"url": "sentinel://s1:26379/mx"}}}, "/redis/external/url"),
    ({"redis": {"external": {"networkPolicyPorts": [0]}}}, "/redis/external/networkPolicyPorts/0"),
    ({"redis": {"replicated": {"masterName": "my master"}}}, "/redis/replicated/masterName"),
    ({"redis": {"replicated": {"downAfterMilliseconds": 100}}}, "/redis/replicated/downAfterMilliseconds"),
    ({"redis": {"replicated": {"failoverTimeout": 0}}}, "/redis/replicated/failoverTimeout"),
    ({"redis": {"replicated": {"minReplicasToWrite": 3}}}, "/redis/replicated/minReplicasToWrite"),
    ({"redis": {"maxmemory": "1tb"}}, "/redis/maxmemory"),
    ({"redis": {"maxmemory": "0"}}, "/redis/maxmemory"),
    ({"redis": {"maxmemoryPercent": 95}}, "/redis/maxmemoryPercent"),
    ({"gateway": {"replicaAcks": "all"}}, "/gateway/replicaAcks"),
    ({"gateway": {"replicaAcks": -1}}, "/gateway/replicaAcks"),
    ({"gateway": {"replicaAckTimeoutSeconds": 0}}, "/gateway/replicaAckTimeoutSeconds"),
    ({"clusterDomain": "cluster.local."}, "/clusterDomain"),
    ({"fullnameOverride": "f" * 47}, "/fullnameOverride"),
    ({"gateway": {"podAntiAffinityPreset": "always"}}, "/gateway/podAntiAffinityPreset"),
    ({"gateway": {"env": [{"name": "A", "value": "b"}]}}, "/gateway"),
    ({"operator": {"envFrom": {"secretRef": {"name": "s"}}}}, "/operator/envFrom"),
], ids=["typo", "mode", "appendfsync-no", "cidr", "port", "url-scheme", "policy-name", "redis-mode",
        "url-sentinel-scheme", "netpol-port", "master-name", "down-after", "failover-timeout", "min-replicas",
        "maxmemory-unit", "maxmemory-zero", "maxmemory-percent", "replica-acks-word", "replica-acks-negative",
        "replica-ack-timeout", "cluster-domain", "fullname-length", "anti-affinity-preset", "env-is-extraEnv",
        "env-from-list"])
def test_values_schema_refuses(helm: Path, values: dict[str, Any], complaint: str) -> None:
    for command in (["lint", "--strict", str(CHART)], ["template", "mx", str(CHART)]):
        result = helm_run(helm, *command, values=values, check=False)
        assert result.returncode != 0, f"helm {command[0]} accepted {values}"
        assert complaint in result.stdout + result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize(("values", "complaint"), [
    ({"gateway": {"terminationGracePeriodSeconds": 20}}, "must exceed preStopSleepSeconds + shutdownGraceSeconds"),
    ({"gateway": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}, "must not exceed"),
    ({"redis": {"maxmemory": "1gb"}},
     "redis.maxmemory (1gb = 1073741824 bytes) must be below redis.resources.limits.memory (1Gi = 1073741824 bytes)"),
    ({"redis": {"mode": "replicated", "maxmemory": "2000mb", "resources": {"limits": {"memory": "2G"}}}},
     "redis.maxmemory (2000mb = 2097152000 bytes) must be below redis.resources.limits.memory (2G = 2000000000"),
    ({"redis": {"resources": {"limits": {"memory": "1.5Gi"}}}},
     'redis.resources.limits.memory "1.5Gi": the chart reads'),
    ({"redis": {"resources": {"limits": None}}}, "redis.resources.limits.memory is unset and redis.maxmemory empty"),
    ({"redis": {"external": {"url": "redis+sentinel://:hunter2@s1:26379/mx"}}}, "redis.external.url holds a password"),
    ({"redis": {"external": {"url": "redis://app:hunter2@redis.corp:6379/0"}}}, "redis.external.url holds a password"),
    ({"redis": {"external": {"url": "unix:///run/redis.sock?password=hunter2"}}},
     "redis.external.url holds a password"),
], ids=["termination", "hpa-range", "maxmemory-at-limit", "maxmemory-above-limit", "limit-fraction", "no-limit",
        "password-in-sentinel-url", "password-in-url", "password-in-unix-url"])
def test_templates_refuse(helm: Path, values: dict[str, Any], complaint: str) -> None:
    # Relations between two values, which JSON Schema cannot state: the templates `fail`. (helm lint only
    # logs a template's fail as INFO, by design; template and install refuse.)
    result = helm_run(helm, "template", "mx", str(CHART), values=values, check=False)
    assert result.returncode != 0, f"helm template accepted {values}"
    assert complaint in result.stderr, result.stderr
    assert "hunter2" not in result.stderr, "the error repeats the password"


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


@pytest.mark.parametrize("values", [REPLICATED, {**REPLICATED, "fullnameOverride": "f" * 46}],
                         ids=["long-release-name", "long-fullname-override"])
def test_names_stay_within_kubernetes_limits(helm: Path, values: dict[str, Any]) -> None:
    release = "r" * 53   # the longest release name helm accepts
    result = helm_run(helm, "template", release, str(CHART), "--namespace", "mail", values=values)
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    label = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    for obj in objects:
        name = obj["metadata"]["name"]
        assert len(name) <= 63 and label.match(name), (obj["kind"], name)
        if obj["kind"] == "StatefulSet":
            # Its pods get the label controller-revision-hash=<name>-<10 characters>, which must fit 63.
            assert len(name) <= 52, name
            nodes = env_of(container(obj, "sentinel"))["REDIS_NODES"].split()
            assert all(len(part) <= 63 for node in nodes for part in node.split(".")), nodes


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


@pytest.mark.parametrize("values", [{}, SECRETS, EXTERNAL_REDIS, REPLICATED, EXTERNAL_SENTINEL],
                         ids=["defaults", "tls-and-auth", "external", "replicated", "external-sentinel"])
def test_gateway_command_line_parses(helm: Path, values: dict[str, Any], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    gateway = container(render(helm, values).get("Deployment", GATEWAY), "gateway")
    parsed = _parse(gateway, tmp_path, monkeypatch)
    assert parsed.command == "gateway"
    assert parsed.listen == ("0.0.0.0", 2525) and parsed.metrics_listen == ("0.0.0.0", 9325)
    assert parsed.redis_url == env_of(gateway)["MXGATE_REDIS_URL"]
    assert str(parsed.redis_password_file) == "/var/run/secrets/mxgate/redis/password"
    assert parsed.replica_acks is None and parsed.replica_ack_timeout == 1.0   # auto; 1 s
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

def redis_conf(manifests: Manifests) -> dict[str, str]:
    """The bundled Redis's static settings (redis.conf in its ConfigMap)."""
    config = manifests.get("ConfigMap", REDIS)["data"]["redis.conf"]
    return dict(line.split(None, 1) for line in config.splitlines() if line.strip() and not line.startswith("#"))


def quantity_bytes(quantity: str) -> int:
    units = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    number, unit = re.fullmatch(r"([0-9]+)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * units[unit]


def redis_bytes(size: str) -> int:
    units = {"": 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}
    number, unit = re.fullmatch(r"([0-9]+)([a-z]*)", size.lower()).groups()  # type: ignore[union-attr]
    return int(number) * units[unit]


def test_bundled_redis_is_durable_and_password_protected(default: Manifests) -> None:
    statefulset = default.get("StatefulSet", REDIS)
    assert statefulset["spec"]["replicas"] == 1
    assert statefulset["spec"]["serviceName"] == f"{REDIS}-headless"
    assert default.get("Service", f"{REDIS}-headless")["spec"]["clusterIP"] == "None"
    assert default.get("Service", REDIS)["spec"]["ports"][0]["port"] == 6379
    claims = statefulset["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["data"]
    settings = redis_conf(default)
    assert settings["appendonly"] == "yes"
    assert settings["appendfsync"] == "everysec"
    assert settings["maxmemory-policy"] == "noeviction"
    assert settings["save"] == '""'
    # The start script writes the password into a file in memory and includes the ConfigMap's settings.
    redis = container(statefulset, "redis")
    assert redis["command"] == ["/bin/sh", "/etc/redis/start-redis.sh"]
    script = default.get("ConfigMap", REDIS)["data"]["start-redis.sh"]
    assert "printf 'requirepass \"%s\"\\n' \"$pw\"" in script
    assert 'exec redis-server "$REDIS_RUN_DIR/redis.conf"' in script
    assert 'echo "include $REDIS_CONFIG_DIR/redis.conf"' in script and "replicaof" not in script
    mounts = {m["mountPath"]: m["name"] for m in redis["volumeMounts"]}
    env = env_of(redis)
    assert mounts[env["REDIS_CONFIG_DIR"]] == "config" and mounts[env["REDIS_DATA_DIR"]] == "data"
    assert {v["name"]: v for v in pod_spec(statefulset)["volumes"]}[mounts[env["REDIS_RUN_DIR"]]]["emptyDir"]
    assert env["REDIS_PASSWORD_FILE"].startswith("/var/run/secrets/mxgate/redis/")
    assert redis["readinessProbe"]["exec"]["command"] == ["/bin/sh", "/etc/redis/ready.sh", "redis"]
    secret = default.get("Secret", REDIS)
    assert set(secret["data"]) == {"password"}
    # Every mxgate process gets the Service's URL and the same Secret.
    for workload, name in ((GATEWAY, "gateway"), (OPERATOR, "operator")):
        deployment = default.get("Deployment", workload)
        env = env_of(container(deployment, name))
        assert env["MXGATE_REDIS_URL"] == f"redis://{REDIS}:6379/0"
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        assert volumes["redis-password"]["secret"]["secretName"] == REDIS
    assert not default.of_kind("PodDisruptionBudget") or REDIS not in default.names("PodDisruptionBudget")


@pytest.mark.parametrize("values", [{}, REPLICATED, {"redis": {"resources": {"limits": {"memory": "3G"}}}},
                                    {"redis": {"maxmemoryPercent": 60, "resources": {"limits": {"memory": "512Mi"}}}},
                                    {"redis": {"maxmemory": "900mb"}}],
                         ids=["defaults", "replicated", "limit-3G", "percent-60", "explicit"])
def test_maxmemory_is_below_the_memory_limit(helm: Path, values: dict[str, Any]) -> None:
    manifests = render(helm, values)
    settings = redis_conf(manifests)
    assert settings["maxmemory-policy"] == "noeviction"
    limit = quantity_bytes(container(manifests.get("StatefulSet", REDIS), "redis")["resources"]["limits"]["memory"])
    maxmemory = redis_bytes(settings["maxmemory"])
    assert 0 < maxmemory < limit
    redis_values = values.get("redis", {})
    if "maxmemory" in redis_values:
        assert settings["maxmemory"] == redis_values["maxmemory"]
    else:
        assert maxmemory == limit * redis_values.get("maxmemoryPercent", 75) // 100


def test_redis_memory_defaults_are_consistent() -> None:
    # values.yaml itself: a limit, maxmemory left to the chart, and memory requested as much as the limit (the
    # kubelet evicts pods above their requests first under node memory pressure).
    values = yaml.safe_load((CHART / "values.yaml").read_text())["redis"]
    assert values["maxmemory"] == "" and 0 < values["maxmemoryPercent"] < 100
    assert values["resources"]["requests"]["memory"] == values["resources"]["limits"]["memory"]


def test_appendfsync_always_and_no_persistence(helm: Path) -> None:
    manifests = render(helm, {"redis": {"appendfsync": "always", "maxmemory": "800mb",
                                        "persistence": {"enabled": False}}})
    settings = redis_conf(manifests)
    assert (settings["appendfsync"], settings["maxmemory"]) == ("always", "800mb")
    statefulset = manifests.get("StatefulSet", REDIS)
    assert "volumeClaimTemplates" not in statefulset["spec"]
    assert {"name": "data", "emptyDir": {}} in pod_spec(statefulset)["volumes"]


def redis_pod_names() -> list[str]:
    return [f"{REDIS}-{i}.{REDIS}-headless.mail.svc.cluster.local" for i in range(3)]


def test_replicated_redis_has_a_primary_two_replicas_and_three_sentinels(replicated: Manifests) -> None:
    statefulset = replicated.get("StatefulSet", REDIS)
    spec = statefulset["spec"]
    assert spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel"
    assert spec["serviceName"] == f"{REDIS}-headless"
    assert [c["metadata"]["name"] for c in spec["volumeClaimTemplates"]] == ["data"]
    assert [c["name"] for c in pod_spec(statefulset)["containers"]] == ["redis", "sentinel"]
    redis, sentinel = (container(statefulset, name) for name in ("redis", "sentinel"))
    assert sentinel["command"] == ["/bin/sh", "/etc/redis/start-sentinel.sh"]
    assert {p["name"]: p["containerPort"] for p in sentinel["ports"]} == {"sentinel": 26379}
    assert sentinel["readinessProbe"]["exec"]["command"] == ["/bin/sh", "/etc/redis/ready.sh", "sentinel"]
    assert sentinel["resources"]["limits"]["memory"] == "64Mi"
    # Each pod knows its own stable DNS name and everyone's, pod 0 first.
    for c in (redis, sentinel):
        env = env_of(c)
        assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["REDIS_SELF"] == f"$(POD_NAME).{REDIS}-headless.mail.svc.cluster.local"
        assert env["REDIS_NODES"].split() == redis_pod_names()
        assert (env["REDIS_PORT"], env["SENTINEL_PORT"]) == ("6379", "26379")
    headless = replicated.get("Service", f"{REDIS}-headless")["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert {p["port"] for p in headless["ports"]} == {6379, 26379}
    # No Service over all three pods: it would send writes to replicas.
    assert REDIS not in replicated.names("Service")

    data = replicated.get("ConfigMap", REDIS)["data"]
    settings = redis_conf(replicated)
    assert (settings["appendonly"], settings["appendfsync"], settings["maxmemory-policy"]) == (
        "yes", "everysec", "noeviction")
    assert "min-replicas-to-write" not in settings
    replica = data["start-redis.sh"]
    assert 'echo "replica-announce-ip $REDIS_SELF"' in replica
    assert "printf 'masterauth \"%s\"\\n' \"$pw\"" in replica
    assert 'echo "replicaof $primary $REDIS_PORT"' in replica and "primary=$(find_primary)" in replica
    lines = {line.strip() for line in data["start-sentinel.sh"].splitlines()}
    for line in ('echo "sentinel monitor mxgate $primary $REDIS_PORT 2"',            # quorum 2 of 3
                 "printf 'sentinel auth-pass mxgate \"%s\"\\n' \"$pw\"",
                 "printf 'requirepass \"%s\"\\n' \"$pw\"",
                 'echo "sentinel resolve-hostnames yes"', 'echo "sentinel announce-hostnames yes"',
                 'echo "sentinel announce-ip $REDIS_SELF"',
                 'echo "sentinel down-after-milliseconds mxgate 10000"',
                 'echo "sentinel failover-timeout mxgate 60000"', 'echo "sentinel parallel-syncs mxgate 1"',
                 'echo "sentinel config-epoch mxgate $epoch"'):
        assert line in lines, line
    assert "sentinel master mxgate" in data["common.sh"]
    # Each pod remembers the last primary its sentinel knew, next to the data, so it outlives the pod as the data
    # does: the sentinel (whose probe writes it) mounts the data volume where the Redis container does.
    assert "MEMORY=$REDIS_DATA_DIR/last-primary" in data["common.sh"]
    assert 'mv -f "$MEMORY.tmp" "$MEMORY"' in data["ready.sh"]
    for c in (redis, sentinel):
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts[env_of(c)["REDIS_DATA_DIR"]] == "data"

    # Spread over nodes when possible; drained one at a time.
    [term] = pod_spec(statefulset)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    pdb = replicated.get("PodDisruptionBudget", REDIS)
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": spec["selector"]}


def test_replicated_redis_values(helm: Path) -> None:
    manifests = render(helm, {"clusterDomain": "corp.internal", "redis": {
        "mode": "replicated", "affinity": {"nodeAffinity": {}},
        "replicated": {"masterName": "mail-spool", "downAfterMilliseconds": 5000, "failoverTimeout": 30000,
                       "minReplicasToWrite": 1, "minReplicasMaxLag": 5, "podDisruptionBudget": {"enabled": False}}}})
    settings = redis_conf(manifests)
    assert (settings["min-replicas-to-write"], settings["min-replicas-max-lag"]) == ("1", "5")
    script = manifests.get("ConfigMap", REDIS)["data"]["start-sentinel.sh"]
    assert 'echo "sentinel monitor mail-spool $primary $REDIS_PORT 2"' in script
    assert 'echo "sentinel down-after-milliseconds mail-spool 5000"' in script
    assert 'echo "sentinel failover-timeout mail-spool 30000"' in script
    statefulset = manifests.get("StatefulSet", REDIS)
    assert pod_spec(statefulset)["affinity"] == {"nodeAffinity": {}}
    assert env_of(container(statefulset, "sentinel"))["REDIS_NODES"].split()[0] == (
        f"{REDIS}-0.{REDIS}-headless.mail.svc.corp.internal")
    assert REDIS not in manifests.names("PodDisruptionBudget")
    url = env_of(container(manifests.get("Deployment", GATEWAY), "gateway"))["MXGATE_REDIS_URL"]
    assert url.endswith("/mail-spool/0") and ".svc.corp.internal:26379," in url


def test_replicated_mode_clients_use_the_sentinels(replicated: Manifests) -> None:
    sentinels = ",".join(f"{name}:26379" for name in redis_pod_names())
    for workload, name in ((GATEWAY, "gateway"), (OPERATOR, "operator")):
        deployment = replicated.get("Deployment", workload)
        env = env_of(container(deployment, name))
        assert env["MXGATE_REDIS_URL"] == f"redis+sentinel://{sentinels}/mxgate/0"
        assert env["MXGATE_REDIS_PASSWORD_FILE"] == "/var/run/secrets/mxgate/redis/password"
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        assert volumes["redis-password"]["secret"]["secretName"] == REDIS
        assert "hunter2" not in json.dumps(deployment) and ":@" not in env["MXGATE_REDIS_URL"]


def test_gateway_passes_replica_acks(default: Manifests, helm: Path) -> None:
    args = container(default.get("Deployment", GATEWAY), "gateway")["args"]
    assert (flag(args, "--replica-acks"), flag(args, "--replica-ack-timeout")) == ("auto", "1")
    args = container(render(helm, {"gateway": {"replicaAcks": 2, "replicaAckTimeoutSeconds": 0.25}}).get(
        "Deployment", GATEWAY), "gateway")["args"]
    assert (flag(args, "--replica-acks"), flag(args, "--replica-ack-timeout")) == ("2", "0.25")


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


@pytest.mark.parametrize("values", [REPLICATED, {**REPLICATED, **SIDECAR}], ids=["deployment", "sidecar"])
def test_network_policies_in_replicated_mode(helm: Path, values: dict[str, Any]) -> None:
    manifests = render(helm, values)
    sidecar = values.get("operator") == SIDECAR["operator"]
    clients = [GATEWAY] if sidecar else [GATEWAY, OPERATOR]
    labels = {name: manifests.get(kind, name)["spec"]["template"]["metadata"]["labels"]
              for kind, name in [("Deployment", c) for c in clients] + [("StatefulSet", REDIS)]}
    # Redis pods: Redis and sentinel ports in from the gateway, the operator and each other.
    redis = manifests.get("NetworkPolicy", REDIS)["spec"]
    [rule] = redis["ingress"]
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}, {"port": "sentinel", "protocol": "TCP"}]
    allowed = [name for name, pod in labels.items() if any(_selects(p, pod) for p in rule["from"])]
    assert sorted(allowed) == sorted([*clients, REDIS])
    # Out: DNS (they know each other by name) and the other Redis pods, on both ports; nothing else.
    egress = {(p["port"], p["protocol"]): r.get("to") for r in redis["egress"] for p in r["ports"]}
    assert set(egress) == {(53, "UDP"), (53, "TCP"), (6379, "TCP"), (26379, "TCP")}
    for port in (6379, 26379):
        [peer] = egress[(port, "TCP")]
        assert _selects(peer, labels[REDIS])
    # Gateway and operator reach the sentinels and the data nodes.
    for client in clients:
        rules = manifests.get("NetworkPolicy", client)["spec"]["egress"]
        to_redis = [r for r in rules if any(_selects(p, labels[REDIS]) for p in r.get("to", []))]
        assert [{p["port"] for p in r["ports"]} for r in to_redis] == [{6379, 26379}]


@pytest.mark.parametrize(("values", "ports"), [
    (EXTERNAL_SENTINEL, {26379, 26380, 6379}),
    ({"redis": {"external": {**EXTERNAL_SENTINEL["redis"]["external"], "networkPolicyPorts": [6380]}}},
     {26379, 26380, 6380}),
    ({"redis": {"external": {"url": "redis+sentinel://sentinel.corp.example/mx"}}}, {26379, 6379}),
    (EXTERNAL_CLUSTER, {7000, 7001, 7002}),
    ({"redis": {"external": {"url": "redis://redis.corp.example/0"}}}, {6379}),
], ids=["sentinel", "sentinel-data-port", "sentinel-default-ports", "cluster", "single-default-port"])
def test_external_redis_network_policy_ports(helm: Path, values: dict[str, Any], ports: set[int]) -> None:
    manifests = render(helm, values)
    assert not manifests.of_kind("StatefulSet") and REDIS not in manifests.names("NetworkPolicy")
    url = values["redis"]["external"]["url"]
    for workload, name in ((GATEWAY, "gateway"), (OPERATOR, "operator")):
        assert env_of(container(manifests.get("Deployment", workload), name))["MXGATE_REDIS_URL"] == url
        rules = manifests.get("NetworkPolicy", workload)["spec"]["egress"]
        [external] = [r for r in rules if r.get("to") == [{"ipBlock": {"cidr": "0.0.0.0/0"}}]
                      and not {p["port"] for p in r["ports"]} & {25, 443, 6443}]
        assert {p["port"] for p in external["ports"]} == ports


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


# ---- the values users of other charts expect (issue 10) ----

def test_openshift_can_drop_the_fixed_uids(helm: Path) -> None:
    # The restricted SCC assigns a random UID and refuses pods that ask for another: every fixed id can go.
    unset = {"runAsUser": None, "runAsGroup": None, "fsGroup": None}
    manifests = render(helm, {"gateway": {"podSecurityContext": unset}, "operator": {"podSecurityContext": unset}})
    for name in (GATEWAY, OPERATOR):
        spec = pod_spec(manifests.get("Deployment", name))
        assert spec["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        assert all("runAsUser" not in c["securityContext"] for c in spec["containers"])


def test_probes_can_be_tuned_or_dropped(helm: Path) -> None:
    manifests = render(helm, {"gateway": {"readinessProbe": {"periodSeconds": 2}, "livenessProbe": None,
                                          "startupProbe": {"httpGet": {"path": "/healthz", "port": "metrics"},
                                                           "failureThreshold": 30}},
                              "operator": {"livenessProbe": {"failureThreshold": 9}}})
    gateway = container(manifests.get("Deployment", GATEWAY), "gateway")
    assert gateway["readinessProbe"] == {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 2,
                                         "timeoutSeconds": 3, "failureThreshold": 2}
    assert "livenessProbe" not in gateway
    assert gateway["startupProbe"]["failureThreshold"] == 30
    operator = container(manifests.get("Deployment", OPERATOR), "operator")
    assert operator["livenessProbe"]["failureThreshold"] == 9
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "operator-health"}


@pytest.mark.parametrize("values", [{}, SIDECAR], ids=["deployment", "sidecar"])
def test_extra_env_env_from_and_volumes_reach_their_containers(helm: Path, values: dict[str, Any]) -> None:
    extra = {"extraEnv": [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel:4317"}],
             "envFrom": [{"secretRef": {"name": "mxgate-extra"}}]}
    manifests = render(helm, {**values,
                              "gateway": {**extra, "extraVolumes": [{"name": "ca", "configMap": {"name": "corp-ca"}}],
                                          "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/corp-ca"}]},
                              "operator": {**values.get("operator", {}), **extra,
                                           "extraVolumes": [{"name": "op", "emptyDir": {}}],
                                           "extraVolumeMounts": [{"name": "op", "mountPath": "/op"}]}})
    gateway_pod = manifests.get("Deployment", GATEWAY)
    operator_pod = gateway_pod if values else manifests.get("Deployment", OPERATOR)
    for workload, name, mount in ((gateway_pod, "gateway", "/etc/corp-ca"), (operator_pod, "operator", "/op")):
        c = container(workload, name)
        assert env_of(c)["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel:4317"
        assert c["envFrom"] == [{"secretRef": {"name": "mxgate-extra"}}]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mount in mounts and mounts[mount] in {v["name"] for v in pod_spec(workload)["volumes"]}


def test_gateways_spread_over_nodes_and_zones_by_default(default: Manifests, helm: Path) -> None:
    spec = pod_spec(default.get("Deployment", GATEWAY))
    labels = default.get("Deployment", GATEWAY)["spec"]["selector"]["matchLabels"]
    [term] = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"] == {"topologyKey": "kubernetes.io/hostname",
                                       "labelSelector": {"matchLabels": labels}}
    [spread] = spec["topologySpreadConstraints"]
    assert spread == {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                      "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": labels}}

    hard = pod_spec(render(helm, {"gateway": {"podAntiAffinityPreset": "hard", "topologySpreadConstraints": []}})
                    .get("Deployment", GATEWAY))
    assert hard["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] \
        == "kubernetes.io/hostname"
    assert "topologySpreadConstraints" not in hard
    own = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "mail", "operator": "Exists"}]}]}}}
    placed = pod_spec(render(helm, {"gateway": {"affinity": own, "nodeSelector": {"pool": "mail"},
                                                "tolerations": [{"key": "mail", "operator": "Exists"}]}})
                      .get("Deployment", GATEWAY))
    assert placed["affinity"] == own and placed["nodeSelector"] == {"pool": "mail"}
    assert placed["tolerations"] == [{"key": "mail", "operator": "Exists"}]
    none = pod_spec(render(helm, {"gateway": {"podAntiAffinityPreset": "none"}}).get("Deployment", GATEWAY))
    assert "affinity" not in none


def test_service_monitor_relabelings(helm: Path) -> None:
    relabel = [{"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}]
    drop = [{"sourceLabels": ["__name__"], "regex": "python_gc_.*", "action": "drop"}]
    manifests = render(helm, {"serviceMonitor": {"enabled": True, "relabelings": relabel,
                                                 "metricRelabelings": drop, "scrapeTimeout": "10s"}})
    [endpoint] = manifests.get("ServiceMonitor", f"{FULLNAME}-gateway")["spec"]["endpoints"]
    assert endpoint["relabelings"] == relabel and endpoint["metricRelabelings"] == drop
    assert endpoint["scrapeTimeout"] == "10s"
