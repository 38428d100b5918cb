"""Domain errors of the trainer, each carrying the contract Reason / ExitCode the operator surfaces.

Why typed errors: the operator turns the trainer's exit code and last stderr line into the job's Failed condition,
so "the data file has no column `label`" must reach it as InvalidDataset, not as a Python traceback. Library code
raises these (converting third-party exceptions at the boundary with `raise X(...) from e`); the entry points
(cli.py) are the only place that turns them into exit codes. They pickle cleanly, so an error raised inside a Ray
Train worker arrives at the driver with its reason intact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from finetune_trainer import oom
from finetune_trainer.contract import EXIT_CODE_BY_REASON, ExitCode, Reason


class TrainerError(Exception):
    """Base class: a failure with a reason the operator understands."""

    reason: Reason = Reason.TRAINING_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[type[TrainerError], tuple[str]]:
        return (type(self), (self.message,))

    @property
    def exit_code(self) -> ExitCode:
        return EXIT_CODE_BY_REASON[self.reason]


class InvalidSpecError(TrainerError):
    """The FineTuneJob cannot be run as written (a field is wrong or inconsistent with the model/data)."""

    reason = Reason.INVALID_SPEC


class InvalidDatasetError(TrainerError):
    """A data file is missing, unreadable, empty, or lacks a column / has an unknown label."""

    reason = Reason.INVALID_DATASET


class ModelNotFoundError(TrainerError):
    """The pretrained model (or its tokenizer) cannot be found or loaded from its URI."""

    reason = Reason.MODEL_NOT_FOUND


class StorageError(TrainerError):
    """Object storage, the model hub or the output location cannot be reached, read or written (also after
    retrying a transient failure: a relaunch may succeed, so the reason is retryable)."""

    reason = Reason.STORAGE_ERROR


class TrainingError(TrainerError):
    """Training itself failed (diverged, crashed, ran out of retries)."""

    reason = Reason.TRAINING_ERROR


class QualityGateFailedError(TrainerError):
    """The kept model missed spec.output.minMetric; its artifacts are under rejected/, the manifest says so."""

    reason = Reason.QUALITY_GATE_FAILED

    def __init__(self, message: str, *, outcome: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.outcome = dict(outcome or {})

    def __reduce__(self) -> tuple[Any, ...]:
        return (_gate_error, (self.message, self.outcome))


def _gate_error(message: str, outcome: dict[str, Any]) -> QualityGateFailedError:
    return QualityGateFailedError(message, outcome=outcome)


class InterruptedRunError(TrainerError):
    """The run was interrupted (SIGTERM/SIGINT); checkpoints stay and a relaunch resumes."""

    reason = Reason.INTERRUPTED


class OomKilledError(TrainerError):
    """A training process was killed for memory inside its container (oom.py: how that is known)."""

    reason = Reason.OOM_KILLED


# Where Ray Train and Ray keep the errors behind an error: worker_failures (rank -> error) of WorkerGroupError,
# controller_failure, a dead worker's health_check_failure, RayTaskError's cause, and Python's own chain.
_NESTED = ("controller_failure", "health_check_failure", "cause", "__cause__", "__context__")


def walk(error: BaseException) -> Iterator[BaseException]:
    """The error and every error behind it, each once."""
    seen: set[int] = set()
    stack: list[BaseException] = [error]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(f for f in failures.values() if isinstance(f, BaseException))
        for attr in _NESTED:
            nested = getattr(current, attr, None)
            if isinstance(nested, BaseException):
                stack.append(nested)


def find_trainer_error(error: BaseException) -> TrainerError | None:
    return next((e for e in walk(error) if isinstance(e, TrainerError)), None)


def ray_memory_monitor_kill(error: BaseException) -> str | None:
    """The line of Ray's words saying its memory monitor killed a worker, if any error behind `error` has them."""
    for current in walk(error):
        text = str(current)
        if type(current).__name__ == "OutOfMemoryError" or any(m in text for m in oom.RAY_MEMORY_MONITOR_MARKS):
            lines = [line for line in text.splitlines() if any(m in line for m in oom.RAY_MEMORY_MONITOR_MARKS)]
            return (lines or text.splitlines() or [""])[0]
    return None


def classify_failure(error: BaseException, *, oom_kills: Sequence[oom.OomKills] = ()) -> TrainerError:
    """A Ray Train failure as the domain error a worker raised; else OOMKilled when Ray's memory monitor or the
    kernel's OOM killer (oom_kills: counters that rose during the run) killed a training process; else
    TrainingError with the first error line."""
    found = find_trainer_error(error)
    if found is not None:
        return found
    ray_kill = ray_memory_monitor_kill(error)
    if oom_kills or ray_kill is not None:
        return OomKilledError(oom.oom_message(list(oom_kills), ray_detail=ray_kill))
    failures = getattr(error, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        rank, first = sorted(failures.items())[0]
        return TrainingError(f"worker {rank} failed: {type(first).__name__}: {str(first).strip().splitlines()[-1:]}")
    text = str(error).strip().splitlines()
    return TrainingError(f"{type(error).__name__}: {text[-1] if text else ''}")
