"""Parse the trainer's Prometheus text exposition into a typed progress sample.

Why pure: the operator reads progress exactly as Prometheus would (the same /metrics endpoint and the metric
names in finetune_trainer.contract), and the parsing is tested on literal text without any server.
"""

from __future__ import annotations

import dataclasses
import math

from finetune_trainer.contract import Metric, TrainerPhase
from prometheus_client.parser import text_string_to_metric_families


@dataclasses.dataclass(frozen=True)
class MetricsSample:
    """One scrape of the trainer; every field None when the trainer has not reported it yet."""

    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eval_metric: float | None = None
    eval_metric_name: str | None = None
    samples_per_second: float | None = None
    resumed_from_step: int | None = None
    last_checkpoint_step: int | None = None
    trainer_phase: TrainerPhase | None = None


# Driver phases before the first progress report of a worker (the driver starts at Initializing, Loading while the
# workers load data and the model; the first report switches to Training).
NOT_REPORTED_YET = frozenset({TrainerPhase.INITIALIZING, TrainerPhase.LOADING})


class MetricsParseError(ValueError):
    """The endpoint answered with something that is not Prometheus text format."""


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def parse_trainer_metrics(text: str) -> MetricsSample:
    values: dict[str, float] = {}
    eval_metric: tuple[str, float] | None = None
    phase: TrainerPhase | None = None
    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, TypeError) as e:
        raise MetricsParseError(f"not Prometheus text format: {e}") from e
    for family in families:
        for sample in family.samples:
            if sample.name == Metric.EVAL_METRIC:
                eval_metric = (sample.labels.get("metric", ""), sample.value)
            elif sample.name == Metric.PHASE:
                if sample.value == 1 and sample.labels.get("phase") in TrainerPhase.__members__.values():
                    phase = TrainerPhase(sample.labels["phase"])
            else:
                values[sample.name] = sample.value

    def number(metric: Metric) -> float | None:
        return _finite(values[metric]) if metric in values else None

    def integer(metric: Metric) -> int | None:
        value = number(metric)
        return None if value is None else int(value)

    if phase in NOT_REPORTED_YET:
        # The gauges exist (at 0) from the driver's start, but no worker has reported: a relaunch that will resume
        # from step N must not show step 0 / resumedFromStep 0 meanwhile. Only the phase is known.
        return MetricsSample(trainer_phase=phase)
    return MetricsSample(
        step=integer(Metric.STEP),
        total_steps=integer(Metric.TOTAL_STEPS) or None,
        epoch=number(Metric.EPOCH),
        loss=number(Metric.LOSS),
        eval_metric=_finite(eval_metric[1]) if eval_metric else None,
        eval_metric_name=eval_metric[0] or None if eval_metric else None,
        samples_per_second=number(Metric.SAMPLES_PER_SECOND),
        resumed_from_step=integer(Metric.RESUMED_FROM_STEP),
        last_checkpoint_step=integer(Metric.LAST_CHECKPOINT_STEP),
        trainer_phase=phase,
    )
