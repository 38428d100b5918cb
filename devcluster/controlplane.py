"""etcd + kube-apiserver + kube-controller-manager as local processes, configured like a small real cluster.

Unlike envtest (API server only) this runs the controller manager too, because the operator's correctness
depends on real garbage collection, namespace deletion, service-account tokens and pod GC. Flags mirror a
kubeadm cluster where it matters for tests (RBAC + Node authorization, default admission plugins, service
account issuer/keys) and trade durability for speed where it does not (etcd without fsync).
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from devcluster import pki as pki_mod
from devcluster import procs
from devcluster.binaries import Binaries

SERVICE_CIDR = "10.96.0.0/16"
# Components are stopped in this order: dependants before what they depend on (a real node's own processes
# are ordered by devcluster.realnode before these).
STOP_ORDER = ("node", "kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    ca: Path,
    user: str,
    cert: Path | None = None,
    key: Path | None = None,
    token: str | None = None,
    namespace: str = "default",
) -> Path:
    """Write a single-context kubeconfig (certificate paths are absolute, so the file can be copied)."""
    creds: dict[str, str] = {}
    if cert and key:
        creds = {"client-certificate": str(cert.resolve()), "client-key": str(key.resolve())}
    if token:
        creds["token"] = token
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "devcluster", "cluster": {"server": server, "certificate-authority": str(ca.resolve())}}],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": user, "context": {"cluster": "devcluster", "user": user, "namespace": namespace}}],
        "current-context": user,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)
    return path


def api_client(kubeconfig: Path) -> k8s.ApiClient:
    """A synchronous kubernetes ApiClient for `kubeconfig` (no global default configuration is touched)."""
    conf = k8s.Configuration()
    k8s_config.load_kube_config(config_file=str(kubeconfig), client_configuration=conf)  # type: ignore[no-untyped-call]
    return k8s.ApiClient(conf)


def mint_kubeconfig(
    admin_kubeconfig: Path,
    *,
    namespace: str,
    serviceaccount: str,
    out: Path,
    expiration_seconds: int = 3600,
) -> Path:
    """Kubeconfig authenticating as `namespace/serviceaccount` via a TokenRequest; it has exactly that SA's RBAC."""
    with api_client(admin_kubeconfig) as api:
        req = k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
        )
        resp = k8s.CoreV1Api(api).create_namespaced_service_account_token(serviceaccount, namespace, req)
    if resp.status is None:
        raise RuntimeError(f"TokenRequest for {namespace}/{serviceaccount} returned no token")
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    return write_kubeconfig(
        out,
        server=cluster["server"],
        ca=Path(cluster["certificate-authority"]),
        user=f"system:serviceaccount:{namespace}:{serviceaccount}",
        token=resp.status.token,
        namespace=namespace,
    )


@dataclass(frozen=True)
class Endpoints:
    """Where the running control plane listens; persisted as state.json so `down` and reuse can find it."""

    etcd_port: int
    apiserver_port: int
    apiserver_host: str = "127.0.0.1"

    @property
    def server(self) -> str:
        """The API server URL."""
        return f"https://{self.apiserver_host}:{self.apiserver_port}"


class ControlPlane:
    """Owns the control-plane processes under one state directory."""

    def __init__(
        self,
        state_dir: Path,
        *,
        binaries: Binaries,
        extra_ips: tuple[str, ...] = (),
        bind_address: str = "127.0.0.1",
        log: Callable[[str], None] = print,
        die_with_caller: bool = False,
    ) -> None:
        self.state_dir = state_dir
        # Where the API server listens and what it advertises as the `kubernetes` Service endpoint: loopback
        # when no node runs (API-only tests, kwok nodes), the host's bridge address when real nodes run in
        # their own network namespaces and reach the API server (and pods reach it through the Service VIP).
        self.bind_address = bind_address
        # Components get SIGKILL when this process dies: a graceful API server shutdown can hang for minutes
        # once etcd is gone, and nothing of a throw-away cluster is worth a graceful stop.
        self.die_with_caller = die_with_caller
        self.binaries = binaries
        self.extra_ips = extra_ips
        self.log = log
        self.pki_dir = state_dir / "pki"
        self.log_dir = state_dir / "logs"
        self.pid_dir = state_dir / "pids"
        self.kubeconfig = state_dir / "kubeconfig"
        # Seconds from start() to each component serving; filled by start(), reported by bench/.
        self.timings: dict[str, float] = {}

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self, *, timeout: float = 120.0) -> Endpoints:
        """Start etcd, the API server and the controller manager; return once all three are serving."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        certs = pki_mod.generate(self.pki_dir, extra_ips=self.extra_ips)
        ep = Endpoints(etcd_port=free_port(), apiserver_port=free_port(), apiserver_host=self.bind_address)
        write_kubeconfig(
            self.kubeconfig,
            server=ep.server,
            ca=certs.ca.cert,
            user="admin",
            cert=certs.admin.cert,
            key=certs.admin.key,
        )
        kcm_kubeconfig = write_kubeconfig(
            self.state_dir / "kcm.kubeconfig",
            server=ep.server,
            ca=certs.ca.cert,
            user="system:kube-controller-manager",
            cert=certs.controller_manager.cert,
            key=certs.controller_manager.key,
        )
        t0 = time.monotonic()
        self._start_etcd(ep)
        self._start_apiserver(ep, certs)
        self._wait_readyz(ep, certs, deadline=t0 + timeout)
        self.timings["apiserver_readyz"] = time.monotonic() - t0
        self.log(f"kube-apiserver ready on {ep.server} after {self.timings['apiserver_readyz']:.1f}s")
        self._start_kcm(kcm_kubeconfig, certs)
        (self.state_dir / "state.json").write_text(
            json.dumps({"etcd_port": ep.etcd_port, "apiserver_port": ep.apiserver_port})
        )
        self._wait_controllers(deadline=t0 + timeout)
        self.timings["controller_manager_ready"] = time.monotonic() - t0
        self.log(f"kube-controller-manager ready after {self.timings['controller_manager_ready']:.1f}s")
        return ep

    def stop(self) -> None:
        """Stop every process recorded under the state dir (works from any Python process)."""
        procs.stop_recorded(self.pid_dir, order=STOP_ORDER)

    # -- components ----------------------------------------------------------------------------------------

    def _start_etcd(self, ep: Endpoints) -> None:
        peer = free_port()
        url = f"http://127.0.0.1:{ep.etcd_port}"
        purl = f"http://127.0.0.1:{peer}"
        procs.spawn(
            name="etcd",
            argv=[
                str(self.binaries.etcd),
                "--name=default",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={url}",
                f"--advertise-client-urls={url}",
                f"--listen-peer-urls={purl}",
                f"--initial-advertise-peer-urls={purl}",
                f"--initial-cluster=default={purl}",
                "--listen-metrics-urls=",
                "--unsafe-no-fsync=true",
                "--quota-backend-bytes=2147483648",
                "--log-level=warn",
            ],
            log_path=self.log_dir / "etcd.log",
            pid_dir=self.pid_dir,
            die_with_parent=self.die_with_caller,
            death_signal=signal.SIGKILL,
        )

    def _start_apiserver(self, ep: Endpoints, certs: pki_mod.Pki) -> None:
        procs.spawn(
            name="kube-apiserver",
            argv=[
                str(self.binaries.kube_apiserver),
                f"--etcd-servers=http://127.0.0.1:{ep.etcd_port}",
                f"--secure-port={ep.apiserver_port}",
                f"--bind-address={self.bind_address}",
                f"--advertise-address={self.bind_address}",
                "--enable-admission-plugins=NodeRestriction",
                f"--cert-dir={self.pki_dir}",
                f"--tls-cert-file={certs.apiserver.cert}",
                f"--tls-private-key-file={certs.apiserver.key}",
                f"--client-ca-file={certs.ca.cert}",
                "--authorization-mode=Node,RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={certs.sa_pub}",
                f"--service-account-signing-key-file={certs.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--kubelet-client-certificate={certs.kubelet_client.cert}",
                f"--kubelet-client-key={certs.kubelet_client.key}",
                "--kubelet-preferred-address-types=InternalIP",
                "--allow-privileged=true",
                "--profiling=false",
                "--event-ttl=1h",
                "--v=1",
            ],
            log_path=self.log_dir / "kube-apiserver.log",
            pid_dir=self.pid_dir,
            die_with_parent=self.die_with_caller,
            death_signal=signal.SIGKILL,
        )

    def _start_kcm(self, kubeconfig: Path, certs: pki_mod.Pki) -> None:
        procs.spawn(
            name="kube-controller-manager",
            argv=[
                str(self.binaries.kube_controller_manager),
                f"--kubeconfig={kubeconfig}",
                "--controllers=*",
                "--leader-elect=false",
                "--secure-port=0",
                f"--root-ca-file={certs.ca.cert}",
                f"--service-account-private-key-file={certs.sa_key}",
                "--use-service-account-credentials=true",
                f"--cluster-signing-cert-file={certs.ca.cert}",
                f"--cluster-signing-key-file={certs.ca.key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # Notice a lost node within ~20 s instead of 50 s so node-loss tests stay short.
                "--node-monitor-grace-period=20s",
                "--v=1",
            ],
            log_path=self.log_dir / "kube-controller-manager.log",
            pid_dir=self.pid_dir,
            die_with_parent=self.die_with_caller,
            death_signal=signal.SIGKILL,
        )

    def start_scheduler(self, *, timeout: float = 60.0) -> None:
        """Start the real kube-scheduler (for clusters with real or kwok nodes); return once it serves."""
        kubeconfig = self._client_kubeconfig("kube-scheduler", user="system:kube-scheduler")
        port = free_port()
        t0 = time.monotonic()
        procs.spawn(
            name="kube-scheduler",
            argv=[
                str(self.binaries.kube_scheduler),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                "--v=1",
            ],
            log_path=self.log_dir / "kube-scheduler.log",
            pid_dir=self.pid_dir,
            die_with_parent=self.die_with_caller,
            death_signal=signal.SIGKILL,
        )
        self._wait_https_ok(f"https://127.0.0.1:{port}/healthz", deadline=t0 + timeout, what="kube-scheduler")
        self.timings["scheduler_ready"] = time.monotonic() - t0
        self.log(f"kube-scheduler ready after {self.timings['scheduler_ready']:.1f}s")

    def _client_kubeconfig(self, stem: str, *, user: str, group: str | None = None) -> Path:
        """A kubeconfig with a fresh client certificate for `user` (CN) in `group` (O)."""
        pair = pki_mod.issue_client(self.pki_dir, stem=stem, user=user, group=group)
        state = json.loads((self.state_dir / "state.json").read_text())
        return write_kubeconfig(
            self.state_dir / f"{stem}.kubeconfig",
            server=f"https://{self.bind_address}:{state['apiserver_port']}",
            ca=self.pki_dir / "ca.crt",
            user=user,
            cert=pair.cert,
            key=pair.key,
        )

    def _wait_https_ok(self, url: str, *, deadline: float, what: str) -> None:
        """Poll a component's /healthz (self-signed serving certificate: not verified) until it answers 200."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(url, context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError) as e:
                last = str(e)
            time.sleep(0.2)
        raise TimeoutError(f"{what} not healthy at {url} ({last}); see {self.log_dir}")

    # -- readiness -----------------------------------------------------------------------------------------

    def _check_alive(self) -> None:
        for rec in procs.recorded(self.pid_dir):
            if not rec.alive():
                tail = tail_file(self.log_dir / f"{rec.name}.log", lines=30)
                raise RuntimeError(f"{rec.name} exited during start-up; last log lines:\n{tail}")

    def _wait_readyz(self, ep: Endpoints, certs: pki_mod.Pki, *, deadline: float) -> None:
        ctx = ssl.create_default_context(cafile=str(certs.ca.cert))
        ctx.load_cert_chain(str(certs.admin.cert), str(certs.admin.key))
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"{ep.server}/readyz", context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError) as e:
                last = str(e)
            time.sleep(0.2)
        raise TimeoutError(f"kube-apiserver not ready at {ep.server}/readyz ({last}); see {self.log_dir}")

    def _wait_controllers(self, *, deadline: float) -> None:
        """The controller manager is working once it has created the default ServiceAccount and root CA map."""
        with api_client(self.kubeconfig) as api:
            core = k8s.CoreV1Api(api)
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    core.read_namespaced_service_account("default", "default")
                    core.read_namespaced_config_map("kube-root-ca.crt", "default")
                    return
                except k8s.ApiException as e:
                    if e.status != 404:
                        raise
                time.sleep(0.2)
        raise TimeoutError(f"kube-controller-manager did not create default/default ServiceAccount; see {self.log_dir}")


def tail_file(path: Path, *, lines: int = 40) -> str:
    """Last `lines` lines of a text file ('' when absent); used to show component logs on failure."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])
