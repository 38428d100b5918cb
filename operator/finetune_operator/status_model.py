"""The FineTuneJob status as a typed model (wire names camelCase), shared by status.py and the CRD generator.

Why separate from status.py: the CRD's status schema is generated from these models, exactly like the spec schema
is generated from finetune_trainer.spec, so `kubectl explain finetunejob.status` and the operator cannot disagree.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class Phase(StrEnum):
    PENDING = "Pending"
    STARTING = "Starting"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"

    @property
    def terminal(self) -> bool:
        return self in {Phase.SUCCEEDED, Phase.FAILED}


class ConditionType(StrEnum):
    READY = "Ready"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="ignore")

    def wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Condition(_Wire):
    type: ConditionType = Field(description="Ready, Running, Succeeded, Failed or Suspended.")
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
    eval_metric: float | None = Field(default=None, description="Last value of the watched evaluation metric.")
    eval_metric_name: str | None = Field(default=None, description="Name of evalMetric (e.g. eval_accuracy).")
    samples_per_second: float | None = Field(default=None, description="Training throughput.")
    eta: str | None = Field(default=None, description="Estimated completion time (RFC 3339).")
    resumed_from_step: int | None = Field(default=None, description="Checkpoint step this attempt resumed from.")
    last_progress_time: str | None = Field(
        default=None, description="When step last increased (the progressDeadlineSeconds watchdog measures from it)."
    )
    summary: str | None = Field(default=None, description="step/totalSteps (percent), for kubectl get.")


class Artifacts(_Wire):
    model: str | None = Field(default=None, description="Saved model (merged model for lora with merge: true).")
    adapter: str | None = Field(default=None, description="LoRA adapter (lora only).")
    checkpoint: str | None = Field(default=None, description="Checkpoints of this job's run.")
    metrics: str | None = Field(default=None, description="Train/eval history (metrics.json).")
    report: str | None = Field(default=None, description="Model card (README.md).")
    manifest: str | None = Field(default=None, description="manifest.json, written last by the trainer.")


class ClusterInfo(_Wire):
    name: str | None = Field(default=None, description="Ray cluster (head Service) of the current attempt.")
    head_pod: str | None = Field(default=None, description="Head pod of the current attempt.")
    workers: int | None = Field(default=None, description="Desired worker pods.")
    workers_ready: int | None = Field(default=None, description="Worker pods running and ready.")
    ready: str | None = Field(default=None, description="workersReady/workers, for kubectl get.")


class Status(_Wire):
    phase: Phase | None = Field(default=None, description="Pending, Starting, Running, Succeeded, Failed, Suspended.")
    reason: str | None = Field(default=None, description="Why the job is in this phase (CamelCase).")
    message: str | None = Field(default=None, description="Details and what to do next.")
    conditions: list[Condition] = Field(default_factory=list, description="Kubernetes-style conditions.")
    observed_generation: int | None = Field(default=None, description="metadata.generation last reconciled.")
    start_time: str | None = Field(default=None, description="When the current active period started (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the job Succeeded or Failed (RFC 3339).")
    attempt: int | None = Field(default=None, description="Current attempt (1-based; a retry or a resume adds one).")
    failed_attempts: int | None = Field(default=None, description="Attempts that failed (compared to backoffLimit).")
    attempt_start_time: str | None = Field(
        default=None, description="When the current attempt's pods were created (pendingDeadlineSeconds)."
    )
    progress: Progress | None = Field(default=None, description="Training progress read from the trainer's metrics.")
    artifacts: Artifacts | None = Field(default=None, description="Artifact URIs (set once the manifest exists).")
    cluster: ClusterInfo | None = Field(default=None, description="The Ray cluster of the current attempt.")

    def condition(self, kind: ConditionType) -> Condition | None:
        return next((c for c in self.conditions if c.type is kind), None)
