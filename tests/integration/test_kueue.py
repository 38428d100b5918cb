"""Kueue's external-framework contract against the real Kueue, without our operator: the test plays the operator.

Each test creates FineTuneJobs (the CRD only; no operator runs) and, for each, the Workload the operator will
create (`finetune_operator.kq.build_workload`), then does what docs/kq.md says the job's controller does:
read the admission, declare the job finished, hand the quota back after an eviction, deactivate on suspend.
The ClusterQueue has quota for exactly one job. These tests pin down the contract phase 2 builds on.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from finetune_operator import builders, names
from finetune_operator import kueue as kq
from finetune_operator.settings import Settings
from finetune_trainer import spec as ftspec
from kubernetes import client as k8s

from devcluster import DevCluster
from devcluster.kube import call_json
from devcluster.kueue import Kueue
from devcluster.testing import wait_crd_established, wait_for
from tests.e2e.operator_harness import CRD

pytestmark = [pytest.mark.cluster, pytest.mark.kueue]


def install_crd(cluster: DevCluster) -> None:
    """The FineTuneJob CRD (operator_harness.install_crd polls with a jsonpath that errors before the first
    condition exists, so this waits with wait_crd_established instead)."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=kueue-test", "-f", str(CRD))
    with cluster.api() as api:
        wait_crd_established(api, f"{names.PLURAL}.{names.GROUP}")


SETTINGS = Settings(trainer_image="registry.local/trainer:test", identity="kueue-test")
# Head 1 CPU / 2Gi + one worker 4 CPU / 16Gi / 1 GPU: 5 CPU, 18Gi, 1 GPU per job. The queue has room for one.
JOB_SPEC: dict[str, Any] = {
    "model": {"uri": "hf://org/model"},
    "dataset": {"train": "s3://data/train.csv"},
    "output": {"uri": "s3://models/out/"},
    "resources": {
        "workers": 1,
        "gpusPerWorker": 1,
        "cpusPerWorker": "4",
        "memoryPerWorker": "16Gi",
        "head": {"cpu": "1", "memory": "2Gi"},
    },
}
QUOTA = {"cpu": "6", "memory": "20Gi", "nvidia.com/gpu": "1"}
WAIT = 60.0


@dataclasses.dataclass
class Queue:
    """One ResourceFlavor + ClusterQueue (quota for one job, preemption of lower priority) + LocalQueue."""

    api: k8s.ApiClient
    namespace: str
    flavor: str
    cluster_queue: str
    local_queue: str = "team"
    cleanup: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # more cluster-scoped objects

    @property
    def custom(self) -> k8s.CustomObjectsApi:
        return k8s.CustomObjectsApi(self.api)

    def get_workload(self, name: str, *, version: str = kq.VERSION) -> dict[str, Any]:
        return call_json(
            self.custom.get_namespaced_custom_object, kq.GROUP, version, self.namespace, kq.WORKLOAD_PLURAL, name
        )

    def admission(self, name: str) -> kq.Admission:
        workload = self.get_workload(name)
        flavors = {
            f: call_json(self.custom.get_cluster_custom_object, kq.GROUP, kq.VERSION, "resourceflavors", f)
            for f in kq.assigned_flavors(workload)
        }
        admission = kq.read_admission(workload, flavors=flavors)
        assert admission is not None
        return admission

    def wait_state(
        self, name: str, state: kq.WorkloadState, *, check: Callable[[kq.Admission], bool] = bool
    ) -> kq.Admission:
        def reached() -> kq.Admission | None:
            admission = self.admission(name)
            return admission if admission.state is state and check(admission) else None

        return wait_for(reached, timeout=WAIT, what=f"workload {name} {state.value}")

    def patch_status(self, name: str, patch: dict[str, Any] | None) -> None:
        assert patch is not None, f"nothing to patch on {name}"
        call_json(
            self.custom.patch_namespaced_custom_object_status,
            kq.GROUP, kq.VERSION, self.namespace, kq.WORKLOAD_PLURAL, name, patch,
        )  # fmt: skip

    def patch_spec(self, name: str, patch: dict[str, Any] | None) -> None:
        assert patch is not None, f"nothing to patch on {name}"
        call_json(
            self.custom.patch_namespaced_custom_object,
            kq.GROUP, kq.VERSION, self.namespace, kq.WORKLOAD_PLURAL, name, patch,
        )  # fmt: skip

    def submit(self, job: str, *, priority: str | None = None) -> str:
        """Create a FineTuneJob and, as the operator will, its Workload; returns the Workload's name."""
        labels = {kq.QUEUE_LABEL: self.local_queue}
        if priority:
            labels[kq.PRIORITY_CLASS_LABEL] = priority
        body = {
            "apiVersion": names.GROUP_VERSION,
            "kind": names.KIND,
            "metadata": {"name": job, "namespace": self.namespace, "labels": labels},
            "spec": JOB_SPEC,
        }
        created = call_json(
            self.custom.create_namespaced_custom_object, names.GROUP, ftspec.API_VERSION, self.namespace, names.PLURAL,
            body,
        )  # fmt: skip
        ident = names.JobIdentity(name=job, namespace=self.namespace, uid=created["metadata"]["uid"])
        spec = builders.resolve_spec(
            ftspec.parse_spec(JOB_SPEC), defaults=builders.operator_defaults(SETTINGS), ident=ident
        )
        workload = kq.build_workload(
            spec,
            settings=SETTINGS,
            ident=ident,
            queue=str(kq.queue_name(labels)),
            priority=self._priority(kq.priority_source(labels, spec)),
        )
        call_json(
            self.custom.create_namespaced_custom_object, kq.GROUP, kq.VERSION, self.namespace,
            kq.WORKLOAD_PLURAL, workload,
        )  # fmt: skip
        return str(workload["metadata"]["name"])

    def _priority(self, source: tuple[kq.PriorityKind, str] | None) -> kq.Priority | None:
        if source is None:
            return None
        kind, name = source
        assert kind is kq.PriorityKind.WORKLOAD_PRIORITY_CLASS
        wpc = call_json(self.custom.get_cluster_custom_object, kq.GROUP, kq.VERSION, "workloadpriorityclasses", name)
        return kq.Priority(kind, name, int(wpc["value"]))


def _cluster_object(api: k8s.ApiClient, plural: str, body: dict[str, Any]) -> None:
    call_json(k8s.CustomObjectsApi(api).create_cluster_custom_object, kq.GROUP, kq.VERSION, plural, body)


def _delete_cluster_objects(api: k8s.ApiClient, objects: list[tuple[str, str]]) -> None:
    """Delete and wait until gone: ClusterQueues and ResourceFlavors carry Kueue finalizers Kueue must remove."""
    custom = k8s.CustomObjectsApi(api)
    for plural, name in objects:
        try:
            custom.delete_cluster_custom_object(kq.GROUP, kq.VERSION, plural, name)
        except k8s.ApiException as e:
            if e.status != 404:
                raise
    for plural, name in objects:

        def gone(plural: str = plural, name: str = name) -> bool:
            try:
                custom.get_cluster_custom_object(kq.GROUP, kq.VERSION, plural, name)
            except k8s.ApiException as e:
                return bool(e.status == 404)
            return False

        wait_for(gone, timeout=WAIT, what=f"{plural}/{name} deleted (Kueue removes its finalizer)")


@pytest.fixture
def queue(cluster: DevCluster, kueue: Kueue, namespace: str) -> Iterator[Queue]:
    install_crd(cluster)
    suffix = secrets.token_hex(3)
    flavor, cq = f"ft-flavor-{suffix}", f"ft-cq-{suffix}"
    api = cluster.api()
    _cluster_object(api, "resourceflavors", {
        "apiVersion": kq.API_VERSION, "kind": "ResourceFlavor", "metadata": {"name": flavor},
        "spec": {"nodeLabels": {"finetune.dev/test-flavor": flavor},
                 "tolerations": [{"key": "finetune.dev/reserved", "operator": "Exists", "effect": "NoSchedule"}]},
    })  # fmt: skip
    _cluster_object(api, "clusterqueues", {
        "apiVersion": kq.API_VERSION, "kind": "ClusterQueue", "metadata": {"name": cq},
        "spec": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "resourceGroups": [{
                "coveredResources": list(QUOTA),
                "flavors": [{"name": flavor, "resources": [{"name": r, "nominalQuota": q} for r, q in QUOTA.items()]}],
            }],
            "preemption": {"withinClusterQueue": "LowerPriority"},
        },
    })  # fmt: skip
    q = Queue(api=api, namespace=namespace, flavor=flavor, cluster_queue=cq)
    call_json(
        q.custom.create_namespaced_custom_object, kq.GROUP, kq.VERSION, namespace, "localqueues",
        {"apiVersion": kq.API_VERSION, "kind": "LocalQueue", "metadata": {"name": q.local_queue},
         "spec": {"clusterQueue": cq}},
    )  # fmt: skip
    try:
        yield q
    finally:
        for workload in call_json(
            q.custom.list_namespaced_custom_object, kq.GROUP, kq.VERSION, namespace, kq.WORKLOAD_PLURAL
        ).get("items", []):
            q.custom.delete_namespaced_custom_object(
                kq.GROUP, kq.VERSION, namespace, kq.WORKLOAD_PLURAL, workload["metadata"]["name"]
            )
        _delete_cluster_objects(api, [*q.cleanup, ("clusterqueues", cq), ("resourceflavors", flavor)])
        api.close()  # type: ignore[no-untyped-call]


def _priority_classes(q: Queue, **values: int) -> dict[str, str]:
    """WorkloadPriorityClasses with unique names (cluster-scoped); deleted with the queue."""
    suffix = secrets.token_hex(3)
    names_by_role = {}
    for role, value in values.items():
        name = f"ft-{role}-{suffix}"
        _cluster_object(q.api, "workloadpriorityclasses", {
            "apiVersion": kq.API_VERSION, "kind": "WorkloadPriorityClass", "metadata": {"name": name}, "value": value,
        })  # fmt: skip
        q.cleanup.append(("workloadpriorityclasses", name))
        names_by_role[role] = name
    return names_by_role


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_quota_for_one_admits_one_and_the_next_when_the_first_finishes(queue: Queue) -> None:
    first = queue.submit("first")
    admitted = queue.wait_state(first, kq.WorkloadState.ADMITTED)
    assert admitted.cluster_queue == queue.cluster_queue
    workers = admitted.placements[kq.POD_SET_WORKERS]
    assert workers.count == 1
    assert workers.node_selector == {"finetune.dev/test-flavor": queue.flavor}
    assert workers.tolerations == ({"key": "finetune.dev/reserved", "operator": "Exists", "effect": "NoSchedule"},)
    assert workers.labels[kq.CLUSTER_QUEUE_POD_LABEL] == queue.cluster_queue
    assert admitted.placements[kq.POD_SET_HEAD].count == 1

    second = queue.submit("second")
    # Kueue's scheduler has looked at it and says why it waits: the GPU (and CPU) quota is in use.
    waiting = queue.wait_state(
        second, kq.WorkloadState.QUEUED, check=lambda a: a.waiting_reason == "Pending" and bool(a.waiting_message)
    )
    assert "insufficient unused quota" in str(waiting.waiting_message), waiting.waiting_message
    assert queue.admission(first).state is kq.WorkloadState.ADMITTED

    queue.patch_status(first, kq.finish_patch(queue.get_workload(first), succeeded=True, message="done", now=_now()))
    queue.wait_state(second, kq.WorkloadState.ADMITTED)
    assert queue.admission(first).state is kq.WorkloadState.FINISHED


def test_conversion_webhook_serves_the_older_api_version(queue: Queue) -> None:
    name = queue.submit("convert")
    queue.wait_state(name, kq.WorkloadState.ADMITTED)
    old = queue.get_workload(name, version="v1beta1")
    assert old["apiVersion"] == "kueue.x-k8s.io/v1beta1"
    assert old["status"]["admission"]["clusterQueue"] == queue.cluster_queue


def test_deleting_the_job_frees_its_quota(queue: Queue) -> None:
    """No finalizer on our Workloads: deleting the FineTuneJob lets the garbage collector delete the Workload."""
    first = queue.submit("gone")
    queue.wait_state(first, kq.WorkloadState.ADMITTED)
    second = queue.submit("next")
    queue.wait_state(second, kq.WorkloadState.QUEUED, check=lambda a: a.waiting_reason == "Pending")
    queue.custom.delete_namespaced_custom_object(names.GROUP, ftspec.API_VERSION, queue.namespace, names.PLURAL, "gone")
    queue.wait_state(second, kq.WorkloadState.ADMITTED)


def test_higher_priority_preempts_and_the_victim_is_readmitted_after_release(queue: Queue) -> None:
    classes = _priority_classes(queue, low=100, high=1000)
    low = queue.submit("low", priority=classes["low"])
    queue.wait_state(low, kq.WorkloadState.ADMITTED)
    assert queue.get_workload(low)["spec"]["priority"] == 100

    high = queue.submit("high", priority=classes["high"])
    evicted = queue.wait_state(low, kq.WorkloadState.EVICTED)
    assert evicted.eviction is not None
    assert (evicted.eviction.reason, evicted.eviction.preemption_reason) == ("Preempted", "InClusterQueue")
    # Kueue waits for the owner: the quota stays with the victim until the job has stopped and released it.
    assert queue.admission(high).state is kq.WorkloadState.QUEUED
    assert queue.admission(low).quota_reserved

    queue.patch_status(low, kq.release_quota_patch(queue.get_workload(low), now=_now()))
    queue.wait_state(high, kq.WorkloadState.ADMITTED)
    requeued = queue.admission(low)
    assert requeued.state is kq.WorkloadState.QUEUED and requeued.eviction is not None
    conditions = {c["type"]: c for c in queue.get_workload(low)["status"]["conditions"]}
    assert (conditions["Requeued"]["status"], conditions["Requeued"]["reason"]) == ("True", "Preempted")

    queue.patch_status(high, kq.finish_patch(queue.get_workload(high), succeeded=True, message="", now=_now()))
    readmitted = queue.wait_state(low, kq.WorkloadState.ADMITTED)
    assert readmitted.eviction is None  # Kueue resets Evicted when it reserves quota again


def test_deactivation_is_how_the_users_suspend_reaches_kueue(queue: Queue) -> None:
    name = queue.submit("paused")
    queue.wait_state(name, kq.WorkloadState.ADMITTED)
    queue.patch_spec(name, kq.active_patch(queue.get_workload(name), active=False))
    evicted = queue.wait_state(name, kq.WorkloadState.EVICTED)
    assert evicted.eviction is not None and evicted.eviction.reason == "Deactivated"
    assert not evicted.active

    queue.patch_status(name, kq.release_quota_patch(queue.get_workload(name), now=_now()))
    other = queue.submit("meanwhile")
    queue.wait_state(other, kq.WorkloadState.ADMITTED)  # the suspended job's quota is free
    queue.patch_status(other, kq.finish_patch(queue.get_workload(other), succeeded=True, message="", now=_now()))

    queue.patch_spec(name, kq.active_patch(queue.get_workload(name), active=True))
    queue.wait_state(name, kq.WorkloadState.ADMITTED)
