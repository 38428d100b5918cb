"""Parse the trainer's Prometheus text exposition into a typed progress sample.

Why pure: the operator reads progress exactly as Prometheus would (the same /metrics endpoint and the metric
names in finetune_trainer.contract), and the parsing is tested on literal text without any server.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from finetune_trainer.contract import Metric, TrainerPhase
from prometheus_client.parser import text_string_to_metric_families


@dataclasses.dataclass(frozen=True)
class MetricsSample:
    """One scrape of the trainer; every field None when the trainer has not reported it yet (or is too old to)."""

    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eval_metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)  # latest value of each
    watched_metric: tuple[str, float] | None = None  # Metric.WATCHED_METRIC (newer trainers)
    samples_per_second: float | None = None
    resumed_from_step: int | None = None
    last_checkpoint_step: int | None = None
    last_checkpoint_time: float | None = None  # unix seconds
    checkpoint: tuple[str, int] | None = None  # Metric.CHECKPOINT_INFO: (uri, step) of the latest complete one
    model_loaded_time: float | None = None  # unix seconds
    first_step_time: float | None = None  # unix seconds, this attempt's first optimizer step
    trainer_phase: TrainerPhase | None = None

    def watched(self, name: str) -> tuple[str, float] | None:
        """The watched metric: exported under its own name, else (older trainers) the eval metric of that name."""
        if self.watched_metric is not None:
            return self.watched_metric
        value = self.eval_metrics.get(name)
        return (name, value) if value is not None else None


# Driver phases before the first progress report of a worker (the driver starts at Initializing, Loading while the
# workers load data and the model; the first report switches to Training).
NOT_REPORTED_YET = frozenset({TrainerPhase.INITIALIZING, TrainerPhase.LOADING})


class MetricsParseError(ValueError):
    """The endpoint answered with something that is not Prometheus text format."""


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _timestamp(value: float | None) -> float | None:
    return value if value is not None and value > 0 else None  # 0 = not yet


def parse_trainer_metrics(text: str) -> MetricsSample:
    values: dict[str, float] = {}
    evals: dict[str, float] = {}
    watched: tuple[str, float] | None = None
    checkpoint: tuple[str, int] | None = None
    phase: TrainerPhase | None = None
    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, TypeError) as e:
        raise MetricsParseError(f"not Prometheus text format: {e}") from e
    for family in families:
        for sample in family.samples:
            value = _finite(sample.value)
            if sample.name == Metric.EVAL_METRIC:
                if value is not None and sample.labels.get("metric"):
                    evals[sample.labels["metric"]] = value
            elif sample.name == Metric.WATCHED_METRIC:
                if value is not None and sample.labels.get("metric"):
                    watched = (sample.labels["metric"], value)
            elif sample.name == Metric.CHECKPOINT_INFO:
                if value is not None and value >= 0 and sample.labels.get("uri"):
                    checkpoint = (sample.labels["uri"], int(value))
            elif sample.name == Metric.PHASE:
                if sample.value == 1 and sample.labels.get("phase") in TrainerPhase.__members__.values():
                    phase = TrainerPhase(sample.labels["phase"])
            elif value is not None:
                values[sample.name] = value

    def number(metric: Metric) -> float | None:
        return values.get(metric)

    def integer(metric: Metric) -> int | None:
        value = number(metric)
        return None if value is None else int(value)

    milestones = MetricsSample(
        checkpoint=checkpoint,
        last_checkpoint_time=_timestamp(number(Metric.LAST_CHECKPOINT_TIMESTAMP)),
        model_loaded_time=_timestamp(number(Metric.MODEL_LOADED_TIMESTAMP)),
        first_step_time=_timestamp(number(Metric.FIRST_STEP_TIMESTAMP)),
        trainer_phase=phase,
    )
    if phase in NOT_REPORTED_YET:
        # The gauges exist (at 0) from the driver's start, but no worker has reported: a relaunch that will resume
        # from step N must not show step 0 / resumedFromStep 0 meanwhile. Only the phase and milestones are known.
        return milestones
    return dataclasses.replace(
        milestones,
        step=integer(Metric.STEP),
        total_steps=integer(Metric.TOTAL_STEPS) or None,
        epoch=number(Metric.EPOCH),
        loss=number(Metric.LOSS),
        eval_metrics=evals,
        watched_metric=watched,
        samples_per_second=number(Metric.SAMPLES_PER_SECOND),
        resumed_from_step=integer(Metric.RESUMED_FROM_STEP),
        last_checkpoint_step=integer(Metric.LAST_CHECKPOINT_STEP),
    )
