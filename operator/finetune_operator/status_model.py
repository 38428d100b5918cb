"""The FineTuneJob status as a typed model (wire names camelCase), shared by status.py and the CRD generator.

Why separate from status.py: the CRD's status schema is generated from these models, exactly like the spec schema
is generated from finetune_trainer.spec, so `kubectl explain finetunejob.status` and the operator cannot disagree.

Every text field is clipped to the CRD's limits here, when the model is built: a status the API server would refuse
(422) jams the job (no later status write succeeds), so "status text always fits" holds by construction rather
than at each place that writes a message.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

STRING_MAX = 4096  # maxLength of every string in the CRD (crd.py)
LIST_MAX = 64  # maxItems of every list in the CRD
TRUNCATED = " …[truncated]"
ATTEMPTS_KEPT = 20  # status.attempts keeps the latest ones


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def clip(text: str, limit: int = STRING_MAX) -> str:
    """text, or its head plus a marker, within `limit` UTF-8 bytes (a bound on characters too, whichever the API
    server counts)."""
    if _size(text) <= limit:
        return text
    room = max(0, limit - _size(TRUNCATED))
    return text.encode("utf-8")[:room].decode("utf-8", errors="ignore") + TRUNCATED


def clip_with_suffix(detail: str, suffix: str, limit: int = STRING_MAX) -> str:
    """detail + suffix within `limit`, shortening the detail so that the suffix (advice, counts) survives."""
    return clip(detail, max(_size(TRUNCATED), limit - _size(suffix))) + suffix


def rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


class Phase(StrEnum):
    PENDING = "Pending"
    STARTING = "Starting"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    QUEUED = "Queued"  # Kueue has not admitted the job (yet, or again after an eviction): no pods

    @property
    def terminal(self) -> bool:
        return self in {Phase.SUCCEEDED, Phase.FAILED}


class ConditionType(StrEnum):
    READY = "Ready"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    # A child could not be created (refused by the API server: quota, admission, a missing PriorityClass; or an
    # object of that name that is not ours). Named after the ReplicaSet condition that says the same.
    REPLICA_FAILURE = "ReplicaFailure"
    # Set from the trainer's final report when evaluation.baseline is not none.
    NEGATIVE_TRANSFER = "NegativeTransfer"


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="ignore")

    @field_validator("*", mode="after")
    @classmethod
    def _fits(cls, value: Any) -> Any:
        if isinstance(value, str):
            return clip(value)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return [clip(v) for v in value[-LIST_MAX:]]
        return value

    def wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Condition(_Wire):
    type: ConditionType = Field(
        description="Ready, Running, Succeeded, Failed, Suspended, ReplicaFailure or NegativeTransfer."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason (see docs/troubleshooting.md for what to do about each).")
    message: str = Field(default="", description="Human-readable details.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="metadata.generation this was computed from.")


class Progress(_Wire):
    step: int | None = Field(default=None, description="Optimizer steps done (counts on across resumes).")
    total_steps: int | None = Field(default=None, description="Planned optimizer steps.")
    epoch: float | None = Field(default=None, description="Fractional epoch.")
    percent: int | None = Field(default=None, description="step / totalSteps in percent.")
    loss: float | None = Field(default=None, description="Last training loss.")
    eval_metric: float | None = Field(
        default=None, description="Last value of the watched metric (earlyStopping.metric, else the task default)."
    )
    eval_metric_name: str | None = Field(default=None, description="Name of evalMetric (e.g. eval_accuracy).")
    samples_per_second: float | None = Field(default=None, description="Training throughput.")
    eta: str | None = Field(default=None, description="Estimated completion time (RFC 3339).")
    resumed_from_step: int | None = Field(default=None, description="Checkpoint step this attempt resumed from.")
    trainer_phase: str | None = Field(
        default=None, description="The trainer's own phase (Loading, Training, Evaluating, Saving, ...)."
    )
    last_progress_time: str | None = Field(
        default=None,
        description="When step last increased, or the trainer was last seen outside training (loading, evaluating, "
        "saving): the progressDeadlineSeconds watchdog measures from it.",
    )
    summary: str | None = Field(default=None, description="step/totalSteps (percent), for kubectl get.")


class Artifacts(_Wire):
    model: str | None = Field(default=None, description="Saved model (merged model for lora with merge: true).")
    adapter: str | None = Field(default=None, description="LoRA adapter (lora only).")
    checkpoint: str | None = Field(default=None, description="Checkpoints of this job's run.")
    metrics: str | None = Field(default=None, description="Train/eval history (metrics.json).")
    report: str | None = Field(default=None, description="Model card (README.md).")
    manifest: str | None = Field(default=None, description="manifest.json, written last by the trainer.")
    logs: str | None = Field(default=None, description="Driver log of each attempt (logs/attempt-N.log).")


class ClusterInfo(_Wire):
    name: str | None = Field(default=None, description="Ray cluster (head Service) of the current attempt.")
    head_pod: str | None = Field(default=None, description="Head pod of the current attempt.")
    workers: int | None = Field(default=None, description="Desired worker pods.")
    workers_ready: int | None = Field(default=None, description="Worker pods running and ready.")
    ready: str | None = Field(default=None, description="workersReady/workers, for kubectl get.")


class LastFailure(_Wire):
    reason: str = Field(description="The failure's reason (the trainer's, else Kubernetes').")
    exit_code: int | None = Field(default=None, description="Exit code of the failed container.")
    message: str = Field(default="", description="What went wrong, in the trainer's or Kubernetes' words.")
    log_tail: list[str] | None = Field(
        default=None, description="Last lines of the failed attempt's driver log (from the trainer, else the pod)."
    )
    log_uri: str | None = Field(
        default=None, description="Where the trainer uploaded that attempt's driver log (<output>/logs/attempt-N.log)."
    )
    pod: str | None = Field(default=None, description="The pod that failed (deleted by now, usually).")
    attempt: int | None = Field(default=None, description="The attempt it belonged to.")
    time: str | None = Field(default=None, description="When the operator saw it (RFC 3339).")


class CheckpointInfo(_Wire):
    uri: str | None = Field(default=None, description="The latest complete checkpoint.")
    step: int | None = Field(default=None, description="Its optimizer step.")
    time: str | None = Field(default=None, description="When it was written (RFC 3339).")


class Timeline(_Wire):
    created: str | None = Field(default=None, description="The job was created.")
    scheduled: str | None = Field(default=None, description="All pods of the first attempt were bound to nodes.")
    model_loaded: str | None = Field(default=None, description="The trainer first had the model loaded.")
    first_step: str | None = Field(default=None, description="The first optimizer step finished.")
    last_checkpoint: str | None = Field(default=None, description="The latest complete checkpoint was written.")
    finished: str | None = Field(default=None, description="The job Succeeded or Failed.")


class AttemptRecord(_Wire):
    attempt: int = Field(description="Attempt number.")
    start_time: str | None = Field(default=None, description="When its pods were first created.")
    running_time: str | None = Field(default=None, description="When it first ran (head and workers ready).")
    resumed_from_step: int | None = Field(
        default=None, description="The checkpoint step it resumed from (0 for a fresh start), as the trainer reported."
    )
    end_time: str | None = Field(default=None, description="When it ended.")
    reason: str | None = Field(default=None, description="How it ended (Succeeded, a failure reason, Suspended).")


class OperatorDefaults(_Wire):
    """The operator settings a job resolved its unset fields from, pinned at its first reconcile."""

    output_base_uri: str | None = Field(default=None, description="Default output base (output.uri unset).")
    trainer_image: str | None = Field(default=None, description="Default trainer image (image unset).")
    storage_endpoint: str | None = Field(default=None, description="Default S3 endpoint.")
    storage_region: str | None = Field(default=None, description="Default S3 region.")
    storage_credentials_secret: str | None = Field(default=None, description="Default credentials Secret.")


class TrainingResult(_Wire):
    metric_name: str | None = Field(default=None, description="The watched metric.")
    metric: float | None = Field(default=None, description="Its value for the published (kept) model.")
    baseline: float | None = Field(default=None, description="The same metric for evaluation.baseline.")
    negative_transfer: bool | None = Field(
        default=None, description="Fine-tuning did not beat the baseline by evaluation.minGain."
    )
    kept_step: int | None = Field(default=None, description="The step whose weights were published.")


class QueueStatus(_Wire):
    name: str = Field(description="The LocalQueue (label kueue.x-k8s.io/queue-name).")
    cluster_queue: str | None = Field(default=None, description="The ClusterQueue that admitted the job.")
    workload: str | None = Field(default=None, description="The Kueue Workload the job waits as.")
    admitted: bool = Field(default=False, description="Kueue admitted the Workload: the pods may run.")
    reason: str | None = Field(default=None, description="Kueue's reason (Pending, Preempted, Admitted, ...).")
    message: str | None = Field(default=None, description="Kueue's message (e.g. which quota is short).")
    queued_since: str | None = Field(default=None, description="Waiting since (RFC 3339); unset while admitted.")
    admitted_time: str | None = Field(default=None, description="When Kueue last admitted the job (RFC 3339).")


class Status(_Wire):
    phase: Phase | None = Field(
        default=None, description="Pending, Starting, Running, Succeeded, Failed, Suspended, Queued."
    )
    reason: str | None = Field(default=None, description="Why the job is in this phase (CamelCase).")
    message: str | None = Field(default=None, description="Details and what to do next.")
    conditions: list[Condition] = Field(default_factory=list, description="Kubernetes-style conditions.")
    observed_generation: int | None = Field(default=None, description="metadata.generation last reconciled.")
    start_time: str | None = Field(default=None, description="When the current active period started (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the job Succeeded or Failed (RFC 3339).")
    attempt: int | None = Field(default=None, description="Current attempt (1-based; a retry or a resume adds one).")
    failed_attempts: int | None = Field(default=None, description="Attempts that failed (compared to backoffLimit).")
    attempt_start_time: str | None = Field(default=None, description="When the current attempt's pods were created.")
    progress: Progress | None = Field(default=None, description="Training progress read from the trainer's metrics.")
    artifacts: Artifacts | None = Field(default=None, description="Artifact URIs (set once the manifest exists).")
    cluster: ClusterInfo | None = Field(default=None, description="The Ray cluster of the current attempt.")
    checkpoint: CheckpointInfo | None = Field(default=None, description="The latest complete checkpoint.")
    last_failure: LastFailure | None = Field(
        default=None, description="The latest failure of an attempt or a pod, kept after its pods are gone."
    )
    timeline: Timeline | None = Field(default=None, description="When the job reached each milestone.")
    attempts: list[AttemptRecord] = Field(
        default_factory=list, description=f"The latest {ATTEMPTS_KEPT} attempts: start, resume step, end, reason."
    )
    operator_defaults: OperatorDefaults | None = Field(
        default=None,
        description="Operator settings this job resolved its defaults from at its first reconcile; used for its "
        "whole life, so changing the operator's defaults never changes a job that has started.",
    )
    result: TrainingResult | None = Field(default=None, description="The trainer's final report of the result.")
    queue: QueueStatus | None = Field(
        default=None, description="Kueue admission (only for jobs labelled kueue.x-k8s.io/queue-name)."
    )

    def condition(self, kind: ConditionType) -> Condition | None:
        return next((c for c in self.conditions if c.type is kind), None)

    def current_attempt(self) -> AttemptRecord | None:
        number = self.attempt or 1
        return next((a for a in reversed(self.attempts) if a.attempt == number), None)
