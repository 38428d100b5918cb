"""Checkpoint contents and resume: what a run must carry across a restart besides Ray Train's bookkeeping.

Why apart: the loop decides *when* to checkpoint; this module decides *what* goes in (trainable parameters only,
optimizer, schedule, run state with history and early-stopping state, the best weights seen so far when they are
not the current ones, RNG) and how a restarted worker puts it back. Rank 0 writes; every rank reads.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch

from finetune_trainer.contract import CHECKPOINTS_DIR
from finetune_trainer.errors import TrainingError
from finetune_trainer.worker import Trainee, WorkerContext, trainable_state, unwrap

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"
META_FILE = "meta.json"


@dataclass
class RunState:
    """Everything that must survive a restart besides model and optimizer tensors (plain values only)."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None  # best value of the watched metric so far
    best_step: int | None = None
    best_metrics: dict[str, float] | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    resumed_from_step: int = 0
    last_checkpoint_step: int = 0
    last_checkpoint_time: float = 0.0
    last_eval_step: int = -1
    baseline: dict[str, Any] | None = None  # the baseline's result once it has run


@dataclass
class Progress:
    """A run's state plus the best weights (rank 0 only; None while the current weights are the best)."""

    state: RunState = field(default_factory=RunState)
    best_weights: dict[str, torch.Tensor] | None = None


def checkpoint_name(step: int) -> str:
    return f"checkpoint_step_{step:08d}"


def checkpoint_uri(ctx: WorkerContext, step: int) -> str:
    """Where Ray Train stores this step's checkpoint: <output>/checkpoints/<run name>/checkpoint_step_N."""
    return f"{ctx.output_uri.rstrip('/')}/{CHECKPOINTS_DIR}/{ctx.run_name}/{checkpoint_name(step)}"


def announcement(ctx: WorkerContext, step: int, at: float) -> dict[str, Any]:
    """What the driver's board gets for the latest committed checkpoint (the status's `checkpoint`)."""
    return {"last_checkpoint_step": step, "last_checkpoint_time": at, "checkpoint_uri": checkpoint_uri(ctx, step)}


@contextmanager
def written(ctx: WorkerContext, trainee: Trainee, progress: Progress) -> Iterator[ray.train.Checkpoint | None]:
    """A checkpoint directory with this step's state (rank 0), or None on the other ranks."""
    with tempfile.TemporaryDirectory(prefix="ftckpt-") as tmp:
        if not ctx.is_chief:
            yield None
            return
        state = progress.state
        state.last_checkpoint_step, state.last_checkpoint_time = state.step, time.time()
        payload = {
            "model": trainable_state(trainee.model),
            "best_model": progress.best_weights,
            "optimizer": trainee.optimizer.state_dict(),
            "scheduler": trainee.scheduler.state_dict(),
            "run": dict(state.__dict__),
            "rng": torch.get_rng_state(),
        }
        torch.save(payload, Path(tmp) / STATE_FILE)
        meta = {"step": state.step, "totalSteps": trainee.budget.total_steps}
        (Path(tmp) / META_FILE).write_text(json.dumps(meta))
        yield ray.train.Checkpoint.from_directory(tmp)


@contextmanager
def latest() -> Iterator[tuple[dict[str, Any], Path | None] | None]:
    """Ray Train's latest checkpoint of this run as (meta, state file), the state file None when the checkpoint
    marks a finished run; None when starting fresh. Valid inside the with block only."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as ckpt_dir:
        meta: dict[str, Any] = json.loads((Path(ckpt_dir) / META_FILE).read_text())
        yield meta, None if meta.get("done") else Path(ckpt_dir) / STATE_FILE


def restore(trainee: Trainee, state_file: Path, *, chief: bool) -> Progress:
    """Put a checkpoint's weights, optimizer, schedule, run state and RNG back into a freshly built trainee."""
    saved = torch.load(state_file, map_location="cpu", weights_only=False)
    missing = unwrap(trainee.model).load_state_dict(saved["model"], strict=False)
    if missing.unexpected_keys:
        raise TrainingError(f"checkpoint does not match the model: unexpected {missing.unexpected_keys[:5]}")
    trainee.optimizer.load_state_dict(saved["optimizer"])
    trainee.scheduler.load_state_dict(saved["scheduler"])
    state = RunState(**saved["run"])
    state.resumed_from_step = state.step
    torch.set_rng_state(saved["rng"])
    return Progress(state=state, best_weights=saved.get("best_model") if chief else None)
