"""`finetune run`: one FineTuneJob on this machine, with a local Ray and a live progress bar.

Why it exists: the same job file that runs on a cluster must run on a laptop with no cluster, as the project's
first command. Differences from the cluster driver are only about placement: relative paths resolve against the
current directory, output defaults to ./runs/<name>/, and the spec's workers are capped to the CPUs Ray sees
(the run says so). If RAY_ADDRESS is set, the run joins that Ray instance instead of starting one (tests use this
to share one Ray across runs).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import ray
from tqdm import tqdm

from finetune_trainer import signals
from finetune_trainer.driver import RunOptions, RunResult, preflight, run_training
from finetune_trainer.metrics import TrainerMetrics
from finetune_trainer.placement import fit_placement
from finetune_trainer.spec import FineTuneJob

log = logging.getLogger(__name__)
RAY_START_TIMEOUT = "timed out during startup"  # ray._private.node.Node's message when the raylet is late


class ProgressPrinter:
    """A tqdm bar fed by ProgressBoard snapshots; eval results are printed as lines above it."""

    def __init__(self, *, stream: TextIO, enabled: bool) -> None:
        self.stream, self.enabled = stream, enabled
        self.bar: Any = None
        self.seen_eval: dict[str, Any] = {}

    def __call__(self, snap: dict[str, Any]) -> None:
        if not self.enabled:
            return
        total = snap.get("total_steps")
        if self.bar is None and isinstance(total, int) and total > 0:
            self.bar = tqdm(
                total=total,
                initial=int(snap.get("step", 0)),
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                desc="training",
            )
        if self.bar is None:
            return
        step = int(snap.get("step", 0))
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)
        postfix: dict[str, str] = {}
        if isinstance(snap.get("loss"), float):
            postfix["loss"] = f"{snap['loss']:.4f}"
        if isinstance(snap.get("samples_per_second"), float):
            postfix["samples/s"] = f"{snap['samples_per_second']:.1f}"
        name = snap.get("eval_metric_name")
        evals = snap.get("eval") or {}
        if name in evals:
            postfix[str(name)] = f"{evals[name]:.4f}"
        self.bar.set_postfix(postfix, refresh=False)
        if evals and evals != self.seen_eval:
            self.seen_eval = dict(evals)
            self.bar.write("eval @ step {}: {}".format(step, " ".join(f"{k}={v:.4f}" for k, v in evals.items())))
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def start_local_ray(*, num_cpus: int, log_to_driver: bool, attempts: int = 3) -> None:
    """Start a Ray instance on this machine whose workers run at the caller's CPU priority.

    Ray starts worker processes at nice 15 (its `worker_niceness`) so its own daemons stay responsive on a busy
    node. For a local run the training worker is the job: at nice 15 it gets a fraction of the CPU a plain
    `python train.py` gets as soon as anything else runs on the machine (bench/overhead.py, docs/benchmarks.md).
    `worker_niceness: 0` adds nothing to the caller's niceness: the worker competes like the process that
    started it, as the in-process HF Trainer it is compared with does.

    Ray gives its raylet a fixed 30 s to register and raises a bare Exception when it misses that on a busy
    machine; that start-up is retried (after `ray.shutdown()` removes what the failed start left) `attempts` times.
    """
    for attempt in range(1, attempts + 1):
        try:
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=log_to_driver,
                logging_level=logging.WARNING,
                _system_config={"worker_niceness": 0},
            )
            return
        except Exception as e:
            if RAY_START_TIMEOUT not in str(e) or attempt == attempts:
                raise
            log.warning(
                "local Ray did not start in time (attempt %d of %d; a busy machine?): retrying", attempt, attempts
            )
            ray.shutdown()


def default_output(job: FineTuneJob, output: str | None) -> str:
    """--output, else spec.output.uri, else ./runs/<name>."""
    return output or job.spec.output.uri or str(Path.cwd() / "runs" / job.metadata.name)


def run_local(
    job: FineTuneJob, *, output: str | None, metrics_port: int | None, progress: bool, verbose: bool
) -> RunResult:
    """Run a job on a local (or RAY_ADDRESS) Ray instance; returns after the manifest is written."""
    spec = job.spec
    base_dir = Path.cwd()
    output_uri = default_output(job, output)
    preflight(spec, output_uri=output_uri, base_dir=base_dir)
    started_ray = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=verbose, logging_level=logging.WARNING)
        else:
            start_local_ray(num_cpus=os.cpu_count() or 1, log_to_driver=verbose)
            started_ray = True
        signals.install()  # ray.init replaced it
    try:
        have = ray.cluster_resources()  # type: ignore[no-untyped-call]
        placement = fit_placement(
            workers=spec.resources.workers,
            cpus=spec.resources.cpus,
            gpus=spec.resources.gpus_per_worker,
            available_cpus=float(have.get("CPU", 1.0)),
            available_gpus=float(have.get("GPU", 0.0)),
        )
        print(
            f"finetune run: {job.metadata.name}: {spec.method.strategy.value} on {spec.model.uri}; "
            f"{placement.workers} worker(s) x {placement.cpus_per_worker:g} CPU"
            + (f" x {placement.gpus_per_worker} GPU" if placement.gpus_per_worker else "")
            + (f" ({placement.note})" if placement.note else ""),
            file=sys.stderr,
        )
        metrics = TrainerMetrics()
        if metrics_port is not None:
            metrics.serve(metrics_port, addr="127.0.0.1")
        printer = ProgressPrinter(stream=sys.stderr, enabled=progress)
        try:
            return run_training(
                spec,
                options=RunOptions(
                    run_name=job.metadata.name,
                    output_uri=output_uri,
                    workers=placement.workers,
                    cpus_per_worker=placement.cpus_per_worker,
                    gpus_per_worker=placement.gpus_per_worker,
                    base_dir=base_dir,
                    resource_wait_seconds=60.0,
                    metrics=metrics,
                    on_progress=printer,
                ),
            )
        finally:
            printer.close()
    finally:
        if started_ray:
            ray.shutdown()
