"""A real Kubernetes API server for the cluster tests: etcd and kube-apiserver, started as envtest starts them.

The fixtures in ``tests/cluster/conftest.py`` are the interface the cluster tests build on; keep it stable.

``kube`` (session scope) -- a :class:`KubeAPI`: one etcd and one kube-apiserver for the whole session.

- ``kube.kubeconfig: Path`` -- an admin kubeconfig (client certificate CN ``envtest-admin``, O ``system:masters``;
  it names certificate files in the session's temporary directory, so it is valid while the session runs).
- ``kube.server: str`` -- ``https://127.0.0.1:<port>``.
- ``kube.bin_dir: Path`` -- where kube-apiserver, etcd and helm came from.
- ``kube.kubectl(*args, check=True, input=None) -> subprocess.CompletedProcess[str]`` -- the machine's
  ``kubectl --kubeconfig <kubeconfig> <args>``; ``input`` is fed to stdin (``-f -``). With ``check``, a
  non-zero exit raises :class:`KubeCommandError`, a ``CalledProcessError`` whose message includes stderr.
- ``kube.helm(*args, check=True) -> subprocess.CompletedProcess[str]`` -- the provisioned helm with
  ``--kubeconfig``; its cache, config and data directories are private to the session.
- ``kube.api_client() -> kubernetes.client.ApiClient`` -- a new client configured from the kubeconfig; close
  it (``with kube.api_client() as api: ...``).
- ``kube.apiserver_log`` / ``kube.etcd_log: Path`` -- the servers' output, for a failing test to print.
- Also there: ``kube.create_namespace(name)``, ``kube.delete_namespace(name)``, ``kube.apply_crds(paths)``
  (what the fixtures below use), ``kube.workdir`` and ``kube.started_in`` (seconds).

``namespace`` (function scope) -- the name of a fresh namespace created for the test. Its deletion is
requested afterwards but never completes: no controller-manager runs to empty it.

``crds_installed`` (session scope) -- every file in the top-level ``crds/`` applied (server-side apply) and
Established; the value is the list of CRD names.

Only etcd and kube-apiserver run (as in controller-runtime's envtest): no scheduler, controller-manager or
kubelet. Pods are created but never scheduled, namespaces stay Terminating, the garbage collector never
follows ownerReferences, and the ServiceAccount admission plugin is off (no token controller would satisfy
it). Authorization is RBAC, so ``kubectl auth can-i --as=...`` answers as a real cluster does.

Binaries: ``$MXGATE_KUBE_BIN`` when set, otherwise the last stdout line of ``.ci/provision-kube`` (instant when
its cache is filled; a cold build takes ~17 minutes, longer than the per-test timeout, so ``.ci/test``
provisions before pytest starts). Missing binaries are an error, never a skip.

Start-up (measured in docs/cluster-binaries.md): certificates from ``trustme`` (ECDSA, fast to generate), etcd and
kube-apiserver started together on free loopback ports (the API server retries etcd until it answers), then
``/readyz`` and the ``default`` namespace are awaited. Shutdown stops kube-apiserver before etcd, each with
SIGTERM and a SIGKILL after :data:`STOP_GRACE`: an API server whose etcd is gone hangs on SIGTERM for minutes.
Both servers run in a session of their own (a Ctrl-C in the terminal must not reach etcd first) and get
SIGKILL if pytest dies (``PR_SET_PDEATHSIG``), so a killed test run leaves no server behind (only its
``/tmp/mxgate-kube-*`` directory).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import kubernetes
import trustme
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

REPO_ROOT = Path(__file__).resolve().parents[2]
PROVISION_SCRIPT = REPO_ROOT / ".ci" / "provision-kube"
BINARIES = ("kube-apiserver", "etcd", "helm")

#: Seconds a server gets between SIGTERM and SIGKILL; kube-apiserver needs ~1.3 s with etcd still up.
STOP_GRACE = 20.0
#: Seconds to wait for /readyz; it takes ~4 s on a 2-core machine that is also running other tests.
READY_TIMEOUT = 90.0
#: Seconds one kubectl or helm command may take before the test fails instead of hanging.
COMMAND_TIMEOUT = 120.0

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


class KubeStartError(RuntimeError):
    """The binaries are missing or the servers did not come up; the message holds the logs' tails."""


class KubeCommandError(subprocess.CalledProcessError):
    """A kubectl or helm command failed; unlike CalledProcessError, its message shows stdout and stderr."""

    def __str__(self) -> str:
        return (f"`{shlex.join(self.cmd)}` exited with {self.returncode}\n"
                f"--- stdout:\n{self.stdout}--- stderr:\n{self.stderr}")


def find_bin_dir() -> Path:
    """The directory holding kube-apiserver, etcd and helm: ``$MXGATE_KUBE_BIN``, else ``.ci/provision-kube``."""
    if configured := os.environ.get("MXGATE_KUBE_BIN"):
        bin_dir = Path(configured)
    else:
        result = subprocess.run(["bash", str(PROVISION_SCRIPT)], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL)
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or not lines:
            raise KubeStartError(f"{PROVISION_SCRIPT} exited with {result.returncode}; stderr:\n"
                                 + _tail(result.stderr, 40))
        bin_dir = Path(lines[-1])
    missing = [name for name in BINARIES if not os.access(bin_dir / name, os.X_OK)]
    if missing:
        raise KubeStartError(f"{', '.join(missing)} missing in {bin_dir}: run `bash .ci/provision-kube` "
                             "(or point MXGATE_KUBE_BIN at a directory holding kube-apiserver, etcd and helm)")
    return bin_dir


def find_kubectl(bin_dir: Path) -> str:
    """The machine's kubectl; a kubectl next to the binaries (``$KUBEBUILDER_ASSETS``) when PATH has none."""
    found = shutil.which("kubectl") or (str(bin_dir / "kubectl") if os.access(bin_dir / "kubectl", os.X_OK) else "")
    if not found:
        raise KubeStartError("kubectl not found on PATH")
    return found


@dataclass
class _Server:
    """One server process writing to its own log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, name: str, argv: Sequence[str], log_path: Path) -> _Server:
        with log_path.open("wb") as log:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        return cls(name, popen, log_path)

    def stop(self, grace: float = STOP_GRACE) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return f"--- last {lines} lines of {self.name}'s log:\n{_tail(text, lines)}"


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGKILL it when pytest exits, however pytest exits.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _free_ports(count: int) -> list[int]:
    # Bound together so the ports differ; closed before the servers bind them (a small race, as in envtest).
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass(frozen=True)
class _Credentials:
    """Files under ``certs/``: the CA, the serving pair, the admin client pair and the service-account keys."""

    ca: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_private: Path
    sa_public: Path

    @classmethod
    def generate(cls, directory: Path, *, serving_names: Sequence[str] = ("127.0.0.1", "localhost")) -> _Credentials:
        """``serving_names``: the API server certificate's names and addresses (a node's API server is also
        reached at its node address and as the ``kubernetes`` Service)."""
        directory.mkdir(mode=0o700)
        ca = trustme.CA(organization_name="mxgate envtest")
        serving = ca.issue_cert(*serving_names, common_name="kube-apiserver")
        # The API server's x509 authenticator takes the user from CN and the groups from O. The DNS name is
        # there because trustme writes an empty, critical subjectAltName without one, which Go refuses
        # ("x509: unhandled critical extension").
        admin = ca.issue_cert("envtest-admin", common_name="envtest-admin", organization_name="system:masters")
        sa_key = ec.generate_private_key(ec.SECP256R1())
        creds = cls(*(directory / name for name in (
            "ca.crt", "apiserver.crt", "apiserver.key", "admin.crt", "admin.key", "sa.key", "sa.pub")))
        ca.cert_pem.write_to_path(str(creds.ca))
        serving.cert_chain_pems[0].write_to_path(str(creds.serving_cert))
        serving.private_key_pem.write_to_path(str(creds.serving_key))
        admin.cert_chain_pems[0].write_to_path(str(creds.admin_cert))
        admin.private_key_pem.write_to_path(str(creds.admin_key))
        creds.sa_private.write_bytes(sa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        creds.sa_public.write_bytes(sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return creds

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.admin_cert), str(self.admin_key))
        return context

    def kubeconfig(self, server: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": "envtest", "preferences": {},
            "clusters": [{"name": "envtest", "cluster": {
                "server": server, "certificate-authority": str(self.ca)}}],
            "users": [{"name": "envtest-admin", "user": {
                "client-certificate": str(self.admin_cert), "client-key": str(self.admin_key)}}],
            "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": "envtest-admin"}}],
        }


@dataclass
class KubeAPI:
    """A running etcd + kube-apiserver pair and the commands that talk to it (see the module docstring)."""

    bin_dir: Path
    workdir: Path
    server: str
    kubeconfig: Path
    kubectl_path: str
    apiserver_log: Path
    etcd_log: Path
    started_in: float                       # seconds from the first certificate to the default namespace
    _servers: list[_Server] = field(repr=False)  # in start order; stopped in reverse
    _api: kubernetes.client.ApiClient | None = field(default=None, repr=False)

    @classmethod
    def start(cls, bin_dir: Path, *, kubectl: str | None = None) -> KubeAPI:
        """Start etcd and kube-apiserver in a new temporary directory and wait until the API is ready."""
        began = time.monotonic()
        workdir = Path(tempfile.mkdtemp(prefix="mxgate-kube-"))
        servers: list[_Server] = []
        try:
            creds = _Credentials.generate(workdir / "certs")
            etcd_port, peer_port, api_port = _free_ports(3)
            etcd_url = f"http://127.0.0.1:{etcd_port}"
            peer_url = f"http://127.0.0.1:{peer_port}"
            server = f"https://127.0.0.1:{api_port}"
            servers.append(_Server.start("etcd", [
                str(bin_dir / "etcd"), f"--data-dir={workdir / 'etcd-data'}",
                f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--unsafe-no-fsync=true",   # a throwaway store: durability is not what these tests check
            ], workdir / "etcd.log"))
            # --advertise-address stays unset: 127.0.0.1 is refused for the kubernetes Service endpoints.
            servers.append(_Server.start("kube-apiserver", [
                str(bin_dir / "kube-apiserver"), f"--etcd-servers={etcd_url}",
                f"--tls-cert-file={creds.serving_cert}", f"--tls-private-key-file={creds.serving_key}",
                f"--secure-port={api_port}", "--bind-address=127.0.0.1",
                "--service-cluster-ip-range=10.0.0.0/24", "--allow-privileged=true",
                "--disable-admission-plugins=ServiceAccount", "--authorization-mode=RBAC",
                f"--service-account-issuer={server}/", f"--service-account-key-file={creds.sa_public}",
                f"--service-account-signing-key-file={creds.sa_private}", f"--client-ca-file={creds.ca}",
            ], workdir / "apiserver.log"))
            _wait_ready(server, creds.ssl_context(), servers)
            kubeconfig = workdir / "kubeconfig"
            kubeconfig.write_text(yaml.safe_dump(creds.kubeconfig(server)))
            kubeconfig.chmod(0o600)
        except BaseException:
            for running in reversed(servers):
                running.stop()
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return cls(bin_dir=bin_dir, workdir=workdir, server=server, kubeconfig=kubeconfig,
                   kubectl_path=kubectl or find_kubectl(bin_dir), apiserver_log=servers[1].log_path,
                   etcd_log=servers[0].log_path, started_in=time.monotonic() - began, _servers=servers)

    def stop(self) -> None:
        """kube-apiserver first, then etcd; then the temporary directory (certificates, data, logs) goes."""
        if self._api is not None:
            self._api.close()
            self._api = None
        for running in reversed(self._servers):
            running.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KubeAPI:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- talking to it -------------------------------------------------------------------------------------

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        # A discovery cache of our own: ~/.kube/cache is shared with other sessions and keyed by host:port.
        return self._run([self.kubectl_path, f"--kubeconfig={self.kubeconfig}",
                          f"--cache-dir={self.workdir / 'kubectl-cache'}", *args], check=check, input=input)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        home = self.workdir / "helm"
        env = {"HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
               "HELM_DATA_HOME": str(home / "data")}
        return self._run([str(self.bin_dir / "helm"), f"--kubeconfig={self.kubeconfig}", *args],
                         check=check, env=env)

    def api_client(self) -> kubernetes.client.ApiClient:
        return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))

    def create_namespace(self, name: str) -> None:
        kubernetes.client.CoreV1Api(self._client()).create_namespace(
            {"metadata": {"name": name, "labels": {"mxgate.io/test-namespace": "true"}}})

    def delete_namespace(self, name: str) -> None:
        """Ask for the deletion; it stays Terminating (no namespace controller runs), which is fine."""
        with contextlib.suppress(kubernetes.client.ApiException):
            kubernetes.client.CoreV1Api(self._client()).delete_namespace(name)

    def apply_crds(self, paths: Sequence[Path], *, timeout: float = 60.0) -> list[str]:
        """Server-side apply each CRD file and wait until every CRD in them is Established."""
        names = [doc["metadata"]["name"] for path in paths for doc in yaml.safe_load_all(path.read_text())
                 if doc and doc.get("kind") == "CustomResourceDefinition"]
        files = [arg for path in paths for arg in ("-f", str(path))]
        self.kubectl("apply", "--server-side", "--field-manager=mxgate-tests", "--force-conflicts", *files)
        self.kubectl("wait", "--for=condition=Established", f"--timeout={timeout:.0f}s",
                     *(f"crd/{name}" for name in names))
        return names

    def _client(self) -> kubernetes.client.ApiClient:
        if self._api is None:
            self._api = self.api_client()
        return self._api

    def _run(self, argv: list[str], *, check: bool, input: str | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                                env={**os.environ, **(env or {})},
                                stdin=None if input is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise KubeCommandError(result.returncode, argv, result.stdout, result.stderr)
        return result


def _wait_ready(server: str, context: ssl.SSLContext, servers: Sequence[_Server]) -> None:
    """Until /readyz says ok and the default namespace exists (kubectl's default; created by a
    post-start hook shortly after /readyz); fail with the logs' tails if a server exits or time runs out."""
    deadline = time.monotonic() + READY_TIMEOUT
    last = ""
    for path in ("/readyz", "/api/v1/namespaces/default"):
        while True:
            exited = [s for s in servers if s.popen.poll() is not None]
            if exited:
                raise KubeStartError(f"{exited[0].name} exited with {exited[0].popen.returncode} during start-up\n"
                                     + "\n".join(s.log_tail() for s in servers))
            try:
                with urllib.request.urlopen(server + path, context=context, timeout=5) as response:
                    if response.status == 200:
                        break
                    last = f"{path}: HTTP {response.status}"
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):   # not a matter of time: the credentials are wrong
                    raise KubeStartError(f"{server}{path} refused the admin client certificate: {exc}\n"
                                         + servers[-1].log_tail()) from exc
                last = f"{path}: {exc}"
            except (urllib.error.URLError, OSError) as exc:
                last = f"{path}: {exc}"
            if time.monotonic() > deadline:
                raise KubeStartError(f"{server} not ready after {READY_TIMEOUT:.0f}s (last: {last})\n"
                                     + "\n".join(s.log_tail() for s in servers))
            time.sleep(0.1)
