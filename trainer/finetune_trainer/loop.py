"""The training loop: optimizer steps over a trainee, evaluation, early stopping with the best model kept,
progress to the driver and checkpoints through Ray Train.

Why a class: the loop's pieces (batching with resume-skip and gradient accumulation, one optimizer step, what
happens after a step, one evaluation) share the trainee, the run state and the throughput window; methods keep
each piece on one screen. The same loop trains the job's model (with checkpoints: `Checkpointer`) and a baseline
(no checkpoints, its steps shown after the model's so the progress gauge keeps moving).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import torch
from torch import nn

from finetune_trainer import checkpoints, commits, evaluation, strategies
from finetune_trainer.checkpoints import Progress
from finetune_trainer.contract import TrainerPhase
from finetune_trainer.errors import TrainingError
from finetune_trainer.spec import FineTuneJobSpec, Strategy
from finetune_trainer.worker import Trainee, WorkerContext, torch_threads, trainable_state

log = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]
# The least time between two looks at the driver's stop request (a drain budget is tens of seconds).
STOP_POLL_S = 0.5


@dataclass(frozen=True)
class EvalPolicy:
    """When to evaluate, what to watch, and whether to stop early and keep the best evaluation's weights."""

    metric: str
    patience: int | None  # None: no early stopping (the final weights are kept)
    every_steps: int | None  # None: at the end of each epoch

    @staticmethod
    def of(spec: FineTuneJobSpec) -> EvalPolicy:
        es = spec.hyperparameters.early_stopping
        return EvalPolicy(
            metric=spec.watched_metric,
            patience=es.patience if es is not None else None,
            every_steps=spec.hyperparameters.eval_every_steps,
        )

    @property
    def keep_best(self) -> bool:
        return self.patience is not None


class Checkpointer:
    """The job's model checkpoints every N steps through `ray.train.report` (a barrier on every rank); rank 0
    announces a checkpoint to the driver once Ray Train has committed it (commits.py says why not before)."""

    def __init__(self, ctx: WorkerContext, *, every_steps: int) -> None:
        self.ctx, self.every_steps = ctx, every_steps
        chief = ctx.is_chief
        self.commits = commits.CommitWatch(fetch=committed_checkpoints, announce=self.announce) if chief else None

    def checkpoint(self, trainee: Trainee, progress: Progress, metrics: dict[str, float]) -> None:
        """Write this step's checkpoint (rank 0) and report it, with the step's evaluation if any, on every rank."""
        state = progress.state
        values = {"step": state.step, "epoch": state.step / trainee.budget.steps_per_epoch, **metrics}
        with checkpoints.written(self.ctx, trainee, progress) as ckpt:
            ray.train.report(values, checkpoint=ckpt, checkpoint_dir_name=checkpoints.checkpoint_name(state.step))
        if self.commits is not None:
            self.commits.reported(state.last_checkpoint_step, state.last_checkpoint_time)

    def announce(self, step: int, at: float) -> None:
        self.ctx.board.push(checkpoints.announcement(self.ctx, step, at), force=True)


def committed_checkpoints(wait_s: float) -> list[dict[str, Any]]:
    """The metrics of every checkpoint Ray Train's controller has committed, once it has processed the reports in
    flight (at most wait_s later)."""
    reported = ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=wait_s
    )
    return [dict(r.metrics) for r in reported]


class StopPoll:
    """Whether the driver asked for a checkpoint and a stop (SIGTERM on the head with a drain budget), as one answer
    for every rank.

    Rank 0 asks the ProgressBoard without waiting: one request in flight, looked at no more than once per
    `STOP_POLL_S` (an actor call and a `ray.wait` cost 0.4-0.6 ms, as much as a whole `head` step on a quiet
    machine: bench/stop_poll_cost.py). The ranks then agree with an all-reduce (max), so that all of them
    checkpoint at the same step (`ray.train.report` is a barrier) and leave the loop together. Called once per step
    on every rank.
    """

    def __init__(self, board: Any, ctx: WorkerContext, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.board = board if ctx.is_chief else None
        self.device, self.world = ctx.device, ctx.world
        self.pending: Any = None
        self.clock, self.next_look = clock, 0.0

    def __call__(self) -> bool:
        asked = self._ask_board()
        if self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([1 if asked else 0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            asked = bool(flag.item())
        return asked

    def _ask_board(self) -> bool:
        now = self.clock()
        if self.board is None or now < self.next_look:
            return False
        self.next_look = now + STOP_POLL_S
        try:
            if self.pending is None:
                self.pending = self.board.stop_requested.remote()
            ready, _ = ray.wait([self.pending], timeout=0)
            if not ready:
                return False
            answer, self.pending = bool(ray.get(self.pending)), None
        except Exception:  # the board is best effort: without it, training goes on (and SIGTERM still stops it)
            self.board = None
            return False
        return answer


def periodic_checkpoint(*, step: int, every_steps: int, total_steps: int, stopped_early: bool) -> bool:
    """Whether this step reports to Ray Train: only when its periodic checkpoint is due, never for an evaluation
    alone. Ray Train keeps nothing of a metrics-only report (its result is the latest checkpoint's), the
    evaluations reach the driver through the progress board, and each report waits for the controller to drain
    the worker's one-slot result queue (up to one poll, `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`): a `head` run that
    evaluates after each of hundreds of passes spent minutes there. The last step and a step that stopped early
    report nothing here: the finish reports the completion record (and checkpoints first when a baseline
    follows). Every rank computes the same answer from the same step, so all make the same report calls."""
    return step % every_steps == 0 and step < total_steps and not stopped_early


def stop_needs_checkpoint(*, saved: bool, last: bool, stopped_early: bool) -> bool | None:
    """On a stop request after a step: None = ignore it (the run ends after this step anyway), else whether a
    checkpoint must be written before leaving the loop (False when this step's periodic one was just written)."""
    if last or stopped_early:
        return None
    return not saved


class Loop:
    """Trains one trainee until its step budget is spent, early stopping ends it, or the driver asks it to stop
    (`stop`: then it checkpoints and leaves, `stopped_on_request`)."""

    def __init__(
        self,
        ctx: WorkerContext,
        trainee: Trainee,
        progress: Progress,
        *,
        policy: EvalPolicy,
        checkpointer: Checkpointer | None,
        step_offset: int = 0,
        stop: StopPoll | None = None,
    ) -> None:
        self.ctx, self.trainee, self.progress, self.policy = ctx, trainee, progress, policy
        self.checkpointer, self.step_offset, self.stop = checkpointer, step_offset, stop
        self.stopped_on_request = False
        self.window = _Window()
        self.first_step_pushed = False
        # Where the worker's time goes (bench/overhead.py prints it): optimizer steps, evaluations, reports.
        self.started, self.started_at = time.monotonic(), time.time()
        self.loop_seconds = self.train_seconds = self.eval_seconds = self.report_seconds = 0.0

    def wall_seconds(self) -> float:
        return time.monotonic() - self.started

    def timing(self) -> dict[str, float]:
        """Seconds in the loop, and within it in optimizer steps, evaluations and Ray Train reports/checkpoints
        (the rest of the loop is data loading, progress and bookkeeping); startedAt is the loop's unix start."""
        return {
            "startedAt": self.started_at,
            "loop": self.loop_seconds,
            "steps": self.train_seconds,
            "eval": self.eval_seconds,
            "report": self.report_seconds,
        }

    @property
    def state(self) -> checkpoints.RunState:
        return self.progress.state

    def run(self) -> None:
        budget = self.trainee.budget
        self.started, self.started_at = time.monotonic(), time.time()
        self.trainee.model.train()
        with torch_threads(self.trainee.threads):
            while self.state.step < budget.total_steps and not self.state.stopped_early and not self.stopped_on_request:
                epoch = self.state.step // budget.steps_per_epoch
                self.trainee.sampler.set_epoch(epoch)
                for micro in self._micro_batches(epoch):
                    self._step(micro, epoch=epoch)
                    if self._after_step():
                        break
        self.loop_seconds = self.wall_seconds()

    def _micro_batches(self, epoch: int) -> Iterator[list[Batch]]:
        """This epoch's batches grouped per optimizer step, skipping those a resumed run already did."""
        budget, loader = self.trainee.budget, self.trainee.train_loader
        skip = (self.state.step - epoch * budget.steps_per_epoch) * budget.accum
        micro: list[Batch] = []
        for index, batch in enumerate(loader):
            if index < skip:
                continue
            micro.append(batch)
            if len(micro) == budget.accum or index == len(loader) - 1:
                yield micro
                micro = []

    def _step(self, micro: list[Batch], *, epoch: int) -> None:
        trainee = self.trainee
        started = time.monotonic()
        loss = optimizer_step(trainee, micro, ctx=self.ctx, epoch=epoch)
        trainee.scheduler.step()
        self.train_seconds += time.monotonic() - started
        self.state.step += 1
        if not math.isfinite(loss):
            raise TrainingError(f"training loss became {loss} at step {self.state.step}; lower learningRate")
        self.window.add(loss, micro)
        if not self.first_step_pushed and self.checkpointer is not None:
            self.first_step_pushed = True
            self.ctx.board.push({"first_step_time": time.time()}, force=True)

    def _after_step(self) -> bool:
        """Progress, evaluation, report/checkpoint; True when this epoch's pass should end."""
        state, budget = self.state, self.trainee.budget
        last = state.step >= budget.total_steps
        self._push_progress(force=last)
        at_epoch_end = state.step % budget.steps_per_epoch == 0
        every = self.policy.every_steps
        due_eval = state.step % every == 0 if every is not None else at_epoch_end
        metrics = self.evaluate() if due_eval else {}
        saved = self.checkpointer is not None and periodic_checkpoint(
            step=state.step, every_steps=self.checkpointer.every_steps, total_steps=budget.total_steps,
            stopped_early=state.stopped_early,
        )  # fmt: skip
        if saved:
            self._checkpoint(metrics)
        if self.stop is not None and self.checkpointer is not None and self.stop():
            self._stop_on_request(saved=saved, last=last)
        return last or state.stopped_early or at_epoch_end or self.stopped_on_request

    def _checkpoint(self, metrics: dict[str, float]) -> None:
        assert self.checkpointer is not None
        started = time.monotonic()
        self.checkpointer.checkpoint(self.trainee, self.progress, metrics)
        self.report_seconds += time.monotonic() - started

    def _stop_on_request(self, *, saved: bool, last: bool) -> None:
        """The driver asked to stop (SIGTERM on the head): checkpoint this step unless just done, then leave."""
        needed = stop_needs_checkpoint(saved=saved, last=last, stopped_early=self.state.stopped_early)
        if needed is None:
            return
        if needed:
            self._checkpoint({})
        self.stopped_on_request = True
        if self.ctx.is_chief:
            log.warning("stopping at step %d on request (SIGTERM on the head): checkpoint written", self.state.step)

    def _push_progress(self, *, force: bool) -> None:
        elapsed = self.window.elapsed()
        if not self.ctx.is_chief or not (force or elapsed >= 1.0):
            return
        state, world, budget = self.state, self.ctx.world, self.trainee.budget
        loss, samples, tokens = self.window.take()
        state.history.append({"step": state.step, "epoch": state.step / budget.steps_per_epoch, "loss": loss})
        self.ctx.board.push(
            {
                "step": self.step_offset + state.step,
                "epoch": state.step / budget.steps_per_epoch,
                "loss": loss,
                "samples_per_second": samples * world / max(elapsed, 1e-9),
                "tokens_per_second": tokens * world / max(elapsed, 1e-9),
            },
            force=True,
        )

    def evaluate(self) -> dict[str, float]:
        """Evaluate now, record it, and update the best model and the early-stopping count."""
        state, ctx, trainee = self.state, self.ctx, self.trainee
        main = self.checkpointer is not None
        ctx.board.push({"phase": TrainerPhase.EVALUATING.value}, force=True)
        started = time.monotonic()
        metrics = evaluation.evaluate(
            trainee.model, trainee.eval_loader, task=ctx.spec.task, num_labels=trainee.num_labels,
            device=ctx.device, dtype=ctx.dtype,
        )  # fmt: skip
        self.eval_seconds += time.monotonic() - started
        state.history.append({"step": state.step, "epoch": state.step / trainee.budget.steps_per_epoch, **metrics})
        state.last_eval_step = state.step
        ctx.board.push({"phase": TrainerPhase.TRAINING.value, **({"eval": metrics} if main else {})}, force=True)
        if ctx.is_chief:
            log.warning(
                "%s step %d: %s", trainee.name, state.step, " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            )
        self._track(metrics)
        return metrics

    def _track(self, metrics: dict[str, float]) -> None:
        state, policy = self.state, self.policy
        value = metrics[policy.metric]
        if evaluation.better(value, state.best, metric=policy.metric):
            state.best, state.best_step, state.best_metrics, state.bad_evals = value, state.step, dict(metrics), 0
            if policy.keep_best and self.ctx.is_chief:
                self.progress.best_weights = trainable_state(self.trainee.model)
        else:
            state.bad_evals += 1
        state.stopped_early = policy.patience is not None and state.bad_evals >= policy.patience


class _Window:
    """Loss, samples and tokens since the last progress push."""

    def __init__(self) -> None:
        self.loss, self.steps, self.samples, self.tokens, self.start = 0.0, 0, 0, 0, time.monotonic()

    def add(self, loss: float, micro: list[Batch]) -> None:
        self.loss += loss
        self.steps += 1
        self.samples += sum(int(b["labels"].shape[0]) for b in micro)
        self.tokens += sum(int(b["attention_mask"].sum()) for b in micro if "attention_mask" in b)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def take(self) -> tuple[float, int, int]:
        """Mean loss, samples and tokens of the window; starts a new one."""
        out = (self.loss / max(self.steps, 1), self.samples, self.tokens)
        self.loss, self.steps, self.samples, self.tokens, self.start = 0.0, 0, 0, 0, time.monotonic()
        return out


def optimizer_step(trainee: Trainee, micro: list[Batch], *, ctx: WorkerContext, epoch: int) -> float:
    """Forward/backward over the micro-batches (DDP syncs on the last one), then one optimizer step."""
    model, optimizer, scaler = trainee.model, trainee.optimizer, trainee.scaler
    total = 0.0
    for i, cpu_batch in enumerate(micro):
        last = i == len(micro) - 1
        no_sync = model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and not last else None
        with no_sync or contextlib.nullcontext():
            batch = {k: v.to(ctx.device) for k, v in cpu_batch.items()}
            with evaluation.autocast(ctx.device, ctx.dtype):
                loss = model(**batch).loss / len(micro)
            (scaler.scale(loss) if scaler else loss).backward()
        total += float(loss.detach())
    if trainee.plan.strategy is Strategy.GRADUAL:
        strategies.drop_frozen_grads(optimizer, plan=trainee.plan, owners=trainee.owners, epoch=epoch)
    if scaler:
        scaler.unscale_(optimizer)
    params: list[Any] = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total
