"""Pure status and decisions: calculate(observed) -> Plan (the new status, what to create/delete, events).

Why pure: "the status tells the truth" and "terminal states are final" are properties of one function of what is
observed (the job, its pods, the trainer's metrics, the clock), so they are tested exhaustively table-driven
without a cluster. The service layer only gathers the Observed snapshot and carries out the Plan. Nothing here
depends on memory of earlier reconciles beyond what the status stored in the API server says, so an operator
restarted at any moment takes the same decisions.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from finetune_trainer import contract
from finetune_trainer import spec as ftspec

from finetune_operator import names
from finetune_operator.status_model import (
    Artifacts,
    ClusterInfo,
    Condition,
    ConditionType,
    Phase,
    Progress,
    Status,
)
from finetune_operator.trainer_metrics import MetricsSample

# Waiting reasons that will not fix themselves quickly; reported and subject to pendingDeadlineSeconds.
PENDING_TROUBLE = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)
# Trainer reasons that a retry cannot fix: fail at once instead of burning attempts.
NOT_RETRYABLE = frozenset(
    {contract.Reason.INVALID_SPEC, contract.Reason.INVALID_DATASET, contract.Reason.MODEL_NOT_FOUND}
)
HEAD_POD_LOST = "HeadPodLost"
OOM_KILLED = "OOMKilled"
NO_PROGRESS = "NoProgress"
DEADLINE_EXCEEDED = "DeadlineExceeded"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
UNSCHEDULABLE = "Unschedulable"
INVALID_SPEC = contract.Reason.INVALID_SPEC.value
TRAINER_EXITED = "TrainerExited"
HEAD_FAILED = "HeadFailed"
# Every reason the Failed condition can carry besides pod-level ones passed through as is (Evicted, NodeLost...).
# docs/troubleshooting.md should have a section for each.
FAILURE_REASONS = frozenset(
    {
        *(r.value for r in contract.Reason),
        OOM_KILLED,
        HEAD_POD_LOST,
        NO_PROGRESS,
        DEADLINE_EXCEEDED,
        UNSCHEDULABLE,
        *PENDING_TROUBLE,
        TRAINER_EXITED,
        HEAD_FAILED,
    }
)


def rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


# ---------------------------------------------------------------------------------------------------------------
# Observed snapshot
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ContainerView:
    state: Literal["waiting", "running", "terminated", "unknown"] = "unknown"
    reason: str | None = None
    message: str | None = None
    exit_code: int | None = None


@dataclasses.dataclass(frozen=True)
class PodView:
    """The facts about one child pod that decisions depend on."""

    name: str
    role: str
    attempt: int
    phase: str = "Pending"
    ready: bool = False
    deleting: bool = False
    scheduled: bool = False
    unschedulable_message: str | None = None
    ip: str | None = None
    reason: str | None = None  # pod-level (Evicted, NodeLost, ...)
    message: str | None = None
    container: ContainerView = ContainerView()
    created: dt.datetime | None = None

    @property
    def finished(self) -> bool:
        return self.phase in {"Succeeded", "Failed"}


def _condition(pod: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for cond in pod.get("status", {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond  # type: ignore[no-any-return]
    return None


def pod_view(pod: Mapping[str, Any]) -> PodView | None:
    """Read a Pod (API dict form) into a PodView; None when it is not one of ours (labels missing)."""
    meta = pod.get("metadata", {})
    labels = meta.get("labels") or {}
    try:
        attempt = int(labels[names.LABEL_ATTEMPT])
        role = str(labels[names.LABEL_ROLE])
    except (KeyError, ValueError):
        return None
    status = pod.get("status") or {}
    scheduled_cond = _condition(pod, "PodScheduled")
    ready_cond = _condition(pod, "Ready")
    unschedulable = (
        scheduled_cond is not None
        and scheduled_cond.get("status") == "False"
        and scheduled_cond.get("reason") == UNSCHEDULABLE
    )
    container = ContainerView()
    statuses = status.get("containerStatuses") or []
    if statuses:
        state = statuses[0].get("state") or {}
        if state.get("terminated"):
            term = state["terminated"]
            container = ContainerView(
                state="terminated",
                reason=term.get("reason"),
                message=term.get("message"),
                exit_code=term.get("exitCode"),
            )
        elif state.get("waiting"):
            container = ContainerView(
                state="waiting", reason=state["waiting"].get("reason"), message=state["waiting"].get("message")
            )
        elif state.get("running") is not None:
            container = ContainerView(state="running")
    created = meta.get("creationTimestamp")
    return PodView(
        name=str(meta.get("name", "")),
        role=role,
        attempt=attempt,
        phase=str(status.get("phase") or "Pending"),
        ready=ready_cond is not None and ready_cond.get("status") == "True",
        deleting=bool(meta.get("deletionTimestamp")),
        scheduled=scheduled_cond is not None and scheduled_cond.get("status") == "True",
        unschedulable_message=scheduled_cond.get("message") if unschedulable and scheduled_cond else None,
        ip=status.get("podIP"),
        reason=status.get("reason"),
        message=status.get("message"),
        container=container,
        created=created if isinstance(created, dt.datetime) else parse_time(created),
    )


@dataclasses.dataclass(frozen=True)
class Observed:
    """Everything one reconcile looks at. `spec` is None exactly when `spec_error` is set."""

    ident: names.JobIdentity
    generation: int
    spec: ftspec.FineTuneJobSpec | None
    old: Status
    pods: tuple[PodView, ...]
    now: dt.datetime
    metrics: MetricsSample | None = None
    spec_error: ftspec.SpecError | None = None
    keep_cluster: bool = False
    artifacts: Artifacts | None = None  # where the trainer writes, from the resolved spec


# ---------------------------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Plan:
    status: Status
    create_support: bool = False  # ConfigMap, Service, NetworkPolicy of status.attempt
    create_head: bool = False
    create_workers: tuple[int, ...] = ()
    delete_pods: tuple[str, ...] = ()
    delete_cluster: bool = False  # every child (pods of all attempts, Services, ConfigMap, NetworkPolicy)
    delete_job: bool = False
    events: tuple[Event, ...] = ()

    @property
    def attempt(self) -> int:
        return self.status.attempt or 1


@dataclasses.dataclass(frozen=True)
class _Outcome:
    phase: Phase
    reason: str
    message: str


def _failure_of_head(head: PodView) -> tuple[str, str]:
    """The real reason an attempt's head pod failed: the trainer's own words first, then Kubernetes'."""
    term = head.container
    if term.message:
        parsed = contract.parse_failure_line(term.message)
        if parsed is not None:
            return parsed
    if term.reason == OOM_KILLED:
        return OOM_KILLED, "the head container ran out of memory; raise spec.resources.head.memory"
    if head.reason:
        return head.reason, head.message or f"head pod {head.name} failed"
    if term.exit_code is not None:
        try:
            reason = contract.REASON_BY_EXIT_CODE[contract.ExitCode(term.exit_code)].value
        except (ValueError, KeyError):
            reason = TRAINER_EXITED
        tail = (term.message or "").strip().splitlines()[-1:] or [""]
        return reason, f"head container exited with code {term.exit_code}{': ' + tail[0] if tail[0] else ''}"
    return HEAD_FAILED, f"head pod {head.name} failed"


def _pending_trouble(pods: Sequence[PodView]) -> tuple[str, str] | None:
    for pod in pods:
        if pod.unschedulable_message is not None:
            return UNSCHEDULABLE, f"pod {pod.name}: {pod.unschedulable_message}"
    for pod in pods:
        if pod.container.state == "waiting" and pod.container.reason in PENDING_TROUBLE:
            detail = pod.container.message or pod.container.reason
            return str(pod.container.reason), f"pod {pod.name}: {detail}"
    return None


def _set_conditions(
    old: Sequence[Condition], *, phase: Phase, reason: str, message: str, ready: bool, now: str, generation: int
) -> list[Condition]:
    wanted = {
        ConditionType.READY: ready,
        ConditionType.RUNNING: phase is Phase.RUNNING,
        ConditionType.SUCCEEDED: phase is Phase.SUCCEEDED,
        ConditionType.FAILED: phase is Phase.FAILED,
        ConditionType.SUSPENDED: phase is Phase.SUSPENDED,
    }
    by_type = {c.type: c for c in old}
    result = []
    for kind, value in wanted.items():
        status: Literal["True", "False"] = "True" if value else "False"
        prev = by_type.get(kind)
        if kind is ConditionType.READY:
            cond_reason = "ClusterReady" if ready else ("ClusterNotReady" if phase is Phase.RUNNING else reason)
        else:
            cond_reason = reason if value else phase.value
        since = prev.last_transition_time if prev is not None and prev.status == status else now
        result.append(
            Condition(
                type=kind,
                status=status,
                reason=cond_reason,
                message=message if value or kind is ConditionType.READY else "",
                last_transition_time=since,
                observed_generation=generation,
            )
        )
    return result


def _progress(obs: Observed, *, running: bool) -> Progress | None:
    old = obs.old.progress
    sample = obs.metrics
    if sample is None or sample.step is None:
        if old is None and running:
            return Progress(last_progress_time=rfc3339(obs.now))
        return old
    advanced = old is None or old.step is None or sample.step > old.step or old.last_progress_time is None
    total = sample.total_steps or (old.total_steps if old else None)
    percent = min(100, int(100 * sample.step / total)) if total else None
    eta = None
    spec = obs.spec
    if spec is not None and total and sample.samples_per_second and sample.samples_per_second > 0:
        per_step = spec.hyperparameters.batch_size * spec.resources.workers
        per_step *= spec.hyperparameters.gradient_accumulation_steps
        remaining = max(0, total - sample.step) * per_step / sample.samples_per_second
        eta = rfc3339(obs.now + dt.timedelta(seconds=remaining))
    summary = f"{sample.step}/{total} ({percent}%)" if total else str(sample.step)
    return Progress(
        step=sample.step,
        total_steps=total,
        epoch=round(sample.epoch, 3) if sample.epoch is not None else None,
        percent=percent,
        loss=round(sample.loss, 6) if sample.loss is not None else None,
        eval_metric=round(sample.eval_metric, 6) if sample.eval_metric is not None else None,
        eval_metric_name=sample.eval_metric_name,
        samples_per_second=round(sample.samples_per_second, 3) if sample.samples_per_second is not None else None,
        eta=eta,
        resumed_from_step=sample.resumed_from_step,
        last_progress_time=rfc3339(obs.now) if advanced else (old.last_progress_time if old else None),
        summary=summary,
    )


def _events_for(old: Status, new: Status, extra: Sequence[Event]) -> tuple[Event, ...]:
    events = list(extra)
    explained = {e.reason for e in extra}
    if new.phase is not None and new.phase != old.phase and new.reason not in explained:
        kind: Literal["Normal", "Warning"] = "Warning" if new.phase is Phase.FAILED else "Normal"
        events.append(Event(kind, new.reason or new.phase.value, new.message or f"job is {new.phase.value}"))
    elif new.reason != old.reason and new.reason in {UNSCHEDULABLE, *PENDING_TROUBLE}:
        events.append(Event("Warning", new.reason or "", new.message or ""))
    return tuple(events)


def _finish(
    obs: Observed,
    *,
    base: Status,
    outcome: _Outcome,
    ready: bool = False,
    extra_events: Sequence[Event] = (),
    cluster: ClusterInfo | None = None,
    **actions: Any,
) -> Plan:
    now = rfc3339(obs.now)
    conditions = _set_conditions(
        obs.old.conditions,
        phase=outcome.phase,
        reason=outcome.reason,
        message=outcome.message,
        ready=ready,
        now=now,
        generation=obs.generation,
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
    if outcome.phase.terminal and base.completion_time is None:
        update["completion_time"] = now
    status = base.model_copy(update=update)
    if outcome.phase.terminal and obs.spec is not None:
        actions.setdefault("delete_cluster", not obs.keep_cluster)
        actions.setdefault("delete_job", _ttl_expired(obs.spec, status, obs.now))
    return Plan(status=status, events=_events_for(obs.old, status, extra_events), **actions)


def _ttl_expired(spec: ftspec.FineTuneJobSpec, status: Status, now: dt.datetime) -> bool:
    done = parse_time(status.completion_time)
    ttl = spec.ttl_seconds_after_finished
    return ttl is not None and done is not None and (now - done).total_seconds() >= ttl


def _cluster_info(obs: Observed, attempt: int, pods: Sequence[PodView]) -> ClusterInfo:
    workers = obs.spec.resources.workers if obs.spec else 0
    ready = sum(1 for p in pods if p.role == names.ROLE_WORKER and p.ready and not p.deleting)
    head = names.head_name(obs.ident.name, attempt)
    seen_head = any(p.role == names.ROLE_HEAD for p in pods)
    old_head = obs.old.cluster.head_pod if obs.old.cluster else None
    return ClusterInfo(
        name=head,
        head_pod=head if seen_head or old_head == head else None,
        workers=workers,
        workers_ready=ready,
        ready=f"{ready}/{workers}",
    )


def calculate(obs: Observed) -> Plan:
    """The whole decision: new status + actions. Never raises for any observed state."""
    old = obs.old
    # Terminal states are final: only clean up and honour the TTL.
    if old.phase is not None and old.phase.terminal:
        keep = obs.keep_cluster
        plan_status = old.model_copy(update={"observed_generation": obs.generation})
        any_live = any(not p.deleting for p in obs.pods)
        return Plan(
            status=plan_status,
            delete_cluster=any_live and not keep,
            delete_job=obs.spec is not None and _ttl_expired(obs.spec, old, obs.now),
        )
    if obs.spec is None:
        error = obs.spec_error
        message = str(error) if error else "invalid spec"
        return _finish(
            obs,
            base=old,
            outcome=_Outcome(Phase.FAILED, INVALID_SPEC, message + " (fix the manifest and re-create the job)"),
            delete_cluster=bool(obs.pods) and not obs.keep_cluster,
        )
    spec = obs.spec
    attempt = old.attempt or 1
    failed = old.failed_attempts or 0
    base = old.model_copy(update={"attempt": attempt, "failed_attempts": failed})
    if base.start_time is None:
        base = base.model_copy(update={"start_time": rfc3339(obs.now)})

    if spec.suspend:
        return _finish(
            obs,
            base=base,
            outcome=_Outcome(
                Phase.SUSPENDED,
                "Suspended",
                "the Ray cluster is deleted; checkpoints are kept; set spec.suspend=false to resume",
            ),
            delete_cluster=any(not p.deleting for p in obs.pods),
            cluster=ClusterInfo(workers=spec.resources.workers, workers_ready=0, ready=f"0/{spec.resources.workers}"),
        )
    extra: list[Event] = []
    if old.phase is Phase.SUSPENDED:
        # Resume: a new attempt (not a failure) that continues from the latest checkpoint of the same run name.
        attempt += 1
        base = base.model_copy(
            update={"attempt": attempt, "start_time": rfc3339(obs.now), "attempt_start_time": None, "cluster": None}
        )
        extra.append(Event("Normal", "Resumed", f"starting attempt {attempt} from the latest checkpoint"))

    deadline = spec.active_deadline_seconds
    started = parse_time(base.start_time)
    if deadline is not None and started is not None and (obs.now - started).total_seconds() > deadline:
        return _finish(
            obs,
            base=base,
            outcome=_Outcome(
                Phase.FAILED,
                DEADLINE_EXCEEDED,
                f"active for more than activeDeadlineSeconds={deadline}; raise it or shorten the run (maxSteps)",
            ),
        )

    current = [p for p in obs.pods if p.attempt == attempt]
    stale = tuple(p.name for p in obs.pods if p.attempt != attempt and not p.deleting)
    head = next((p for p in current if p.role == names.ROLE_HEAD), None)
    workers = {p.name: p for p in current if p.role == names.ROLE_WORKER}
    cluster = _cluster_info(obs, attempt, current)

    # ---- the head decides the attempt ----
    head_failed: tuple[str, str] | None = None
    if head is not None and head.finished:
        if head.phase == "Succeeded":
            artifacts = obs.artifacts
            progress = _progress(obs, running=True)
            if progress is not None and progress.total_steps:
                progress = progress.model_copy(
                    update={
                        "step": max(progress.step or 0, progress.total_steps),
                        "percent": 100,
                        "summary": f"{progress.total_steps}/{progress.total_steps} (100%)",
                        "eta": None,
                    }
                )
            done = base.model_copy(update={"artifacts": artifacts, "progress": progress})
            return _finish(
                obs,
                base=done,
                outcome=_Outcome(Phase.SUCCEEDED, "Succeeded", f"artifacts written to {spec.output.uri}"),
                cluster=cluster,
                delete_pods=stale,
            )
        head_failed = _failure_of_head(head)
    elif head is None and old.cluster is not None and old.cluster.head_pod == cluster.name:
        head_failed = (HEAD_POD_LOST, f"head pod {cluster.name} disappeared (deleted, evicted or its node was lost)")
    elif head is not None and head.deleting and head.phase != "Succeeded":
        head_failed = (HEAD_POD_LOST, f"head pod {head.name} is being deleted")

    if head_failed is not None:
        reason, message = head_failed
        retryable = reason not in {r.value for r in NOT_RETRYABLE}
        if retryable and failed < spec.backoff_limit:
            nxt = attempt + 1
            retry = base.model_copy(
                update={"attempt": nxt, "failed_attempts": failed + 1, "attempt_start_time": rfc3339(obs.now)}
            )
            old_pods = tuple(p.name for p in obs.pods if not p.deleting)
            event = Event(
                "Warning",
                "Retrying",
                f"attempt {attempt} failed ({reason}: {message}); starting attempt {nxt} of "
                f"{spec.backoff_limit + 1}, resuming from the latest checkpoint",
            )
            return _finish(
                obs,
                base=retry,
                outcome=_Outcome(Phase.PENDING, "Retrying", f"attempt {attempt} failed: {reason}: {message}"),
                extra_events=[*extra, event],
                cluster=ClusterInfo(
                    name=names.head_name(obs.ident.name, nxt),
                    workers=spec.resources.workers,
                    workers_ready=0,
                    ready=f"0/{spec.resources.workers}",
                ),
                delete_pods=old_pods,
                create_support=True,
                create_head=True,
                create_workers=tuple(range(spec.resources.workers)),
            )
        if retryable:
            extra.append(
                Event(
                    "Warning",
                    BACKOFF_LIMIT_EXCEEDED,
                    f"{failed + 1} attempt(s) failed; backoffLimit is {spec.backoff_limit}",
                )
            )
            message = f"{message} (attempt {attempt}; backoffLimit {spec.backoff_limit} reached)"
        return _finish(
            obs, base=base, outcome=_Outcome(Phase.FAILED, reason, message), extra_events=extra, cluster=cluster
        )

    # ---- the attempt is alive (or not created yet) ----
    attempt_start = base.attempt_start_time
    if not current:
        attempt_start = attempt_start or rfc3339(obs.now)
    base = base.model_copy(update={"attempt_start_time": attempt_start})
    create_head = head is None
    missing_workers = tuple(
        i for i in range(spec.resources.workers) if names.worker_name(obs.ident.name, attempt, i) not in workers
    )
    # Failed workers are replaced: delete now, re-create once gone (names are reused only after deletion).
    failed_workers = [p for p in workers.values() if p.finished and not p.deleting]
    for pod in failed_workers:
        why = pod.container.reason or pod.reason or pod.phase
        extra.append(Event("Warning", "WorkerReplaced", f"worker pod {pod.name} ended ({why}); re-creating it"))
    actions: dict[str, Any] = {
        "create_support": not current,
        "create_head": create_head,
        "create_workers": missing_workers,
        "delete_pods": stale + tuple(p.name for p in failed_workers),
    }

    trouble = _pending_trouble(current)
    pending_since = parse_time(attempt_start)
    if trouble is not None:
        reason, message = trouble
        waited = (obs.now - pending_since).total_seconds() if pending_since else 0.0
        if waited > spec.pending_deadline_seconds:
            return _finish(
                obs,
                base=base,
                outcome=_Outcome(
                    Phase.FAILED,
                    reason,
                    f"{message} (for more than pendingDeadlineSeconds={spec.pending_deadline_seconds})",
                ),
                extra_events=extra,
                cluster=cluster,
            )
        return _finish(
            obs,
            base=base,
            outcome=_Outcome(Phase.PENDING, reason, message),
            extra_events=extra,
            cluster=cluster,
            **actions,
        )

    live = [p for p in current if not p.deleting and not p.finished]
    all_present = head is not None and not missing_workers and not failed_workers
    all_scheduled = all_present and all(p.scheduled or p.phase == "Running" for p in live)
    all_ready = all_present and all(p.ready for p in live)
    head_running = head is not None and head.phase == "Running"
    was_running = old.phase is Phase.RUNNING and (old.attempt or 1) == attempt
    if (head_running and all_ready) or (was_running and head_running):
        progress = _progress(obs, running=True)
        base = base.model_copy(update={"progress": progress})
        running_since = next(
            (c.last_transition_time for c in old.conditions if c.type is ConditionType.RUNNING and c.status == "True"),
            None,
        )
        last = max(
            (
                t
                for t in (parse_time(running_since), parse_time(progress.last_progress_time if progress else None))
                if t
            ),
            default=obs.now,
        )
        if was_running and (obs.now - last).total_seconds() > spec.progress_deadline_seconds:
            return _finish(
                obs,
                base=base,
                outcome=_Outcome(
                    Phase.FAILED,
                    NO_PROGRESS,
                    f"no new training step for more than progressDeadlineSeconds={spec.progress_deadline_seconds} "
                    f"(last step {progress.step if progress and progress.step is not None else 'none'}); "
                    "check the head pod's logs",
                ),
                extra_events=extra,
                cluster=cluster,
            )
        message = "training"
        if obs.metrics is not None and obs.metrics.trainer_phase is not None:
            message = f"trainer phase {obs.metrics.trainer_phase.value}"
        if not all_ready:
            message += f"; workers ready {cluster.ready}, replacing lost workers"
        return _finish(
            obs,
            base=base,
            outcome=_Outcome(Phase.RUNNING, "Running", message),
            ready=all_ready,
            extra_events=extra,
            cluster=cluster,
            **actions,
        )
    if all_scheduled:
        outcome = _Outcome(Phase.STARTING, "Starting", f"Ray cluster starting; workers ready {cluster.ready}")
    else:
        waiting = "creating the Ray cluster" if not current else "waiting for pods to be scheduled"
        retrying = old.phase is Phase.PENDING and old.reason == "Retrying" and old.message
        outcome = (
            _Outcome(Phase.PENDING, "Retrying", str(old.message))
            if retrying
            else _Outcome(Phase.PENDING, "Pending", waiting)
        )
    return _finish(obs, base=base, outcome=outcome, extra_events=extra, cluster=cluster, **actions)


def status_changed(old: Status, new: Status) -> bool:
    return old.wire() != new.wire()


def parse_status(raw: Mapping[str, Any] | None) -> Status:
    """Read the stored status; a status this operator cannot read is treated as empty (never a crash)."""
    try:
        return Status.model_validate(dict(raw or {}))
    except ValueError:
        return Status()
