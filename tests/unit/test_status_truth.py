"""Failure paths where the status used to lie, a healthy job died, or text jammed the status (issue 10), table-driven.

Each case is a hand-built observed state (the way the defects were found) and what the status must say about it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import pytest
from finetune_operator import reasons
from finetune_operator import status as st
from finetune_operator.observe import ContainerView
from finetune_operator.status_model import (
    AttemptRecord,
    ClusterInfo,
    Condition,
    ConditionType,
    OperatorDefaults,
    Phase,
    Progress,
    Status,
)
from finetune_operator.trainer_metrics import MetricsSample, parse_trainer_metrics
from finetune_trainer import contract

from tests.unit.test_operator_status import (
    T0,
    observe,
    pod,
    running_cluster,
    spec,
    status,
    terminated,
    ts,
)

HOUR = 3600
LABELS_400 = "validation labels not seen in training: " + ", ".join(f"'label-{i:03d}'" for i in range(400))


def _report_line(reason: str, message: str) -> str:
    """A report line as an older trainer wrote it (no size limit), so the operator must do the clipping itself."""
    return json.dumps({"reason": reason, "message": message})


def running_since_start(**kw: Any) -> Status:
    """A job that has been Running since T0 (its attempt record says so)."""
    running = Condition(type=ConditionType.RUNNING, status="True", reason="Running", last_transition_time=ts(0))
    record = AttemptRecord(attempt=1, start_time=ts(0), running_time=ts(0))
    return status(Phase.RUNNING, conditions=[running], attempts=[record], **kw)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    observed: Any
    phase: Phase
    reason: str
    check: Callable[[st.Plan], None] = lambda _plan: None


def _short_status_text(plan: st.Plan) -> None:
    s = plan.status
    texts = [s.message or "", *(c.message for c in s.conditions)]
    if s.last_failure is not None:
        texts += [s.last_failure.message, *(s.last_failure.log_tail or [])]
    assert all(len(t) <= 4096 for t in texts), [len(t) for t in texts]
    assert s.message is not None and "[truncated]" in s.message
    assert all(len(e.message) <= 1024 for e in plan.events)


def _short_with_advice(plan: st.Plan) -> None:
    _short_status_text(plan)
    assert (plan.status.message or "").endswith("(attempt 1; backoffLimit 0 reached)")  # the advice survives


def _retried(plan: st.Plan) -> None:
    assert plan.status.failed_attempts == 1 and plan.actions.create_head
    assert plan.status.last_failure is not None and plan.status.last_failure.reason == "Unschedulable"


def _still_running(plan: st.Plan) -> None:
    assert "Unschedulable" in (plan.status.message or "") and plan.actions.create_workers == ()
    assert plan.status.failed_attempts == 0 and plan.status.completion_time is None


def _not_failed(plan: st.Plan) -> None:
    assert plan.status.completion_time is None and not plan.actions.delete_cluster


def _replica_failure_kept(plan: st.Plan) -> None:
    cond = plan.status.condition(ConditionType.REPLICA_FAILURE)
    assert cond is not None and cond.status == "True" and "exceeded quota" in cond.message


def _kept_step(plan: st.Plan) -> None:
    assert plan.status.progress is not None and plan.status.progress.step == 50


WORKER_1_UNSCHEDULABLE = {
    "phase": "Pending",
    "ready": False,
    "scheduled": False,
    "unschedulable_message": "0/2 nodes are available: 2 Insufficient cpu",
}
STUCK_CREATING = {"phase": "Pending", "ready": False, "scheduled": True}
CREATING = ContainerView(state="waiting", reason="ContainerCreating")
STALE_PROGRESS = Progress(step=50, total_steps=200, last_progress_time=ts(0))
EVALUATING = MetricsSample(step=50, total_steps=200, trainer_phase=contract.TrainerPhase.EVALUATING)

CASES = [
    # 1. a replacement pod is timed from its own creation, and trouble while running goes through retry/backoff
    Case(
        "3-hour-old running job with a just-created unschedulable worker keeps running",
        observe(
            running_since_start(),
            (
                *running_cluster()[:2],
                pod("worker", index=1, created=T0 + dt.timedelta(seconds=3 * HOUR - 5), **WORKER_1_UNSCHEDULABLE),
            ),
            now=3 * HOUR,
        ),
        Phase.RUNNING,
        "Running",
        _still_running,
    ),
    Case(
        "replacement worker unschedulable past the pending deadline retries the attempt",
        observe(
            running_since_start(),
            (
                *running_cluster()[:2],
                pod("worker", index=1, created=T0 + dt.timedelta(seconds=2 * HOUR), **WORKER_1_UNSCHEDULABLE),
            ),
            now=2 * HOUR + 601,
        ),
        Phase.PENDING,
        "Retrying",
        _retried,
    ),
    # 2. a long failure message is clipped everywhere status text is written
    Case(
        "a 4,131-character trainer message ends Failed with a clipped message",
        observe(
            status(Phase.RUNNING),
            running_cluster(
                phase="Failed",
                container=terminated(3, message=_report_line("InvalidDataset", LABELS_400[:4131].ljust(4131, "x"))),
            ),
            the_spec=spec(backoffLimit=0),
        ),
        Phase.FAILED,
        "InvalidDataset",
        _short_status_text,
    ),
    Case(
        "a 4,131-character pod message (no report) is clipped too",
        observe(
            status(Phase.RUNNING),
            running_cluster(phase="Failed", reason="Evicted", message="x" * 4131, container=terminated(137)),
            the_spec=spec(backoffLimit=0),
        ),
        Phase.FAILED,
        "Evicted",
        _short_with_advice,
    ),
    # 4. the head's outcome is decided before the active deadline
    Case(
        "head succeeded but observed after activeDeadlineSeconds is Succeeded",
        observe(
            status(Phase.RUNNING),
            running_cluster(phase="Succeeded", container=terminated(0, reason="Completed")),
            now=HOUR,
            the_spec=spec(activeDeadlineSeconds=600),
        ),
        Phase.SUCCEEDED,
        "Succeeded",
    ),
    # 5. the watchdog acts only on a fresh scrape of a trainer that is training
    Case(
        "stale lastProgressTime without a scrape (operator was down) does not fail the job",
        observe(running_since_start(progress=STALE_PROGRESS), running_cluster(), now=1900),
        Phase.RUNNING,
        "Running",
        _not_failed,
    ),
    Case(
        "evaluating longer than progressDeadlineSeconds is not NoProgress",
        observe(running_since_start(progress=STALE_PROGRESS), running_cluster(), now=1900, metrics=EVALUATING),
        Phase.RUNNING,
        "Running",
        _kept_step,
    ),
    Case(
        "a relaunched trainer loading the model is not NoProgress",
        observe(
            running_since_start(progress=STALE_PROGRESS),
            running_cluster(),
            now=1900,
            metrics=parse_trainer_metrics(f'{contract.Metric.PHASE}{{phase="Loading"}} 1\n'),
        ),
        Phase.RUNNING,
        "Running",
        _kept_step,
    ),
    Case(
        "training with no new step past the deadline, freshly scraped, is NoProgress",
        observe(
            running_since_start(progress=STALE_PROGRESS),
            running_cluster(),
            now=1900,
            metrics=MetricsSample(step=50, total_steps=200, trainer_phase=contract.TrainerPhase.TRAINING),
            the_spec=spec(backoffLimit=0),
        ),
        Phase.FAILED,
        "NoProgress",
    ),
    # 6. every not-running state has a deadline
    Case(
        "a pod stuck in ContainerCreating past the pending deadline fails the job",
        observe(
            status(Phase.STARTING),
            (*running_cluster()[:2], pod("worker", index=1, container=CREATING, **STUCK_CREATING)),
            now=601,
        ),
        Phase.FAILED,
        "ContainerCreating",
    ),
    Case(
        "a pod pending with no reason at all past the deadline fails with PendingDeadlineExceeded",
        observe(status(Phase.STARTING), (*running_cluster()[:2], pod("worker", index=1, **STUCK_CREATING)), now=601),
        Phase.FAILED,
        reasons.PENDING_DEADLINE_EXCEEDED,
    ),
    Case(
        "ContainerCreating within the deadline is just Starting",
        observe(
            status(Phase.STARTING),
            (*running_cluster()[:2], pod("worker", index=1, container=CREATING, **STUCK_CREATING)),
            now=30,
        ),
        Phase.STARTING,
        "Starting",
    ),
    Case(
        "a refused pod keeps its reason until the pending deadline, then fails",
        observe(
            status(
                Phase.PENDING,
                cluster=ClusterInfo(name="job-a1-head"),
                reason="FailedCreate",
                conditions=[
                    Condition(
                        type=ConditionType.REPLICA_FAILURE,
                        status="True",
                        reason="FailedCreate",
                        message="creating Pod job-a1-head was refused: exceeded quota",
                        last_transition_time=ts(0),
                    )
                ],
            ),
            (),
            now=601,
        ),
        Phase.FAILED,
        "FailedCreate",
        _replica_failure_kept,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_status_tells_the_truth(case: Case) -> None:
    plan = st.calculate(case.observed)
    assert plan.status.phase is case.phase, (plan.status.reason, plan.status.message)
    assert plan.status.reason == case.reason, plan.status.message
    case.check(plan)
    for text in (plan.status.message or "", *(c.message for c in plan.status.conditions)):
        assert len(text) <= 4096


def test_refused_creation_shows_in_a_condition_and_an_event_and_keeps_its_clock() -> None:
    plan = st.calculate(observe(Status()))
    problem = st.CreationProblem(
        "FailedCreate", "Pod", "job-a1-head", 'pods "job-a1-head" is forbidden: exceeded quota'
    )
    first, events = st.record_creation_problem(plan.status, problem, now=T0, generation=1)
    cond = first.condition(ConditionType.REPLICA_FAILURE)
    assert cond is not None and cond.status == "True" and "exceeded quota" in cond.message
    assert (first.phase, first.reason) == (Phase.PENDING, "FailedCreate")
    assert [e.reason for e in events] == ["FailedCreate"]
    again, events = st.record_creation_problem(first, problem, now=T0 + dt.timedelta(seconds=30), generation=1)
    assert again.condition(ConditionType.REPLICA_FAILURE) == cond and events == ()  # same since, no repeated Event
    # The next reconcile keeps it (pods still missing) instead of flipping it to False and restarting the clock.
    kept = st.calculate(observe(again, now=40)).status
    assert kept.condition(ConditionType.REPLICA_FAILURE) == cond and kept.reason == "FailedCreate"
    # Once the pods exist, it is False.
    created = st.calculate(observe(again, running_cluster(), now=50)).status.condition(ConditionType.REPLICA_FAILURE)
    assert created is not None and created.status == "False"


def test_name_conflict_says_what_to_do() -> None:
    problem = st.CreationProblem("NameConflict", "ConfigMap", "bert-config", "it has no owner")
    assert "not owned by this job" in problem.message and "left alone" in problem.message


# 7. operator defaults are pinned at the first reconcile
def test_operator_defaults_are_pinned_at_the_first_reconcile() -> None:
    first = OperatorDefaults(output_base_uri="s3://models/", trainer_image="trainer:1")
    plan = st.calculate(observe(Status(), defaults=first))
    assert plan.status.operator_defaults == first
    later = OperatorDefaults(output_base_uri=None, trainer_image="trainer:2")
    again = st.calculate(observe(plan.status, running_cluster(), defaults=later))
    assert again.status.operator_defaults == first


# 8. lastFailure: the trainer's report first, else Kubernetes' reason and the pod's log tail
def test_last_failure_from_the_trainer_report() -> None:
    report = contract.TrainerReport(
        reason="TrainingError",
        message="loss is NaN at step 40",
        log_tail=("step 39 loss 0.7", "step 40 loss nan"),
        log_uri="s3://out/job/logs/attempt-1.log",
    )
    plan = st.calculate(
        observe(
            status(Phase.RUNNING), running_cluster(phase="Failed", container=terminated(6, message=report.to_line()))
        )
    )
    failure = plan.status.last_failure
    assert failure is not None
    assert (failure.reason, failure.exit_code, failure.pod, failure.attempt) == ("TrainingError", 6, "job-a1-head", 1)
    assert failure.log_tail == ["step 39 loss 0.7", "step 40 loss nan"]
    assert failure.log_uri == "s3://out/job/logs/attempt-1.log"
    assert plan.status.attempt == 2  # retried, and the failure of attempt 1 is still there to read


def test_last_failure_without_a_report_uses_kubernetes_and_the_log_tail() -> None:
    obs = observe(
        status(Phase.RUNNING),
        running_cluster(phase="Failed", container=terminated(137, reason="OOMKilled")),
        the_spec=spec(backoffLimit=0),
        log_tails={"job-a1-head": ("loading model", "tokenizing 10000 rows")},
    )
    failure = st.calculate(obs).status.last_failure
    assert failure is not None and failure.reason == "OOMKilled" and failure.exit_code == 137
    assert "spec.resources.head.memory" in failure.message
    assert failure.log_tail == ["loading model", "tokenizing 10000 rows"] and failure.log_uri is None


@dataclasses.dataclass(frozen=True)
class ExitCase:
    name: str
    container: ContainerView
    reason: str
    says: tuple[str, ...] = ()


EXIT_CASES = [
    # crictl stop --timeout 0 on the real node: containerd says "Error", exit 137, and no report (issue 9)
    ExitCase("sigkill", terminated(137), "KilledBySignal", ("by SIGKILL (exit code 137), not by the OOM killer",)),
    ExitCase("sigkill-oom", terminated(137, reason="OOMKilled"), "OOMKilled", ("raise spec.resources.head.memory",)),
    ExitCase("sigsegv", terminated(139), "KilledBySignal", ("killed by SIGSEGV (exit code 139)", "native code")),
    ExitCase("sigterm-no-report", terminated(143), "KilledBySignal", ("SIGTERM", "did not get to report")),
    ExitCase("sigabrt-with-message", terminated(134, message="Aborted"), "KilledBySignal", ("SIGABRT", ": Aborted")),
    ExitCase("contract-exit", terminated(6), "TrainingError", ("exited with code 6",)),
    ExitCase("unknown-exit", terminated(1), "TrainerExited", ("exited with code 1",)),
    ExitCase("not-a-signal", terminated(255), "TrainerExited", ("exited with code 255",)),
    ExitCase(
        "report-wins",
        terminated(137, message=contract.failure_line(contract.Reason.INTERRUPTED, "SIGTERM")),
        "Interrupted",
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", EXIT_CASES, ids=[c.name for c in EXIT_CASES])
def test_a_container_ended_without_a_report_gets_a_truthful_reason(case: ExitCase) -> None:
    head = pod("head", phase="Failed", ready=False, container=case.container)
    failure = st.failure_of(head, now=ts(10))
    assert failure.reason == case.reason, failure
    assert all(text in failure.message for text in case.says), failure.message
    assert reasons.retryable(failure.reason) or case.reason == "InvalidSpec"


def test_worker_oom_is_recorded_while_the_job_keeps_running() -> None:
    oom = pod("worker", index=1, phase="Failed", ready=False, container=terminated(137, reason="OOMKilled"))
    plan = st.calculate(observe(running_since_start(), (*running_cluster()[:2], oom)))
    assert plan.status.phase is Phase.RUNNING
    failure = plan.status.last_failure
    assert failure is not None and failure.reason == "OOMKilled" and "memoryPerWorker" in failure.message
    assert any(e.reason == "WorkerReplaced" and "OOMKilled" in e.message for e in plan.events)


# 13 + contract: the watched metric, the timeline, the latest checkpoint, the resume step per attempt
def test_progress_shows_the_watched_metric_not_the_last_exported() -> None:
    m = contract.Metric
    text = (
        f'{m.STEP} 10\n{m.TOTAL_STEPS} 100\n{m.PHASE}{{phase="Training"}} 1\n'
        f'{m.EVAL_METRIC}{{metric="eval_accuracy"}} 0.9\n{m.EVAL_METRIC}{{metric="eval_loss"}} 0.3\n'
    )
    progress = st.calculate(observe(running_since_start(), running_cluster(), metrics=parse_trainer_metrics(text)))
    shown = progress.status.progress
    assert shown is not None and (shown.eval_metric_name, shown.eval_metric) == ("eval_accuracy", 0.9)
    newer = text + f'{m.WATCHED_METRIC}{{metric="eval_f1"}} 0.8\n'
    shown = st.calculate(observe(running_since_start(), running_cluster(), metrics=parse_trainer_metrics(newer)))
    assert shown.status.progress is not None and shown.status.progress.eval_metric_name == "eval_f1"


def test_timeline_checkpoint_and_resume_step_are_kept() -> None:
    m = contract.Metric
    t = T0.timestamp()
    text = (
        f'{m.STEP} 40\n{m.TOTAL_STEPS} 100\n{m.RESUMED_FROM_STEP} 20\n{m.PHASE}{{phase="Training"}} 1\n'
        f"{m.MODEL_LOADED_TIMESTAMP} {t + 5}\n{m.FIRST_STEP_TIMESTAMP} {t + 8}\n"
        f'{m.CHECKPOINT_INFO}{{uri="s3://out/job/checkpoints/r/checkpoint_step_00000040"}} 40\n'
        f"{m.LAST_CHECKPOINT_TIMESTAMP} {t + 9}\n"
    )
    plan = st.calculate(
        observe(running_since_start(), running_cluster(), now=10, metrics=parse_trainer_metrics(text), created=ts(-3))
    )
    s = plan.status
    assert s.timeline is not None
    assert (s.timeline.created, s.timeline.model_loaded, s.timeline.first_step) == (ts(-3), ts(5), ts(8))
    assert s.checkpoint is not None and (s.checkpoint.step, s.checkpoint.time) == (40, ts(9))
    assert s.checkpoint.uri == "s3://out/job/checkpoints/r/checkpoint_step_00000040"
    assert s.current_attempt() is not None and s.current_attempt().resumed_from_step == 20  # type: ignore[union-attr]
    # A later scrape that fails (None) or a relaunched trainer still loading keeps every one of them.
    loading = parse_trainer_metrics(f'{m.PHASE}{{phase="Loading"}} 1\n')
    for metrics in (None, loading):
        kept = st.calculate(observe(s, running_cluster(), now=20, metrics=metrics)).status
        assert (kept.timeline, kept.checkpoint, kept.attempts) == (s.timeline, s.checkpoint, s.attempts)


def test_success_report_sets_result_and_negative_transfer() -> None:
    report = contract.TrainerReport(
        reason=contract.SUCCEEDED,
        metric_name="eval_accuracy",
        metric=0.61,
        baseline=0.64,
        negative_transfer=True,
        kept_step=30,
        resumed_from_step=20,
    )
    head = {"phase": "Succeeded", "container": terminated(0, reason="Completed", message=report.to_line())}
    plan = st.calculate(observe(running_since_start(), running_cluster(**head)))
    s = plan.status
    assert s.phase is Phase.SUCCEEDED
    cond = s.condition(ConditionType.NEGATIVE_TRANSFER)
    assert cond is not None and cond.status == "True" and "0.61" in cond.message and "0.64" in cond.message
    assert any(e.reason == "NegativeTransfer" for e in plan.events)
    assert s.result is not None and (s.result.metric, s.result.baseline, s.result.kept_step) == (0.61, 0.64, 30)
    assert s.attempts[-1].resumed_from_step == 20 and s.attempts[-1].reason == "Succeeded"
    assert s.timeline is not None and s.timeline.finished == s.completion_time


def test_quality_gate_failure_is_not_retried() -> None:
    line = contract.failure_line(contract.Reason.QUALITY_GATE_FAILED, "eval_accuracy 0.70 < minMetric 0.85")
    plan = st.calculate(
        observe(status(Phase.RUNNING), running_cluster(phase="Failed", container=terminated(8, message=line)))
    )
    assert (plan.status.phase, plan.status.reason, plan.status.attempt) == (Phase.FAILED, "QualityGateFailed", 1)
    assert "0.70" in (plan.status.message or "")


@pytest.mark.parametrize("text", ["x" * 5000, "é" * 3000, "标签" * 1500, "a" * 4096, "ü" * 2048], ids=len)
def test_status_text_fits_in_bytes_and_characters(text: str) -> None:
    s = Status(
        message=text,
        conditions=[
            Condition(type=ConditionType.READY, status="False", reason="R", message=text, last_transition_time=ts(0))
        ],
    )
    for value in (s.message or "", s.conditions[0].message):
        assert len(value.encode("utf-8")) <= 4096
        assert value == text or value.endswith("…[truncated]")


def test_every_reason_has_advice_and_warnings_carry_it() -> None:
    missing = sorted((reasons.FAILURE_REASONS | reasons.OTHER_REASONS) - reasons.ADVICE.keys())
    assert not missing, f"no advice for: {missing}"
    plan = st.calculate(
        observe(
            status(Phase.RUNNING),
            running_cluster(phase="Failed", container=terminated(137, reason="OOMKilled")),
            the_spec=spec(backoffLimit=0),
        )
    )
    failed = next(e for e in plan.events if e.reason == "OOMKilled")
    assert "what to do: raise the memory" in failed.message and len(failed.message) <= 1024
