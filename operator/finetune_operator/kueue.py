"""Kueue, the pure side: the Workload a queued FineTuneJob waits as, and what Kueue's answer means for its pods.

Why a module of its own: in Kueue's external-framework integration (docs/kueue.md) the job's own controller owns the
Workload. It builds it from the job, reads the admission Kueue writes into its status, stops the job when Kueue
evicts it and then hands the quota back, and declares it finished. Each of those steps is a pure function of the
typed spec and of the Workload as read from the API server, so they are tested table-driven here and checked
against a real Kueue in tests/integration/test_kueue.py; the service layer only reads and writes the objects.
Nothing here imports a Kubernetes client (an import-linter contract enforces it); manifests are wire-form dicts.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, Literal

from finetune_trainer import spec as ftspec

from finetune_operator import builders, names
from finetune_operator.settings import Settings
from finetune_operator.status_model import QueueStatus

Manifest = dict[str, Any]

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
API_VERSION = f"{GROUP}/{VERSION}"
WORKLOAD_KIND = "Workload"
WORKLOAD_PLURAL = "workloads"
RESOURCE_FLAVOR_PLURAL = "resourceflavors"

# Labels Kueue reads on a job (sigs.k8s.io/kueue pkg/controller/constants) and sets on pods (pkg/constants).
QUEUE_LABEL = f"{GROUP}/queue-name"
PRIORITY_CLASS_LABEL = f"{GROUP}/priority-class"
JOB_UID_LABEL = f"{GROUP}/job-uid"
POD_SET_LABEL = f"{GROUP}/podset"
LOCAL_QUEUE_POD_LABEL = f"{GROUP}/local-queue-name"
CLUSTER_QUEUE_POD_LABEL = f"{GROUP}/cluster-queue-name"

# What a Kueue Configuration lists under integrations.externalFrameworks for us: Kind.version.group.
EXTERNAL_FRAMEWORK = f"{ftspec.KIND}.{ftspec.API_VERSION}.{ftspec.API_GROUP}"

POD_SET_HEAD = "head"
POD_SET_WORKERS = "workers"

# Workload condition types and the reasons this module interprets (apis/kueue/v1beta2/workload_types.go).
QUOTA_RESERVED = "QuotaReserved"
ADMITTED = "Admitted"
EVICTED = "Evicted"
PREEMPTED = "Preempted"
REQUEUED = "Requeued"
FINISHED = "Finished"
# Evictions after which Kueue's own job reconciler marks the workload Requeued=True (it may be admitted again at
# once); after the others Requeued=False until Kueue's workload controller decides (backoff, reactivation).
REQUEUE_AT_ONCE = frozenset({"Preempted", "NodeFailures"})
CONDITION_MESSAGE_MAX = 32768  # metav1.Condition.message

# Kueue's generated names: <kind>-<job>-<5 hex of sha1>, at most 63 characters (a valid label value).
_NAME_MAX = 63
_HASH_LEN = 5
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class WorkloadState(StrEnum):
    """Where a job stands with Kueue, from its Workload's conditions."""

    QUEUED = "Queued"  # waiting for quota (never admitted, released after an eviction, or inactive)
    ADMITTED = "Admitted"  # quota reserved and every admission check ready: the pods may run
    EVICTED = "Evicted"  # Kueue wants the pods gone; the quota stays reserved until the owner releases it
    FINISHED = "Finished"  # the owner declared the job finished; the quota is free


class PriorityKind(StrEnum):
    WORKLOAD_PRIORITY_CLASS = "WorkloadPriorityClass"  # kueue.x-k8s.io, from the job's priority-class label
    PRIORITY_CLASS = "PriorityClass"  # scheduling.k8s.io, the pods' priorityClassName (or the global default)


_PRIORITY_GROUP = {PriorityKind.WORKLOAD_PRIORITY_CLASS: GROUP, PriorityKind.PRIORITY_CLASS: "scheduling.k8s.io"}


@dataclasses.dataclass(frozen=True)
class Priority:
    """A resolved priority: which class and its value (the I/O layer reads the class object to learn the value)."""

    kind: PriorityKind
    name: str
    value: int

    def ref(self) -> Manifest:
        return {"group": _PRIORITY_GROUP[self.kind], "kind": self.kind.value, "name": self.name}


@dataclasses.dataclass(frozen=True)
class Eviction:
    reason: str  # Evicted condition reason: Preempted, PodsReadyTimeout, Deactivated, ClusterQueueStopped, ...
    message: str
    preemption_reason: str | None = None  # Preempted condition reason: InClusterQueue, InCohortReclamation, ...


@dataclasses.dataclass(frozen=True)
class Placement:
    """What admission adds to the pods of one pod set: the flavor's node labels and tolerations, Kueue's labels."""

    pod_set: str
    count: int
    node_selector: Mapping[str, str]
    tolerations: tuple[Mapping[str, Any], ...]
    labels: Mapping[str, str]
    annotations: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class Admission:
    """Kueue's answer for one job, read from its Workload (and the ResourceFlavors the admission names)."""

    workload: str
    queue: str
    active: bool
    cluster_queue: str | None = None
    quota_reserved: bool = False
    admitted: bool = False
    finished: bool = False
    eviction: Eviction | None = None
    waiting_reason: str | None = None  # QuotaReserved=False reason (Pending, Inadmissible, ...)
    waiting_message: str | None = None  # e.g. "couldn't assign flavors to pod set workers: insufficient quota ..."
    placements: Mapping[str, Placement] = dataclasses.field(default_factory=dict)
    problems: tuple[str, ...] = ()  # a missing flavor or conflicting node labels: the pods cannot be placed

    @property
    def state(self) -> WorkloadState:
        if self.finished:
            return WorkloadState.FINISHED
        if self.eviction is not None and self.quota_reserved:
            return WorkloadState.EVICTED
        if self.admitted:
            return WorkloadState.ADMITTED
        return WorkloadState.QUEUED


class PlacementError(ValueError):
    """Kueue's placement contradicts the job's own (same node label key, different value)."""


def queue_name(labels: Mapping[str, str] | None) -> str | None:
    """The LocalQueue a job asks for (its kueue.x-k8s.io/queue-name label); None means Kueue does not manage it."""
    value = (labels or {}).get(QUEUE_LABEL, "").strip()
    return value or None


def priority_source(labels: Mapping[str, str] | None, spec: ftspec.FineTuneJobSpec) -> tuple[PriorityKind, str] | None:
    """Which class gives the Workload its priority, as Kueue's jobframework decides it.

    The job's kueue.x-k8s.io/priority-class label (a WorkloadPriorityClass) wins over the pods' priorityClassName;
    None means the cluster's global default PriorityClass, or priority 0 when there is none.
    """
    workload_class = (labels or {}).get(PRIORITY_CLASS_LABEL, "").strip()
    if workload_class:
        return PriorityKind.WORKLOAD_PRIORITY_CLASS, workload_class
    if spec.resources.priority_class_name:
        return PriorityKind.PRIORITY_CLASS, spec.resources.priority_class_name
    return None


def workload_name(ident: names.JobIdentity) -> str:
    """Kueue's own naming for a job's Workload (jobframework GetWorkloadNameForOwnerWithGVK, short form).

    `finetunejob-<job>` cut to fit, then 5 hex digits of sha1(kind, group, name, uid): stable for the job's life,
    different for a re-created job of the same name, always a valid label value (<= 63 characters).
    """
    digest = hashlib.sha1(
        "\n".join((ftspec.KIND, ftspec.API_GROUP, ident.name, ident.uid)).encode(), usedforsecurity=False
    ).hexdigest()
    prefix = f"{ftspec.KIND.lower()}-{ident.name}"[: _NAME_MAX - 1 - _HASH_LEN]
    return f"{prefix}-{digest[:_HASH_LEN]}"


# ---------------------------------------------------------------------------------------------------------------
# Building the Workload
# ---------------------------------------------------------------------------------------------------------------


def _scheduling_template(pod: Manifest) -> Manifest:
    """The parts of a pod that decide admission: container requests/limits and the placement constraints.

    Taken from the manifests builders.py renders, so Kueue counts exactly what the pods will request.
    Attempt-specific fields (names, commands, env) are left out: one Workload serves every attempt of a job.
    """
    spec = pod["spec"]
    template_spec: Manifest = {
        "restartPolicy": spec["restartPolicy"],
        "containers": [{"name": c["name"], "resources": c["resources"]} for c in spec["containers"]],
    }
    for key in ("initContainers",):
        if spec.get(key):
            template_spec[key] = [{"name": c["name"], "resources": c.get("resources", {})} for c in spec[key]]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "runtimeClassName", "overhead"):
        if spec.get(key):
            template_spec[key] = spec[key]
    return {"spec": template_spec}


def pod_sets(spec: ftspec.FineTuneJobSpec, *, settings: Settings, ident: names.JobIdentity) -> list[Manifest]:
    """Two pod sets: the Ray head (1 pod) and the workers (spec.resources.workers identical pods).

    TODO(issue 10): take the requests from the single worker/head shape the operator derives from ResourcesSpec
    once builders.py has it; until then they come from the rendered pods themselves (the same code path).
    """
    head = builders.build_head_pod(spec, settings=settings, ident=ident)
    worker = builders.build_worker_pod(spec, settings=settings, ident=ident, index=0)
    return [
        {"name": POD_SET_HEAD, "count": 1, "template": _scheduling_template(head)},
        {"name": POD_SET_WORKERS, "count": spec.resources.workers, "template": _scheduling_template(worker)},
    ]


def build_workload(
    spec: ftspec.FineTuneJobSpec,
    *,
    settings: Settings,
    ident: names.JobIdentity,
    queue: str,
    priority: Priority | None,
    active: bool = True,
) -> Manifest:
    """The Workload a queued FineTuneJob waits as, owned by the job (controller reference, so GC deletes it).

    No finalizer: unlike Kueue's built-in integrations, the operator never blocks a deletion (docs/kueue.md
    explains the trade-off). `active: false` is how the user's spec.suspend reaches Kueue.
    """
    workload: Manifest = {
        "apiVersion": API_VERSION,
        "kind": WORKLOAD_KIND,
        "metadata": {
            "name": workload_name(ident),
            "namespace": ident.namespace,
            "labels": {**names.job_labels(ident.name), JOB_UID_LABEL: ident.uid},
            "ownerReferences": [builders.owner_reference(ident)],
        },
        "spec": {
            "queueName": queue,
            "podSets": pod_sets(spec, settings=settings, ident=ident),
            "active": active,
        },
    }
    if priority is not None:
        workload["spec"]["priorityClassRef"] = priority.ref()
        workload["spec"]["priority"] = priority.value
    return workload


# ---------------------------------------------------------------------------------------------------------------
# Reading Kueue's answer
# ---------------------------------------------------------------------------------------------------------------


def _conditions(workload: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in (workload.get("status") or {}).get("conditions") or []}


def _is_true(conditions: Mapping[str, Mapping[str, Any]], kind: str) -> bool:
    return conditions.get(kind, {}).get("status") == "True"


def assigned_flavors(workload: Mapping[str, Any] | None) -> frozenset[str]:
    """Names of the ResourceFlavors the admission assigns (the I/O layer reads these before read_admission)."""
    admission = ((workload or {}).get("status") or {}).get("admission") or {}
    return frozenset(
        str(flavor)
        for assignment in admission.get("podSetAssignments") or []
        for flavor in (assignment.get("flavors") or {}).values()
    )


def _merge_labels(into: dict[str, str], extra: Mapping[str, str], *, what: str, problems: list[str]) -> None:
    for key, value in extra.items():
        if key in into and into[key] != value:
            problems.append(f"{what}: {key}={value} conflicts with {key}={into[key]}")
        else:
            into[key] = str(value)


def _add_tolerations(into: list[Mapping[str, Any]], extra: Iterable[Mapping[str, Any]]) -> None:
    for toleration in extra:
        if dict(toleration) not in into:
            into.append(dict(toleration))


def _placement(
    assignment: Mapping[str, Any],
    *,
    spec_pod_sets: Mapping[str, Mapping[str, Any]],
    flavors: Mapping[str, Mapping[str, Any]],
    updates: Iterable[Mapping[str, Any]],
    queues: Mapping[str, str],
    problems: list[str],
) -> Placement:
    """Kueue's podset.FromAssignment + the admission checks' podSetUpdates for one pod set."""
    name = str(assignment.get("name"))
    node_selector: dict[str, str] = {}
    tolerations: list[Mapping[str, Any]] = []
    assigned = assignment.get("flavors") or {}
    for flavor_name in dict.fromkeys(str(assigned[resource]) for resource in sorted(assigned)):
        flavor = flavors.get(flavor_name)
        if flavor is None:
            problems.append(f"ResourceFlavor {flavor_name} (assigned to pod set {name}) not found")
            continue
        flavor_spec = flavor.get("spec") or {}
        _merge_labels(
            node_selector, flavor_spec.get("nodeLabels") or {}, what=f"flavor {flavor_name}", problems=problems
        )
        _add_tolerations(tolerations, flavor_spec.get("tolerations") or [])
    labels = {POD_SET_LABEL: name, **queues}
    annotations: dict[str, str] = {}
    for update in updates:
        if update.get("name") != name:
            continue
        _merge_labels(node_selector, update.get("nodeSelector") or {}, what="admission check", problems=problems)
        _merge_labels(labels, update.get("labels") or {}, what="admission check", problems=problems)
        _merge_labels(annotations, update.get("annotations") or {}, what="admission check", problems=problems)
        _add_tolerations(tolerations, update.get("tolerations") or [])
    count = assignment.get("count", (spec_pod_sets.get(name) or {}).get("count", 0))
    return Placement(
        pod_set=name,
        count=int(count),
        node_selector=node_selector,
        tolerations=tuple(tolerations),
        labels=labels,
        annotations=annotations,
    )


def _queue_labels(workload: Mapping[str, Any], cluster_queue: str) -> dict[str, str]:
    """The pod labels Kueue adds with AssignQueueLabelsForPods (the cluster queue only when it is a DNS label)."""
    labels = {LOCAL_QUEUE_POD_LABEL: str((workload.get("spec") or {}).get("queueName") or "")}
    if _DNS_LABEL.match(cluster_queue) and len(cluster_queue) <= _NAME_MAX:
        labels[CLUSTER_QUEUE_POD_LABEL] = cluster_queue
    return labels


def _placements(
    workload: Mapping[str, Any], *, flavors: Mapping[str, Mapping[str, Any]], problems: list[str]
) -> tuple[str | None, dict[str, Placement]]:
    status = workload.get("status") or {}
    admission = status.get("admission") or {}
    cluster_queue = admission.get("clusterQueue")
    if not cluster_queue:
        return None, {}
    spec_pod_sets = {str(p.get("name")): p for p in (workload.get("spec") or {}).get("podSets") or []}
    updates = [u for check in status.get("admissionChecks") or [] for u in check.get("podSetUpdates") or []]
    queues = _queue_labels(workload, str(cluster_queue))
    placements = {}
    for assignment in admission.get("podSetAssignments") or []:
        placement = _placement(
            assignment, spec_pod_sets=spec_pod_sets, flavors=flavors, updates=updates, queues=queues, problems=problems
        )
        placements[placement.pod_set] = placement
    return str(cluster_queue), placements


def read_admission(
    workload: Mapping[str, Any] | None, *, flavors: Mapping[str, Mapping[str, Any]] | None = None
) -> Admission | None:
    """What Kueue decided for a job (None when it has no Workload yet).

    `flavors` maps the names in `assigned_flavors(workload)` to the ResourceFlavor objects; a flavor missing from
    it is reported in `problems`, never raised: this is called on whatever the API server returned.
    """
    if workload is None:
        return None
    conditions = _conditions(workload)
    problems: list[str] = []
    cluster_queue, placements = _placements(workload, flavors=flavors or {}, problems=problems)
    evicted = conditions.get(EVICTED) if _is_true(conditions, EVICTED) else None
    preempted = conditions.get(PREEMPTED) if _is_true(conditions, PREEMPTED) else None
    quota_reserved = _is_true(conditions, QUOTA_RESERVED)
    waiting = conditions.get(QUOTA_RESERVED) if not quota_reserved else None
    return Admission(
        workload=str((workload.get("metadata") or {}).get("name") or ""),
        queue=str((workload.get("spec") or {}).get("queueName") or ""),
        active=(workload.get("spec") or {}).get("active", True) is not False,
        cluster_queue=cluster_queue,
        quota_reserved=quota_reserved,
        admitted=_is_true(conditions, ADMITTED),
        finished=_is_true(conditions, FINISHED),
        eviction=Eviction(
            reason=str(evicted.get("reason") or ""),
            message=str(evicted.get("message") or ""),
            preemption_reason=str(preempted.get("reason")) if preempted else None,
        )
        if evicted is not None
        else None,
        waiting_reason=str(waiting.get("reason")) if waiting else None,
        waiting_message=str(waiting.get("message")) if waiting else None,
        placements=placements if quota_reserved else {},
        problems=tuple(problems) if quota_reserved else (),
    )


def apply_placement(pod: Manifest, placement: Placement) -> Manifest:
    """The pod with the admission's node selector, tolerations, labels and annotations merged in (a new dict).

    A node label the job already pins to a different value is a PlacementError naming the key; Kueue only
    assigns flavors compatible with the pod set's template, so this means the job changed after admission.
    """
    spec = dict(pod["spec"])
    meta = dict(pod["metadata"])
    selector = dict(spec.get("nodeSelector") or {})
    for key, value in placement.node_selector.items():
        if key in selector and selector[key] != value:
            raise PlacementError(
                f"spec.resources.nodeSelector[{key}]={selector[key]} conflicts with the flavor Kueue assigned "
                f"to pod set {placement.pod_set} ({key}={value})"
            )
        selector[key] = value
    if selector:
        spec["nodeSelector"] = selector
    tolerations: list[Mapping[str, Any]] = [dict(t) for t in spec.get("tolerations") or []]
    _add_tolerations(tolerations, placement.tolerations)
    if tolerations:
        spec["tolerations"] = tolerations
    meta["labels"] = {**(meta.get("labels") or {}), **placement.labels}
    if placement.annotations:
        meta["annotations"] = {**(meta.get("annotations") or {}), **placement.annotations}
    return {**pod, "metadata": meta, "spec": spec}


# ---------------------------------------------------------------------------------------------------------------
# Telling Kueue what the job did (status merge patches, guarded by the Workload's resourceVersion)
# ---------------------------------------------------------------------------------------------------------------


def _rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _condition(
    workload: Mapping[str, Any],
    *,
    kind: str,
    status: Literal["True", "False"],
    reason: str,
    message: str,
    now: dt.datetime,
) -> Manifest:
    old = _conditions(workload).get(kind)
    since = old.get("lastTransitionTime") if old and old.get("status") == status else None
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message[:CONDITION_MESSAGE_MAX],
        "lastTransitionTime": since or _rfc3339(now),
        "observedGeneration": int((workload.get("metadata") or {}).get("generation") or 0),
    }


def _with_conditions(workload: Mapping[str, Any], updated: Iterable[Manifest]) -> list[Manifest]:
    """Every existing condition, the updated ones replaced in place and new ones appended (a merge patch replaces
    the whole list, so nothing Kueue wrote may be dropped)."""
    new = {c["type"]: c for c in updated}
    result = [dict(new.pop(str(c.get("type")), c)) for c in (workload.get("status") or {}).get("conditions") or []]
    return result + list(new.values())


def _patch(workload: Mapping[str, Any], status: Manifest) -> Manifest:
    return {"metadata": {"resourceVersion": (workload.get("metadata") or {}).get("resourceVersion")}, "status": status}


def release_quota_patch(workload: Mapping[str, Any], *, now: dt.datetime) -> Manifest | None:
    """After an eviction, once the job's pods are gone: give the quota back (Kueue's jobframework, step 6).

    Requeued (True after a preemption or node failure), QuotaReserved=False reason Pending with the eviction's
    message, Admitted=False reason NoReservation (adding the admitted time to accumulatedPastExecutionTimeSeconds),
    and status.admission removed. None when there is nothing to release (not evicted, or already released).
    """
    conditions = _conditions(workload)
    evicted = conditions.get(EVICTED)
    if not _is_true(conditions, EVICTED) or not _is_true(conditions, QUOTA_RESERVED) or evicted is None:
        return None
    reason, message = str(evicted.get("reason") or "Evicted"), str(evicted.get("message") or "")
    updated = [
        _condition(
            workload,
            kind=REQUEUED,
            status="True" if reason in REQUEUE_AT_ONCE else "False",
            reason=reason,
            message=message,
            now=now,
        ),
        _condition(workload, kind=QUOTA_RESERVED, status="False", reason="Pending", message=message, now=now),
    ]
    status: Manifest = {"admission": None}
    admitted = conditions.get(ADMITTED)
    if admitted is not None and admitted.get("status") == "True":
        updated.append(
            _condition(
                workload,
                kind=ADMITTED,
                status="False",
                reason="NoReservation",
                message="The workload has no reservation",
                now=now,
            )
        )
        status["accumulatedPastExecutionTimeSeconds"] = _accumulated(workload, admitted, now=now)
    status["conditions"] = _with_conditions(workload, updated)
    return _patch(workload, status)


def _accumulated(workload: Mapping[str, Any], admitted: Mapping[str, Any], *, now: dt.datetime) -> int:
    before = int((workload.get("status") or {}).get("accumulatedPastExecutionTimeSeconds") or 0)
    since = str(admitted.get("lastTransitionTime") or "")
    try:
        started = dt.datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError:
        return before
    return before + max(0, int((now - started).total_seconds()))


def finish_patch(workload: Mapping[str, Any], *, succeeded: bool, message: str, now: dt.datetime) -> Manifest | None:
    """The job ended: Finished=True (reason Succeeded or Failed), which frees its quota. None if already finished."""
    if _is_true(_conditions(workload), FINISHED):
        return None
    finished = _condition(
        workload,
        kind=FINISHED,
        status="True",
        reason="Succeeded" if succeeded else "Failed",
        message=message,
        now=now,
    )
    return _patch(workload, {"conditions": _with_conditions(workload, [finished])})


def active_patch(workload: Mapping[str, Any], *, active: bool) -> Manifest | None:
    """spec.active for the user's spec.suspend: false makes Kueue evict (reason Deactivated) and never re-admit
    until it is true again. None when it already has that value."""
    if ((workload.get("spec") or {}).get("active", True) is not False) == active:
        return None
    return {
        "metadata": {"resourceVersion": (workload.get("metadata") or {}).get("resourceVersion")},
        "spec": {"active": active},
    }


# ---------------------------------------------------------------------------------------------------------------
# What a reconcile of a queued job sees and decides (used by status.calculate, carried out by the service layer)
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QueueObserved:
    """A labelled job's side of Kueue, as read in one reconcile (the I/O layer fills it, calculate decides on it)."""

    name: str  # the LocalQueue
    workload: Mapping[str, Any] | None = None  # as read from the API server; None: not created yet
    admission: Admission | None = None  # read_admission(workload, flavors=...)


class Gate(StrEnum):
    """What Kueue's answer means for the job's pods."""

    WAIT = "Wait"  # not admitted (or no Workload yet): no pods; pods left over from an admission are deleted
    STOP = "Stop"  # evicted: delete the pods, then hand the quota back
    RUN = "Run"  # admitted: pods may be created, with the placement


def gate(queue: QueueObserved) -> Gate:
    admission = queue.admission
    if admission is None:
        return Gate.WAIT
    state = admission.state
    if state is WorkloadState.ADMITTED:
        return Gate.RUN
    if state is WorkloadState.EVICTED:
        return Gate.STOP
    return Gate.WAIT


def waiting_words(queue: QueueObserved) -> tuple[str, str]:
    """(reason, message) for a job Kueue does not let run: Kueue's own words where it gave any."""
    admission = queue.admission
    if admission is None:
        return "Queued", f"waiting for Kueue: creating the Workload in LocalQueue {queue.name}"
    if admission.eviction is not None:
        eviction = admission.eviction
        detail = f" ({eviction.preemption_reason})" if eviction.preemption_reason else ""
        return eviction.reason or EVICTED, (
            f"evicted by Kueue{detail}: {eviction.message}; the Ray cluster is deleted and the job resumes from its "
            "latest checkpoint when Kueue admits it again"
        )
    if not admission.active:
        return "Deactivated", f"Workload {admission.workload} is inactive (spec.active: false)"
    if admission.quota_reserved:
        return QUOTA_RESERVED, f"quota reserved in ClusterQueue {admission.cluster_queue}; waiting for admission checks"
    reason = admission.waiting_reason or "Pending"
    message = admission.waiting_message or f"waiting for Kueue to admit Workload {admission.workload}"
    return reason, f"LocalQueue {admission.queue or queue.name}: {message}"


@dataclasses.dataclass(frozen=True)
class WorkloadActions:
    """What to do to the job's Workload after the job's status is written (at most one write per reconcile: each
    write changes the Workload's resourceVersion, which the next one is conditional on)."""

    create: bool = False
    active: bool = True  # spec.active of a Workload to create
    spec_patch: Manifest | None = None  # merge patch of the Workload (spec.active)
    status_patch: Manifest | None = None  # merge patch of its status subresource (release quota, finish)
    placements: Mapping[str, Placement] = dataclasses.field(default_factory=dict)  # pod set -> for pods created now

    @property
    def writes(self) -> bool:
        return self.create or self.spec_patch is not None or self.status_patch is not None


def workload_actions(
    queue: QueueObserved,
    *,
    suspend: bool,
    terminal: bool,
    succeeded: bool,
    message: str,
    pods_left: bool,
    now: dt.datetime,
) -> WorkloadActions:
    """The one Workload write this reconcile owes Kueue (decision table in docs/kueue.md).

    Created once (inactive when the user suspended the job); Finished when the job is; `active` follows the user's
    spec.suspend; the quota of an evicted Workload is handed back only once no pod of the job is left (terminating
    ones included: their trainer may still be writing a checkpoint).
    """
    workload = queue.workload
    placements = queue.admission.placements if queue.admission is not None and gate(queue) is Gate.RUN else {}
    if workload is None:
        return WorkloadActions(create=not terminal, active=not suspend)
    if terminal:
        return WorkloadActions(status_patch=finish_patch(workload, succeeded=succeeded, message=message, now=now))
    spec_patch = active_patch(workload, active=not suspend)
    if spec_patch is not None:
        return WorkloadActions(spec_patch=spec_patch, placements=placements)
    release = release_quota_patch(workload, now=now) if not pods_left else None
    return WorkloadActions(status_patch=release, placements=placements)


def queue_status(queue: QueueObserved, *, old: QueueStatus | None, now: str) -> QueueStatus:
    """status.queue: where the job stands with Kueue; `queuedSince` survives reconciles (the queued-time metric)."""
    admission = queue.admission
    workload = str((queue.workload or {}).get("metadata", {}).get("name") or "") or None
    if gate(queue) is Gate.RUN and admission is not None:
        was = old is not None and old.admitted
        return QueueStatus(
            name=queue.name,
            cluster_queue=admission.cluster_queue,
            workload=workload,
            admitted=True,
            reason=ADMITTED,
            message=f"admitted by ClusterQueue {admission.cluster_queue}",
            admitted_time=(old.admitted_time if was and old is not None else None) or now,
        )
    reason, message = waiting_words(queue)
    since = old.queued_since if old is not None and not old.admitted else None
    return QueueStatus(
        name=queue.name,
        cluster_queue=admission.cluster_queue if admission is not None else None,
        workload=workload,
        admitted=False,
        reason=reason,
        message=message,
        queued_since=since or now,
        admitted_time=old.admitted_time if old is not None else None,
    )


def place(pod: Manifest, placements: Mapping[str, Placement]) -> Manifest:
    """A rendered pod with the placement of its pod set (head or workers) applied; as is when there is none."""
    role = (pod.get("metadata", {}).get("labels") or {}).get(names.LABEL_ROLE)
    placement = placements.get(POD_SET_HEAD if role == names.ROLE_HEAD else POD_SET_WORKERS)
    return apply_placement(pod, placement) if placement is not None else pod


def place_children(rendered: builders.Rendered, placements: Mapping[str, Placement]) -> builders.Rendered:
    """Every pod of an attempt placed where Kueue admitted it (PlacementError on a contradiction)."""
    if not placements:
        return rendered
    return dataclasses.replace(
        rendered,
        head=place(rendered.head, placements),
        workers=tuple(place(w, placements) for w in rendered.workers),
    )
