"""Pure status and decisions: calculate(observed) -> Plan (the new status, what to create/delete, events).

Why pure: "the status tells the truth" and "terminal states are final" are properties of one function of what is
observed (the job, its pods, the trainer's metrics, the clock), so they are tested exhaustively table-driven
without a cluster. The service layer only gathers the Observed snapshot (observe.py) and carries out the Plan.
Nothing here depends on memory of earlier reconciles beyond what the status stored in the API server says, so an
operator restarted at any moment takes the same decisions.

The decision, in order: a finished job stays finished; an invalid spec fails; suspend; for a job under Kueue, wait
Queued (no pods) until its Workload is admitted, and go back there when Kueue evicts it; the head's outcome (a head
that succeeded wins over every deadline: its artifacts are complete); the active deadline; the head's failure
(retry or fail); otherwise the attempt is alive: repair it, time every not-running pod from its own creation, and
report Pending / Starting / Running.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import signal
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from finetune_trainer import contract
from finetune_trainer import spec as ftspec

from finetune_operator import kueue as kq
from finetune_operator import names, reasons
from finetune_operator.observe import Observed, PodRef, PodView
from finetune_operator.status_model import (
    ATTEMPTS_KEPT,
    AttemptRecord,
    ClusterInfo,
    Condition,
    ConditionType,
    LastFailure,
    Phase,
    Status,
    TrainingResult,
    clip,
    clip_with_suffix,
    parse_time,
    rfc3339,
)
from finetune_operator.trainer_progress import advance_milestones, progress_of, watched_metric_name

EVENT_MESSAGE_MAX = 1024


@dataclasses.dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Actions:
    """What to do to the cluster after the status is written."""

    create_support: bool = False  # ConfigMap, NetworkPolicy and head Service of status.attempt
    create_head: bool = False
    create_workers: tuple[int, ...] = ()
    delete_pods: tuple[PodRef, ...] = ()
    delete_cluster: bool = False  # every child of every attempt that this job owns
    delete_job: bool = False  # ttlSecondsAfterFinished
    workload: kq.WorkloadActions | None = None  # Kueue (labelled jobs only): the Workload write and the placement

    @property
    def creates(self) -> bool:
        return self.create_support or self.create_head or bool(self.create_workers)


@dataclasses.dataclass(frozen=True)
class Plan:
    status: Status
    actions: Actions = Actions()
    events: tuple[Event, ...] = ()

    @property
    def attempt(self) -> int:
        return self.status.attempt or 1


@dataclasses.dataclass(frozen=True)
class Outcome:
    phase: Phase
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class _Attempt:
    """The current attempt as observed, plus the status carried forward to this reconcile."""

    obs: Observed
    spec: ftspec.FineTuneJobSpec
    base: Status
    number: int
    head: PodView | None
    workers: Mapping[str, PodView]
    stale: tuple[PodRef, ...]
    cluster: ClusterInfo
    events: tuple[Event, ...]

    @property
    def now(self) -> str:
        return rfc3339(self.obs.now)

    @property
    def ran(self) -> bool:
        """This attempt has run (head and workers ready) at some point: recorded durably in status.attempts."""
        record = self.base.current_attempt()
        if record is not None and record.running_time is not None:
            return True
        old = self.obs.old  # a status written before status.attempts existed
        return old.phase is Phase.RUNNING and (old.attempt or 1) == self.number


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------


def calculate(obs: Observed) -> Plan:
    """The whole decision: new status + actions. Never raises for any observed state.

    A job under Kueue (obs.queue set) takes the same path once admitted; before that, and after an eviction, it
    waits Queued without pods; what the plan means for its Workload is added last (_with_queue).
    """
    plan = _calculate(obs)
    return _with_queue(obs, obs.queue, plan) if obs.queue is not None else plan


def _calculate(obs: Observed) -> Plan:
    old = obs.old
    if old.phase is not None and old.phase.terminal:
        return _terminal(obs)
    if obs.spec is None:
        return _invalid_spec(obs)
    base = _carry(obs, obs.spec)
    if obs.spec.suspend:
        return _suspend(obs, obs.spec, base)
    if obs.queue is not None and kq.gate(obs.queue) is not kq.Gate.RUN:
        return _queued(obs, obs.queue, obs.spec, base)
    base, events = _resume(obs, base)
    attempt = _attempt(obs, obs.spec, base, events)
    head = attempt.head
    if head is not None and head.phase == "Succeeded":
        return _succeeded(attempt, head)
    deadline = _active_deadline(attempt)
    if deadline is not None:
        return _fail(attempt, deadline)
    failure = _head_failure(attempt)
    if failure is not None:
        return _attempt_failed(attempt, failure)
    return _alive(attempt)


def parse_status(raw: Mapping[str, Any] | None) -> Status:
    """Read the stored status; a status this operator cannot read is treated as empty (never a crash)."""
    try:
        return Status.model_validate(dict(raw or {}))
    except ValueError:
        return Status()


# ---------------------------------------------------------------------------------------------------------------
# before the attempt: terminal, invalid, suspend, resume
# ---------------------------------------------------------------------------------------------------------------


def _terminal(obs: Observed) -> Plan:
    """Terminal states are final: only clean up and honour the TTL."""
    old = obs.old
    any_live = any(not p.deleting for p in obs.pods)
    return Plan(
        status=old.model_copy(update={"observed_generation": obs.generation}),
        actions=Actions(
            delete_cluster=any_live and not obs.keep_cluster,
            delete_job=obs.spec is not None and _ttl_expired(obs.spec, old, obs.now),
        ),
    )


def _invalid_spec(obs: Observed) -> Plan:
    message = str(obs.spec_error) if obs.spec_error else "invalid spec"
    outcome = Outcome(
        Phase.FAILED,
        reasons.INVALID_SPEC,
        clip_with_suffix(message, " (fix the manifest and re-create the job)"),
    )
    base = obs.old.model_copy(update={"operator_defaults": obs.old.operator_defaults or obs.defaults})
    return _plan(
        obs,
        base=base,
        outcome=outcome,
        actions=Actions(delete_cluster=bool(obs.pods) and not obs.keep_cluster),
    )


def _carry(obs: Observed, spec: ftspec.FineTuneJobSpec) -> Status:
    """The stored status with this reconcile's durable facts added (numbers, pinned defaults, milestones)."""
    old = obs.old
    update: dict[str, Any] = {
        "attempt": old.attempt or 1,
        "failed_attempts": old.failed_attempts or 0,
        "start_time": old.start_time or rfc3339(obs.now),
        "operator_defaults": old.operator_defaults or obs.defaults,
    }
    base = old.model_copy(update=update)
    return advance_milestones(base, obs=obs)


def _suspend(obs: Observed, spec: ftspec.FineTuneJobSpec, base: Status) -> Plan:
    workers = spec.resources.workers
    if obs.old.phase is not Phase.SUSPENDED:
        base = _end_attempt(base, reason="Suspended", now=rfc3339(obs.now))
    return _plan(
        obs,
        base=base,
        outcome=Outcome(
            Phase.SUSPENDED,
            "Suspended",
            "the Ray cluster is deleted; checkpoints are kept; set spec.suspend=false to resume",
        ),
        actions=stop_cluster(obs.pods, drain=obs.drain_on_stop),
        cluster=ClusterInfo(workers=workers, workers_ready=0, ready=f"0/{workers}"),
    )


def stop_cluster(pods: Sequence[PodView], *, drain: bool) -> Actions:
    """Stop a running job's Ray cluster on request (suspend, Kueue eviction).

    With `drain`, the head goes first: its trainer gets SIGTERM and has the workers write a checkpoint at their next
    step, which needs the workers alive. So the workers (and the Service, ConfigMap, NetworkPolicy) are deleted only
    once no head is running any more: none left, or its container has exited (phase Succeeded/Failed). Without
    `drain`, or when there is no running head to wait for, everything is deleted at once.
    """
    heads = [p for p in pods if p.role == names.ROLE_HEAD and not p.finished]
    if drain and heads:
        return Actions(delete_pods=tuple(PodRef(p.name, p.uid) for p in heads if not p.deleting))
    return Actions(delete_cluster=any(not p.deleting for p in pods))


def _queued(obs: Observed, queue: kq.QueueObserved, spec: ftspec.FineTuneJobSpec, base: Status) -> Plan:
    """Kueue has not admitted the job, or evicted it: no pods (an attempt they belonged to ends, not as a failure),
    and no deadline runs (start_time starts at admission)."""
    reason, message = kq.waiting_words(queue)
    record = base.current_attempt()
    if record is not None and record.end_time is None:
        base = _end_attempt(base, reason=reason, now=rfc3339(obs.now))
    base = base.model_copy(update={"start_time": obs.old.start_time})
    workers = spec.resources.workers
    return _plan(
        obs,
        base=base,
        outcome=Outcome(Phase.QUEUED, reason, message),
        actions=stop_cluster(obs.pods, drain=obs.drain_on_stop),
        cluster=ClusterInfo(workers=workers, workers_ready=0, ready=f"0/{workers}"),
    )


def _with_queue(obs: Observed, queue: kq.QueueObserved, plan: Plan) -> Plan:
    """The plan plus what it means for the job's Workload, and status.queue (Kueue's view) while not finished."""
    status = plan.status
    terminal = status.phase is not None and status.phase.terminal
    workload = kq.workload_actions(
        queue,
        suspend=obs.spec is not None and obs.spec.suspend,
        terminal=terminal,
        succeeded=status.phase is Phase.SUCCEEDED,
        message=status.message or "",
        pods_left=bool(obs.pods),
        now=obs.now,
    )
    if not terminal:
        queued = kq.queue_status(queue, old=obs.old.queue, now=rfc3339(obs.now))
        status = status.model_copy(update={"queue": queued})
    return dataclasses.replace(plan, status=status, actions=dataclasses.replace(plan.actions, workload=workload))


def _resumes(obs: Observed, base: Status) -> bool:
    """After Suspended, or after Kueue took the quota back from an attempt that had started (its record ended)."""
    if obs.old.phase is Phase.SUSPENDED:
        return True
    record = base.current_attempt()
    return obs.old.phase is Phase.QUEUED and record is not None and record.end_time is not None


def _resume(obs: Observed, base: Status) -> tuple[Status, tuple[Event, ...]]:
    """Resume after Suspended or an eviction: a new attempt (not a failure) continuing from the latest checkpoint."""
    if not _resumes(obs, base):
        return base, ()
    attempt = (base.attempt or 1) + 1
    base = base.model_copy(
        update={"attempt": attempt, "start_time": rfc3339(obs.now), "attempt_start_time": None, "cluster": None}
    )
    return base, (Event("Normal", "Resumed", f"starting attempt {attempt} from the latest checkpoint"),)


def _attempt(obs: Observed, spec: ftspec.FineTuneJobSpec, base: Status, events: tuple[Event, ...]) -> _Attempt:
    number = base.attempt or 1
    current = [p for p in obs.pods if p.attempt == number]
    workers = spec.resources.workers
    ready = sum(1 for p in current if p.role == names.ROLE_WORKER and p.ready and not p.deleting)
    head_name = names.head_name(obs.ident.name, number)
    head = next((p for p in current if p.role == names.ROLE_HEAD), None)
    old_head = base.cluster.head_pod if base.cluster else None
    return _Attempt(
        obs=obs,
        spec=spec,
        base=base,
        number=number,
        head=head,
        workers={p.name: p for p in current if p.role == names.ROLE_WORKER},
        stale=tuple(PodRef(p.name, p.uid) for p in obs.pods if p.attempt != number and not p.deleting),
        cluster=ClusterInfo(
            name=head_name,
            head_pod=head_name if head is not None or old_head == head_name else None,
            workers=workers,
            workers_ready=ready,
            ready=f"{ready}/{workers}",
        ),
        events=events,
    )


# ---------------------------------------------------------------------------------------------------------------
# the head decides the attempt
# ---------------------------------------------------------------------------------------------------------------


def _succeeded(attempt: _Attempt, head: PodView) -> Plan:
    obs, spec = attempt.obs, attempt.spec
    report = head.container.report
    progress = progress_of(obs, spec)
    if progress is not None and progress.total_steps:
        total = progress.total_steps
        done = {"step": max(progress.step or 0, total), "percent": 100, "summary": f"{total}/{total} (100%)"}
        progress = progress.model_copy(update={**done, "eta": None})
    base = attempt.base.model_copy(update={"artifacts": obs.artifacts, "progress": progress, "result": _result(report)})
    base = _end_attempt(base, reason="Succeeded", now=attempt.now, resumed=_resumed(report))
    events = list(attempt.events)
    negative = _negative_transfer(report)
    if negative is not None and negative.status == "True":
        events.append(Event("Warning", reasons.NEGATIVE_TRANSFER, negative.message))
    return _plan(
        obs,
        base=base,
        outcome=Outcome(Phase.SUCCEEDED, "Succeeded", f"artifacts written to {spec.output.uri}"),
        events=events,
        cluster=attempt.cluster,
        actions=Actions(delete_pods=attempt.stale),
        extra_conditions=(negative,) if negative is not None else (),
    )


def _result(report: contract.TrainerReport | None) -> TrainingResult | None:
    if report is None or report.reason != contract.SUCCEEDED:
        return None
    result = TrainingResult(
        metric_name=report.metric_name,
        metric=report.metric,
        baseline=report.baseline,
        negative_transfer=report.negative_transfer,
        kept_step=report.kept_step,
    )
    return result if result.wire() else None


def _resumed(report: contract.TrainerReport | None) -> int | None:
    return report.resumed_from_step if report is not None else None


def _head_resumed(attempt: _Attempt) -> int | None:
    """The resume step the head's final report gives (durable: it arrives with the terminated pod's status)."""
    return _resumed(attempt.head.container.report) if attempt.head is not None else None


def _negative_transfer(report: contract.TrainerReport | None) -> Condition | None:
    if report is None or report.negative_transfer is None:
        return None
    name = report.metric_name or "the watched metric"
    numbers = f"{name} {report.metric!s} vs baseline {report.baseline!s}"
    if report.negative_transfer:
        message = (
            f"fine-tuning did not beat the baseline by evaluation.minGain ({numbers}); the model is published, but "
            "the pretrained weights did not help: see docs/troubleshooting.md#negativetransfer"
        )
        return Condition(
            type=ConditionType.NEGATIVE_TRANSFER, status="True", reason=reasons.NEGATIVE_TRANSFER,
            message=message, last_transition_time="",
        )  # fmt: skip
    return Condition(
        type=ConditionType.NEGATIVE_TRANSFER, status="False", reason="BaselineBeaten", message=numbers,
        last_transition_time="",
    )  # fmt: skip


def _active_deadline(attempt: _Attempt) -> LastFailure | None:
    deadline = attempt.spec.active_deadline_seconds
    started = parse_time(attempt.base.start_time)
    if deadline is None or started is None or (attempt.obs.now - started).total_seconds() <= deadline:
        return None
    return LastFailure(
        reason=reasons.DEADLINE_EXCEEDED,
        message=f"active for more than activeDeadlineSeconds={deadline}; raise it or shorten the run (maxSteps)",
        attempt=attempt.number,
        time=attempt.now,
    )


def failure_of(pod: PodView, *, log_tail: Sequence[str] = (), now: str) -> LastFailure:
    """The real reason a pod failed: the trainer's own report first, then Kubernetes' words and the pod's log."""
    term = pod.container
    report = term.report
    common: dict[str, Any] = {"exit_code": term.exit_code, "pod": pod.name, "attempt": pod.attempt, "time": now}
    if report is not None and report.reason != contract.SUCCEEDED:
        return LastFailure(
            reason=report.reason,
            message=report.message,
            log_tail=list(report.log_tail) or list(log_tail) or None,
            log_uri=report.log_uri,
            **common,
        )
    tail = list(log_tail) or None
    if term.reason == reasons.OOM_KILLED:
        field = "spec.resources.head.memory" if pod.role == names.ROLE_HEAD else "spec.resources.memoryPerWorker"
        message = f"the {pod.role} container of {pod.name} ran out of memory; raise {field}"
        return LastFailure(reason=reasons.OOM_KILLED, message=message, log_tail=tail, **common)
    if pod.reason:
        return LastFailure(reason=pod.reason, message=pod.message or f"pod {pod.name} failed", log_tail=tail, **common)
    if term.exit_code is not None:
        reason, message = _exit_reason(pod, term.exit_code)
        return LastFailure(reason=reason, message=message, log_tail=tail, **common)
    return LastFailure(reason=reasons.HEAD_FAILED, message=f"pod {pod.name} failed", log_tail=tail, **common)


def _exit_reason(pod: PodView, code: int) -> tuple[str, str]:
    """A container that exited without a report and without OOMKilled: the contract's reason for its exit code, a
    death by signal said as such (the runtime calls it "Error", which hides the signal), else TrainerExited."""
    term = pod.container
    last = (term.message or "").strip().splitlines()[-1:] or [""]
    detail = f": {last[0]}" if last[0] else ""
    exited = f"{pod.role} container of {pod.name} exited with code {code}{detail}"
    try:
        return contract.REASON_BY_EXIT_CODE[contract.ExitCode(code)].value, exited
    except (ValueError, KeyError):
        pass
    sig = term.killed_by
    if sig is None:
        return reasons.TRAINER_EXITED, exited
    cause = _SIGNAL_CAUSES.get(sig, "the process died of this signal")
    return reasons.KILLED_BY_SIGNAL, (
        f"the {pod.role} container of {pod.name} was killed by {sig.name} (exit code {code}), not by the OOM "
        f"killer: {cause}{detail}"
    )


_SIGNAL_CAUSES: Mapping[signal.Signals, str] = {
    signal.SIGKILL: "it was stopped from outside without a grace period (a runtime or node restart, `crictl stop`, "
    "a failed liveness probe, an admin)",
    signal.SIGTERM: "it was stopped from outside and the trainer did not get to report (it exits 7 when it does)",
    signal.SIGSEGV: "a crash in native code (torch, a tokenizer, Ray); the log tail shows where",
    signal.SIGABRT: "native code aborted (a failed assertion in Ray, torch or a library); the log tail shows where",
    signal.SIGBUS: "a bad memory access, often a full /dev/shm (Ray's object store)",
}


def _head_failure(attempt: _Attempt) -> LastFailure | None:
    head, obs = attempt.head, attempt.obs
    common: dict[str, Any] = {"pod": attempt.cluster.name, "attempt": attempt.number, "time": attempt.now}
    if head is not None and head.finished:
        return failure_of(head, log_tail=obs.log_tails.get(head.name, ()), now=attempt.now)
    if head is None and attempt.base.cluster is not None and attempt.base.cluster.head_pod == attempt.cluster.name:
        message = f"head pod {attempt.cluster.name} disappeared (deleted, evicted or its node was lost)"
        return LastFailure(reason=reasons.HEAD_POD_LOST, message=message, **common)
    if head is not None and head.deleting:
        return LastFailure(reason=reasons.HEAD_POD_LOST, message=f"head pod {head.name} is being deleted", **common)
    return None


def _attempt_failed(attempt: _Attempt, failure: LastFailure) -> Plan:
    """A failed attempt: retry from the latest checkpoint while backoffLimit allows, else fail with its reason."""
    spec, base = attempt.spec, attempt.base
    failed = base.failed_attempts or 0
    retryable = reasons.retryable(failure.reason)
    if retryable and failed < spec.backoff_limit:
        return _retry(attempt, failure)
    events = list(attempt.events)
    message = failure.message
    if retryable:
        events.append(
            Event(
                "Warning",
                reasons.BACKOFF_LIMIT_EXCEEDED,
                f"{failed + 1} attempt(s) failed; backoffLimit is {spec.backoff_limit}",
            )
        )
        message = clip_with_suffix(message, f" (attempt {attempt.number}; backoffLimit {spec.backoff_limit} reached)")
    return _fail(dataclasses.replace(attempt, events=tuple(events)), failure, message=message)


def _retry(attempt: _Attempt, failure: LastFailure) -> Plan:
    spec, now = attempt.spec, attempt.now
    nxt = attempt.number + 1
    base = _end_attempt(attempt.base, reason=failure.reason, now=now, resumed=_head_resumed(attempt))
    base = base.model_copy(
        update={
            "attempt": nxt,
            "failed_attempts": (base.failed_attempts or 0) + 1,
            "attempt_start_time": now,
            "last_failure": failure,
            "attempts": _with_record(base.attempts, AttemptRecord(attempt=nxt, start_time=now)),
        }
    )
    what = f"{failure.reason}: {failure.message}"
    event = Event(
        "Warning",
        "Retrying",
        clip_with_suffix(
            f"attempt {attempt.number} failed ({what}",
            f"); starting attempt {nxt} of {spec.backoff_limit + 1}, resuming from the latest checkpoint",
            EVENT_MESSAGE_MAX,
        ),
    )
    workers = spec.resources.workers
    return _plan(
        attempt.obs,
        base=base,
        outcome=Outcome(Phase.PENDING, "Retrying", clip(f"attempt {attempt.number} failed: {what}")),
        events=(*attempt.events, event),
        cluster=ClusterInfo(
            name=names.head_name(attempt.obs.ident.name, nxt), workers=workers, workers_ready=0, ready=f"0/{workers}"
        ),
        actions=Actions(
            delete_pods=tuple(PodRef(p.name, p.uid) for p in attempt.obs.pods if not p.deleting),
            create_support=True,
            create_head=True,
            create_workers=tuple(range(workers)),
        ),
    )


def _fail(attempt: _Attempt, failure: LastFailure, *, message: str | None = None) -> Plan:
    base = _end_attempt(attempt.base, reason=failure.reason, now=attempt.now, resumed=_head_resumed(attempt))
    base = base.model_copy(update={"last_failure": failure})
    return _plan(
        attempt.obs,
        base=base,
        outcome=Outcome(Phase.FAILED, failure.reason, message or failure.message),
        events=attempt.events,
        cluster=attempt.cluster,
        creation_problem=failure.reason in reasons.CREATION_PROBLEMS,  # the condition keeps saying what was refused
    )


# ---------------------------------------------------------------------------------------------------------------
# the attempt is alive (or not created yet)
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Stuck:
    """Something keeps a pod of the attempt from running: the reason, what to say, and since when."""

    reason: str
    message: str
    since: dt.datetime | None
    shown: bool  # reported in the status before its deadline (not for the ordinary ContainerCreating etc.)


def _alive(attempt: _Attempt) -> Plan:
    obs, spec = attempt.obs, attempt.spec
    base, actions, events = _repair(attempt)
    base = _scheduled(attempt, base, actions)
    attempt = dataclasses.replace(attempt, base=base, events=events)
    stuck = _stuck(attempt, missing=_missing(actions))
    if stuck is not None and stuck.since is not None:
        waited = (obs.now - stuck.since).total_seconds()
        if waited > spec.pending_deadline_seconds:
            failure = LastFailure(
                reason=stuck.reason,
                message=clip_with_suffix(
                    stuck.message, f" (for more than pendingDeadlineSeconds={spec.pending_deadline_seconds})"
                ),
                attempt=attempt.number,
                time=attempt.now,
            )
            if attempt.ran:  # trouble during a running attempt is an attempt failure: retry / backoff
                return _attempt_failed(attempt, failure)
            return _fail(attempt, failure)
    if _is_running(attempt, actions):
        return _running(attempt, actions, stuck)
    return _pending(attempt, actions, stuck)


def _repair(attempt: _Attempt) -> tuple[Status, Actions, tuple[Event, ...]]:
    """Create what is missing, replace failed workers (delete now, re-create once gone), drop stale pods."""
    obs, spec, base = attempt.obs, attempt.spec, attempt.base
    current = attempt.head is not None or bool(attempt.workers)
    if not current and base.attempt_start_time is None:
        base = base.model_copy(update={"attempt_start_time": attempt.now})
    if base.current_attempt() is None:
        record = AttemptRecord(attempt=attempt.number, start_time=base.attempt_start_time or attempt.now)
        base = base.model_copy(update={"attempts": _with_record(base.attempts, record)})
    missing = tuple(
        i
        for i in range(spec.resources.workers)
        if names.worker_name(obs.ident.name, attempt.number, i) not in attempt.workers
    )
    failed = [p for p in attempt.workers.values() if p.finished and not p.deleting]
    events = list(attempt.events)
    for pod in failed:
        why = pod.container.reason or pod.phase
        if pod.phase == "Failed":  # a worker that exited 0 (its head went away) is replaced, not a failure
            failure = failure_of(pod, log_tail=obs.log_tails.get(pod.name, ()), now=attempt.now)
            base = base.model_copy(update={"last_failure": failure})
            why = f"{failure.reason}: {failure.message}"
        events.append(
            Event("Warning", "WorkerReplaced", clip(f"worker pod {pod.name} ended ({why}); re-creating it", 1024))
        )
    actions = Actions(
        create_support=not current,
        create_head=attempt.head is None,
        create_workers=missing,
        delete_pods=attempt.stale + tuple(PodRef(p.name, p.uid) for p in failed),
    )
    return base, actions, tuple(events)


def _missing(actions: Actions) -> bool:
    return actions.create_support or actions.create_head or bool(actions.create_workers)


def _creation_problem(attempt: _Attempt, actions: Actions) -> bool:
    problem = attempt.base.condition(ConditionType.REPLICA_FAILURE)
    return _missing(actions) and problem is not None and problem.status == "True"


def _all_scheduled(attempt: _Attempt, actions: Actions) -> bool:
    if actions.create_head or actions.create_workers:
        return False
    pods = [p for p in (attempt.head, *attempt.workers.values()) if p is not None and not p.deleting]
    return all(p.scheduled or p.phase != "Pending" for p in pods)


def _scheduled(attempt: _Attempt, base: Status, actions: Actions) -> Status:
    """timeline.scheduled: the first time every pod of an attempt was bound to a node."""
    if base.timeline is None or base.timeline.scheduled is not None or not _all_scheduled(attempt, actions):
        return base
    return base.model_copy(update={"timeline": base.timeline.model_copy(update={"scheduled": attempt.now})})


def _stuck(attempt: _Attempt, *, missing: bool) -> _Stuck | None:
    """The oldest reason a pod of this attempt is not running; every one of them has a deadline."""
    problem = attempt.base.condition(ConditionType.REPLICA_FAILURE)
    if missing and problem is not None and problem.status == "True":
        since = parse_time(problem.last_transition_time)
        return _Stuck(problem.reason, problem.message, since, shown=True)
    candidates: list[_Stuck] = []
    pods = [p for p in (attempt.head, *attempt.workers.values()) if p is not None and p.not_running]
    for pod in pods:
        if pod.unschedulable_message is not None:
            candidates.append(
                _Stuck(reasons.UNSCHEDULABLE, f"pod {pod.name}: {pod.unschedulable_message}", pod.created, True)
            )
        elif pod.container.state == "waiting" and pod.container.reason:
            detail = pod.container.message or pod.container.reason
            shown = pod.container.reason in reasons.PENDING_TROUBLE
            candidates.append(_Stuck(pod.container.reason, f"pod {pod.name}: {detail}", pod.created, shown))
        else:
            message = f"pod {pod.name} is still {pod.phase} (no reason reported; see kubectl describe pod)"
            candidates.append(_Stuck(reasons.PENDING_DEADLINE_EXCEEDED, message, pod.created, False))
    if not candidates:
        return None
    oldest = min(candidates, key=lambda s: (not s.shown, s.since or attempt.obs.now))
    return oldest


def _is_running(attempt: _Attempt, actions: Actions) -> bool:
    head = attempt.head
    if head is None or head.phase != "Running":
        return False
    if attempt.ran:  # stays Running while lost workers are replaced
        return True
    live = [p for p in (head, *attempt.workers.values()) if not p.deleting and not p.finished]
    return not actions.create_workers and len(live) == 1 + len(attempt.workers) and all(p.ready for p in live)


def _running(attempt: _Attempt, actions: Actions, stuck: _Stuck | None) -> Plan:
    obs, spec, base = attempt.obs, attempt.spec, attempt.base
    progress = progress_of(obs, spec)
    base = base.model_copy(update={"progress": progress})
    record = base.current_attempt()
    if record is not None and record.running_time is None:
        update = {"running_time": attempt.now}
        base = base.model_copy(update={"attempts": _with_record(base.attempts, record.model_copy(update=update))})
    stalled = _no_progress(attempt, base)
    if stalled is not None:
        return _fail(attempt, stalled)
    live = [p for p in (attempt.head, *attempt.workers.values()) if p is not None and not p.deleting]
    ready = not actions.create_workers and all(p.ready for p in live)
    message = "training"
    if obs.metrics is not None and obs.metrics.trainer_phase is not None:
        message = f"trainer phase {obs.metrics.trainer_phase.value}"
    if not ready:
        message += f"; workers ready {attempt.cluster.ready}, replacing lost workers"
    if stuck is not None and stuck.shown:
        message += f"; {stuck.reason}: {stuck.message}"
    return _plan(
        obs,
        base=base,
        outcome=Outcome(Phase.RUNNING, "Running", message),
        ready=ready,
        events=attempt.events,
        cluster=attempt.cluster,
        actions=actions,
        creation_problem=_creation_problem(attempt, actions),
    )


def _no_progress(attempt: _Attempt, base: Status) -> LastFailure | None:
    """The watchdog: only on a fresh scrape of a trainer that is training (the clock stops outside training)."""
    sample, old, spec = attempt.obs.metrics, attempt.obs.old, attempt.spec
    was_running = old.phase is Phase.RUNNING and (old.attempt or 1) == attempt.number
    if sample is None or not was_running or sample.trainer_phase not in {None, contract.TrainerPhase.TRAINING}:
        return None
    progress = base.progress
    running = old.condition(ConditionType.RUNNING)
    since = running.last_transition_time if running is not None and running.status == "True" else None
    times = [t for t in (parse_time(since), parse_time(progress.last_progress_time if progress else None)) if t]
    last = max(times, default=attempt.obs.now)
    if (attempt.obs.now - last).total_seconds() <= spec.progress_deadline_seconds:
        return None
    step = progress.step if progress is not None and progress.step is not None else "none"
    return LastFailure(
        reason=reasons.NO_PROGRESS,
        message=f"no new training step for more than progressDeadlineSeconds={spec.progress_deadline_seconds} "
        f"(last step {step}); check the head pod's logs",
        attempt=attempt.number,
        time=attempt.now,
    )


def _pending(attempt: _Attempt, actions: Actions, stuck: _Stuck | None) -> Plan:
    old = attempt.obs.old
    if stuck is not None and stuck.shown:
        outcome = Outcome(Phase.PENDING, stuck.reason, stuck.message)
    elif _all_scheduled(attempt, actions):
        outcome = Outcome(Phase.STARTING, "Starting", f"Ray cluster starting; workers ready {attempt.cluster.ready}")
    elif old.phase is Phase.PENDING and old.reason == "Retrying" and old.message:
        outcome = Outcome(Phase.PENDING, "Retrying", old.message)
    else:
        waiting = "creating the Ray cluster" if actions.create_support else "waiting for pods to be scheduled"
        outcome = Outcome(Phase.PENDING, "Pending", waiting)
    return _plan(
        attempt.obs,
        base=attempt.base,
        outcome=outcome,
        events=attempt.events,
        cluster=attempt.cluster,
        actions=actions,
        creation_problem=_creation_problem(attempt, actions),
    )


# ---------------------------------------------------------------------------------------------------------------
# creation problems (reported by the service layer after it tried to create children)
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CreationProblem:
    reason: str  # reasons.FAILED_CREATE or reasons.NAME_CONFLICT
    kind: str
    name: str
    detail: str

    @property
    def message(self) -> str:
        if self.reason == reasons.NAME_CONFLICT:
            what = (
                f"a {self.kind} named {self.name} already exists and is not owned by this job ({self.detail}); "
                "it is left alone: delete or rename it, or re-create the job under another name"
            )
        else:
            what = f"creating {self.kind} {self.name} was refused: {self.detail}"
        return clip(what)


def record_creation_problem(
    status: Status, problem: CreationProblem, *, now: dt.datetime, generation: int
) -> tuple[Status, tuple[Event, ...]]:
    """Status (and Event) saying that a child could not be created; the pending deadline runs from its first time."""
    stamp = rfc3339(now)
    old = status.condition(ConditionType.REPLICA_FAILURE)
    same = old is not None and old.status == "True"
    condition = Condition(
        type=ConditionType.REPLICA_FAILURE,
        status="True",
        reason=problem.reason,
        message=problem.message,
        last_transition_time=old.last_transition_time if same and old is not None else stamp,
        observed_generation=generation,
    )
    conditions = [c for c in status.conditions if c.type is not ConditionType.REPLICA_FAILURE] + [condition]
    update: dict[str, Any] = {"conditions": conditions}
    if status.phase is Phase.PENDING:
        update |= {"reason": problem.reason, "message": problem.message}
    new = status.model_copy(update=update)
    changed = not same or old is None or old.message != problem.message
    events = (_with_advice(Event("Warning", problem.reason, problem.message)),) if changed else ()
    return new, events


# ---------------------------------------------------------------------------------------------------------------
# building the plan
# ---------------------------------------------------------------------------------------------------------------


def _with_record(records: Sequence[AttemptRecord], record: AttemptRecord) -> list[AttemptRecord]:
    kept = [r for r in records if r.attempt != record.attempt] + [record]
    return sorted(kept, key=lambda r: r.attempt)[-ATTEMPTS_KEPT:]


def _end_attempt(base: Status, *, reason: str, now: str, resumed: int | None = None) -> Status:
    record = base.current_attempt() or AttemptRecord(attempt=base.attempt or 1, start_time=base.attempt_start_time)
    update: dict[str, Any] = {"end_time": record.end_time or now, "reason": record.reason or reason}
    if resumed is not None:
        update["resumed_from_step"] = resumed
    return base.model_copy(update={"attempts": _with_record(base.attempts, record.model_copy(update=update))})


def _set_conditions(
    old: Sequence[Condition],
    *,
    outcome: Outcome,
    ready: bool,
    now: str,
    generation: int,
    extra: Sequence[Condition],
    creation_problem: bool,
) -> list[Condition]:
    phase, reason, message = outcome.phase, outcome.reason, outcome.message
    ready_reason = "ClusterReady" if ready else ("ClusterNotReady" if phase is Phase.RUNNING else reason)
    wanted: list[tuple[ConditionType, bool, str, str]] = [(ConditionType.READY, ready, ready_reason, message)]
    for kind, value in (
        (ConditionType.RUNNING, phase is Phase.RUNNING),
        (ConditionType.SUCCEEDED, phase is Phase.SUCCEEDED),
        (ConditionType.FAILED, phase is Phase.FAILED),
        (ConditionType.SUSPENDED, phase is Phase.SUSPENDED),
    ):
        wanted.append((kind, value, reason if value else phase.value, message if value else ""))
    by_type = {c.type: c for c in old}
    result = [
        _condition(by_type.get(kind), kind, "True" if value else "False", why, text, now=now, generation=generation)
        for kind, value, why, text in wanted
    ]
    # ReplicaFailure: set True by record_creation_problem; kept while the children it is about are still missing.
    replica = by_type.get(ConditionType.REPLICA_FAILURE)
    if replica is None or replica.status != "True" or not creation_problem:
        replica = _condition(
            replica, ConditionType.REPLICA_FAILURE, "False", "Created", "", now=now, generation=generation
        )
    result.append(replica)
    negative = next((c for c in extra if c.type is ConditionType.NEGATIVE_TRANSFER), None)
    if negative is not None:
        prev = by_type.get(ConditionType.NEGATIVE_TRANSFER)
        result.append(
            _condition(
                prev, negative.type, negative.status, negative.reason, negative.message, now=now, generation=generation
            )
        )
    elif ConditionType.NEGATIVE_TRANSFER in by_type:
        result.append(by_type[ConditionType.NEGATIVE_TRANSFER])
    return result


def _condition(
    prev: Condition | None,
    kind: ConditionType,
    status: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    *,
    now: str,
    generation: int,
) -> Condition:
    since = prev.last_transition_time if prev is not None and prev.status == status else now
    return Condition(
        type=kind,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )


def _events_for(old: Status, new: Status, extra: Sequence[Event]) -> tuple[Event, ...]:
    events = list(extra)
    explained = {e.reason for e in extra}
    if new.phase is not None and new.phase != old.phase and new.reason not in explained:
        kind: Literal["Normal", "Warning"] = "Warning" if new.phase is Phase.FAILED else "Normal"
        events.append(Event(kind, new.reason or new.phase.value, new.message or f"job is {new.phase.value}"))
    elif new.reason != old.reason and new.reason in {reasons.UNSCHEDULABLE, *reasons.PENDING_TROUBLE}:
        events.append(Event("Warning", new.reason or "", new.message or ""))
    return tuple(_with_advice(e) for e in events)


def _with_advice(event: Event) -> Event:
    """A Warning says what to do next (kubectl describe ftj), within the Event's size limit."""
    todo = reasons.advice(event.reason) if event.type == "Warning" else None
    if todo is None:
        return Event(event.type, event.reason, clip(event.message, EVENT_MESSAGE_MAX))
    return Event(event.type, event.reason, clip_with_suffix(event.message, f" — what to do: {todo}", EVENT_MESSAGE_MAX))


def _plan(
    obs: Observed,
    *,
    base: Status,
    outcome: Outcome,
    ready: bool = False,
    events: Sequence[Event] = (),
    cluster: ClusterInfo | None = None,
    actions: Actions = Actions(),
    extra_conditions: Sequence[Condition] = (),
    creation_problem: bool = False,
) -> Plan:
    now = rfc3339(obs.now)
    conditions = _set_conditions(
        obs.old.conditions,
        outcome=outcome,
        ready=ready,
        now=now,
        generation=obs.generation,
        extra=extra_conditions,
        creation_problem=creation_problem,
    )
    update: dict[str, Any] = {
        "phase": outcome.phase,
        "reason": outcome.reason,
        "message": outcome.message,
        "conditions": conditions,
        "observed_generation": obs.generation,
    }
    if cluster is not None:
        update["cluster"] = cluster
    if outcome.phase.terminal:
        update["completion_time"] = base.completion_time or now
        if base.timeline is not None and base.timeline.finished is None:
            update["timeline"] = base.timeline.model_copy(update={"finished": base.completion_time or now})
    status = base.model_copy(update=update)
    if outcome.phase.terminal and obs.spec is not None:
        actions = dataclasses.replace(
            actions, delete_cluster=not obs.keep_cluster, delete_job=_ttl_expired(obs.spec, status, obs.now)
        )
    return Plan(status=status, actions=actions, events=_events_for(obs.old, status, events))


def _ttl_expired(spec: ftspec.FineTuneJobSpec, status: Status, now: dt.datetime) -> bool:
    done = parse_time(status.completion_time)
    ttl = spec.ttl_seconds_after_finished
    return ttl is not None and done is not None and (now - done).total_seconds() >= ttl


__all__ = [
    "Actions",
    "CreationProblem",
    "Event",
    "Outcome",
    "Plan",
    "calculate",
    "failure_of",
    "parse_status",
    "record_creation_problem",
    "watched_metric_name",
]
