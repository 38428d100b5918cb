"""The operator's own Prometheus metrics, in a registry owned by one operator instance (kept in the kopf memo).

Why not the default registry: a module-level registry is global mutable state, breaks running two operators in one
test process, and leaks series between tests. Per-job series are labelled only by namespace and name (bounded by
the number of jobs) and are removed when the job is deleted.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from finetune_operator.status_model import Phase, Status

DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, float("inf"))
STARTUP_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1800, float("inf"))
QUEUE_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 14400, 86400, float("inf"))
RECONCILE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Gauge("finetune_jobs", "FineTuneJobs by phase", ["phase"], registry=r)
        self.job_duration = Histogram(
            "finetune_job_duration_seconds",
            "Start to Succeeded/Failed",
            ["result"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.time_to_running = Histogram(
            "finetune_job_time_to_running_seconds", "Creation to Running", buckets=STARTUP_BUCKETS, registry=r
        )
        self.time_to_first_step = Histogram(
            "finetune_job_time_to_first_step_seconds",
            "Creation to the first optimizer step of the first attempt that trained (the trainer's own timestamp)",
            buckets=STARTUP_BUCKETS,
            registry=r,
        )
        self.queued = Histogram(
            "finetune_job_queued_seconds",
            "Time a Kueue-managed job waited for admission (first admission and each re-admission after an eviction)",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.attempts = Counter("finetune_job_attempts", "Attempts started (first runs, retries, resumes)", registry=r)
        self.retries = Counter("finetune_job_retries", "Attempts started because the previous one failed", registry=r)
        self.failures = Counter("finetune_job_failures", "Jobs that ended Failed, by reason", ["reason"], registry=r)
        self.api_requests = Counter(
            "finetune_api_requests",
            "Kubernetes API requests made by the reconciler, by HTTP method",
            ["method"],
            registry=r,
        )
        self.reconcile_errors = Counter("finetune_reconcile_errors", "Reconciles that raised", registry=r)
        self.reconcile_duration = Histogram(
            "finetune_reconcile_duration_seconds", "Time per reconcile", buckets=RECONCILE_BUCKETS, registry=r
        )
        self.step = Gauge("finetune_job_step", "Optimizer steps done", ["namespace", "name"], registry=r)
        self.loss = Gauge("finetune_job_loss", "Last training loss", ["namespace", "name"], registry=r)
        self.eval_metric = Gauge(
            "finetune_job_eval_metric", "Last value of the watched evaluation metric", ["namespace", "name"], registry=r
        )
        self.samples_per_second = Gauge(
            "finetune_job_samples_per_second", "Training throughput", ["namespace", "name"], registry=r
        )
        self._phases: dict[tuple[str, str], Phase] = {}
        for phase in Phase:
            self.jobs.labels(phase=phase.value).set(0)

    def observe_status(self, *, namespace: str, name: str, status: Status) -> None:
        """Update the phase gauge and the per-job training gauges from a freshly computed status."""
        key = (namespace, name)
        if status.phase is not None and self._phases.get(key) != status.phase:
            previous = self._phases.get(key)
            if previous is not None:
                self.jobs.labels(phase=previous.value).dec()
            self.jobs.labels(phase=status.phase.value).inc()
            self._phases[key] = status.phase
        progress = status.progress
        if progress is None or status.phase is None or status.phase.terminal:
            self._remove_training(namespace, name)
            return
        for gauge, value in (
            (self.step, progress.step),
            (self.loss, progress.loss),
            (self.eval_metric, progress.eval_metric),
            (self.samples_per_second, progress.samples_per_second),
        ):
            if value is not None:
                gauge.labels(namespace=namespace, name=name).set(value)

    def _remove_training(self, namespace: str, name: str) -> None:
        for gauge in (self.step, self.loss, self.eval_metric, self.samples_per_second):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, name)

    def forget(self, *, namespace: str, name: str) -> None:
        """The job was deleted: drop its series and its contribution to the phase gauge."""
        self._remove_training(namespace, name)
        previous = self._phases.pop((namespace, name), None)
        if previous is not None:
            self.jobs.labels(phase=previous.value).dec()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
