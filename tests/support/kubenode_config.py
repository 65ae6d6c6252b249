"""The configuration files and command lines of ``kubenode.py``'s components, in one place.

:class:`NodePlan` writes each component's configuration under the node's work directory when asked for its
command line; nothing here starts a process. The choices that matter on these machines are commented where
they are made (see also ../shared/reference.md §5 of the project's notes).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import kubernetes
import yaml

from support.kubeapi import _Credentials, _free_ports

BRIDGE = "mxgtest0"                        # the CNI bridge (its own name: nothing else uses it)
CNI_NETWORK = "mxgtest"
POD_CIDR = "10.213.0.0/24"
SERVICE_CIDR = "10.214.0.0/24"
API_SERVICE_IP = "10.214.0.1"
DNS_IP = "10.214.0.10"
CLUSTER_DOMAIN = "cluster.local"
CGROUP = "mxgate-e2e"                      # the kubelet's cgroupRoot, in every hierarchy
NODE_NAME = "mxgate-e2e"


@dataclass
class NodePlan:
    bin_dir: Path
    workdir: Path
    run_dir: Path
    node_ip: str
    api_port: int
    creds: _Credentials
    kubeconfig: Path
    pause_image: str
    free_port: Callable[..., int]

    def __post_init__(self) -> None:
        self.config_dir = self.workdir / "config"
        self.config_dir.mkdir(exist_ok=True)
        self.etcd_port, self.etcd_peer_port = _free_ports(2)
        self.kcm_port, self.scheduler_port, self.kubelet_port, self.kubelet_healthz_port, self.proxy_healthz_port, \
            self.proxy_metrics_port, self.dns_health_port, self.dns_ready_port = _free_ports(8)
        self.dns_port = self.free_port(self.node_ip, udp_too=True)

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _write(self, name: str, text: str) -> Path:
        path = self.config_dir / name
        path.write_text(text)
        return path

    # -- wave 1: containerd, etcd, kube-apiserver -------------------------------------------------------

    def first_wave(self) -> list[tuple[str, list[str]]]:
        etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        peer_url = f"http://127.0.0.1:{self.etcd_peer_port}"
        c = self.creds
        return [
            ("containerd", ["containerd", "--config", str(self._containerd_config())]),
            ("etcd", [
                self._bin("etcd"), f"--data-dir={self.workdir / 'etcd-data'}",
                f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}", "--unsafe-no-fsync=true",
            ]),
            ("kube-apiserver", [
                self._bin("kube-apiserver"), f"--etcd-servers={etcd_url}",
                f"--tls-cert-file={c.serving_cert}", f"--tls-private-key-file={c.serving_key}",
                f"--secure-port={self.api_port}", f"--bind-address={self.node_ip}",
                f"--advertise-address={self.node_ip}", f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true", "--authorization-mode=Node,RBAC",
                f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
                f"--service-account-key-file={c.sa_public}", f"--service-account-signing-key-file={c.sa_private}",
                f"--client-ca-file={c.ca}",
                # The host name resolves to 127.0.0.1 here: logs/exec must go to the node's address.
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-client-certificate={c.admin_cert}", f"--kubelet-client-key={c.admin_key}",
                "--profiling=false",
            ]),
        ]

    def _containerd_config(self) -> Path:
        root = self.workdir / "containerd"
        cni_conf = self.workdir / "cni" / "net.d"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-mxgtest.conflist").write_text(json.dumps(self._cni_network(), indent=2))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        sock = self.run_dir / "containerd.sock"
        return self._write("containerd.toml", f"""\
version = 2
root = "{root}"
state = "{self.run_dir / 'containerd'}"
# Snapshotters this host cannot use.
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{root / 'opt'}"
[{cri}]
  sandbox_image = "{self.pause_image}"
  # Without CAP_SYS_RESOURCE every sandbox fails otherwise (runc cannot lower oom_score_adj).
  restrict_oom_score_adj = true
  # Pod network namespaces under our state directory instead of /run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "runc"
        Root = "{self.run_dir / 'runc'}"
  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
""")

    def _cni_network(self) -> dict[str, object]:
        # No ipMasq: pods talk to each other, to Services and to the host, never beyond; fewer host rules.
        return {"cniVersion": "1.0.0", "name": CNI_NETWORK, "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                      "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.workdir / "cni" / "ipam")}},
        ]}

    # -- wave 2: the rest -------------------------------------------------------------------------------

    def second_wave(self) -> list[tuple[str, list[str]]]:
        kubeconfig = str(self.kubeconfig)
        return [
            ("kube-controller-manager", [
                self._bin("kube-controller-manager"), f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
                f"--service-account-private-key-file={self.creds.sa_private}",
                f"--root-ca-file={self.creds.ca}",      # the kube-root-ca.crt ConfigMap of every namespace
                f"--service-cluster-ip-range={SERVICE_CIDR}", f"--cluster-cidr={POD_CIDR}",
                "--allocate-node-cidrs=false", "--leader-elect=false",
                "--bind-address=127.0.0.1", f"--secure-port={self.kcm_port}",
            ]),
            ("kube-scheduler", [
                self._bin("kube-scheduler"), f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={self.scheduler_port}",
            ]),
            ("kubelet", [
                self._bin("kubelet"), f"--config={self._kubelet_config()}", f"--kubeconfig={kubeconfig}",
                f"--hostname-override={NODE_NAME}", f"--node-ip={self.node_ip}",
                f"--root-dir={self.workdir / 'kubelet'}", f"--cert-dir={self.workdir / 'kubelet' / 'pki'}",
            ]),
            ("kube-proxy", [self._bin("kube-proxy"), f"--config={self._proxy_config()}"]),
            ("coredns", [self._bin("coredns"), "-conf", str(self._corefile())]),
        ]

    def _kubelet_config(self) -> Path:
        (self.workdir / "pod-logs").mkdir(exist_ok=True)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            # cgroup v1 here (hybrid): refused from v1.35 on unless failCgroupV1 is false.
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "cgroupRoot": f"/{CGROUP}",
            "containerRuntimeEndpoint": f"unix://{self.run_dir / 'containerd.sock'}",
            "address": self.node_ip, "port": self.kubelet_port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": self.kubelet_healthz_port,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.creds.ca)}},
            "authorization": {"mode": "Webhook"},
            "clusterDNS": [DNS_IP], "clusterDomain": CLUSTER_DOMAIN, "resolvConf": "/etc/resolv.conf",
            "podLogsDir": str(self.workdir / "pod-logs"),
            "failSwapOn": False,
            # Images come from archives (imagePullPolicy: Never): garbage-collecting one would break the tests.
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            # The disk and memory are shared with other tests: no eviction for pressure they cause.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "serializeImagePulls": False,
        }
        return self._write("kubelet.yaml", yaml.safe_dump(config))

    def _proxy_config(self) -> Path:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.kubeconfig)},
            "mode": "iptables", "clusterCIDR": POD_CIDR, "hostnameOverride": NODE_NAME,
            "healthzBindAddress": f"127.0.0.1:{self.proxy_healthz_port}",
            "metricsBindAddress": f"127.0.0.1:{self.proxy_metrics_port}",
            # Leave the host's conntrack sysctls and route_localnet alone.
            "conntrack": {"maxPerCore": 0, "min": 0},
            "iptables": {"localhostNodePorts": False},
        }
        return self._write("kube-proxy.yaml", yaml.safe_dump(config))

    def _corefile(self) -> Path:
        # A host process on the node address, behind the kube-dns Service (create_dns_service): pods resolve
        # through the ClusterIP as in any cluster; unknown names go to the host's resolvers.
        return self._write("Corefile", f"""\
.:{self.dns_port} {{
    bind {self.node_ip}
    errors
    health 127.0.0.1:{self.dns_health_port}
    ready 127.0.0.1:{self.dns_ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {self.kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    forward . /etc/resolv.conf
    cache 5
}}
""")

    def create_dns_service(self, api: kubernetes.client.ApiClient) -> None:
        """The kube-dns Service at :data:`DNS_IP` and an EndpointSlice pointing it at the host's CoreDNS."""
        ports = [("dns", "UDP"), ("dns-tcp", "TCP")]
        kubernetes.client.CoreV1Api(api).create_namespaced_service("kube-system", {
            "metadata": {"name": "kube-dns", "labels": {"k8s-app": "kube-dns"}},
            "spec": {"clusterIP": DNS_IP, "ports": [{"name": n, "port": 53, "protocol": p} for n, p in ports]}})
        kubernetes.client.DiscoveryV1Api(api).create_namespaced_endpoint_slice("kube-system", {
            "metadata": {"name": "kube-dns-host", "labels": {"kubernetes.io/service-name": "kube-dns"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [self.node_ip], "conditions": {"ready": True}}],
            "ports": [{"name": n, "port": self.dns_port, "protocol": p} for n, p in ports]})

    def health_urls(self) -> dict[str, str]:
        return {
            "kube-controller-manager": f"https://127.0.0.1:{self.kcm_port}/healthz",
            "kube-scheduler": f"https://127.0.0.1:{self.scheduler_port}/healthz",
            "kubelet": f"http://127.0.0.1:{self.kubelet_healthz_port}/healthz",
            "kube-proxy": f"http://127.0.0.1:{self.proxy_healthz_port}/healthz",
            "coredns": f"http://127.0.0.1:{self.dns_ready_port}/ready",
        }


