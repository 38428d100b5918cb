"""Real Kueue next to the dev control plane: the controller manager built from its Go module, its CRDs and webhook
configurations from the same module version, running as a local process under the RBAC its release ships.

Why each choice (docs/kueue.md, "Kueue in tests", has the longer story):
- Webhooks: the API server runs on loopback with no Service routing, so the webhook configurations point at
  `https://127.0.0.1:<port>/<path>` with a caBundle of the dev cluster's CA, and Kueue serves a certificate that CA
  signed (`internalCertManagement.enable: false`; Kueue's own cert rotator only knows Service DNS names). The five
  CRDs Kueue converts between v1beta1 and v1beta2 get the same treatment for `/convert`.
- Only the webhooks for Kueue's own API group are installed. Kueue serves no-op handlers for the job kinds it does
  not integrate, but a pod/job webhook with failurePolicy Fail would make every pod of the shared test cluster
  depend on this process; FineTuneJob, an external framework, has no Kueue webhook at all.
- The metrics server reads its certificate from the fixed path /etc/kueue/metrics/certs when internal cert
  management is off (cmd/kueue/main.go). Kueue runs in a private mount namespace where /etc is an overlay whose
  upper layer holds that certificate; the host's /etc is never written.
- Kueue authenticates as the ServiceAccount kueue-system/kueue-controller-manager bound to the ClusterRoles of the
  module's config/components/rbac, plus read access to FineTuneJobs (what docs/kueue.md tells cluster admins).
The process is recorded in the cluster's pid directory, so stopping the cluster stops Kueue too.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import ipaddress
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client as k8s

from devcluster import pki as pki_mod
from devcluster import procs
from devcluster.binaries import REPO_ROOT, cache_dir, versions
from devcluster.cluster import DevCluster
from devcluster.controlplane import free_port, mint_kubeconfig, tail_file
from devcluster.kube import call_json
from devcluster.testing import wait_crd_established, wait_for

NAMESPACE = "kueue-system"
SERVICE_ACCOUNT = "kueue-controller-manager"
PROCESS_NAME = "kueue"
EXTERNAL_FRAMEWORKS = ("FineTuneJob.v1alpha1.finetune.dev",)
# The CRDs whose versions Kueue converts (pkg/util/cert: the CRDConversion entries of its cert rotator).
CONVERTED_CRDS = (
    "localqueues.kueue.x-k8s.io",
    "clusterqueues.kueue.x-k8s.io",
    "workloads.kueue.x-k8s.io",
    "cohorts.kueue.x-k8s.io",
    "multikueueclusters.kueue.x-k8s.io",
)
WEBHOOK_CONFIGS = {
    "MutatingWebhookConfiguration": "kueue-mutating-webhook-configuration",
    "ValidatingWebhookConfiguration": "kueue-validating-webhook-configuration",
}
KUEUE_GROUP = "kueue.x-k8s.io"
# The metrics certificate path cmd/kueue/main.go reads when internal cert management is off, below /etc.
METRICS_CERT_DIR = Path("kueue/metrics/certs")
TOKEN_SECONDS = 7 * 24 * 3600  # the session's Kueue must not lose its credentials mid-run
# Runs inside `unshare --mount`: /etc becomes an overlay (host /etc below, our certificate above), then exec Kueue.
OVERLAY_SCRIPT = 'mount -t overlay kueue-etc -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc && shift 2 && exec "$@"'


class KueueError(RuntimeError):
    """Kueue could not be built or started; the message says what to run or where the log is."""


@dataclasses.dataclass(frozen=True)
class KueueBuild:
    """Where hack/build-kueue.sh put one version: the binary and the module's manifests."""

    version: str
    root: Path

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "kueue"

    @property
    def crd_dir(self) -> Path:
        return self.root / "config" / "crd"

    @property
    def webhook_manifests(self) -> Path:
        return self.root / "config" / "webhook" / "manifests.yaml"

    @property
    def rbac_dir(self) -> Path:
        return self.root / "config" / "rbac"

    def missing(self) -> list[Path]:
        needed = (self.binary, self.webhook_manifests, self.root / "config" / ".complete")
        return [p for p in needed if not p.exists()]


def locate() -> KueueBuild:
    version = versions()["KUEUE_VERSION"]
    return KueueBuild(version=version, root=cache_dir() / "kueue" / version)


def ensure_built() -> KueueBuild:
    """The pinned build, running hack/build-kueue.sh first when anything is missing (~3 min cold on 2 cores)."""
    build = locate()
    if build.missing():
        subprocess.run(["bash", str(REPO_ROOT / "hack" / "build-kueue.sh")], check=True, cwd=REPO_ROOT)
    if build.missing():
        raise KueueError(f"hack/build-kueue.sh finished but {', '.join(map(str, build.missing()))} is missing")
    return build


@dataclasses.dataclass(frozen=True)
class Kueue:
    """A running Kueue for one dev cluster (state in <cluster state>/kueue, pid in the cluster's pid directory)."""

    version: str
    state_dir: Path
    log_path: Path
    webhook_port: int
    health_port: int
    metrics_port: int
    pid_dir: Path

    def alive(self) -> bool:
        return any(r.name == PROCESS_NAME and r.alive() for r in procs.recorded(self.pid_dir))

    def log_tail(self, *, lines: int = 60) -> str:
        return tail_file(self.log_path, lines=lines)

    def ready(self) -> bool:
        """Kueue's own readiness: certificates loaded and the webhook server listening."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False


def _manifests(path: Path) -> Iterator[dict[str, Any]]:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            yield doc


def _apply(cluster: DevCluster, docs: list[dict[str, Any]]) -> None:
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=devcluster-kueue", "-f", "-",
        input=yaml.safe_dump_all(docs),
    )  # fmt: skip


# ---- certificates ---------------------------------------------------------------------------------------------


def _serving_cert(pki: pki_mod.Pki, out: Path) -> tuple[Path, Path]:
    """tls.crt/tls.key for https://127.0.0.1, signed by the dev cluster's CA (the API server trusts it)."""
    out.mkdir(parents=True, exist_ok=True)
    ca_cert = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca.key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise KueueError(f"unexpected CA key type in {pki.ca.key}")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kueue-webhook")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    crt, tls_key = out / "tls.crt", out / "tls.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    tls_key.chmod(0o600)
    return crt, tls_key


# ---- what the API server needs --------------------------------------------------------------------------------


def _crds(build: KueueBuild, *, url: str, ca_bundle: str) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(build.crd_dir.glob("*.yaml")):
        for crd in _manifests(path):
            if crd["metadata"]["name"] in CONVERTED_CRDS:
                crd["spec"]["conversion"] = {
                    "strategy": "Webhook",
                    "webhook": {
                        "clientConfig": {"url": f"{url}/convert", "caBundle": ca_bundle},
                        "conversionReviewVersions": ["v1"],
                    },
                }
            docs.append(crd)
    return docs


def _webhook_configurations(build: KueueBuild, *, url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """The module's webhook configurations, narrowed to Kueue's own API group and pointed at the local process."""
    docs = []
    for config in _manifests(build.webhook_manifests):
        hooks = []
        for hook in config.get("webhooks") or []:
            groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
            if groups != {KUEUE_GROUP}:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hooks.append({**hook, "clientConfig": {"url": f"{url}{path}", "caBundle": ca_bundle}})
        config["metadata"] = {"name": WEBHOOK_CONFIGS[config["kind"]]}
        config["webhooks"] = hooks
        docs.append(config)
    return docs


def _rbac(build: KueueBuild) -> list[dict[str, Any]]:
    """Kueue's own roles (named as its release names them), bound to its ServiceAccount; plus FineTuneJob reads."""
    sa = {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SERVICE_ACCOUNT, "namespace": NAMESPACE}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "kueue-finetunejob-reader"},
            "rules": [
                {"apiGroups": ["finetune.dev"], "resources": ["finetunejobs"], "verbs": ["get", "list", "watch"]}
            ],
        },
    ]
    for stem in ("role", "metrics_auth_role", "manager_secrets_role"):
        for role in _manifests(build.rbac_dir / f"{stem}.yaml"):
            role["metadata"]["name"] = f"kueue-{role['metadata']['name']}"
            docs.append(role)
    for role in [d for d in docs if d["kind"] in ("ClusterRole", "Role")]:
        binding_kind = "ClusterRoleBinding" if role["kind"] == "ClusterRole" else "RoleBinding"
        meta: dict[str, Any] = {"name": role["metadata"]["name"]}
        if role["kind"] == "Role":
            role["metadata"]["namespace"] = meta["namespace"] = NAMESPACE
        docs.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": binding_kind,
                "metadata": meta,
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role["kind"], "name": meta["name"]},
                "subjects": [sa],
            }
        )
    return docs


def configuration(*, webhook_port: int, health_port: int, metrics_port: int, cert_dir: Path) -> dict[str, Any]:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2) for one local process: loopback ports, our certs,
    our external framework. VisibilityOnDemand is off: its API server would want certificates under /visibility."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "integrations": {"frameworks": ["batch/job"], "externalFrameworks": list(EXTERNAL_FRAMEWORKS)},
        "featureGates": {"VisibilityOnDemand": False},
    }


# ---- lifecycle ------------------------------------------------------------------------------------------------


def _state_file(cluster: DevCluster) -> Path:
    return cluster.state_dir / "kueue" / "kueue.json"


def attach(cluster: DevCluster) -> Kueue | None:
    """The Kueue already running for this cluster (started by another process), or None."""
    try:
        info = json.loads(_state_file(cluster).read_text())
    except (OSError, ValueError):
        return None
    handle = Kueue(**{**info, "state_dir": Path(info["state_dir"]), "log_path": Path(info["log_path"]),
                      "pid_dir": Path(info["pid_dir"])})  # fmt: skip
    return handle if handle.alive() else None


def start(
    cluster: DevCluster, *, log: Callable[[str], None] = print, die_with_caller: bool = False, timeout: float = 120
) -> Kueue:
    """Install Kueue's CRDs, RBAC and webhooks into `cluster` and start its controller manager; returns when its
    webhooks answer through the API server. Reuses a Kueue another process started for the same cluster."""
    running = attach(cluster)
    if running is not None:
        return running
    build = ensure_built()
    state = cluster.state_dir / "kueue"
    pki = pki_mod.generate(cluster.state_dir / "pki")  # the cluster's existing PKI (never regenerated)
    crt, key = _serving_cert(pki, state / "certs")
    overlay = state / "etc-overlay"
    (overlay / "upper" / METRICS_CERT_DIR).mkdir(parents=True, exist_ok=True)
    (overlay / "work").mkdir(parents=True, exist_ok=True)
    for src in (crt, key):
        (overlay / "upper" / METRICS_CERT_DIR / src.name).write_bytes(src.read_bytes())
    ports = {"webhook_port": free_port(), "health_port": free_port(), "metrics_port": free_port()}
    url = f"https://127.0.0.1:{ports['webhook_port']}"
    ca_bundle = _b64(pki.ca.cert.read_bytes())
    t0 = time.monotonic()
    _apply(cluster, _crds(build, url=url, ca_bundle=ca_bundle))
    with cluster.api() as api:
        for path in sorted(build.crd_dir.glob("*.yaml")):
            for crd in _manifests(path):
                wait_crd_established(api, crd["metadata"]["name"])
    _apply(cluster, _rbac(build))
    kubeconfig = mint_kubeconfig(
        cluster.kubeconfig,
        namespace=NAMESPACE,
        serviceaccount=SERVICE_ACCOUNT,
        out=state / "kubeconfig",
        expiration_seconds=TOKEN_SECONDS,
    )
    config_path = state / "config.yaml"
    config_path.write_text(yaml.safe_dump(configuration(cert_dir=crt.parent, **ports), sort_keys=False))
    handle = Kueue(
        version=build.version,
        state_dir=state,
        log_path=cluster.state_dir / "logs" / "kueue.log",
        pid_dir=cluster.state_dir / "pids",
        **ports,
    )
    procs.spawn(
        name=PROCESS_NAME,
        argv=[
            "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", OVERLAY_SCRIPT, "sh",
            str(overlay / "upper"), str(overlay / "work"),
            str(build.binary), f"--config={config_path}", f"--kubeconfig={kubeconfig}", "--zap-log-level=2",
        ],
        log_path=handle.log_path,
        pid_dir=handle.pid_dir,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        die_with_parent=die_with_caller,
    )  # fmt: skip
    try:
        _wait_ready(cluster, handle, timeout=timeout)
        _apply(cluster, _webhook_configurations(build, url=url, ca_bundle=ca_bundle))
        _wait_webhooks_served(cluster, handle, timeout=timeout)
    except BaseException:
        stop(cluster, handle)
        raise
    _state_file(cluster).write_text(json.dumps({**dataclasses.asdict(handle), **_paths(handle)}, indent=2))
    log(f"kueue {build.version} ready after {time.monotonic() - t0:.1f}s (webhooks on {url}; log {handle.log_path})")
    return handle


def _paths(handle: Kueue) -> dict[str, str]:
    return {"state_dir": str(handle.state_dir), "log_path": str(handle.log_path), "pid_dir": str(handle.pid_dir)}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _wait_ready(cluster: DevCluster, handle: Kueue, *, timeout: float) -> None:
    def ready() -> bool:
        if not handle.alive():
            raise KueueError(f"kueue exited during start-up; last log lines:\n{handle.log_tail(lines=40)}")
        return handle.ready()

    wait_for(ready, timeout=timeout, what=f"kueue /readyz on 127.0.0.1:{handle.health_port} (log {handle.log_path})")


def _wait_webhooks_served(cluster: DevCluster, handle: Kueue, *, timeout: float) -> None:
    """A server-side dry-run create goes through Kueue's mutating and validating webhooks via the API server."""
    flavor = {"apiVersion": f"{KUEUE_GROUP}/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "probe"}}

    def served() -> bool:
        if not handle.alive():
            raise KueueError(f"kueue exited; last log lines:\n{handle.log_tail(lines=40)}")
        with cluster.api() as api:
            try:
                call_json(
                    k8s.CustomObjectsApi(api).create_cluster_custom_object,
                    KUEUE_GROUP, "v1beta2", "resourceflavors", flavor, dry_run="All",
                )  # fmt: skip
                return True
            except k8s.ApiException as e:
                if e.status in (500, 502, 503, 504):  # webhook not reachable yet
                    return False
                raise

    wait_for(served, timeout=timeout, what="Kueue's webhooks answering through the API server")


def stop(cluster: DevCluster, handle: Kueue) -> None:
    """Stop the process and remove its webhook configurations (so nothing in the cluster calls a dead port).

    The CRDs stay: deleting them would delete every Kueue object, and a later start re-points their conversion
    webhook anyway.
    """
    for rec in procs.recorded(handle.pid_dir):
        if rec.name == PROCESS_NAME:
            if rec.alive():
                procs.stop_group(rec.pid, grace=10)
            (handle.pid_dir / f"{rec.name}.pid").unlink(missing_ok=True)
    for kind, name in WEBHOOK_CONFIGS.items():
        cluster.kubectl("delete", kind.lower(), name, "--ignore-not-found", check=False)
    _state_file(cluster).unlink(missing_ok=True)
