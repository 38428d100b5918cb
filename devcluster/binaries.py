"""Where the upstream binaries live, and building them on demand.

Versions are read from `hack/versions.env` (the one place they are pinned) and binaries from the build cache
laid out by `hack/build-binaries.sh`, so Python never disagrees with the build script about what to run.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


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
class Binaries:
    """Absolute paths of every control-plane tool."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kubectl: Path
    helm: Path

    def missing(self) -> list[Path]:
        """Control-plane binaries that are not built yet (helm is optional for the cluster itself)."""
        need = (self.etcd, self.kube_apiserver, self.kube_controller_manager, self.kubectl)
        return [p for p in need if not os.access(p, os.X_OK)]


def locate() -> Binaries:
    """Paths the build script writes to for the pinned versions."""
    v = versions()
    cache = cache_dir()
    k8s = cache / "k8s" / v["KUBERNETES_VERSION"] / "bin"
    return Binaries(
        etcd=cache / "etcd" / v["ETCD_VERSION"] / "bin" / "etcd",
        kube_apiserver=k8s / "kube-apiserver",
        kube_controller_manager=k8s / "kube-controller-manager",
        kubectl=k8s / "kubectl",
        helm=cache / "helm" / v["HELM_VERSION"] / "bin" / "helm",
    )


def ensure_built() -> Binaries:
    """Return the binaries, running hack/build-binaries.sh first when any is missing."""
    bins = locate()
    if bins.missing():
        subprocess.run(
            ["bash", str(REPO_ROOT / "hack" / "build-binaries.sh"), "etcd", "k8s"],
            check=True,
            cwd=REPO_ROOT,
        )
    still = bins.missing()
    if still:
        raise RuntimeError(f"build finished but binaries are missing: {', '.join(map(str, still))}")
    return bins
