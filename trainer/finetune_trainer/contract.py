"""The contract between the trainer and the operator: exit codes, failure reasons, metrics, artifact layout.

Why a module of its own: the operator reads what the trainer writes (its exit code, the one-line JSON reason,
its Prometheus metrics, its manifest.json) without importing torch or ray. Both sides import these names, so a
rename is a type error on both sides rather than a silent mismatch. docs/trainer-contract.md explains it.
"""

from __future__ import annotations

import json
from enum import IntEnum, StrEnum


class ExitCode(IntEnum):
    """Process exit codes of `finetune train` / `finetune run`. 0 only once manifest.json is written."""

    SUCCEEDED = 0
    INVALID_SPEC = 2
    INVALID_DATASET = 3
    MODEL_NOT_FOUND = 4
    STORAGE_ERROR = 5
    TRAINING_ERROR = 6
    INTERRUPTED = 7


class Reason(StrEnum):
    """Failure reasons, as written on stderr / the termination message and shown in the job's conditions."""

    INVALID_SPEC = "InvalidSpec"
    INVALID_DATASET = "InvalidDataset"
    MODEL_NOT_FOUND = "ModelNotFound"
    STORAGE_ERROR = "StorageError"
    TRAINING_ERROR = "TrainingError"
    INTERRUPTED = "Interrupted"


REASON_BY_EXIT_CODE: dict[ExitCode, Reason] = {
    ExitCode.INVALID_SPEC: Reason.INVALID_SPEC,
    ExitCode.INVALID_DATASET: Reason.INVALID_DATASET,
    ExitCode.MODEL_NOT_FOUND: Reason.MODEL_NOT_FOUND,
    ExitCode.STORAGE_ERROR: Reason.STORAGE_ERROR,
    ExitCode.TRAINING_ERROR: Reason.TRAINING_ERROR,
    ExitCode.INTERRUPTED: Reason.INTERRUPTED,
}
EXIT_CODE_BY_REASON: dict[Reason, ExitCode] = {reason: code for code, reason in REASON_BY_EXIT_CODE.items()}

# Kubernetes' default terminationMessagePath: the trainer writes the same JSON line there, so the operator reads it
# from the container's terminated state without needing pod logs.
TERMINATION_MESSAGE_PATH = "/dev/termination-log"


def failure_line(reason: Reason, message: str) -> str:
    """The one-line JSON the trainer prints last on stderr when it fails."""
    return json.dumps({"reason": reason.value, "message": message}, ensure_ascii=False)


def parse_failure_line(text: str) -> tuple[str, str] | None:
    """Find the last JSON failure line in text (stderr tail or termination message); None if there is none."""
    for raw in reversed(text.strip().splitlines()):
        line = raw.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and isinstance(data.get("reason"), str):
            return data["reason"], str(data.get("message", ""))
    return None


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
