"""The per-worker training function that Ray Train runs (TorchTrainer's train_loop_per_worker).

Why self-contained: workers are separate processes (separate pods on a cluster) and are restarted by Ray Train after
a failure, so the function loads its own data, model and tokenizer from the spec, shards the data by rank, wraps the
model in DDP (gloo on CPU, nccl on GPU, set up by Ray), and resumes from `ray.train.get_checkpoint()` when there is
one. Only rank 0 writes files (checkpoints, final artifacts); every rank calls `ray.train.report` at the same points,
because report is a barrier. Progress goes to the driver through the ProgressBoard actor, fire-and-forget.

The four stages each live in their own module: set-up (`worker`), resume (`checkpoints`), the loop (`loop`) and the
finish (`finish`: kept model, baseline, verdict, artifacts).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray.train
import torch

from finetune_trainer import checkpoints, commits
from finetune_trainer.checkpoints import Progress
from finetune_trainer.contract import TrainerPhase
from finetune_trainer.finish import finish
from finetune_trainer.loop import Checkpointer, EvalPolicy, Loop, StopPoll
from finetune_trainer.worker import (
    Inputs,
    Trainee,
    WorkerContext,
    baseline_steps,
    build_trainee,
    load_inputs,
    worker_context,
    wrap_ddp,
)

log = logging.getLogger(__name__)


def train_func(config: dict[str, Any]) -> None:
    """Entry point per worker; config is built by driver.run_training."""
    ctx = worker_context(config)
    ctx.board.push({"phase": TrainerPhase.LOADING.value}, force=True)
    with checkpoints.latest() as found:
        if found is not None and found[1] is None:
            log.warning("rank %d: run already finished at step %s; nothing to train", ctx.rank, found[0].get("step"))
            ray.train.report(found[0])
            return
        inputs = load_inputs(ctx)
        trainee = build_trainee(ctx, inputs)
        progress = Progress()
        if found is not None and found[1] is not None:
            progress = checkpoints.restore(trainee, found[1], chief=ctx.is_chief)
            log.warning("rank %d resumed from step %d", ctx.rank, progress.state.step)
            state = progress.state
            # What Ray Train gave us is its latest committed checkpoint: announce it at once.
            ctx.board.push(
                checkpoints.announcement(ctx, state.last_checkpoint_step, state.last_checkpoint_time), force=True
            )
    wrap_ddp(trainee, ctx)
    policy = EvalPolicy.of(ctx.spec)
    loop = Loop(
        ctx,
        trainee,
        progress,
        policy=policy,
        checkpointer=Checkpointer(ctx, every_steps=ctx.spec.checkpoint.every_steps),
        stop=StopPoll(config.get("board"), ctx),
    )
    announce(ctx, trainee, progress)
    loop.run()
    if loop.stopped_on_request:  # checkpointed; the driver reports Interrupted and a relaunch resumes from here
        if loop.checkpointer is not None and loop.checkpointer.commits is not None:
            loop.checkpointer.commits.drain(timeout=commits.COMMIT_WAIT_S)  # status.checkpoint shows it (bounded)
        return
    finish(ctx, inputs, loop, summary_base=summary_base(ctx, trainee, inputs))


def announce(ctx: WorkerContext, trainee: Trainee, progress: Progress) -> None:
    """Log the plan (rank 0) and tell the driver what the run will do."""
    plan, budget, state = trainee.plan, trainee.budget, progress.state
    extra_steps = baseline_steps(ctx.spec, budget=budget)
    if ctx.is_chief:
        log.warning(
            "strategy %s: %d of %d parameters trainable; %d steps (%d per epoch) on %d worker(s)",
            plan.strategy.value, plan.trainable_parameters, plan.total_parameters, budget.total_steps,
            budget.steps_per_epoch, ctx.world,
        )  # fmt: skip
    ctx.board.push(
        {
            "phase": TrainerPhase.TRAINING.value,
            "step": state.step,
            "total_steps": budget.total_steps + extra_steps,
            "epoch": state.step / budget.steps_per_epoch,
            "trainable_parameters": plan.trainable_parameters,
            "resumed_from_step": state.resumed_from_step,
            "eval_metric_name": ctx.spec.watched_metric,
            "strategy": plan.strategy.value,
            "task": ctx.spec.task.value,
            "worker_pid": os.getpid(),  # rank 0's process, for diagnostics (and the worker-kill test)
        },
        force=True,
    )


def summary_base(ctx: WorkerContext, trainee: Trainee, inputs: Inputs) -> dict[str, Any]:
    plan, budget = trainee.plan, trainee.budget
    return {
        "strategy": plan.strategy.value,
        "task": ctx.spec.task.value,
        "trainableParameters": plan.trainable_parameters,
        "totalParameters": plan.total_parameters,
        "strategyDetails": plan.details,
        "labels": inputs.label_names,
        "trainSamples": inputs.train_rows,
        "evalSamples": inputs.eval_rows,
        "workers": ctx.world,
        "torchThreads": torch.get_num_threads(),  # intra-op threads of each worker (bench/overhead.py prints it)
        "stepsPerEpoch": budget.steps_per_epoch,
        "totalSteps": budget.total_steps,
    }
