"""Prometheus metrics served by the trainer driver (contract.Metric names, bounded labels).

Why in the driver: the operator and Prometheus scrape one stable address per job (http://<head-pod-ip>:8000/metrics)
for the whole run, across worker restarts. The driver copies the ProgressBoard snapshot (pushed by the rank-0
worker) into these gauges about once a second. A private CollectorRegistry per run keeps module state empty and
lets tests run several drivers in one process.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from finetune_trainer.contract import Metric, TrainerPhase

# Eval metric names the trainer computes: the only values the `metric` label can take.
EVAL_METRICS = ("eval_loss", "eval_accuracy", "eval_f1", "eval_perplexity")


class TrainerMetrics:
    """The driver's gauges; `update` takes a ProgressBoard snapshot."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

        def gauge(metric: Metric, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(metric.value, doc, labelnames=labels, registry=r)

        self.step = gauge(Metric.STEP, "Optimizer steps completed (continues across resumes).")
        self.total_steps = gauge(Metric.TOTAL_STEPS, "Optimizer steps the run will take.")
        self.epoch = gauge(Metric.EPOCH, "Fractional epoch.")
        self.loss = gauge(Metric.LOSS, "Training loss averaged over the last ~1 s window.")
        self.eval_metric = gauge(Metric.EVAL_METRIC, "Latest validation metrics.", ("metric",))
        self.samples = gauge(Metric.SAMPLES_PER_SECOND, "Training samples per second (all workers).")
        self.tokens = gauge(Metric.TOKENS_PER_SECOND, "Non-padding training tokens per second (all workers).")
        self.ckpt_time = gauge(Metric.LAST_CHECKPOINT_TIMESTAMP, "Unix time of the last checkpoint.")
        self.ckpt_step = gauge(Metric.LAST_CHECKPOINT_STEP, "Step of the last checkpoint.")
        self.resumed = gauge(Metric.RESUMED_FROM_STEP, "Step this attempt resumed from (0 = fresh start).")
        self.trainable = gauge(Metric.TRAINABLE_PARAMETERS, "Parameters trained by the strategy.")
        self.phase = gauge(Metric.PHASE, "1 for the current phase of the trainer, else 0.", ("phase",))
        self.info = gauge(Metric.INFO, "Constant 1 with the run's strategy and task.", ("strategy", "task"))
        self.watched = gauge(
            Metric.WATCHED_METRIC,
            "Latest value of the watched metric (earlyStopping.metric or task default).",
            ("metric",),
        )
        self.model_loaded = gauge(
            Metric.MODEL_LOADED_TIMESTAMP, "Unix time this attempt loaded the model (0 = not yet)."
        )
        self.first_step = gauge(Metric.FIRST_STEP_TIMESTAMP, "Unix time of this attempt's first optimizer step.")
        self.checkpoint = gauge(
            Metric.CHECKPOINT_INFO, "Step of the latest complete checkpoint; label uri = its location.", ("uri",)
        )
        self.checkpoint_uri: str | None = None
        self.set_phase(TrainerPhase.INITIALIZING)

    def serve(self, port: int, *, addr: str = "0.0.0.0") -> Any:
        """Start the HTTP endpoint (daemon thread); returns the server so callers can shut it down."""
        server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return server

    def set_phase(self, phase: TrainerPhase) -> None:
        for value in TrainerPhase:
            self.phase.labels(phase=value.value).set(1.0 if value is phase else 0.0)

    def set_info(self, *, strategy: str, task: str) -> None:
        self.info.labels(strategy=strategy, task=task).set(1.0)

    def update(self, snap: dict[str, Any]) -> None:
        simple = {
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.epoch,
            "loss": self.loss,
            "samples_per_second": self.samples,
            "tokens_per_second": self.tokens,
            "last_checkpoint_time": self.ckpt_time,
            "last_checkpoint_step": self.ckpt_step,
            "resumed_from_step": self.resumed,
            "trainable_parameters": self.trainable,
            "model_loaded_time": self.model_loaded,
            "first_step_time": self.first_step,
        }
        for key, gauge in simple.items():
            value = snap.get(key)
            if isinstance(value, int | float):
                gauge.set(float(value))
        evals = snap.get("eval") or {}
        for name, value in evals.items():
            if name in EVAL_METRICS and isinstance(value, int | float):
                self.eval_metric.labels(metric=name).set(float(value))
        watched = snap.get("eval_metric_name")
        if watched in EVAL_METRICS and isinstance(evals.get(watched), int | float):
            self.watched.labels(metric=watched).set(float(evals[watched]))
        self._checkpoint(snap)
        phase = snap.get("phase")
        if phase in {p.value for p in TrainerPhase}:
            self.set_phase(TrainerPhase(phase))

    def _checkpoint(self, snap: dict[str, Any]) -> None:
        """One series: the latest complete checkpoint's location, valued with its step (the old one removed).

        The worker pushes checkpoint_uri together with last_checkpoint_step, after Ray Train has persisted it.
        """
        uri, step = snap.get("checkpoint_uri"), snap.get("last_checkpoint_step")
        if not isinstance(uri, str) or not uri or not isinstance(step, int | float):
            return
        if uri != self.checkpoint_uri:
            if self.checkpoint_uri is not None:
                self.checkpoint.remove(self.checkpoint_uri)
            self.checkpoint_uri = uri
        self.checkpoint.labels(uri=uri).set(float(step))
