"""The quick start as users run it, on the dev cluster's real node: `hack/kind-demo.sh demo` itself.

Why the script and not a copy of its steps: the kind quick start and this test must not drift, so the test runs
the very `demo` step `make kind-demo` runs, pointed at the real node (KUBE_CONTEXT="" + KUBECONFIG) and at images
built from this repository (buildah, imported into the node's containerd). Everything is real: MinIO is a pod
(images/minio), the chart goes in with `helm upgrade --install` (operator image, two replicas, leader election),
the SST-2 subset is uploaded through `kubectl port-forward`, the Ray head and workers are containers of the trainer
image under the restricted security context (non-root, read-only root filesystem, emptyDirs for Ray's temp dir and
caches, a memory-backed /dev/shm, no service-account token), and the script ends with `kubectl wait
--for=condition=Succeeded` and `demo_s3.py verify` (every file of the manifest, size and sha256).

Test-sized, not the kind job verbatim: the same examples/quickstart-kind.yaml (the real all-MiniLM-L6-v2 from the
image's seeded cache, LoRA, two workers) with 64 training rows, short sequences and CPU requests that fit the
node's two cores next to the operator, MinIO and CoreDNS.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

import devcluster
from devcluster import quickstart
from devcluster.kube import call_json
from devcluster.testing import wait_for
from tests.e2e.operator_harness import Jobs

pytestmark = [pytest.mark.realnode, pytest.mark.ray, pytest.mark.slow]

JOB = quickstart.JOB
DEMO_TIMEOUT = 1200


class PodRecorder:
    """Keeps the spec of every Ray pod of the job the moment it is first seen: they are deleted once it finished,
    and the test asserts what the pods that actually ran were given (not a transient status)."""

    def __init__(self, cluster: devcluster.DevCluster, namespace: str) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(cluster, namespace), daemon=True)

    def _run(self, cluster: devcluster.DevCluster, namespace: str) -> None:
        with cluster.api() as api:
            core = k8s.CoreV1Api(api)
            while not self._stop.wait(1.0):
                listed = call_json(core.list_namespaced_pod, namespace, label_selector=f"finetune.dev/job={JOB}")
                for pod in listed["items"]:
                    self.pods.setdefault(pod["metadata"]["name"], pod)

    def __enter__(self) -> PodRecorder:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture
def demo(real_cluster: devcluster.DevCluster, real_namespace: str, tmp_path: Path) -> Iterator[quickstart.Quickstart]:
    run = quickstart.Quickstart.for_cluster(real_cluster, job_namespace=real_namespace, work_dir=tmp_path)
    try:
        yield run
    finally:
        run.teardown()


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["spec"]["containers"]
    result: dict[str, Any] = container
    return result


@pytest.mark.timeout(DEMO_TIMEOUT + 900)  # + the first import of the ~7 GB trainer image into containerd
def test_kind_quick_start_succeeds_on_the_real_node_under_the_restricted_security_context(
    real_cluster: devcluster.DevCluster, real_namespace: str, demo: quickstart.Quickstart
) -> None:
    with PodRecorder(real_cluster, real_namespace) as ray_pods:
        res = demo.run("demo", timeout=DEMO_TIMEOUT)
    output = res.stdout + res.stderr
    print(output[-8000:])
    assert res.returncode == 0, f"hack/kind-demo.sh demo failed ({res.returncode}):\n{output[-6000:]}"
    assert "verified:" in output
    # Step 7 of the script: the in-cluster Prometheus found the operator's metrics endpoint and scraped the job's series
    # from its head pod while it ran (kept in its TSDB: max_over_time over the last hour, not a live value).
    seen = dict(re.findall(r"prometheus: (.+?) = (\S+)", output))
    assert float(seen['count(up{job="finetune-operator"} == 1)']) >= 1, seen
    step = next(float(v) for q, v in seen.items() if q.startswith("max_over_time(finetune_trainer_step"))
    loss = next(float(v) for q, v in seen.items() if q.startswith("max_over_time(finetune_trainer_loss"))
    assert step >= 1 and loss > 0, seen

    ftj = yaml.safe_load(real_cluster.kubectl("-n", real_namespace, "get", "ftj", JOB, "-o", "yaml").stdout)
    status = ftj["status"]
    assert status["phase"] == "Succeeded"
    assert status["artifacts"]["model"].startswith(f"s3://models/{JOB}/")
    assert status["artifacts"]["manifest"] == f"s3://models/{JOB}/manifest.json", status["artifacts"]
    # The listing `verify` printed: the LoRA adapter next to the merged model, and Ray Train's checkpoints.
    for prefix in ("adapter/", "checkpoints/"):
        assert f"s3://models/{JOB}/{prefix}" in output, f"no {prefix} in the artifact listing"
    # What the status and the Events keep of the run (not what a poll happened to see): one attempt that ended
    # Succeeded, a timeline in order, and an Event for every phase the job went through.
    assert [a["reason"] for a in status["attempts"]] == ["Succeeded"], status["attempts"]
    timeline = status["timeline"]
    assert timeline["created"] <= timeline["scheduled"] <= timeline["finished"], timeline
    events = {reason for reason, _ in Jobs(real_cluster, real_namespace).events(JOB)}
    assert {"Pending", "Running", "Succeeded"} <= events, events

    # The Ray pods that ran: a head and two workers, each under the restricted security context.
    roles = sorted(p["metadata"]["labels"].get("finetune.dev/role", "") for p in ray_pods.pods.values())
    assert roles == ["head", "worker", "worker"], roles
    for pod in ray_pods.pods.values():
        spec, container = pod["spec"], _container(pod)
        assert spec["automountServiceAccountToken"] is False
        assert not any(v.get("projected") for v in spec["volumes"]), "a service-account token was mounted"
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["runAsNonRoot"] is True and security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"

    # Two operator replicas, restricted too; exactly one holds the leader Lease.
    operator_ns = demo.operator_namespace
    with real_cluster.api() as api:
        pods = call_json(k8s.CoreV1Api(api).list_namespaced_pod, operator_ns)["items"]
        names = {p["metadata"]["name"] for p in pods if p["status"]["phase"] == "Running"}
        assert len(names) == 2, names
        for pod in pods:
            assert _container(pod)["securityContext"]["readOnlyRootFilesystem"] is True
        leases = call_json(k8s.CoordinationV1Api(api).list_namespaced_lease, operator_ns)["items"]
        holders = [lease["spec"].get("holderIdentity") for lease in leases]
        assert len(holders) == 1 and holders[0] in names, (holders, names)

    # Nothing of the job's Ray cluster is left once it finished.
    def no_children() -> bool:
        left = real_cluster.kubectl(
            "-n", real_namespace, "get", "pods,services,configmaps", "-l", f"finetune.dev/job={JOB}", "-o", "name"
        ).stdout
        return not left.strip()

    wait_for(no_children, timeout=120, what=f"the Ray cluster of {JOB} deleted")
