"""The kind quick start (`hack/kind-demo.sh`) pointed at a dev cluster with real nodes.

Why here: the e2e tests on the real node (quick start, faults, metrics) and bench/time_to_first_step.py run the
same script `make kind-demo` runs, with the same knobs; this module says once how a dev cluster sets them (its
kubeconfig instead of a kind context, images built from this repository, a free port for the port-forward) and
how the quick-start job is cut down to the node's two cores. Nothing here knows kind or the product's code.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from devcluster.binaries import REPO_ROOT, cache_dir, versions
from devcluster.cluster import DevCluster
from devcluster.controlplane import free_port
from devcluster.testing import wait_for

SCRIPT = REPO_ROOT / "hack" / "kind-demo.sh"
QUICKSTART = REPO_ROOT / "examples" / "quickstart-kind.yaml"
JOB = "sst2-quickstart"  # metadata.name in examples/quickstart-kind.yaml
MINIO_NAMESPACE = "minio"  # examples/minio-kind.yaml
PROMETHEUS_NAMESPACE = "monitoring"  # examples/prometheus-kind.yaml
CRD = "finetunejobs.finetune.dev"
PROMETHEUS_RBAC = "finetune-demo-prometheus"  # its ClusterRole and ClusterRoleBinding
IMAGES = ("operator", "trainer", "minio", "prometheus")
# Test-sized: the same model (all-MiniLM-L6-v2 from the image's cache), method, storage and output as the kind
# job, with 64 rows, short sequences, and CPU requests that fit two cores next to two operators, MinIO and CoreDNS.
TRAIN_ROWS = 64
SMALL_SPEC: dict[str, Any] = {
    "dataset": {"maxTrainSamples": TRAIN_ROWS, "maxEvalSamples": 64},
    "hyperparameters": {"batchSize": 8, "maxSeqLength": 32, "epochs": 1},
    "resources": {"cpusPerWorker": "500m", "memoryPerWorker": "2Gi", "head": {"cpu": "400m", "memory": "2Gi"}},
    "checkpoint": {"everySteps": 2, "keep": 2},
}


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in, recursively for mappings (a None value removes the key)."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def quickstart_job(spec: Mapping[str, Any] | None = None, *, name: str = JOB) -> dict[str, Any]:
    """examples/quickstart-kind.yaml, test-sized (SMALL_SPEC), with `spec` merged on top and renamed to `name`."""
    (job,) = [d for d in yaml.safe_load_all(QUICKSTART.read_text()) if d]
    job = merge(job, {"metadata": {"name": name}, "spec": merge(SMALL_SPEC, spec or {})})
    if name != JOB:
        job["spec"]["output"]["uri"] = f"s3://models/{name}/"
    result: dict[str, Any] = job
    return result


@dataclass(frozen=True)
class Quickstart:
    """The knobs of one run of hack/kind-demo.sh against a dev cluster."""

    cluster: DevCluster
    job_namespace: str
    operator_namespace: str
    images: Mapping[str, str]  # name -> reference, as imported into the nodes' containerd
    work_dir: Path  # job file, helm's home, the script's log
    release: str = "quickstart"
    chart_values: Mapping[str, str] = dataclasses.field(default_factory=dict)  # more `--set key=value`

    @classmethod
    def for_cluster(
        cls,
        cluster: DevCluster,
        *,
        job_namespace: str,
        work_dir: Path,
        chart_values: Mapping[str, str] | None = None,
        log: Callable[[str], None] = print,
    ) -> Quickstart:
        """Our images built (cached) and imported into the cluster's nodes, and the script pointed at them; the
        operator goes to `<job namespace>-op`."""
        images = cluster.load_images(IMAGES, log=log)
        return cls(
            cluster=cluster,
            job_namespace=job_namespace,
            operator_namespace=f"{job_namespace[:50]}-op",
            images={name: image.ref for name, image in images.items()},
            work_dir=work_dir,
            chart_values=dict(chart_values or {}),
        )

    def env(self, *, job_file: Path, job: str = JOB, timeout: float = 1200) -> dict[str, str]:
        helm_home = self.work_dir / "helm"
        return {
            **os.environ,
            "KUBE_CONTEXT": "",
            "KUBECONFIG": str(self.cluster.kubeconfig),
            "KUBECTL": str(self.cluster.binaries.kubectl),
            "HELM": str(cache_dir() / "helm" / versions()["HELM_VERSION"] / "bin" / "helm"),
            "HELM_CACHE_HOME": str(helm_home / "cache"),
            "HELM_CONFIG_HOME": str(helm_home / "config"),
            "HELM_DATA_HOME": str(helm_home / "data"),
            "PY": sys.executable,
            "OPERATOR_IMAGE": self.images["operator"],
            "TRAINER_IMAGE": self.images["trainer"],
            "MINIO_IMAGE": self.images["minio"],
            "PROMETHEUS_IMAGE": self.images["prometheus"],
            "RELEASE": self.release,
            "OPERATOR_NS": self.operator_namespace,
            "JOB_NS": self.job_namespace,
            "JOB_FILE": str(job_file),
            "JOB": job,
            "TRAIN_ROWS": str(TRAIN_ROWS),
            "PF_PORT": str(free_port()),
            "PROM_PORT": str(free_port()),
            "TIMEOUT": str(int(timeout)),
            "HELM_SET": " ".join(f"{key}={value}" for key, value in self.chart_values.items()),
        }

    def run(
        self, step: str, *, job: Mapping[str, Any] | None = None, timeout: float = 1200
    ) -> subprocess.CompletedProcess[str]:
        """`hack/kind-demo.sh <step>` (demo | setup); its output goes to <work_dir>/kind-demo-<step>.log too."""
        self._adopt_crd()
        manifest = job or quickstart_job()
        job_file = self.work_dir / f"{manifest['metadata']['name']}.yaml"
        job_file.write_text(yaml.safe_dump(manifest))
        env = self.env(job_file=job_file, job=manifest["metadata"]["name"], timeout=timeout)
        res = subprocess.run(
            ["bash", str(SCRIPT), step],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout + 600,
            check=False,
        )
        (self.work_dir / f"kind-demo-{step}.log").write_text(res.stdout + res.stderr)
        return res

    def _adopt_crd(self) -> None:
        """Let this release adopt a FineTuneJob CRD another test applied without helm (helm's documented adoption:
        its ownership label and annotations); on a fresh cluster there is nothing to adopt."""
        k = self.cluster.kubectl
        if k("get", "crd", CRD, "-o", "name", check=False).returncode != 0:
            return
        k("label", "crd", CRD, "app.kubernetes.io/managed-by=Helm", "--overwrite")
        k(
            "annotate", "crd", CRD, "--overwrite",
            f"meta.helm.sh/release-name={self.release}", f"meta.helm.sh/release-namespace={self.operator_namespace}",
        )  # fmt: skip

    def teardown(self) -> None:
        """Uninstall the release and delete the operator and MinIO namespaces (the job namespace is the caller's)."""
        k = self.cluster.kubectl
        k("-n", self.job_namespace, "delete", "ftj", "--all", "--wait=true", "--timeout=120s", check=False)
        k("-n", self.operator_namespace, "delete", "deployment", "--all", "--wait=false", check=False)
        helm = self.env(job_file=Path("/dev/null"))
        subprocess.run(
            [helm["HELM"], "uninstall", self.release, "--namespace", self.operator_namespace],
            env=helm,
            capture_output=True,
            timeout=300,
            check=False,
        )
        for ns in (self.operator_namespace, MINIO_NAMESPACE, PROMETHEUS_NAMESPACE):
            k("delete", "namespace", ns, "--ignore-not-found", "--wait=false", check=False)
        k("delete", "clusterrole,clusterrolebinding", PROMETHEUS_RBAC, "--ignore-not-found", check=False)
        # The chart keeps its CRD on uninstall (crds.keep); the next install under another release or namespace
        # would refuse to adopt it.
        k("delete", "crd", CRD, "--ignore-not-found", "--wait=true", "--timeout=120s", check=False)


@contextlib.contextmanager
def platform(
    cluster: DevCluster,
    *,
    prefix: str,
    work_dir: Path,
    chart_values: Mapping[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> Iterator[Quickstart]:
    """`hack/kind-demo.sh setup` once (MinIO, Prometheus, the chart, the data) in a new namespace `<prefix>-<n>`, for
    tests that apply their own jobs; on exit the release, its namespaces and the job namespace go."""
    namespace = f"{prefix}-{time.time_ns() % 10**6}"
    cluster.kubectl("create", "namespace", namespace)
    setup = Quickstart.for_cluster(
        cluster, job_namespace=namespace, work_dir=work_dir, chart_values=chart_values, log=log
    )
    try:
        res = setup.run("setup", timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"hack/kind-demo.sh setup failed:\n{(res.stdout + res.stderr)[-6000:]}")
        yield setup
    finally:
        setup.teardown()
        cluster.kubectl("delete", "namespace", namespace, "--ignore-not-found", "--wait=false", check=False)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as res:
            return bool(res.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def minio_port_forward(cluster: DevCluster) -> Iterator[str]:
    """`kubectl port-forward svc/minio` (as the script does) for as long as the block runs; yields the endpoint."""
    port = free_port()
    proc = subprocess.Popen(
        [
            str(cluster.binaries.kubectl),
            f"--kubeconfig={cluster.kubeconfig}",
            "-n",
            MINIO_NAMESPACE,
            "port-forward",
            "svc/minio",
            f"{port}:9000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(f"{endpoint}/minio/health/ready"), timeout=60, what="MinIO through port-forward")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)
