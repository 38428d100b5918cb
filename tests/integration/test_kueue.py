"""Kueue's external-framework contract against the real Kueue, without our operator: the test plays the operator.

Each test creates FineTuneJobs (the CRD only; no operator runs) and, for each, the Workload the operator will
create (`finetune_operator.kueue.build_workload`), then does what docs/kueue.md says the job's controller does:
read the admission, declare the job finished, hand the quota back after an eviction, deactivate on suspend.
The ClusterQueue has quota for exactly one job. These tests pin down the contract the operator implements.

The second half runs the real operator (in-process, under its documented RBAC with the Kueue rules, integration
on) against the same Kueue: jobs wait Queued, start where the flavor says, are preempted and resume. Pods run on a
kwok node (kwok reports pods Running, `end_pod` ends them), labelled and tainted like the flavor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import secrets
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from finetune_operator import builders, names, rbac
from finetune_operator import kueue as kq
from finetune_operator.settings import Settings
from finetune_trainer import spec as ftspec
from kubernetes import client as k8s

from devcluster import DevCluster
from devcluster.kube import call_json
from devcluster.kueue import Kueue
from devcluster.testing import wait_crd_established, wait_for
from tests.e2e.operator_harness import (
    CRD,
    Jobs,
    OperatorHandle,
    add_simulated_node,
    grant_documented_rbac,
    job_manifest,
    operator_settings,
    start_operator,
)

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
FLAVOR_LABEL = "finetune.dev/test-flavor"
FLAVOR_TOLERATION = {"key": "finetune.dev/reserved", "operator": "Exists", "effect": "NoSchedule"}


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


@contextlib.contextmanager
def make_queue(
    cluster: DevCluster, namespace: str, *, quota: dict[str, str], labelled_flavor: bool = True
) -> Iterator[Queue]:
    """A ResourceFlavor (a node label + a toleration for a taint, unless `labelled_flavor` is False: any node), a
    ClusterQueue with `quota`, a LocalQueue. The FineTuneJob CRD must be installed (`install_crd`)."""
    suffix = secrets.token_hex(3)
    flavor, cq = f"ft-flavor-{suffix}", f"ft-cq-{suffix}"
    api = cluster.api()
    placement = {"nodeLabels": {FLAVOR_LABEL: flavor}, "tolerations": [FLAVOR_TOLERATION]}
    _cluster_object(api, "resourceflavors", {
        "apiVersion": kq.API_VERSION, "kind": "ResourceFlavor", "metadata": {"name": flavor},
        "spec": placement if labelled_flavor else {},
    })  # fmt: skip
    _cluster_object(api, "clusterqueues", {
        "apiVersion": kq.API_VERSION, "kind": "ClusterQueue", "metadata": {"name": cq},
        "spec": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "resourceGroups": [{
                "coveredResources": list(quota),
                "flavors": [{"name": flavor, "resources": [{"name": r, "nominalQuota": q} for r, q in quota.items()]}],
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


@pytest.fixture
def queue(cluster: DevCluster, kueue: Kueue, namespace: str) -> Iterator[Queue]:
    install_crd(cluster)
    with make_queue(cluster, namespace, quota=QUOTA) as q:
        yield q


def priority_classes(q: Queue, **values: int) -> dict[str, str]:
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
    assert workers.node_selector == {FLAVOR_LABEL: queue.flavor}
    assert workers.tolerations == (FLAVOR_TOLERATION,)
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
    classes = priority_classes(queue, low=100, high=1000)
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


# ---------------------------------------------------------------------------------------------------------------
# The operator against the real Kueue
# ---------------------------------------------------------------------------------------------------------------

# Head 1 CPU / 1Gi + one CPU worker 1 CPU / 1Gi: 2 CPU and 2Gi per job; the queue has room for one.
SMALL = {
    "workers": 1, "gpusPerWorker": 0, "cpusPerWorker": "1", "memoryPerWorker": "1Gi",
    "head": {"cpu": "1", "memory": "1Gi"},
}  # fmt: skip
SMALL_QUOTA = {"cpu": "3", "memory": "3Gi"}


@dataclasses.dataclass
class Queued:
    queue: Queue
    jobs: Jobs
    operator: OperatorHandle

    def submit(
        self, name: str, *, priority: str | None = None, label: bool = True, resources: dict[str, Any] = SMALL
    ) -> None:
        manifest = job_manifest(name, resources=resources)
        labels = {kq.QUEUE_LABEL: self.queue.local_queue} if label else {}
        if priority:
            labels[kq.PRIORITY_CLASS_LABEL] = priority
        manifest["metadata"]["labels"] = labels
        self.jobs.create(manifest)

    def workload(self, job: str) -> str:
        uid = (self.jobs.get(job) or {})["metadata"]["uid"]
        return kq.workload_name(names.JobIdentity(name=job, namespace=self.queue.namespace, uid=uid))

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.operator.settings.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=5).read().decode()


def _grant_kueue_rbac(cluster: DevCluster, namespace: str) -> str:
    """The Workload Role in the namespace and the cluster-scoped reads (a ClusterRole named for the namespace)."""
    role = rbac.kueue_role(namespace)
    reads = rbac.kueue_cluster_role(f"{rbac.KUEUE_ROLE}-{namespace}", namespaced=True)
    docs = [role, rbac.binding(role=role, namespace=namespace), reads, rbac.binding(role=reads, namespace=namespace)]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    return str(reads["metadata"]["name"])


@pytest.fixture
def queued(cluster: DevCluster, kueue: Kueue, namespace: str) -> Iterator[Queued]:
    install_crd(cluster)
    with contextlib.ExitStack() as stack:
        q = stack.enter_context(make_queue(cluster, namespace, quota=SMALL_QUOTA))
        node = contextlib.contextmanager(add_simulated_node)(
            cluster, cpu="16", memory="64Gi", labels={FLAVOR_LABEL: q.flavor},
            taints=({"key": "finetune.dev/reserved", "value": "true", "effect": "NoSchedule"},),
        )  # fmt: skip
        stack.enter_context(node)
        kubeconfig = grant_documented_rbac(cluster, namespace)
        reads = _grant_kueue_rbac(cluster, namespace)
        handle = start_operator(operator_settings(namespace, kubeconfig, kueue_enabled=True))
        try:
            yield Queued(queue=q, jobs=Jobs(cluster, namespace), operator=handle)
        finally:
            assert handle.stop_and_wait() == 0
            cluster.kubectl("delete", "clusterrole,clusterrolebinding", reads, "--ignore-not-found")


def _pod_sets(pods: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {n: p["metadata"]["labels"].get(kq.POD_SET_LABEL, "") for n, p in pods.items()}


def test_operator_queues_the_second_job_until_the_first_succeeds(cluster: DevCluster, queued: Queued) -> None:
    jobs, namespace = queued.jobs, queued.queue.namespace
    queued.submit("first")
    pods = jobs.wait_running_pods("first", 2, attempt=1)
    running = jobs.wait_phase("first", "Running")
    assert running["queue"]["admitted"] is True and running["queue"]["clusterQueue"] == queued.queue.cluster_queue
    # The flavor's node label and toleration are on every pod (the node is tainted: without it, no scheduling).
    for pod in pods.values():
        assert pod["spec"]["nodeSelector"][FLAVOR_LABEL] == queued.queue.flavor
        assert FLAVOR_TOLERATION in pod["spec"]["tolerations"]
    assert sorted(_pod_sets(pods).values()) == ["head", "workers"]

    queued.submit("second")
    waiting = jobs.wait_phase("second", "Queued")
    waiting = wait_for(
        lambda: (s := jobs.status("second")).get("reason") == "Pending" and s,
        timeout=WAIT, what="second job waits with Kueue's reason",
    )  # fmt: skip
    assert "insufficient unused quota" in waiting["message"], waiting["message"]
    assert waiting["queue"] == {**waiting["queue"], "name": queued.queue.local_queue, "admitted": False}
    assert not jobs.pods("second")
    header, row = cluster.kubectl("get", "ftj", "-n", namespace, "second").stdout.splitlines()
    assert "QUEUE" in header.split() and queued.queue.local_queue in row.split(), (header, row)

    cluster.end_pod(namespace, "first-a1-head", exit_code=0)
    jobs.wait_phase("first", "Succeeded")
    queued.queue.wait_state(queued.workload("first"), kq.WorkloadState.FINISHED)  # written right after the status
    jobs.wait_running_pods("second", 2, attempt=1)
    started = jobs.wait_phase("second", "Running")
    assert started["attempt"] == 1 and started["queue"]["admitted"] is True
    assert "finetune_job_queued_seconds_count 2.0" in queued.metrics()


def test_operator_preemption_suspends_the_job_and_readmission_resumes_it(queued: Queued, cluster: DevCluster) -> None:
    jobs, namespace = queued.jobs, queued.queue.namespace
    classes = priority_classes(queued.queue, low=100, high=1000)
    queued.submit("low", priority=classes["low"])
    jobs.wait_running_pods("low", 2, attempt=1)
    jobs.wait_phase("low", "Running")

    queued.submit("high", priority=classes["high"])
    preempted = jobs.wait_phase("low", "Queued")
    assert preempted["reason"] == "Preempted" and "InClusterQueue" in preempted["message"], preempted["message"]
    jobs.wait_no_pods("low")
    jobs.wait_running_pods("high", 2, attempt=1)
    assert jobs.status("low")["attempts"][-1]["reason"] == "Preempted"

    cluster.end_pod(namespace, "high-a1-head", exit_code=0)
    jobs.wait_phase("high", "Succeeded")
    jobs.wait_running_pods("low", 2, attempt=2)
    resumed = jobs.wait_phase("low", "Running")
    assert resumed["attempt"] == 2 and resumed["failedAttempts"] == 0
    assert ("Preempted" in {r for r, _ in jobs.events("low")}) and ("Resumed" in {r for r, _ in jobs.events("low")})
    cluster.end_pod(namespace, "low-a2-head", exit_code=0)
    jobs.wait_phase("low", "Succeeded")


def test_operator_leaves_a_job_without_the_label_alone(queued: Queued) -> None:
    jobs = queued.jobs
    # Tolerates the flavor's taint (the only node here carries it); no queue label: Kueue never hears of it.
    queued.submit("plain", label=False, resources={**SMALL, "tolerations": [FLAVOR_TOLERATION]})
    jobs.wait_running_pods("plain", 2, attempt=1)
    status = jobs.wait_phase("plain", "Running")
    assert "queue" not in status
    workloads = call_json(
        queued.queue.custom.list_namespaced_custom_object, kq.GROUP, kq.VERSION, queued.queue.namespace,
        kq.WORKLOAD_PLURAL,
    )["items"]  # fmt: skip
    assert workloads == []


def test_operator_users_suspend_wins_and_frees_the_quota(queued: Queued, cluster: DevCluster) -> None:
    jobs, namespace = queued.jobs, queued.queue.namespace
    queued.submit("paused")
    jobs.wait_running_pods("paused", 2, attempt=1)
    jobs.wait_phase("paused", "Running")
    workload = queued.workload("paused")

    jobs.patch("paused", {"suspend": True})
    jobs.wait_phase("paused", "Suspended")
    jobs.wait_no_pods("paused")
    assert queued.queue.get_workload(workload)["spec"]["active"] is False
    # Kueue evicts the inactive Workload, the operator hands its quota back: another job is admitted meanwhile.
    queued.submit("meanwhile")
    jobs.wait_running_pods("meanwhile", 2, attempt=1)
    assert jobs.status("paused")["phase"] == "Suspended"  # Kueue's eviction never overrides the user's suspend

    jobs.patch("paused", {"suspend": False})
    waiting = jobs.wait_phase("paused", "Queued")  # active again, but the quota is taken
    assert waiting["queue"]["admitted"] is False
    assert not jobs.pods("paused")
    cluster.end_pod(namespace, "meanwhile-a1-head", exit_code=0)
    jobs.wait_running_pods("paused", 2, attempt=2)
    resumed = jobs.wait_phase("paused", "Running")
    assert resumed["attempt"] == 2 and resumed["failedAttempts"] == 0
