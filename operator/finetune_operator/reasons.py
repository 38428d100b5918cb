"""The failure vocabulary: every reason the operator writes into a job's status, and which ones a retry can fix.

Why one module: docs/troubleshooting.md must have a "what to do" section for each reason (tests/unit/test_docs.py
checks FAILURE_REASONS against it), and the decision code and the docs must not drift apart.
"""

from __future__ import annotations

from finetune_trainer import contract

# Waiting reasons that will not fix themselves quickly: shown in the status at once (and subject to
# pendingDeadlineSeconds like every other not-running state).
PENDING_TROUBLE = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
# Trainer reasons that a retry cannot fix: fail at once instead of burning attempts.
NOT_RETRYABLE = frozenset(
    {
        contract.Reason.INVALID_SPEC.value,
        contract.Reason.INVALID_DATASET.value,
        contract.Reason.MODEL_NOT_FOUND.value,
        contract.Reason.QUALITY_GATE_FAILED.value,  # a retry would train the same model again
    }
)
HEAD_POD_LOST = "HeadPodLost"
OOM_KILLED = "OOMKilled"
NO_PROGRESS = "NoProgress"
DEADLINE_EXCEEDED = "DeadlineExceeded"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
UNSCHEDULABLE = "Unschedulable"
PENDING_DEADLINE_EXCEEDED = "PendingDeadlineExceeded"  # a pod stayed not-running without a reason of its own
INVALID_SPEC = contract.Reason.INVALID_SPEC.value
TRAINER_EXITED = "TrainerExited"
HEAD_FAILED = "HeadFailed"
FAILED_CREATE = "FailedCreate"  # the API server refused a child (quota, admission, PriorityClass, ...)
NAME_CONFLICT = "NameConflict"  # an object of a child's name exists and is not owned by this job
NEGATIVE_TRANSFER = "NegativeTransfer"  # condition (the job still Succeeds)
CREATION_PROBLEMS = frozenset({FAILED_CREATE, NAME_CONFLICT})

# Every reason the Failed condition can carry besides pod-level ones passed through as is (Evicted, NodeLost...).
FAILURE_REASONS = frozenset(
    {
        *(r.value for r in contract.Reason),
        OOM_KILLED,
        HEAD_POD_LOST,
        NO_PROGRESS,
        DEADLINE_EXCEEDED,
        UNSCHEDULABLE,
        PENDING_DEADLINE_EXCEEDED,
        *PENDING_TROUBLE,
        TRAINER_EXITED,
        HEAD_FAILED,
        FAILED_CREATE,
        NAME_CONFLICT,
    }
)
# Reasons of conditions that are not failures but have a troubleshooting section too.
OTHER_REASONS = frozenset({NEGATIVE_TRANSFER, BACKOFF_LIMIT_EXCEEDED})


def retryable(reason: str) -> bool:
    return reason not in NOT_RETRYABLE
