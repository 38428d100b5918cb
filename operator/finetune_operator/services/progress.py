"""Where training progress comes from: the trainer's Prometheus endpoint on the head pod, or (tests only) a simulation.

Why injectable: pods on simulated (kwok) nodes run no trainer, yet the lifecycle (progress, NoProgress, ETA)
must still be exercised at scale. The simulation is selected only by settings.metrics_source=simulated.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Protocol

import aiohttp
from finetune_trainer import spec as ftspec
from finetune_trainer.contract import TrainerPhase

from finetune_operator.builders import METRICS_PORT
from finetune_operator.observe import PodView
from finetune_operator.trainer_metrics import MetricsParseError, MetricsSample, parse_trainer_metrics

logger = logging.getLogger(__name__)


class ProgressSource(Protocol):
    async def sample(self, *, head: PodView, spec: ftspec.FineTuneJobSpec, now: dt.datetime) -> MetricsSample | None:
        """A progress sample from the running head pod, or None when it cannot be read right now."""


class HttpProgressSource:
    """Scrape http://<head pod IP>:8000/metrics (the same endpoint Prometheus scrapes)."""

    def __init__(self, session: aiohttp.ClientSession, *, timeout: float) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def sample(self, *, head: PodView, spec: ftspec.FineTuneJobSpec, now: dt.datetime) -> MetricsSample | None:
        if not head.ip:
            return None
        url = f"http://{head.ip}:{METRICS_PORT}/metrics"
        try:
            async with self.session.get(url, timeout=self.timeout) as response:
                if response.status != 200:
                    return None
                return parse_trainer_metrics(await response.text())
        except (TimeoutError, aiohttp.ClientError, MetricsParseError) as e:
            logger.debug("no trainer metrics from %s: %s", url, e)
            return None


class SimulatedProgressSource:
    """Test-only: step grows with the head pod's age; totalSteps = maxSteps or 1000."""

    def __init__(self, *, steps_per_second: float = 2.0) -> None:
        self.steps_per_second = steps_per_second

    async def sample(self, *, head: PodView, spec: ftspec.FineTuneJobSpec, now: dt.datetime) -> MetricsSample | None:
        if head.created is None:
            return None
        total = spec.hyperparameters.max_steps or 1000
        age = max(0.0, (now - head.created).total_seconds())
        step = min(total, int(age * self.steps_per_second))
        return MetricsSample(
            step=step,
            total_steps=total,
            epoch=step / total * spec.hyperparameters.epochs,
            loss=1.0 / (1 + step),
            samples_per_second=self.steps_per_second * spec.hyperparameters.batch_size * spec.resources.workers,
            trainer_phase=TrainerPhase.TRAINING,
        )
