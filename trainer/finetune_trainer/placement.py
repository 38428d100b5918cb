"""Where `finetune run` puts workers on this machine: the spec's workers capped to the CPUs/GPUs Ray sees.

Why separate: a pure function, shared by `finetune run` and its tests, that must say what it changed (a user who
asked for 4 GPU workers on a laptop should read why the run used 2 CPU workers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: int
    note: str | None


def fit_placement(*, workers: int, cpus: float, gpus: int, available_cpus: float, available_gpus: float) -> Placement:
    """Cap the spec's workers to this machine: at most one worker per CPU, sharing all CPUs between them."""
    notes = []
    use_gpus = gpus if available_gpus >= gpus > 0 else 0
    if gpus and not use_gpus:
        notes.append(f"gpusPerWorker={gpus} but this machine has {available_gpus:g} GPU: training on CPU")
    if use_gpus:
        workers_fit = min(workers, int(available_gpus // use_gpus))
    else:
        workers_fit = min(workers, max(1, int(available_cpus)))
    per_worker = max(1.0, math.floor(available_cpus / workers_fit)) if available_cpus >= 1 else available_cpus
    if workers_fit != workers:
        notes.append(f"spec asks for {workers} worker(s); {workers_fit} fit on this machine")
    if per_worker != cpus:
        notes.append(f"each worker uses {per_worker:g} CPU (spec: {cpus:g})")
    return Placement(workers_fit, per_worker, use_gpus, "; ".join(notes) or None)
