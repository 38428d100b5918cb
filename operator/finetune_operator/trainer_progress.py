"""From a scrape of the trainer to status: progress, the watched metric, the timeline and the latest checkpoint.

Why separate from status.py: these are facts the trainer reports, merged into what the status already keeps
(a scrape may fail, a relaunched trainer reports nothing while it loads, an older trainer lacks newer metrics);
status.py decides what to *do*. Pure.

The no-progress clock (`progress.lastProgressTime`) moves when the step increases and whenever the trainer is seen
outside training (loading the model, evaluating, saving): those phases can legitimately take long, so the
progressDeadlineSeconds watchdog measures only time spent training without a new step.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from finetune_trainer import spec as ftspec
from finetune_trainer.contract import TrainerPhase

from finetune_operator.observe import Observed
from finetune_operator.status_model import CheckpointInfo, Progress, Status, Timeline, rfc3339
from finetune_operator.trainer_metrics import MetricsSample

TRAINING_PHASES = frozenset({None, TrainerPhase.TRAINING})


def watched_metric_name(spec: ftspec.FineTuneJobSpec) -> str:
    """earlyStopping.metric, else the task's default: the spec's one rule (docs/trainer-contract.md)."""
    return spec.watched_metric


def _eta(spec: ftspec.FineTuneJobSpec, sample: MetricsSample, total: int | None, now: dt.datetime) -> str | None:
    if sample.step is None or not total or not sample.samples_per_second or sample.samples_per_second <= 0:
        return None
    per_step = (
        spec.hyperparameters.batch_size * spec.resources.workers * spec.hyperparameters.gradient_accumulation_steps
    )
    remaining = max(0, total - sample.step) * per_step / sample.samples_per_second
    return rfc3339(now + dt.timedelta(seconds=remaining))


def progress_of(obs: Observed, spec: ftspec.FineTuneJobSpec) -> Progress | None:
    """status.progress after this reconcile's scrape (if any), keeping what the trainer has not re-reported."""
    old = obs.old.progress
    sample = obs.metrics
    now = rfc3339(obs.now)
    if sample is None:  # no fresh scrape: nothing changes (the clock starts when the attempt first runs)
        return old or Progress(last_progress_time=now)
    base = old or Progress()
    training = sample.trainer_phase in TRAINING_PHASES
    phase = sample.trainer_phase.value if sample.trainer_phase is not None else base.trainer_phase
    if sample.step is None:  # a (re)starting trainer: only its phase is known; keep the last step
        return base.model_copy(
            update={"trainer_phase": phase, "last_progress_time": base.last_progress_time if training else now}
        )
    advanced = base.step is None or sample.step > base.step or base.last_progress_time is None
    total = sample.total_steps or base.total_steps
    percent = min(100, int(100 * sample.step / total)) if total else None
    watched = sample.watched(watched_metric_name(spec))
    update: dict[str, Any] = {
        "step": sample.step,
        "total_steps": total,
        "epoch": round(sample.epoch, 3) if sample.epoch is not None else base.epoch,
        "percent": percent,
        "loss": round(sample.loss, 6) if sample.loss is not None else base.loss,
        "eval_metric": round(watched[1], 6) if watched else base.eval_metric,
        "eval_metric_name": watched[0] if watched else base.eval_metric_name,
        "samples_per_second": (round(sample.samples_per_second, 3) if sample.samples_per_second is not None else None),
        "eta": _eta(spec, sample, total, obs.now),
        "resumed_from_step": sample.resumed_from_step
        if sample.resumed_from_step is not None
        else base.resumed_from_step,
        "trainer_phase": phase,
        "last_progress_time": now if advanced or not training else base.last_progress_time,
        "summary": f"{sample.step}/{total} ({percent}%)" if total else str(sample.step),
    }
    return base.model_copy(update=update)


def _stamp(seconds: float | None) -> str | None:
    return rfc3339(dt.datetime.fromtimestamp(seconds, tz=dt.UTC)) if seconds is not None else None


def _checkpoint(old: CheckpointInfo | None, sample: MetricsSample) -> CheckpointInfo | None:
    uri: str | None
    if sample.checkpoint is not None:
        uri, step = sample.checkpoint
    elif sample.last_checkpoint_step:  # older trainers: the step is known, the location is not
        uri, step = (old.uri if old else None), sample.last_checkpoint_step
    else:
        return old
    if old is not None and old.step is not None and step < old.step:
        return old  # a relaunched trainer that has not caught up yet
    return CheckpointInfo(uri=uri, step=step, time=_stamp(sample.last_checkpoint_time) or (old.time if old else None))


def advance_milestones(base: Status, *, obs: Observed) -> Status:
    """Timeline, latest checkpoint and the current attempt's resume step, from what this reconcile saw."""
    timeline = base.timeline or Timeline()
    if timeline.created is None and obs.created:
        timeline = timeline.model_copy(update={"created": obs.created})
    sample = obs.metrics
    if sample is None:
        return base.model_copy(update={"timeline": timeline})
    checkpoint = _checkpoint(base.checkpoint, sample)
    update: dict[str, Any] = {}
    if timeline.model_loaded is None and sample.model_loaded_time is not None:
        update["model_loaded"] = _stamp(sample.model_loaded_time)
    if timeline.first_step is None and sample.first_step_time is not None:
        update["first_step"] = _stamp(sample.first_step_time)
    if checkpoint is not None and checkpoint.time is not None:
        update["last_checkpoint"] = checkpoint.time
    status_update: dict[str, Any] = {"timeline": timeline.model_copy(update=update), "checkpoint": checkpoint}
    record = base.current_attempt()
    resumed = sample.resumed_from_step
    grew = resumed is not None and (
        record is None or record.resumed_from_step is None or resumed > record.resumed_from_step
    )
    if record is not None and sample.step is not None and grew:
        records = [r if r is not record else r.model_copy(update={"resumed_from_step": resumed}) for r in base.attempts]
        status_update["attempts"] = records
    return base.model_copy(update=status_update)
