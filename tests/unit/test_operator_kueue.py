"""Kueue's external-framework contract, pure side: the Workload we build and how we read Kueue's answer."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from finetune_operator import builders, kueue, names
from finetune_operator.settings import Settings
from finetune_trainer import spec as ftspec

IDENT = names.JobIdentity(name="sst2", namespace="team-a", uid="0123abcd-0000-1111-2222-333344445555", attempt=3)
SETTINGS = Settings(trainer_image="registry/trainer:1", output_base_uri="s3://models/", identity="test")
BASE: dict[str, Any] = {"model": {"uri": "hf://org/model"}, "dataset": {"train": "s3://data/train.csv"}}
NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _spec(**overrides: Any) -> ftspec.FineTuneJobSpec:
    return builders.resolve_spec(
        ftspec.parse_spec({**BASE, **overrides}), defaults=builders.operator_defaults(SETTINGS), ident=IDENT
    )


# ---- labels, names, priority --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (None, None),
        ({}, None),
        ({"app": "x"}, None),
        ({kueue.QUEUE_LABEL: ""}, None),
        ({kueue.QUEUE_LABEL: " team-a-queue "}, "team-a-queue"),
    ],
)
def test_queue_name(labels: dict[str, str] | None, expected: str | None) -> None:
    assert kueue.queue_name(labels) == expected


@pytest.mark.parametrize(
    ("labels", "resources", "expected"),
    [
        ({}, {}, None),
        ({}, {"priorityClassName": "high"}, (kueue.PriorityKind.PRIORITY_CLASS, "high")),
        (
            {kueue.PRIORITY_CLASS_LABEL: "prod"},
            {"priorityClassName": "high"},
            (kueue.PriorityKind.WORKLOAD_PRIORITY_CLASS, "prod"),
        ),
        ({kueue.PRIORITY_CLASS_LABEL: " "}, {}, None),
    ],
)
def test_priority_source_label_wins_over_pod_priority_class(
    labels: dict[str, str], resources: dict[str, Any], expected: tuple[kueue.PriorityKind, str] | None
) -> None:
    assert kueue.priority_source(labels, _spec(resources=resources)) == expected


def test_priority_ref_names_the_right_api_group() -> None:
    assert kueue.Priority(kueue.PriorityKind.WORKLOAD_PRIORITY_CLASS, "prod", 1000).ref() == {
        "group": "kueue.x-k8s.io",
        "kind": "WorkloadPriorityClass",
        "name": "prod",
    }
    assert kueue.Priority(kueue.PriorityKind.PRIORITY_CLASS, "high", 10).ref()["group"] == "scheduling.k8s.io"


def test_external_framework_name_is_kind_version_group() -> None:
    assert kueue.EXTERNAL_FRAMEWORK == "FineTuneJob.v1alpha1.finetune.dev"


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        ("sst2", "finetunejob-sst2-62d9a"),
        # Kueue's long form is finetunejob-a-rather-long-job-name-that-needs-truncation-for-kueue-workloads-418d1;
        # the short form (ShortWorkloadNames, always used here) cuts the prefix to 57 characters, same hash.
        (
            "a-rather-long-job-name-that-needs-truncation-for-kueue-workloads",
            "finetunejob-a-rather-long-job-name-that-needs-truncation--418d1",
        ),
    ],
)
def test_workload_name_matches_kueues_own_function(job: str, expected: str) -> None:
    """Expected values printed by sigs.k8s.io/kueue@v0.17.0 jobframework.GetWorkloadNameForOwnerWithGVK for
    FineTuneJob.v1alpha1.finetune.dev and IDENT's uid (a 10-line `go run` program, see docs/kueue.md)."""
    assert kueue.workload_name(dataclasses.replace(IDENT, name=job)) == expected


@pytest.mark.parametrize("length", [1, 45, 51, 52, 63, 115, 253])
def test_workload_name_is_stable_short_and_unique_per_uid(length: int) -> None:
    ident = dataclasses.replace(IDENT, name="j" * length)
    name = kueue.workload_name(ident)
    assert len(name) <= 63
    assert name.startswith("finetunejob-j")
    assert name == kueue.workload_name(dataclasses.replace(ident, attempt=9))  # one Workload for every attempt
    assert name != kueue.workload_name(dataclasses.replace(ident, uid="ffffffff-0000-1111-2222-333344445555"))


# ---- the Workload ------------------------------------------------------------------------------------------


def _pod_set(workload: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(p for p in workload["spec"]["podSets"] if p["name"] == name)
    return found


def _build(spec: ftspec.FineTuneJobSpec, priority: kueue.Priority | None = None, **kw: Any) -> dict[str, Any]:
    return kueue.build_workload(spec, settings=SETTINGS, ident=IDENT, queue="q", priority=priority, **kw)


@dataclasses.dataclass(frozen=True)
class BuildCase:
    name: str
    resources: dict[str, Any]
    check: Callable[[dict[str, Any]], None]


def _gpu_workers(wl: dict[str, Any]) -> None:
    workers = _pod_set(wl, "workers")
    assert workers["count"] == 3
    assert workers["template"]["spec"]["containers"][0]["resources"]["requests"] == {
        "cpu": "4",
        "memory": "16Gi",
        "nvidia.com/gpu": "2",
    }
    assert GPU_TOLERATION in workers["template"]["spec"]["tolerations"]
    head = _pod_set(wl, "head")
    assert head["count"] == 1
    assert head["template"]["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}
    assert "tolerations" not in head["template"]["spec"]


def _cpu_only(wl: dict[str, Any]) -> None:
    for pod_set in wl["spec"]["podSets"]:
        requests = pod_set["template"]["spec"]["containers"][0]["resources"]["requests"]
        assert "nvidia.com/gpu" not in requests
        assert "tolerations" not in pod_set["template"]["spec"]
    assert _pod_set(wl, "workers")["count"] == 1


def _placement_constraints(wl: dict[str, Any]) -> None:
    for pod_set in wl["spec"]["podSets"]:
        spec = pod_set["template"]["spec"]
        assert spec["nodeSelector"] == {"pool": "a100"}
        assert spec["affinity"] == {"nodeAffinity": {"x": 1}}
        assert spec["priorityClassName"] == "high"
        assert {"key": "dedicated", "operator": "Exists"} in spec["tolerations"]


BUILD_CASES = [
    BuildCase(
        "gpu workers, cpu head",
        {"workers": 3, "gpusPerWorker": 2, "cpusPerWorker": "4", "memoryPerWorker": "16Gi",
         "head": {"cpu": "2", "memory": "8Gi"}},
        _gpu_workers,
    ),
    BuildCase("cpu only", {"cpusPerWorker": "500m", "memoryPerWorker": "1Gi"}, _cpu_only),
    BuildCase(
        "the job's own placement is part of the template",
        {"nodeSelector": {"pool": "a100"}, "affinity": {"nodeAffinity": {"x": 1}}, "priorityClassName": "high",
         "tolerations": [{"key": "dedicated", "operator": "Exists"}]},
        _placement_constraints,
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", BUILD_CASES, ids=lambda c: c.name)
def test_build_workload_pod_sets(case: BuildCase) -> None:
    case.check(_build(_spec(resources=case.resources)))


@pytest.mark.parametrize("resources", [c.resources for c in BUILD_CASES])
def test_pod_set_requests_are_exactly_the_pods_requests(resources: dict[str, Any]) -> None:
    spec = _spec(resources=resources)
    rendered = builders.build_children(spec, settings=SETTINGS, ident=IDENT)
    wl = _build(spec)
    for pod, pod_set in ((rendered.head, "head"), *((w, "workers") for w in rendered.workers)):
        template = _pod_set(wl, pod_set)["template"]["spec"]
        assert template["containers"][0]["resources"] == pod["spec"]["containers"][0]["resources"]
        for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
            assert template.get(key) == pod["spec"].get(key), key


def test_workload_is_owned_by_the_job_without_a_finalizer() -> None:
    wl = _build(_spec(), kueue.Priority(kueue.PriorityKind.WORKLOAD_PRIORITY_CLASS, "prod", 1000))
    meta = wl["metadata"]
    assert (wl["apiVersion"], wl["kind"]) == ("kueue.x-k8s.io/v1beta2", "Workload")
    assert meta["name"] == kueue.workload_name(IDENT)
    assert meta["namespace"] == "team-a"
    assert meta["ownerReferences"] == [builders.owner_reference(IDENT)]
    assert meta["ownerReferences"][0]["controller"] is True
    assert "finalizers" not in meta
    assert meta["labels"][kueue.JOB_UID_LABEL] == IDENT.uid
    assert wl["spec"]["queueName"] == "q"
    assert wl["spec"]["active"] is True
    assert wl["spec"]["priority"] == 1000
    assert wl["spec"]["priorityClassRef"]["kind"] == "WorkloadPriorityClass"


def test_workload_does_not_change_between_attempts() -> None:
    spec = _spec()
    first = kueue.build_workload(spec, settings=SETTINGS, ident=IDENT, queue="q", priority=None)
    later = kueue.build_workload(
        spec, settings=SETTINGS, ident=dataclasses.replace(IDENT, attempt=7), queue="q", priority=None
    )
    assert first == later
    assert "priority" not in first["spec"]


def test_suspended_job_builds_an_inactive_workload() -> None:
    assert _build(_spec(), active=False)["spec"]["active"] is False


# ---- reading the admission ---------------------------------------------------------------------------------


def _cond(kind: str, status: str, reason: str, message: str = "", when: str = "2026-03-01T11:00:00Z") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": when}


FLAVORS = {
    "a100": {"metadata": {"name": "a100"}, "spec": {"nodeLabels": {"gpu": "a100"},
             "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]}},
    "cpu": {"metadata": {"name": "cpu"}, "spec": {"nodeLabels": {"pool": "cpu"}}},
}  # fmt: skip
ADMISSION = {
    "clusterQueue": "gpu-cq",
    "podSetAssignments": [
        {"name": "head", "flavors": {"cpu": "cpu", "memory": "cpu"}, "count": 1},
        {"name": "workers", "flavors": {"cpu": "a100", "memory": "a100", "nvidia.com/gpu": "a100"}, "count": 2},
    ],
}
RESERVED = _cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue gpu-cq")
ADMITTED = _cond("Admitted", "True", "Admitted", "The workload is admitted")


def _workload(*conditions: dict[str, Any], admission: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"conditions": list(conditions), **status}
    if admission is not None:
        body["admission"] = admission
    return {
        "metadata": {"name": "finetunejob-sst2-abcde", "resourceVersion": "42", "generation": 1},
        "spec": {"queueName": "team-a", "podSets": [{"name": "head", "count": 1}, {"name": "workers", "count": 2}]},
        "status": body,
    }


@dataclasses.dataclass(frozen=True)
class ReadCase:
    name: str
    workload: dict[str, Any]
    state: kueue.WorkloadState
    check: Callable[[kueue.Admission], None] = lambda _a: None
    flavors: dict[str, Any] = dataclasses.field(default_factory=lambda: FLAVORS)


def _waiting(a: kueue.Admission) -> None:
    assert a.waiting_reason == "Pending"
    assert a.waiting_message is not None and "insufficient unused quota" in a.waiting_message
    assert a.placements == {} and a.cluster_queue is None and a.eviction is None


def _placed(a: kueue.Admission) -> None:
    assert a.cluster_queue == "gpu-cq" and a.queue == "team-a"
    workers = a.placements["workers"]
    assert workers.count == 2
    assert workers.node_selector == {"gpu": "a100"}
    assert workers.tolerations == ({"key": "gpu", "operator": "Exists", "effect": "NoSchedule"},)
    assert workers.labels == {
        kueue.POD_SET_LABEL: "workers",
        kueue.LOCAL_QUEUE_POD_LABEL: "team-a",
        kueue.CLUSTER_QUEUE_POD_LABEL: "gpu-cq",
    }
    assert a.placements["head"].node_selector == {"pool": "cpu"}
    assert a.placements["head"].tolerations == ()
    assert a.problems == ()


def _missing_flavor(a: kueue.Admission) -> None:
    assert a.problems == ("ResourceFlavor a100 (assigned to pod set workers) not found",)


def _preempted(a: kueue.Admission) -> None:
    assert a.eviction == kueue.Eviction(
        reason="Preempted",
        message="Preempted to accommodate a workload (UID: u) ...",
        preemption_reason="InClusterQueue",
    )


def _released(a: kueue.Admission) -> None:
    assert a.eviction is not None and a.eviction.reason == "Preempted"
    assert not a.quota_reserved and a.placements == {}


def _check_updates(a: kueue.Admission) -> None:
    workers = a.placements["workers"]
    assert workers.node_selector == {"gpu": "a100", "zone": "z1"}
    assert workers.annotations == {"provreq": "x"}
    assert len(workers.tolerations) == 2
    assert a.problems == ()


def _conflict(a: kueue.Admission) -> None:
    assert a.problems == ("admission check: gpu=h100 conflicts with gpu=a100",)


def _long_cluster_queue(a: kueue.Admission) -> None:
    assert kueue.CLUSTER_QUEUE_POD_LABEL not in a.placements["head"].labels


def _inactive(a: kueue.Admission) -> None:
    assert not a.active
    assert a.eviction is not None and a.eviction.reason == "Deactivated"


PREEMPTED = [
    _cond("Evicted", "True", "Preempted", "Preempted to accommodate a workload (UID: u) ..."),
    _cond("Preempted", "True", "InClusterQueue", "Preempted to accommodate a workload (UID: u) ..."),
]
UPDATES = [
    {
        "name": "prov",
        "state": "Ready",
        "podSetUpdates": [
            {"name": "workers", "nodeSelector": {"zone": "z1"}, "annotations": {"provreq": "x"},
             "tolerations": [{"key": "spot", "operator": "Exists"}]},
        ],
    }
]  # fmt: skip
READ_CASES = [
    ReadCase(
        "waiting for quota",
        _workload(
            _cond("QuotaReserved", "False", "Pending", "couldn't assign flavors to pod set workers: insufficient "
                  "unused quota for nvidia.com/gpu in flavor a100, 2 more needed")
        ),
        kueue.WorkloadState.QUEUED,
        _waiting,
    ),
    ReadCase("not seen by Kueue yet", _workload(), kueue.WorkloadState.QUEUED),
    ReadCase("admitted", _workload(RESERVED, ADMITTED, admission=ADMISSION), kueue.WorkloadState.ADMITTED, _placed),
    ReadCase(
        "quota reserved, admission checks pending",
        _workload(RESERVED, _cond("Admitted", "False", "UnsatisfiedChecks"), admission=ADMISSION),
        kueue.WorkloadState.QUEUED,
    ),
    ReadCase(
        "assigned flavor deleted",
        _workload(RESERVED, ADMITTED, admission=ADMISSION),
        kueue.WorkloadState.ADMITTED,
        _missing_flavor,
        flavors={"cpu": FLAVORS["cpu"]},
    ),
    ReadCase(
        "preempted, quota still held",
        _workload(RESERVED, ADMITTED, *PREEMPTED, admission=ADMISSION),
        kueue.WorkloadState.EVICTED,
        _preempted,
    ),
    ReadCase(
        "preempted, quota released",
        _workload(
            _cond("QuotaReserved", "False", "Pending", "Preempted"), _cond("Admitted", "False", "NoReservation"),
            *PREEMPTED, _cond("Requeued", "True", "Preempted"),
        ),
        kueue.WorkloadState.QUEUED,
        _released,
    ),
    ReadCase(
        "readmitted after a preemption",
        _workload(RESERVED, ADMITTED, _cond("Evicted", "False", "QuotaReserved"), admission=ADMISSION),
        kueue.WorkloadState.ADMITTED,
        lambda a: _placed(a) if a.eviction is None else pytest.fail("a reset Evicted condition is no eviction"),
    ),
    ReadCase(
        "finished",
        _workload(RESERVED, ADMITTED, _cond("Finished", "True", "Succeeded"), admission=ADMISSION),
        kueue.WorkloadState.FINISHED,
    ),
    ReadCase(
        "admission check podSetUpdates are merged",
        _workload(RESERVED, ADMITTED, admission=ADMISSION, admissionChecks=UPDATES),
        kueue.WorkloadState.ADMITTED,
        _check_updates,
    ),
    ReadCase(
        "conflicting podSetUpdates are a problem, not a crash",
        _workload(RESERVED, ADMITTED, admission=ADMISSION,
                  admissionChecks=[{"name": "p", "podSetUpdates": [{"name": "workers",
                                                                    "nodeSelector": {"gpu": "h100"}}]}]),
        kueue.WorkloadState.ADMITTED,
        _conflict,
    ),
    ReadCase(
        "cluster queue name that is no label value",
        _workload(RESERVED, ADMITTED, admission={**ADMISSION, "clusterQueue": "gpu.cq"}),
        kueue.WorkloadState.ADMITTED,
        _long_cluster_queue,
    ),
    ReadCase(
        "deactivated (the user's suspend)",
        {**_workload(RESERVED, ADMITTED, _cond("Evicted", "True", "Deactivated", "The workload is deactivated"),
                     admission=ADMISSION), "spec": {"queueName": "team-a", "active": False}},
        kueue.WorkloadState.EVICTED,
        _inactive,
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", READ_CASES, ids=lambda c: c.name)
def test_read_admission(case: ReadCase) -> None:
    admission = kueue.read_admission(case.workload, flavors=case.flavors)
    assert admission is not None
    assert admission.state is case.state
    case.check(admission)


def test_no_workload_is_no_admission() -> None:
    assert kueue.read_admission(None) is None


def test_assigned_flavors() -> None:
    assert kueue.assigned_flavors(_workload(RESERVED, admission=ADMISSION)) == {"a100", "cpu"}
    assert kueue.assigned_flavors(_workload()) == frozenset()
    assert kueue.assigned_flavors(None) == frozenset()


# ---- applying the placement --------------------------------------------------------------------------------

PLACEMENT = kueue.Placement(
    pod_set="workers",
    count=2,
    node_selector={"gpu": "a100"},
    tolerations=({"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}, GPU_TOLERATION),
    labels={kueue.POD_SET_LABEL: "workers"},
    annotations={},
)


def test_apply_placement_merges_without_touching_the_input() -> None:
    pod = builders.build_worker_pod(_spec(resources={"gpusPerWorker": 1}), settings=SETTINGS, ident=IDENT, index=0)
    placed = kueue.apply_placement(pod, PLACEMENT)
    assert placed["spec"]["nodeSelector"] == {"gpu": "a100"}
    assert placed["spec"]["tolerations"].count(GPU_TOLERATION) == 1
    assert {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"} in placed["spec"]["tolerations"]
    assert placed["metadata"]["labels"][kueue.POD_SET_LABEL] == "workers"
    assert placed["metadata"]["labels"][names.LABEL_JOB] == "sst2"
    assert "nodeSelector" not in pod["spec"] and kueue.POD_SET_LABEL not in pod["metadata"]["labels"]


def test_apply_placement_refuses_a_conflicting_node_label() -> None:
    pod = builders.build_worker_pod(
        _spec(resources={"nodeSelector": {"gpu": "h100"}}), settings=SETTINGS, ident=IDENT, index=0
    )
    with pytest.raises(kueue.PlacementError, match=r"spec.resources.nodeSelector\[gpu\]=h100 .*\(gpu=a100\)"):
        kueue.apply_placement(pod, PLACEMENT)


# ---- status patches ----------------------------------------------------------------------------------------


def _by_type(patch: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in patch["status"]["conditions"]}


def test_release_after_preemption_requeues_and_frees_the_quota() -> None:
    wl = _workload(RESERVED, ADMITTED, *PREEMPTED, admission=ADMISSION, accumulatedPastExecutionTimeSeconds=100)
    patch = kueue.release_quota_patch(wl, now=NOW)
    assert patch is not None
    assert patch["metadata"] == {"resourceVersion": "42"}
    assert patch["status"]["admission"] is None
    assert patch["status"]["accumulatedPastExecutionTimeSeconds"] == 100 + 3600
    conditions = _by_type(patch)
    assert conditions["QuotaReserved"] | {} == {
        "type": "QuotaReserved",
        "status": "False",
        "reason": "Pending",
        "message": PREEMPTED[0]["message"],
        "lastTransitionTime": "2026-03-01T12:00:00Z",
        "observedGeneration": 1,
    }
    assert (conditions["Requeued"]["status"], conditions["Requeued"]["reason"]) == ("True", "Preempted")
    assert (conditions["Admitted"]["status"], conditions["Admitted"]["reason"]) == ("False", "NoReservation")
    assert conditions["Evicted"] == PREEMPTED[0] and conditions["Preempted"] == PREEMPTED[1]  # Kueue's, kept


@pytest.mark.parametrize(
    ("reason", "requeued"), [("Preempted", "True"), ("NodeFailures", "True"), ("Deactivated", "False"),
                             ("PodsReadyTimeout", "False"), ("ClusterQueueStopped", "False")]
)  # fmt: skip
def test_release_requeues_at_once_only_after_preemption_or_node_failure(reason: str, requeued: str) -> None:
    wl = _workload(RESERVED, ADMITTED, _cond("Evicted", "True", reason, "m"), admission=ADMISSION)
    patch = kueue.release_quota_patch(wl, now=NOW)
    assert patch is not None
    assert _by_type(patch)["Requeued"]["status"] == requeued


@pytest.mark.parametrize(
    "workload",
    [
        _workload(RESERVED, ADMITTED, admission=ADMISSION),  # not evicted
        _workload(_cond("QuotaReserved", "False", "Pending"), *PREEMPTED),  # already released
        _workload(),
    ],
)
def test_nothing_to_release(workload: dict[str, Any]) -> None:
    assert kueue.release_quota_patch(workload, now=NOW) is None


@pytest.mark.parametrize(("succeeded", "reason"), [(True, "Succeeded"), (False, "Failed")])
def test_finish_patch(succeeded: bool, reason: str) -> None:
    wl = _workload(RESERVED, ADMITTED, admission=ADMISSION)
    patch = kueue.finish_patch(wl, succeeded=succeeded, message="x" * 40000, now=NOW)
    assert patch is not None
    finished = _by_type(patch)["Finished"]
    assert (finished["status"], finished["reason"]) == ("True", reason)
    assert len(finished["message"]) == kueue.CONDITION_MESSAGE_MAX
    assert _by_type(patch)["QuotaReserved"] == RESERVED
    assert (
        kueue.finish_patch(_workload(_cond("Finished", "True", "Succeeded")), succeeded=True, message="", now=NOW)
        is None
    )


def test_active_patch() -> None:
    wl = _workload()
    assert kueue.active_patch(wl, active=True) is None
    assert kueue.active_patch(wl, active=False) == {"metadata": {"resourceVersion": "42"}, "spec": {"active": False}}
    assert kueue.active_patch({**wl, "spec": {"active": False}}, active=True) is not None
