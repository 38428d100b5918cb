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
OOM_KILLED = contract.Reason.OOM_KILLED.value  # the runtime's word, and the trainer's for a process inside
NO_PROGRESS = "NoProgress"
DEADLINE_EXCEEDED = "DeadlineExceeded"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
UNSCHEDULABLE = "Unschedulable"
PENDING_DEADLINE_EXCEEDED = "PendingDeadlineExceeded"  # a pod stayed not-running without a reason of its own
INVALID_SPEC = contract.Reason.INVALID_SPEC.value
TRAINER_EXITED = "TrainerExited"
# The container's main process died of a signal (exit code 128 + N) with no trainer report and no OOMKilled from the
# runtime: killed from outside (a node agent, `crictl stop`, a runtime or node restart), or a native crash.
KILLED_BY_SIGNAL = "KilledBySignal"
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
        KILLED_BY_SIGNAL,
        HEAD_FAILED,
        FAILED_CREATE,
        NAME_CONFLICT,
    }
)
# Reasons of conditions that are not failures but have a troubleshooting section too.
OTHER_REASONS = frozenset({NEGATIVE_TRANSFER, BACKOFF_LIMIT_EXCEEDED})


def retryable(reason: str) -> bool:
    return reason not in NOT_RETRYABLE


_IMAGE = "check spec.image (or the chart's defaults.trainerImage) and that the nodes can pull it"
_RUNTIME = "kubectl describe pod shows the runtime's message"
# One line of "what to do next" per reason, appended to the Warning Event (kubectl describe ftj); the full text of
# each is a section of docs/troubleshooting.md.
ADVICE: dict[str, str] = {
    contract.Reason.INVALID_SPEC.value: "fix the field named in the message (kubectl explain finetunejob.spec.<path>), "
    "then delete and re-apply the job",
    contract.Reason.INVALID_DATASET.value: "check the file, its format and the column names; try `finetune run` "
    "locally with maxTrainSamples: 100",
    contract.Reason.MODEL_NOT_FOUND.value: "check model.uri and revision; air-gapped clusters need s3:// or a model "
    "baked into the image",
    contract.Reason.STORAGE_ERROR.value: "check spec.storage.endpoint, the credentials Secret and the bucket named in "
    "the message",
    contract.Reason.TRAINING_ERROR.value: "read status.lastFailure.logTail; out of GPU memory: lower batchSize or "
    "maxSeqLength; NaN loss: lower learningRate",
    contract.Reason.INTERRUPTED.value: "retried from the latest checkpoint; if it repeats use a priorityClassName that "
    "is not preempted",
    contract.Reason.QUALITY_GATE_FAILED.value: "the model is kept under rejected/; train longer, change the strategy "
    "or learning rate, or lower output.minMetric",
    OOM_KILLED: "raise the memory field named in the message, or lower batchSize/maxSeqLength",
    HEAD_POD_LOST: "kubectl get events shows who deleted or evicted the head; protect long jobs with a "
    "priorityClassName",
    NO_PROGRESS: "read status.lastFailure and the head's log around the last step; raise progressDeadlineSeconds if "
    "one step legitimately takes longer",
    DEADLINE_EXCEEDED: "raise activeDeadlineSeconds or shorten the run (maxSteps); the checkpoints are kept",
    UNSCHEDULABLE: "compare spec.resources with the nodes' allocatable, nodeSelector and tolerations",
    PENDING_DEADLINE_EXCEEDED: "kubectl describe pod of the pending pod; check ResourceQuotas and LimitRanges",
    "ErrImagePull": _IMAGE,
    "ImagePullBackOff": _IMAGE,
    "InvalidImageName": _IMAGE,
    "ErrImageNeverPull": _IMAGE,
    "CreateContainerConfigError": "the Secret in storage.credentialsSecret must exist in the job's namespace with "
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "CreateContainerError": _RUNTIME,
    "RunContainerError": _RUNTIME,
    TRAINER_EXITED: "read status.lastFailure (exit code, log tail) and <output>/logs/attempt-N.log",
    KILLED_BY_SIGNAL: "retried from the latest checkpoint; find what killed it: kubectl get events, the node's "
    "kubelet and container runtime logs (SIGKILL from a liveness probe, a node restart, an admin); SIGSEGV or "
    "SIGABRT: read status.lastFailure.logTail",
    HEAD_FAILED: "kubectl describe pod of the head and its log tail in status.lastFailure",
    FAILED_CREATE: "free the quota, or fix what the message names (priorityClassName, an admission policy)",
    NAME_CONFLICT: "rename or delete the object that is not the job's, or re-create the job under another name",
    BACKOFF_LIMIT_EXCEEDED: "fix the cause of the last attempt (its reason is on the Failed condition)",
    NEGATIVE_TRANSFER: "the pretrained weights did not help: try a base model closer to the data or a strategy that "
    "keeps more of it (head, top-layers, lora)",
}


def advice(reason: str | None) -> str | None:
    """What to do next about a reason (None for reasons that need nothing, e.g. Running)."""
    return ADVICE.get(reason or "")
