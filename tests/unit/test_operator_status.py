"""calculate(observed) -> Plan: phases, reasons, retries, deadlines, suspend/resume, TTL, terminal finality."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from finetune_operator import names
from finetune_operator import observe as ob
from finetune_operator import status as st
from finetune_operator.status_model import (
    Artifacts,
    ClusterInfo,
    Condition,
    ConditionType,
    Phase,
    Progress,
    Status,
    rfc3339,
)
from finetune_operator.trainer_metrics import MetricsSample, parse_trainer_metrics
from finetune_trainer import contract
from finetune_trainer import spec as ftspec

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
IDENT = names.JobIdentity(name="job", namespace="ns", uid="uid-1234-5678", attempt=1)
BASE: dict[str, Any] = {
    "model": {"uri": "hf://o/m"},
    "dataset": {"train": "s3://d/t.csv"},
    "output": {"uri": "s3://out/job/"},
    "resources": {"workers": 2},
}


def spec(**overrides: Any) -> ftspec.FineTuneJobSpec:
    return ftspec.parse_spec({**BASE, **overrides})


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def ts(seconds: float) -> str:
    return rfc3339(at(seconds))


def pod(role: str, *, attempt: int = 1, index: int = 0, **kw: Any) -> ob.PodView:
    name = names.head_name("job", attempt) if role == "head" else names.worker_name("job", attempt, index)
    defaults: dict[str, Any] = {"phase": "Running", "ready": True, "scheduled": True, "ip": "10.0.0.1", "created": T0}
    return ob.PodView(name=name, role=role, attempt=attempt, **{**defaults, **kw})


def running_cluster(attempt: int = 1, **head: Any) -> tuple[ob.PodView, ...]:
    return (
        pod("head", attempt=attempt, **head),
        pod("worker", attempt=attempt, index=0),
        pod("worker", attempt=attempt, index=1),
    )


def terminated(exit_code: int, *, reason: str = "Error", message: str | None = None) -> ob.ContainerView:
    return ob.ContainerView(state="terminated", reason=reason, exit_code=exit_code, message=message)


def status(phase: Phase | None = None, **kw: Any) -> Status:
    base: dict[str, Any] = {"phase": phase, "attempt": 1, "failed_attempts": 0, "start_time": ts(0)}
    if phase is not None:
        base["attempt_start_time"] = ts(0)
        base["cluster"] = ClusterInfo(name="job-a1-head", head_pod="job-a1-head")
    return Status(**{**base, **kw})


def observe(
    old: Status,
    pods: tuple[ob.PodView, ...] = (),
    *,
    now: float = 10,
    the_spec: ftspec.FineTuneJobSpec | None = None,
    metrics: MetricsSample | None = None,
    **kw: Any,
) -> ob.Observed:
    return ob.Observed(
        ident=IDENT,
        generation=1,
        spec=the_spec if the_spec is not None else spec(),
        old=old,
        pods=pods,
        now=at(now),
        metrics=metrics,
        artifacts=Artifacts(model="s3://out/job/model/"),
        **kw,
    )


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    observed: ob.Observed
    phase: Phase
    reason: str
    attempt: int = 1
    create_head: bool = False
    create_workers: tuple[int, ...] = ()
    delete_pods: tuple[str, ...] = ()
    delete_cluster: bool = False
    delete_job: bool = False
    message_has: str = ""


TRAINER_FAIL = contract.failure_line(contract.Reason.TRAINING_ERROR, "loss is NaN at step 40")
DATA_FAIL = contract.failure_line(contract.Reason.INVALID_DATASET, "column 'sentence' missing")
WORKERS = ("job-a1-worker-0", "job-a1-worker-1")

CASES = [
    Case(
        "new job creates its cluster",
        observe(Status()),
        Phase.PENDING,
        "Pending",
        create_head=True,
        create_workers=(0, 1),
    ),
    Case(
        "unschedulable shows the scheduler's message",
        observe(
            status(Phase.PENDING),
            (
                pod(
                    "head",
                    phase="Pending",
                    ready=False,
                    scheduled=False,
                    unschedulable_message="0/2 nodes: Insufficient nvidia.com/gpu",
                ),
            ),
        ),
        Phase.PENDING,
        "Unschedulable",
        create_workers=(0, 1),
        message_has="Insufficient nvidia.com/gpu",
    ),
    Case(
        "unschedulable past the pending deadline fails with the scheduler's reason",
        observe(
            status(Phase.PENDING),
            (
                pod(
                    "head",
                    phase="Pending",
                    ready=False,
                    scheduled=False,
                    unschedulable_message="0/2 nodes: Insufficient nvidia.com/gpu",
                ),
            ),
            now=601,
        ),
        Phase.FAILED,
        "Unschedulable",
        delete_cluster=True,
        message_has="pendingDeadlineSeconds=600",
    ),
    Case(
        "image pull error",
        observe(
            status(Phase.PENDING),
            (
                *running_cluster()[:1],
                pod(
                    "worker",
                    index=0,
                    phase="Pending",
                    ready=False,
                    container=ob.ContainerView(state="waiting", reason="ErrImagePull", message="not found"),
                ),
            ),
        ),
        Phase.PENDING,
        "ErrImagePull",
        create_workers=(1,),
        message_has="not found",
    ),
    Case(
        "scheduled but not ready is Starting",
        observe(status(Phase.PENDING), (*running_cluster()[:2], pod("worker", index=1, ready=False))),
        Phase.STARTING,
        "Starting",
    ),
    Case("all ready is Running", observe(status(Phase.STARTING), running_cluster()), Phase.RUNNING, "Running"),
    Case(
        "head exit 0 is Succeeded and deletes the cluster",
        observe(status(Phase.RUNNING), running_cluster(phase="Succeeded", container=terminated(0, reason="Completed"))),
        Phase.SUCCEEDED,
        "Succeeded",
        delete_cluster=True,
    ),
    Case(
        "trainer failure retries with a new attempt",
        observe(status(Phase.RUNNING), running_cluster(phase="Failed", container=terminated(6, message=TRAINER_FAIL))),
        Phase.PENDING,
        "Retrying",
        attempt=2,
        create_head=True,
        create_workers=(0, 1),
        delete_pods=("job-a1-head", *WORKERS),
        message_has="loss is NaN",
    ),
    Case(
        "trainer failure with backoffLimit 0 fails with the trainer's reason",
        observe(
            status(Phase.RUNNING),
            running_cluster(phase="Failed", container=terminated(6, message=TRAINER_FAIL)),
            the_spec=spec(backoffLimit=0),
        ),
        Phase.FAILED,
        "TrainingError",
        delete_cluster=True,
        message_has="backoffLimit 0 reached",
    ),
    Case(
        "retries exhausted",
        observe(
            status(Phase.RUNNING, attempt=3, failed_attempts=2, cluster=ClusterInfo(name="job-a3-head")),
            running_cluster(attempt=3, phase="Failed", container=terminated(6, message=TRAINER_FAIL)),
        ),
        Phase.FAILED,
        "TrainingError",
        attempt=3,
        delete_cluster=True,
    ),
    Case(
        "invalid dataset is not retried",
        observe(status(Phase.RUNNING), running_cluster(phase="Failed", container=terminated(3, message=DATA_FAIL))),
        Phase.FAILED,
        "InvalidDataset",
        delete_cluster=True,
        message_has="column 'sentence' missing",
    ),
    Case(
        "OOMKilled head",
        observe(
            status(Phase.RUNNING),
            running_cluster(phase="Failed", container=terminated(137, reason="OOMKilled")),
            the_spec=spec(backoffLimit=0),
        ),
        Phase.FAILED,
        "OOMKilled",
        delete_cluster=True,
        message_has="spec.resources.head.memory",
    ),
    Case(
        "exit code without a message maps through the contract",
        observe(
            status(Phase.RUNNING),
            running_cluster(phase="Failed", container=terminated(5)),
            the_spec=spec(backoffLimit=0),
        ),
        Phase.FAILED,
        "StorageError",
        delete_cluster=True,
    ),
    Case(
        "head pod lost retries",
        observe(status(Phase.RUNNING), running_cluster()[1:]),
        Phase.PENDING,
        "Retrying",
        attempt=2,
        create_head=True,
        create_workers=(0, 1),
        delete_pods=WORKERS,
        message_has="HeadPodLost",
    ),
    Case(
        "failed worker is replaced while the job keeps running",
        observe(
            status(Phase.RUNNING),
            (*running_cluster()[:2], pod("worker", index=1, phase="Failed", ready=False, container=terminated(1))),
        ),
        Phase.RUNNING,
        "Running",
        delete_pods=("job-a1-worker-1",),
    ),
    Case(
        "missing worker is re-created",
        observe(status(Phase.RUNNING), running_cluster()[:2]),
        Phase.RUNNING,
        "Running",
        create_workers=(1,),
    ),
    Case(
        "stale pods of an earlier attempt are deleted",
        observe(
            status(Phase.PENDING, attempt=2, failed_attempts=1, cluster=ClusterInfo(name="job-a2-head")),
            (pod("head", attempt=1, phase="Failed"), *running_cluster(attempt=2)),
        ),
        Phase.RUNNING,
        "Running",
        attempt=2,
        delete_pods=("job-a1-head",),
    ),
    Case(
        "suspend deletes the cluster",
        observe(status(Phase.RUNNING), running_cluster(), the_spec=spec(suspend=True)),
        Phase.SUSPENDED,
        "Suspended",
        delete_cluster=True,
    ),
    Case(
        "resume starts a new attempt without counting a failure",
        observe(status(Phase.SUSPENDED)),
        Phase.PENDING,
        "Pending",
        attempt=2,
        create_head=True,
        create_workers=(0, 1),
    ),
    Case(
        "active deadline",
        observe(status(Phase.RUNNING), running_cluster(), now=101, the_spec=spec(activeDeadlineSeconds=100)),
        Phase.FAILED,
        "DeadlineExceeded",
        delete_cluster=True,
    ),
    Case(
        "no progress",
        observe(
            status(
                Phase.RUNNING,
                progress=Progress(step=5, last_progress_time=ts(0)),
                conditions=[
                    Condition(type=ConditionType.RUNNING, status="True", reason="Running", last_transition_time=ts(0))
                ],
            ),
            running_cluster(),
            now=1801,
            metrics=MetricsSample(step=5, total_steps=100),
        ),
        Phase.FAILED,
        "NoProgress",
        delete_cluster=True,
        message_has="last step 5",
    ),
    Case(
        "invalid spec fails with the field path",
        ob.Observed(
            ident=IDENT,
            generation=1,
            spec=None,
            old=Status(),
            pods=(),
            now=at(1),
            spec_error=ftspec.SpecError([("spec.method.lora", "lora is only allowed with strategy 'lora'")]),
        ),
        Phase.FAILED,
        "InvalidSpec",
        message_has="spec.method.lora",
    ),
    Case(
        "terminal is final: nothing is created for a Succeeded job without pods",
        observe(status(Phase.SUCCEEDED, completion_time=ts(5))),
        Phase.SUCCEEDED,
        "",
    ),
    Case(
        "terminal is final: leftover pods are deleted, not adopted",
        observe(status(Phase.FAILED, completion_time=ts(5), reason="TrainingError"), running_cluster()),
        Phase.FAILED,
        "TrainingError",
        delete_cluster=True,
    ),
    Case(
        "ttl deletes the finished job",
        observe(status(Phase.SUCCEEDED, completion_time=ts(5)), now=16, the_spec=spec(ttlSecondsAfterFinished=10)),
        Phase.SUCCEEDED,
        "",
        delete_job=True,
    ),
    Case(
        "ttl not yet due",
        observe(status(Phase.SUCCEEDED, completion_time=ts(5)), now=14, the_spec=spec(ttlSecondsAfterFinished=10)),
        Phase.SUCCEEDED,
        "",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_calculate(case: Case) -> None:
    plan = st.calculate(case.observed)
    actions = plan.actions
    assert plan.status.phase is case.phase, (plan.status.reason, plan.status.message)
    assert (plan.status.reason or "") == case.reason, plan.status.message
    assert plan.attempt == case.attempt
    assert actions.create_head == case.create_head
    assert actions.create_workers == case.create_workers
    assert {p.name for p in actions.delete_pods} == set(case.delete_pods)
    assert actions.delete_cluster == case.delete_cluster
    assert actions.delete_job == case.delete_job
    assert case.message_has in (plan.status.message or "") + " ".join(e.message for e in plan.events)
    if case.phase.terminal:
        assert not actions.creates
    assert len(plan.status.message or "") <= 4096


def test_keep_cluster_setting_keeps_pods_after_success() -> None:
    obs = observe(status(Phase.RUNNING), running_cluster(phase="Succeeded", container=terminated(0)), keep_cluster=True)
    assert st.calculate(obs).actions.delete_cluster is False


def test_success_reports_artifacts_and_completion() -> None:
    plan = st.calculate(observe(status(Phase.RUNNING), running_cluster(phase="Succeeded", container=terminated(0))))
    assert plan.status.artifacts == Artifacts(model="s3://out/job/model/")
    assert plan.status.completion_time == ts(10)
    cond = plan.status.condition(ConditionType.SUCCEEDED)
    assert cond is not None and cond.status == "True" and cond.observed_generation == 1


def test_conditions_keep_transition_time_until_status_flips() -> None:
    first = st.calculate(observe(status(Phase.STARTING), running_cluster(), now=10)).status
    again = st.calculate(observe(first, running_cluster(), now=20)).status
    running = again.condition(ConditionType.RUNNING)
    assert running is not None and running.last_transition_time == ts(10)
    assert st.calculate(observe(first, running_cluster(), now=20)).events == ()  # no transition, no event


def test_progress_from_metrics_with_eta() -> None:
    sample = MetricsSample(
        step=50,
        total_steps=200,
        epoch=0.5,
        loss=0.4,
        eval_metrics={"eval_accuracy": 0.9},
        samples_per_second=64.0,
    )
    plan = st.calculate(observe(status(Phase.RUNNING), running_cluster(), metrics=sample))
    progress = plan.status.progress
    assert progress is not None
    assert (progress.step, progress.total_steps, progress.percent, progress.summary) == (50, 200, 25, "50/200 (25%)")
    # 150 steps left * (32 batch * 2 workers) samples / 64 samples/s = 150 s after now=10
    assert progress.eta == ts(160)
    assert progress.last_progress_time == ts(10)


def test_progress_time_only_moves_when_step_advances() -> None:
    old = status(Phase.RUNNING, progress=Progress(step=50, total_steps=200, last_progress_time=ts(0)))
    same = st.calculate(observe(old, running_cluster(), now=30, metrics=MetricsSample(step=50, total_steps=200)))
    assert same.status.progress is not None and same.status.progress.last_progress_time == ts(0)
    more = st.calculate(observe(old, running_cluster(), now=30, metrics=MetricsSample(step=51, total_steps=200)))
    assert more.status.progress is not None and more.status.progress.last_progress_time == ts(30)


def test_relaunched_trainer_not_reporting_yet_keeps_the_step() -> None:
    """Attempt 2's driver, still loading, has no progress: the status keeps step 50 rather than showing 0, and the
    no-progress clock stops while the model loads."""
    old = status(Phase.RUNNING, progress=Progress(step=50, total_steps=200, last_progress_time=ts(0)))
    m = contract.Metric
    loading = parse_trainer_metrics(f'{m.STEP} 0\n{m.RESUMED_FROM_STEP} 0\n{m.PHASE}{{phase="Loading"}} 1\n')
    progress = st.calculate(observe(old, running_cluster(), now=30, metrics=loading)).status.progress
    assert progress is not None and progress.step == 50 and progress.trainer_phase == "Loading"
    assert progress.last_progress_time == ts(30)


def test_events_for_transitions() -> None:
    plan = st.calculate(
        observe(status(Phase.RUNNING), running_cluster(phase="Failed", container=terminated(6, message=TRAINER_FAIL)))
    )
    reasons = [e.reason for e in plan.events]
    assert reasons == ["Retrying"]  # one event per transition, not one per source
    assert plan.events[0].type == "Warning" and "loss is NaN" in plan.events[0].message
    failed = st.calculate(
        observe(
            status(Phase.RUNNING),
            running_cluster(phase="Failed", container=terminated(6, message=TRAINER_FAIL)),
            the_spec=spec(backoffLimit=0),
        )
    )
    assert [(e.type, e.reason) for e in failed.events] == [
        ("Warning", "BackoffLimitExceeded"),
        ("Warning", "TrainingError"),
    ]


def _pod_dict(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "job-a1-head",
            "labels": {names.LABEL_ROLE: "head", names.LABEL_ATTEMPT: "1"},
            "creationTimestamp": "2026-01-01T12:00:00Z",
        },
        "status": status,
    }


def test_pod_view_reads_the_real_reasons() -> None:
    view = ob.pod_view(
        _pod_dict(
            phase="Pending",
            conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/2 nodes"}],
        )
    )
    assert view is not None and view.unschedulable_message == "0/2 nodes" and not view.scheduled
    view = ob.pod_view(
        _pod_dict(
            phase="Failed",
            podIP="10.1.1.1",
            containerStatuses=[{"state": {"terminated": {"exitCode": 6, "reason": "Error", "message": TRAINER_FAIL}}}],
        )
    )
    assert view is not None and view.container.exit_code == 6 and view.ip == "10.1.1.1"
    assert view.created == T0
    assert ob.pod_view({"metadata": {"name": "other", "labels": {}}}) is None


def test_unreadable_status_is_treated_as_empty() -> None:
    assert st.parse_status({"phase": "Exploded"}) == Status()
    assert st.parse_status(None) == Status()


@dataclasses.dataclass(frozen=True)
class StopCase:
    name: str
    pods: tuple[ob.PodView, ...]
    drain: bool
    delete_pods: tuple[str, ...] = ()
    delete_cluster: bool = False


STOP_CASES = [
    StopCase("no drain: everything at once", running_cluster(), False, delete_cluster=True),
    StopCase("drain: the head first, the workers stay", running_cluster(), True, delete_pods=("job-a1-head",)),
    StopCase("drain: the head is stopping, wait for it", running_cluster(deleting=True), True),
    StopCase(
        "drain: the head's container exited, the rest goes",
        running_cluster(deleting=True, phase="Failed", container=terminated(7)),
        True,
        delete_cluster=True,
    ),
    StopCase("drain: the head is gone, the rest goes", running_cluster()[1:], True, delete_cluster=True),
    StopCase(
        "drain: a pending head goes first too",
        running_cluster(phase="Pending", ready=False),
        True,
        delete_pods=("job-a1-head",),
    ),
    StopCase(
        "drain: all pods already deleting",
        tuple(dataclasses.replace(p, deleting=True) for p in running_cluster()[1:]),
        True,
    ),
    StopCase("nothing left", (), True),
]


@pytest.mark.parametrize("case", STOP_CASES, ids=lambda c: c.name)
def test_stop_cluster_lets_the_head_checkpoint_before_its_workers_go(case: StopCase) -> None:
    actions = st.stop_cluster(case.pods, drain=case.drain)
    assert tuple(p.name for p in actions.delete_pods) == case.delete_pods
    assert actions.delete_cluster is case.delete_cluster


def test_suspend_with_drain_stops_the_head_first_and_the_rest_once_it_exited() -> None:
    suspended = spec(suspend=True)
    first = st.calculate(observe(status(Phase.RUNNING), running_cluster(), the_spec=suspended, drain_on_stop=True))
    assert first.status.phase is Phase.SUSPENDED
    assert [p.name for p in first.actions.delete_pods] == ["job-a1-head"] and not first.actions.delete_cluster
    draining = running_cluster(deleting=True)
    second = st.calculate(observe(first.status, draining, the_spec=suspended, drain_on_stop=True))
    assert second.status.phase is Phase.SUSPENDED and second.actions == st.Actions()
    exited = running_cluster(deleting=True, phase="Failed", container=terminated(7))
    third = st.calculate(observe(second.status, exited, the_spec=suspended, drain_on_stop=True))
    assert third.actions.delete_cluster and third.status.phase is Phase.SUSPENDED
