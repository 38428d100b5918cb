"""calculate() for jobs under Kueue: no pods before admission, placement, eviction -> Queued, resume, suspend.

Every row is a snapshot (old status, pods, the Workload as Kueue left it) and what the plan must say: phase and
reason, the pods it creates or deletes, and the one Workload write it owes Kueue. An unlabelled job (obs.queue None)
must get exactly the plan it got before the integration existed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import types
from collections.abc import Callable
from typing import Any

import pytest
from finetune_operator import builders
from finetune_operator import kueue as kq
from finetune_operator import observe as ob
from finetune_operator import status as st
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.services import queue as queue_io
from finetune_operator.services import reconcile
from finetune_operator.settings import Settings
from finetune_operator.status_model import AttemptRecord, Phase, QueueStatus, Status

from tests.unit.test_operator_kueue import ADMISSION, ADMITTED, FLAVORS, PREEMPTED, RESERVED, _cond, _workload
from tests.unit.test_operator_status import (
    IDENT,
    observe,
    running_cluster,
    spec,
    status,
    terminated,
    ts,
)

PENDING = _cond("QuotaReserved", "False", "Pending", "couldn't assign flavors to pod set workers: insufficient quota")
ADMITTED_WL = _workload(RESERVED, ADMITTED, admission=ADMISSION)
WAITING_WL = _workload(PENDING)
EVICTED_WL = _workload(RESERVED, ADMITTED, *PREEMPTED, admission=ADMISSION)
RELEASED_WL = _workload(PENDING, _cond("Admitted", "False", "NoReservation"), *PREEMPTED)
DEACTIVATED_WL = {
    **_workload(
        RESERVED, ADMITTED, _cond("Evicted", "True", "Deactivated", "spec.active is false"), admission=ADMISSION
    ),
    "spec": {"queueName": "team-a", "active": False},
}
INACTIVE_WL = {**_workload(PENDING), "spec": {"queueName": "team-a", "active": False}}
TERMINATING = tuple(dataclasses.replace(p, deleting=True) for p in running_cluster())
FINISHED_WL = _workload(RESERVED, ADMITTED, _cond("Finished", "True", "Succeeded"), admission=ADMISSION)


def queue(workload: dict[str, Any] | None) -> kq.QueueObserved:
    return kq.QueueObserved(name="team-a", workload=workload, admission=kq.read_admission(workload, flavors=FLAVORS))


def queued(**kw: Any) -> Status:
    """A job that has waited Queued since t=0 (no attempt has started: no pods, no start time)."""
    record = kw.pop("record", None)
    base = Status(
        phase=Phase.QUEUED,
        attempt=kw.pop("attempt", 1),
        failed_attempts=0,
        queue=QueueStatus(name="team-a", reason="Pending", queued_since=ts(0)),
        attempts=[record] if record is not None else [],
    )
    return base.model_copy(update=kw)


def admitted_status(phase: Phase = Phase.RUNNING) -> Status:
    """An admitted attempt 1 that has been running (its record is open)."""
    return status(
        phase,
        queue=QueueStatus(name="team-a", admitted=True, cluster_queue="gpu-cq", admitted_time=ts(0)),
        attempts=[AttemptRecord(attempt=1, start_time=ts(0), running_time=ts(1))],
    )


def ended(reason: str) -> AttemptRecord:
    return AttemptRecord(attempt=1, start_time=ts(0), running_time=ts(1), end_time=ts(5), reason=reason)


def _no_write(w: kq.WorkloadActions) -> bool:
    return not w.writes


def _creates(active: bool) -> Callable[[kq.WorkloadActions], bool]:
    return lambda w: w.create and w.active is active and w.spec_patch is None and w.status_patch is None


def _releases(w: kq.WorkloadActions) -> bool:
    patch = w.status_patch or {}
    return patch.get("status", {}).get("admission", "absent") is None and not w.create


def _finishes(reason: str) -> Callable[[kq.WorkloadActions], bool]:
    def check(w: kq.WorkloadActions) -> bool:
        conditions = (w.status_patch or {}).get("status", {}).get("conditions", [])
        return any(c["type"] == "Finished" and c["reason"] == reason for c in conditions)

    return check


def _activates(active: bool) -> Callable[[kq.WorkloadActions], bool]:
    return lambda w: (w.spec_patch or {}).get("spec") == {"active": active} and w.status_patch is None


def _placed(w: kq.WorkloadActions) -> bool:
    return set(w.placements) == {"head", "workers"} and w.placements["workers"].node_selector == {"gpu": "a100"}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    observed: ob.Observed
    phase: Phase
    reason: str
    workload: Callable[[kq.WorkloadActions], bool]
    attempt: int = 1
    creates_pods: bool = False
    delete_cluster: bool = False
    admitted: bool = False
    message_has: str = ""


def obs(old: Status, workload: dict[str, Any] | None, pods: tuple[ob.PodView, ...] = (), **kw: Any) -> ob.Observed:
    return observe(old, pods, queue=queue(workload), **kw)


CASES = [
    Case("new job: Workload created, no pods", obs(Status(), None), Phase.QUEUED, "Queued", _creates(active=True)),
    Case(
        "new suspended job: inactive Workload, no pods",
        obs(Status(), None, the_spec=spec(suspend=True)),
        Phase.SUSPENDED,
        "Suspended",
        _creates(active=False),
    ),
    Case(
        "not admitted: Queued with Kueue's words",
        obs(queued(), WAITING_WL),
        Phase.QUEUED,
        "Pending",
        _no_write,
        message_has="insufficient quota",
    ),
    Case(
        "quota reserved, admission checks pending: still no pods",
        obs(queued(), _workload(RESERVED, admission=ADMISSION)),
        Phase.QUEUED,
        "QuotaReserved",
        _no_write,
    ),
    Case(
        "admitted: the cluster is created where the flavor says",
        obs(queued(), ADMITTED_WL),
        Phase.PENDING,
        "Pending",
        _placed,
        creates_pods=True,
        admitted=True,
    ),
    Case(
        "admitted and running: nothing to write",
        obs(admitted_status(), ADMITTED_WL, running_cluster()),
        Phase.RUNNING,
        "Running",
        lambda w: not w.writes and _placed(w),
        admitted=True,
    ),
    Case(
        "preempted: the cluster goes, the quota stays until the pods are gone",
        obs(admitted_status(), EVICTED_WL, running_cluster()),
        Phase.QUEUED,
        "Preempted",
        _no_write,
        delete_cluster=True,
        message_has="InClusterQueue",
    ),
    Case(
        "preempted, pods still terminating (checkpoint in flight): no release yet",
        obs(queued(record=ended("Preempted")), EVICTED_WL, TERMINATING),
        Phase.QUEUED,
        "Preempted",
        _no_write,
    ),
    Case(
        "preempted, pods gone: the quota is handed back",
        obs(queued(record=ended("Preempted")), EVICTED_WL),
        Phase.QUEUED,
        "Preempted",
        _releases,
    ),
    Case(
        "released, waiting again: Kueue's eviction reason stays",
        obs(queued(record=ended("Preempted")), RELEASED_WL),
        Phase.QUEUED,
        "Preempted",
        _no_write,
    ),
    Case(
        "re-admitted after preemption: attempt 2 resumes from the checkpoint",
        obs(queued(record=ended("Preempted")), ADMITTED_WL),
        Phase.PENDING,
        "Pending",
        _placed,
        attempt=2,
        creates_pods=True,
        admitted=True,
        message_has="from the latest checkpoint",
    ),
    Case(
        "admission removed without eviction (Workload recreated): pods go",
        obs(admitted_status(), WAITING_WL, running_cluster()),
        Phase.QUEUED,
        "Pending",
        _no_write,
        delete_cluster=True,
    ),
    Case(
        "user suspends an admitted job: Suspended wins, Workload deactivated",
        obs(admitted_status(), ADMITTED_WL, running_cluster(), the_spec=spec(suspend=True)),
        Phase.SUSPENDED,
        "Suspended",
        _activates(False),
        delete_cluster=True,
        admitted=True,  # status.queue is Kueue's view: admitted until Kueue processes the deactivation
    ),
    Case(
        "suspended, Kueue evicted it (Deactivated), pods gone: quota handed back",
        obs(status(Phase.SUSPENDED), DEACTIVATED_WL, the_spec=spec(suspend=True)),
        Phase.SUSPENDED,
        "Suspended",
        _releases,
    ),
    Case(
        "user resumes: Workload active again, the job waits Queued for admission",
        obs(status(Phase.SUSPENDED, attempts=[ended("Suspended")]), INACTIVE_WL),
        Phase.QUEUED,
        "Deactivated",
        _activates(True),
    ),
    Case(
        "Kueue admits the resumed job: attempt 2",
        obs(queued(record=ended("Suspended")), ADMITTED_WL),
        Phase.PENDING,
        "Pending",
        _placed,
        attempt=2,
        creates_pods=True,
        admitted=True,
    ),
    Case(
        "head succeeded: Workload Finished (quota free)",
        obs(admitted_status(), ADMITTED_WL, running_cluster(phase="Succeeded", container=terminated(0))),
        Phase.SUCCEEDED,
        "Succeeded",
        _finishes("Succeeded"),
        delete_cluster=True,
    ),
    Case(
        "job already Failed, Workload not finished yet: Finished Failed",
        obs(status(Phase.FAILED, reason="TrainingError"), ADMITTED_WL),
        Phase.FAILED,
        "TrainingError",
        _finishes("Failed"),
    ),
    Case(
        "finished job, finished Workload: nothing to write",
        obs(status(Phase.SUCCEEDED, reason="Succeeded"), FINISHED_WL),
        Phase.SUCCEEDED,
        "Succeeded",
        _no_write,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_calculate_under_kueue(case: Case) -> None:
    plan = st.calculate(case.observed)
    actions = plan.actions
    assert plan.status.phase is case.phase, (plan.status.reason, plan.status.message)
    assert plan.status.reason == case.reason, plan.status.message
    assert plan.attempt == case.attempt
    assert actions.workload is not None and case.workload(actions.workload), actions.workload
    assert (actions.create_head or bool(actions.create_workers)) == case.creates_pods
    assert actions.delete_cluster == case.delete_cluster
    assert case.message_has in (plan.status.message or "") + " ".join(e.message for e in plan.events)
    if not case.phase.terminal:
        assert plan.status.queue is not None and plan.status.queue.admitted is case.admitted


def test_no_deadline_runs_while_queued() -> None:
    long_ago = obs(queued(), WAITING_WL, now=10_000, the_spec=spec(activeDeadlineSeconds=60))
    plan = st.calculate(long_ago)
    assert plan.status.phase is Phase.QUEUED and plan.status.start_time is None


def test_queued_since_survives_reconciles_and_admission_records_the_time() -> None:
    first = st.calculate(obs(Status(), None, now=10)).status
    assert first.queue is not None and first.queue.queued_since == ts(10)
    again = st.calculate(obs(first, WAITING_WL, now=20)).status
    assert again.queue is not None and again.queue.queued_since == ts(10)
    admitted = st.calculate(obs(again, ADMITTED_WL, now=30)).status
    assert admitted.queue is not None and admitted.queue.admitted and admitted.queue.queued_since is None
    assert admitted.queue.admitted_time == ts(30) and admitted.start_time == ts(30)
    assert admitted.queue.cluster_queue == "gpu-cq"


def test_the_eviction_ends_the_attempt_with_kueues_reason() -> None:
    plan = st.calculate(obs(admitted_status(), EVICTED_WL, running_cluster()))
    record = plan.status.current_attempt()
    assert record is not None and record.reason == "Preempted" and record.end_time == ts(10)
    assert plan.status.failed_attempts == 0 and plan.status.last_failure is None


@pytest.mark.parametrize(
    ("old", "pods"),
    [
        (Status(), ()),
        (status(Phase.RUNNING), running_cluster()),
        (status(Phase.RUNNING), running_cluster(phase="Succeeded", container=terminated(0))),
        (status(Phase.SUSPENDED), ()),
    ],
    ids=["new", "running", "succeeded", "suspended"],
)
def test_a_job_without_the_label_gets_the_plan_it_always_got(old: Status, pods: tuple[ob.PodView, ...]) -> None:
    plan = st.calculate(observe(old, pods))
    assert plan.actions.workload is None and plan.status.queue is None
    assert plan == st._calculate(observe(old, pods))


def test_placement_reaches_every_pod_of_the_attempt() -> None:
    settings = Settings(trainer_image="registry/trainer:1", output_base_uri="s3://models/", identity="t")
    resolved = builders.resolve_spec(spec(), defaults=builders.operator_defaults(settings), ident=IDENT)
    rendered = builders.build_children(resolved, settings=settings, ident=IDENT)
    placements = kq.read_admission(ADMITTED_WL, flavors=FLAVORS)
    assert placements is not None
    placed = kq.place_children(rendered, placements.placements)
    assert placed.head["spec"]["nodeSelector"] == {"pool": "cpu"}
    assert placed.head["metadata"]["labels"][kq.POD_SET_LABEL] == "head"
    for worker in placed.workers:
        assert worker["spec"]["nodeSelector"] == {"gpu": "a100"}
        assert {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["spec"]["tolerations"]
        assert worker["metadata"]["labels"][kq.CLUSTER_QUEUE_POD_LABEL] == "gpu-cq"
    assert kq.place_children(rendered, {}) == rendered


class _NoApi:
    """A Kube that fails the test on any request."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a job without the queue label made a Kubernetes request ({name})")


@pytest.mark.parametrize("labels", [None, {}, {"app": "x"}, {kq.QUEUE_LABEL: " "}])
def test_a_job_without_the_label_makes_no_kueue_request(labels: dict[str, str] | None) -> None:
    observed = asyncio.run(queue_io.observe(_NoApi(), labels=labels, ident=IDENT))  # type: ignore[arg-type]
    assert observed is None


@pytest.mark.parametrize(
    ("old", "new", "count"),
    [
        (QueueStatus(name="q", queued_since=ts(0)), QueueStatus(name="q", admitted=True, admitted_time=ts(30)), 1),
        (QueueStatus(name="q", queued_since=ts(0)), QueueStatus(name="q", queued_since=ts(0)), 0),
        (QueueStatus(name="q", admitted=True), QueueStatus(name="q", admitted=True, admitted_time=ts(30)), 0),
        (None, None, 0),
    ],
    ids=["admitted", "still-waiting", "already-admitted", "not-queued"],
)
def test_queued_time_is_observed_once_per_admission(
    old: QueueStatus | None, new: QueueStatus | None, count: int
) -> None:
    metrics = OperatorMetrics()
    ctx = types.SimpleNamespace(metrics=metrics)
    reconcile._record_queued(ctx, old=Status(queue=old), new=Status(queue=new))  # type: ignore[arg-type]
    text = metrics.exposition().decode()
    assert f"finetune_job_queued_seconds_count {float(count)}" in text
    if count:
        assert "finetune_job_queued_seconds_sum 30.0" in text


def test_an_evicted_job_drains_its_head_first_and_keeps_the_quota_until_no_pod_is_left() -> None:
    plan = st.calculate(obs(admitted_status(), EVICTED_WL, running_cluster(), drain_on_stop=True))
    assert plan.status.phase is Phase.QUEUED and plan.status.reason == "Preempted"
    assert [p.name for p in plan.actions.delete_pods] == ["job-a1-head"] and not plan.actions.delete_cluster
    assert plan.actions.workload is not None and plan.actions.workload.status_patch is None  # quota still held
    exited = running_cluster(deleting=True, phase="Failed", container=terminated(7))
    after = st.calculate(obs(plan.status, EVICTED_WL, exited, drain_on_stop=True))
    assert after.actions.delete_cluster
    assert after.actions.workload is not None and after.actions.workload.status_patch is None
