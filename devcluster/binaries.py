"""Where the upstream binaries live, and building them on demand.

Versions are read from `hack/versions.env` (the one place they are pinned) and binaries from the build cache
laid out by `hack/build-binaries.sh`, so Python never disagrees with the build script about what to run.
Debian's packages provide what is not built here (runc, the CNI plugins, iptables; see hack/apt-deps.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins


def versions(root: Path = REPO_ROOT) -> dict[str, str]:
    """Parse KEY=VALUE lines of hack/versions.env."""
    out: dict[str, str] = {}
    for raw in (root / "hack" / "versions.env").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().strip('"')
    return out


def cache_dir() -> Path:
    """The build cache: $FT_CACHE, else <repo>/.cache (the Makefile default)."""
    return Path(os.environ.get("FT_CACHE") or REPO_ROOT / ".cache")


@dataclass(frozen=True)
class NodeBinaries:
    """What a real node runs: kubelet, kube-proxy, containerd (+ shim, ctr), crictl, CoreDNS, runc, CNI."""

    kubelet: Path
    kube_proxy: Path
    containerd: Path
    containerd_shim: Path
    ctr: Path
    crictl: Path
    coredns: Path

    @property
    def containerd_bin_dir(self) -> Path:
        """containerd finds its shim on PATH: this directory goes first on the node's PATH."""
        return self.containerd.parent

    def missing(self) -> list[Path]:
        """Binaries not built yet, plus the Debian tools the node needs that are not installed."""
        built = (self.kubelet, self.kube_proxy, self.containerd, self.containerd_shim, self.ctr, self.crictl)
        gone = [p for p in (*built, self.coredns) if not os.access(p, os.X_OK)]
        for tool in ("runc", "iptables", "conntrack", "nsenter", "unshare", "ip"):
            if shutil.which(tool) is None:
                gone.append(Path(tool))
        gone += [
            CNI_BIN_DIR / p for p in ("bridge", "host-local", "loopback", "portmap") if not (CNI_BIN_DIR / p).exists()
        ]
        return gone


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of every tool the dev cluster runs."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    helm: Path
    kwok: Path
    node: NodeBinaries

    def missing(self) -> list[Path]:
        """Control-plane binaries that are not built yet (helm is optional for the cluster itself)."""
        need = (self.etcd, self.kube_apiserver, self.kube_controller_manager, self.kubectl)
        return [p for p in need if not os.access(p, os.X_OK)]


def locate() -> Binaries:
    """Paths the build script writes to for the pinned versions."""
    v = versions()
    cache = cache_dir()
    k8s = cache / "k8s" / v["KUBERNETES_VERSION"] / "bin"
    containerd = cache / "containerd" / v["CONTAINERD_VERSION"] / "bin"
    return Binaries(
        etcd=cache / "etcd" / v["ETCD_VERSION"] / "bin" / "etcd",
        kube_apiserver=k8s / "kube-apiserver",
        kube_controller_manager=k8s / "kube-controller-manager",
        kube_scheduler=k8s / "kube-scheduler",
        kubectl=k8s / "kubectl",
        helm=cache / "helm" / v["HELM_VERSION"] / "bin" / "helm",
        kwok=cache / "kwok" / v["KWOK_VERSION"] / "bin" / "kwok",
        node=NodeBinaries(
            kubelet=k8s / "kubelet",
            kube_proxy=k8s / "kube-proxy",
            containerd=containerd / "containerd",
            containerd_shim=containerd / "containerd-shim-runc-v2",
            ctr=containerd / "ctr",
            crictl=cache / "crictl" / v["CRICTL_VERSION"] / "bin" / "crictl",
            coredns=cache / "coredns" / v["COREDNS_VERSION"] / "bin" / "coredns",
        ),
    )


def _build(*targets: str) -> None:
    subprocess.run(["bash", str(REPO_ROOT / "hack" / "build-binaries.sh"), *targets], check=True, cwd=REPO_ROOT)


def ensure_built(*, node: bool = False, scheduler: bool = False, kwok: bool = False) -> Binaries:
    """Return the binaries, running hack/build-binaries.sh first for whatever is missing.

    The control plane is always needed; `scheduler` adds kube-scheduler, `node` the real node's binaries,
    `kwok` the kwok controller.
    """
    bins = locate()
    need = list(bins.missing())
    targets = ["etcd", "k8s"] if need else []
    if scheduler and not os.access(bins.kube_scheduler, os.X_OK):
        targets.append("k8s")
    if node:
        node_missing = bins.node.missing()
        if node_missing:
            targets += ["k8s", "containerd", "crictl", "coredns"]
        need += node_missing
    if kwok and not os.access(bins.kwok, os.X_OK):
        targets.append("kwok")
        need.append(bins.kwok)
    if targets:
        _build(*dict.fromkeys(targets))
    still = [p for p in need if not (os.access(p, os.X_OK) if p.is_absolute() else shutil.which(str(p)))]
    if still:
        raise RuntimeError(
            f"missing after the build: {', '.join(map(str, still))} "
            "(Debian tools come from hack/apt-deps.sh: run it as root)"
        )
    return bins
