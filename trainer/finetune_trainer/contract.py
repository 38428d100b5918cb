"""The contract between the trainer and the operator: exit codes, failure reasons, metrics, artifact layout.

Why a module of its own: the operator reads what the trainer writes (its exit code, the one-line JSON reason,
its Prometheus metrics, its manifest.json) without importing torch or ray. Both sides import these names, so a
rename is a type error on both sides rather than a silent mismatch. docs/trainer-contract.md explains it.
"""

from __future__ import annotations

import dataclasses
import json
from enum import IntEnum, StrEnum
from typing import Any


class ExitCode(IntEnum):
    """Process exit codes of `finetune train` / `finetune run`. 0 only once manifest.json is written."""

    SUCCEEDED = 0
    INVALID_SPEC = 2
    INVALID_DATASET = 3
    MODEL_NOT_FOUND = 4
    STORAGE_ERROR = 5
    TRAINING_ERROR = 6
    INTERRUPTED = 7
    QUALITY_GATE_FAILED = 8
    OOM_KILLED = 9


class Reason(StrEnum):
    """Failure reasons, as written on stderr / the termination message and shown in the job's conditions."""

    INVALID_SPEC = "InvalidSpec"
    INVALID_DATASET = "InvalidDataset"
    MODEL_NOT_FOUND = "ModelNotFound"
    STORAGE_ERROR = "StorageError"
    TRAINING_ERROR = "TrainingError"
    INTERRUPTED = "Interrupted"
    QUALITY_GATE_FAILED = "QualityGateFailed"  # the model missed spec.output.minMetric; kept under rejected/
    # A training process was killed for memory inside its container (the kernel's OOM killer on a process that is
    # not the container's PID 1, or Ray's memory monitor): the pod itself never shows OOMKilled. The operator
    # writes the same reason for a container the runtime marked OOMKilled (reasons.OOM_KILLED is this value).
    OOM_KILLED = "OOMKilled"


REASON_BY_EXIT_CODE: dict[ExitCode, Reason] = {
    ExitCode.INVALID_SPEC: Reason.INVALID_SPEC,
    ExitCode.INVALID_DATASET: Reason.INVALID_DATASET,
    ExitCode.MODEL_NOT_FOUND: Reason.MODEL_NOT_FOUND,
    ExitCode.STORAGE_ERROR: Reason.STORAGE_ERROR,
    ExitCode.TRAINING_ERROR: Reason.TRAINING_ERROR,
    ExitCode.INTERRUPTED: Reason.INTERRUPTED,
    ExitCode.QUALITY_GATE_FAILED: Reason.QUALITY_GATE_FAILED,
    ExitCode.OOM_KILLED: Reason.OOM_KILLED,
}
EXIT_CODE_BY_REASON: dict[Reason, ExitCode] = {reason: code for code, reason in REASON_BY_EXIT_CODE.items()}

# Kubernetes' default terminationMessagePath: the trainer writes the same JSON line there, so the operator reads it
# from the container's terminated state without needing pod logs.
TERMINATION_MESSAGE_PATH = "/dev/termination-log"


# The kubelet keeps at most this many bytes of a termination message; a report line never exceeds it.
TERMINATION_MESSAGE_LIMIT = 4096
# How many of the driver log's last lines a failure report carries (status.lastFailure.logTail).
LOG_TAIL_LINES = 20
# `reason` of the report a successful run writes (it is not a failure Reason).
SUCCEEDED = "Succeeded"


@dataclasses.dataclass(frozen=True)
class TrainerReport:
    """The one JSON line the trainer writes last, on stderr and to the termination message, on failure AND success.

    Why on success too: the operator cannot read object storage, and the last Prometheus scrape may precede the
    end of the run; the terminated container's message is durable and arrives with the pod status.
    """

    reason: str  # a Reason value, or SUCCEEDED
    message: str = ""
    log_tail: tuple[str, ...] = ()  # last lines of this attempt's driver log (failures only)
    log_uri: str | None = None  # where this attempt's driver log was uploaded (<output>/logs/attempt-N.log)
    metric_name: str | None = None  # the watched metric (earlyStopping.metric or the task default)
    metric: float | None = None  # its value for the model kept
    baseline: float | None = None  # the same metric for evaluation.baseline (None when baseline: none)
    negative_transfer: bool | None = None  # fine-tuning did not beat the baseline by evaluation.minGain
    kept_step: int | None = None  # the step whose weights are the published model (early stopping keeps the best)
    # The checkpoint step this attempt resumed from (0 = fresh start; the latest one when Ray Train restarted the
    # workers within the attempt): lets the operator record it durably per attempt without relying on a scrape.
    resumed_from_step: int | None = None

    def to_line(self) -> str:
        """Compact JSON, at most TERMINATION_MESSAGE_LIMIT bytes: drops log lines, then shortens the message."""
        report = self
        while True:
            line = json.dumps(_camel(report), ensure_ascii=False, separators=(",", ":"))
            excess = len(line.encode("utf-8")) - TERMINATION_MESSAGE_LIMIT
            if excess <= 0:
                return line
            if report.log_tail:
                report = dataclasses.replace(report, log_tail=report.log_tail[1:])
            elif len(report.message) > len(TRUNCATED):
                keep = max(0, len(report.message) - excess - len(TRUNCATED))
                report = dataclasses.replace(report, message=report.message[:keep] + TRUNCATED)
            else:  # only a pathological URI or reason is left: keep what identifies the failure
                return json.dumps({"reason": report.reason[:200], "message": TRUNCATED.strip()})


TRUNCATED = " …[truncated]"


def _camel(report: TrainerReport) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in dataclasses.fields(report):
        value = getattr(report, field.name)
        if value is None or value == ():
            continue
        head, *rest = field.name.split("_")
        out[head + "".join(w.title() for w in rest)] = list(value) if isinstance(value, tuple) else value
    return out


def failure_line(reason: Reason, message: str) -> str:
    """The JSON line of a failure without log details (tests and simple callers)."""
    return TrainerReport(reason=reason.value, message=message).to_line()


def parse_report(text: str) -> TrainerReport | None:
    """Find the last report line in text (stderr tail or termination message); None if there is none."""
    for raw in reversed(text.strip().splitlines()):
        line = raw.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and isinstance(data.get("reason"), str):
            return _report_from(data)
    return None


def _report_from(data: dict[str, Any]) -> TrainerReport:
    def num(key: str) -> float | None:
        value = data.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    tail = data.get("logTail")
    kept = num("keptStep")
    resumed = num("resumedFromStep")
    neg = data.get("negativeTransfer")
    return TrainerReport(
        reason=data["reason"],
        message=str(data.get("message", "")),
        log_tail=tuple(str(x) for x in tail) if isinstance(tail, list) else (),
        log_uri=str(data["logUri"]) if isinstance(data.get("logUri"), str) else None,
        metric_name=str(data["metricName"]) if isinstance(data.get("metricName"), str) else None,
        metric=num("metric"),
        baseline=num("baseline"),
        negative_transfer=neg if isinstance(neg, bool) else None,
        kept_step=int(kept) if kept is not None else None,
        resumed_from_step=int(resumed) if resumed is not None else None,
    )


def parse_failure_line(text: str) -> tuple[str, str] | None:
    """(reason, message) of the last report line in text, when it reports a failure."""
    report = parse_report(text)
    if report is None or report.reason == SUCCEEDED:
        return None
    return report.reason, report.message


# ---- Stopping on request (suspend, Kueue preemption): the head's SIGTERM ----
# Seconds the driver may spend, after SIGTERM, having the workers write a checkpoint at their next step before it
# stops (exit 7, Interrupted); unset or 0: it stops at once. The operator sets it on the head pod and gives the pod
# a grace period STOP_DRAIN_MARGIN_SECONDS longer (the log upload and Ray's shutdown come after).
STOP_DRAIN_ENV = "FINETUNE_STOP_DRAIN_SECONDS"
STOP_DRAIN_MARGIN_SECONDS = 30


# ---- Prometheus metrics exposed by the trainer driver (rank-0 process on the Ray head) ----
DEFAULT_METRICS_PORT = 8000


class Metric(StrEnum):
    """Metric names. Labels are bounded: only `phase` (TrainerPhase values) and `metric` (the eval metric name)."""

    STEP = "finetune_trainer_step"  # optimizer steps done (global, resumes count on)
    TOTAL_STEPS = "finetune_trainer_total_steps"
    EPOCH = "finetune_trainer_epoch"  # fractional epoch
    LOSS = "finetune_trainer_loss"  # last training loss (smoothed over the logging window)
    EVAL_METRIC = "finetune_trainer_eval_metric"  # label metric="eval_accuracy" etc.
    SAMPLES_PER_SECOND = "finetune_trainer_samples_per_second"
    TOKENS_PER_SECOND = "finetune_trainer_tokens_per_second"
    LAST_CHECKPOINT_TIMESTAMP = "finetune_trainer_last_checkpoint_timestamp_seconds"
    LAST_CHECKPOINT_STEP = "finetune_trainer_last_checkpoint_step"
    RESUMED_FROM_STEP = "finetune_trainer_resumed_from_step"  # 0 when started fresh
    TRAINABLE_PARAMETERS = "finetune_trainer_trainable_parameters"
    PHASE = "finetune_trainer_phase"  # label phase=<TrainerPhase>, value 1 for the current phase, else 0
    INFO = "finetune_trainer_info"  # labels: strategy, task (bounded by the spec's enums)
    # The metric the job watches (earlyStopping.metric, else the task default) under its own name, so the operator
    # shows that one and not whichever eval metric was exported last. Label metric=<its name>.
    WATCHED_METRIC = "finetune_trainer_watched_metric"
    MODEL_LOADED_TIMESTAMP = "finetune_trainer_model_loaded_timestamp_seconds"  # unix time; 0 until loaded
    FIRST_STEP_TIMESTAMP = "finetune_trainer_first_step_timestamp_seconds"  # this attempt's first optimizer step
    # The latest COMPLETE checkpoint: one series, label uri=<its location>, value = its step (cleared when replaced).
    CHECKPOINT_INFO = "finetune_trainer_checkpoint_info"


class TrainerPhase(StrEnum):
    INITIALIZING = "Initializing"
    LOADING = "Loading"
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    SAVING = "Saving"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


# ---- Artifact layout under output.uri ----
MANIFEST = "manifest.json"  # written last; a prefix without it is incomplete
MODEL_DIR = "model"  # save_pretrained (safetensors) + tokenizer; merged model for lora with merge: true
ADAPTER_DIR = "adapter"  # lora adapter (peft save_pretrained)
METRICS_FILE = "metrics.json"  # train/eval history
REPORT_FILE = "README.md"  # model card
CURVES_FILE = "curves.png"  # loss / metric curves
CHECKPOINTS_DIR = "checkpoints"  # Ray Train storage for this run (<output>/checkpoints/<run name>/...)
LOGS_DIR = "logs"  # each attempt's driver log, uploaded at the end of the attempt (also on failure, best effort)
REJECTED_DIR = "rejected"  # a model below spec.output.minMetric goes here, not to model/


def attempt_log_path(attempt: int) -> str:
    """Path of an attempt's driver log under output.uri."""
    return f"{LOGS_DIR}/attempt-{attempt}.log"
