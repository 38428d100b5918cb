"""The per-worker training function that Ray Train runs (TorchTrainer's train_loop_per_worker).

Why self-contained: workers are separate processes (separate pods on a cluster) and are restarted by Ray Train after
a failure, so the function loads its own data, model and tokenizer from the spec, shards the data by rank, wraps the
model in DDP (gloo on CPU, nccl on GPU, set up by Ray), and resumes from `ray.train.get_checkpoint()` when there is
one. Only rank 0 writes files (checkpoints, final artifacts); every rank calls `ray.train.report` at the same points,
because report is a barrier. Progress goes to the driver through the ProgressBoard actor, fire-and-forget.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from finetune_trainer import artifacts, data, sources, storage, strategies
from finetune_trainer.contract import (
    ADAPTER_DIR,
    CURVES_FILE,
    METRICS_FILE,
    MODEL_DIR,
    REPORT_FILE,
    TrainerPhase,
)
from finetune_trainer.errors import InvalidSpecError, ModelNotFoundError, TrainingError
from finetune_trainer.spec import FineTuneJobSpec, Precision, Strategy, Task, parse_spec

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"
META_FILE = "meta.json"
PUSH_INTERVAL_S = 1.0


@dataclass
class RunState:
    """Everything that must survive a restart besides model and optimizer tensors."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    resumed_from_step: int = 0
    last_checkpoint_step: int = 0
    last_checkpoint_time: float = 0.0


class _Encoded(torch.utils.data.Dataset[dict[str, list[int]]]):
    def __init__(self, features: list[dict[str, list[int]]]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


def encode(tokenizer: Any, examples: data.Examples, *, task: Task, max_length: int) -> list[dict[str, list[int]]]:
    """Tokenise without padding (padding happens per batch)."""
    enc = tokenizer(examples.texts, examples.pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    features = []
    for i in range(len(examples)):
        item = {k: list(enc[k][i]) for k in keys}
        if task is Task.SEQUENCE_CLASSIFICATION:
            assert examples.labels is not None
            item["labels"] = [examples.labels[i]]
        else:
            item["labels"] = list(enc["input_ids"][i])
        features.append(item)
    return features


def make_collate(pad_id: int) -> Any:
    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(b["input_ids"]) for b in batch)
        out: dict[str, torch.Tensor] = {}
        for key in batch[0]:
            if key == "labels" and len(batch[0]["labels"]) == 1 and len(batch[0]["input_ids"]) != 1:
                out[key] = torch.tensor([b["labels"][0] for b in batch])
                continue
            fill = {"input_ids": pad_id, "labels": -100}.get(key, 0)
            out[key] = torch.tensor([b[key] + [fill] * (longest - len(b[key])) for b in batch])
        return out

    return collate


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. auto = bf16 on a GPU that supports it, else fp32."""
    if precision is Precision.FP32:
        return None
    if precision is Precision.AUTO:
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if precision is Precision.FP16 and device.type != "cuda":
        raise InvalidSpecError("spec.hyperparameters.precision: fp16 needs a GPU (use auto, fp32 or bf16)")
    return torch.bfloat16 if precision is Precision.BF16 else torch.float16


def load_model(spec: FineTuneJobSpec, *, model_dir: Path, label_names: list[str]) -> tuple[nn.Module, Any]:
    """Tokenizer and model for the task; errors loading them are ModelNotFound naming the URI."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise ModelNotFoundError(f"tokenizer of {spec.model.uri} cannot be loaded: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    try:
        if spec.task is Task.SEQUENCE_CLASSIFICATION:
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir,
                num_labels=len(label_names),
                id2label=dict(enumerate(label_names)),
                label2id={name: i for i, name in enumerate(label_names)},
                pad_token_id=tokenizer.pad_token_id,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise ModelNotFoundError(f"model {spec.model.uri} cannot be loaded for {spec.task.value}: {e}") from e
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return [float(v) for v in tensor.tolist()]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader[Any],
    *,
    task: Task,
    num_labels: int,
    device: torch.device,
    autocast: torch.dtype | None,
) -> dict[str, float]:
    """Metrics over the whole validation set (each rank evaluates its shard; sums are all-reduced)."""
    model.eval()
    loss_sum, count, tokens = 0.0, 0.0, 0.0
    confusion = torch.zeros(max(num_labels, 1), max(num_labels, 1), dtype=torch.float64)
    for cpu_batch in loader:
        batch = {k: v.to(device) for k, v in cpu_batch.items()}
        with _autocast(device, autocast):
            out = model(**batch)
        if task is Task.SEQUENCE_CLASSIFICATION:
            n = batch["labels"].shape[0]
            loss_sum += float(out.loss) * n
            count += n
            preds = out.logits.float().argmax(-1).cpu()
            for t, p in zip(batch["labels"].cpu().tolist(), preds.tolist(), strict=True):
                confusion[t, p] += 1
        else:
            n_tok = float((batch["labels"][:, 1:] != -100).sum())
            loss_sum += float(out.loss) * n_tok
            tokens += n_tok
    model.train()
    if task is Task.SEQUENCE_CLASSIFICATION:
        flat = _all_reduce([loss_sum, count, *confusion.flatten().tolist()], device)
        loss_sum, count = flat[0], flat[1]
        confusion = torch.tensor(flat[2:], dtype=torch.float64).view_as(confusion)
        correct = float(confusion.diag().sum())
        tp = confusion.diag()
        precision = tp / confusion.sum(0).clamp(min=1)
        recall = tp / confusion.sum(1).clamp(min=1)
        f1 = (2 * precision * recall / (precision + recall).clamp(min=1e-12)).mean()
        return {
            "eval_loss": loss_sum / max(count, 1),
            "eval_accuracy": correct / max(count, 1),
            "eval_f1": float(f1),
        }
    loss_sum, tokens = _all_reduce([loss_sum, tokens], device)
    loss = loss_sum / max(tokens, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # Frozen parameters are reloaded from the pretrained source, so a checkpoint holds only what trains.
    return {n: p.detach().cpu() for n, p in _unwrap(model).named_parameters() if p.requires_grad}


class _Board:
    """Rank 0's handle on the driver's ProgressBoard (no-op on other ranks or without a board)."""

    def __init__(self, handle: Any, *, enabled: bool) -> None:
        self.handle = handle if enabled else None
        self.last = 0.0

    def push(self, values: dict[str, Any], *, force: bool = False) -> None:
        if self.handle is None:
            return
        now = time.monotonic()
        if force or now - self.last >= PUSH_INTERVAL_S:
            self.last = now
            with contextlib.suppress(Exception):  # progress must never break training
                self.handle.update.remote(values)


def train_func(config: dict[str, Any]) -> None:
    """Entry point per worker; config is built by driver.train_loop_config."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = parse_spec(config["spec"])
    hp = spec.hyperparameters
    base_dir = Path(config["base_dir"]) if config.get("base_dir") else None
    board = _Board(config.get("board"), enabled=rank == 0)
    board.push({"phase": TrainerPhase.LOADING.value}, force=True)

    random.seed(hp.seed)
    np.random.seed(hp.seed)
    torch.manual_seed(hp.seed)
    threads = int(config.get("threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    autocast = resolve_precision(hp.precision, device)

    prepared = data.prepare(spec, base_dir=base_dir)
    label_names = prepared.label_names
    model_dir = sources.resolve_model(spec.model, storage_spec=spec.storage, base_dir=base_dir)
    model, tokenizer = load_model(spec, model_dir=model_dir, label_names=label_names)

    train_feats = encode(tokenizer, prepared.train, task=spec.task, max_length=hp.max_seq_length)
    eval_feats = encode(tokenizer, prepared.validation, task=spec.task, max_length=hp.max_seq_length)
    collate = make_collate(int(tokenizer.pad_token_id))
    sampler: DistributedSampler[Any] = DistributedSampler(
        _Encoded(train_feats), num_replicas=world, rank=rank, shuffle=True, seed=hp.seed
    )
    train_loader = DataLoader(_Encoded(train_feats), batch_size=hp.batch_size, sampler=sampler, collate_fn=collate)
    eval_loader = DataLoader(
        _Encoded(eval_feats[rank::world]), batch_size=hp.batch_size * 2, shuffle=False, collate_fn=collate
    )

    accum = hp.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(len(train_loader) / accum))
    total_steps = hp.epochs * steps_per_epoch
    if hp.max_steps is not None:
        total_steps = min(total_steps, hp.max_steps)
    epochs_needed = math.ceil(total_steps / steps_per_epoch)

    model, plan = strategies.apply_strategy(model, method=spec.method, task=spec.task, epochs=epochs_needed)
    model.to(device)
    groups, owners = strategies.optimizer_groups(
        model, plan=plan, learning_rate=hp.learning_rate, weight_decay=hp.weight_decay
    )
    optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        strategies.lr_lambdas(
            plan=plan,
            owners=owners,
            total_steps=total_steps,
            warmup_steps=int(hp.warmup_ratio * total_steps),
            steps_per_epoch=steps_per_epoch,
        ),
    )
    state = RunState()
    checkpoint = ray.train.get_checkpoint()
    saved: dict[str, Any] | None = None
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            meta = json.loads((Path(ckpt_dir) / META_FILE).read_text())
            if meta.get("done"):
                log.warning("rank %d: run already finished at step %s; nothing to train", rank, meta.get("step"))
                ray.train.report(meta)
                return
            saved = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=False)
    if saved is not None:
        missing = _unwrap(model).load_state_dict(saved["model"], strict=False)
        if missing.unexpected_keys:
            raise TrainingError(f"checkpoint does not match the model: unexpected {missing.unexpected_keys[:5]}")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = RunState(**saved["run"])
        state.resumed_from_step = state.step
        torch.set_rng_state(saved["rng"])
        log.warning("rank %d resumed from step %d", rank, state.step)

    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler("cuda") if autocast is torch.float16 else None
    num_labels = len(label_names)
    eval_metric = (
        hp.early_stopping.metric
        if hp.early_stopping
        else ("eval_accuracy" if spec.task is Task.SEQUENCE_CLASSIFICATION else "eval_loss")
    )
    summary_base = {
        "strategy": plan.strategy.value,
        "task": spec.task.value,
        "trainableParameters": plan.trainable_parameters,
        "totalParameters": plan.total_parameters,
        "strategyDetails": plan.details,
        "labels": label_names,
        "trainSamples": len(prepared.train),
        "evalSamples": len(prepared.validation),
        "workers": world,
        "stepsPerEpoch": steps_per_epoch,
        "totalSteps": total_steps,
    }
    if rank == 0:
        log.warning(
            "strategy %s: %d of %d parameters trainable; %d steps (%d per epoch) on %d worker(s)",
            plan.strategy.value,
            plan.trainable_parameters,
            plan.total_parameters,
            total_steps,
            steps_per_epoch,
            world,
        )
    board.push(
        {
            "phase": TrainerPhase.TRAINING.value,
            "step": state.step,
            "total_steps": total_steps,
            "epoch": state.step / steps_per_epoch,
            "trainable_parameters": plan.trainable_parameters,
            "resumed_from_step": state.resumed_from_step,
            "eval_metric_name": eval_metric,
            "strategy": plan.strategy.value,
            "task": spec.task.value,
            "worker_pid": os.getpid(),  # rank 0's process, for diagnostics (and the worker-kill test)
        },
        force=True,
    )

    def report(extra: dict[str, Any], *, save: bool) -> None:
        metrics = {"step": state.step, "epoch": state.step / steps_per_epoch, **extra}
        if not save:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="ftckpt-") as tmp:
            ckpt = None
            if rank == 0:
                state.last_checkpoint_step, state.last_checkpoint_time = state.step, time.time()
                torch.save(
                    {
                        "model": _trainable_state(model),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "run": state.__dict__,
                        "rng": torch.get_rng_state(),
                    },
                    Path(tmp) / STATE_FILE,
                )
                (Path(tmp) / META_FILE).write_text(json.dumps({"step": state.step, "totalSteps": total_steps}))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_step_{state.step:08d}")
        board.push(
            {"last_checkpoint_step": state.last_checkpoint_step, "last_checkpoint_time": state.last_checkpoint_time},
            force=True,
        )

    def run_eval() -> dict[str, float]:
        board.push({"phase": TrainerPhase.EVALUATING.value}, force=True)
        metrics = evaluate(model, eval_loader, task=spec.task, num_labels=num_labels, device=device, autocast=autocast)
        state.history.append({"step": state.step, "epoch": state.step / steps_per_epoch, **metrics})
        board.push({"phase": TrainerPhase.TRAINING.value, "eval": metrics}, force=True)
        if rank == 0:
            log.warning("step %d: %s", state.step, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if hp.early_stopping is not None:
            value = metrics.get(hp.early_stopping.metric)
            if value is None:
                raise InvalidSpecError(
                    f"spec.hyperparameters.earlyStopping.metric: {hp.early_stopping.metric} is not computed for "
                    f"{spec.task.value}; available: {', '.join(metrics)}"
                )
            better = state.best is None or (value < state.best if hp.early_stopping.minimize else value > state.best)
            state.best, state.bad_evals = (value, 0) if better else (state.best, state.bad_evals + 1)
            state.stopped_early = state.bad_evals >= hp.early_stopping.patience
        return metrics

    model.train()
    started = time.monotonic()
    window_loss, window_n, window_samples, window_tokens, window_start = 0.0, 0, 0, 0, time.monotonic()
    last_eval_step = -1
    while state.step < total_steps and not state.stopped_early:
        epoch = state.step // steps_per_epoch
        sampler.set_epoch(epoch)
        skip = (state.step - epoch * steps_per_epoch) * accum  # micro-batches already done in this epoch
        micro: list[dict[str, torch.Tensor]] = []
        for index, batch in enumerate(train_loader):
            if index < skip:
                continue
            micro.append(batch)
            if len(micro) < accum and index < len(train_loader) - 1:
                continue
            loss_value = _optimizer_step(
                model,
                micro,
                optimizer=optimizer,
                device=device,
                autocast=autocast,
                scaler=scaler,
                plan=plan,
                owners=owners,
                epoch=epoch,
            )
            scheduler.step()
            state.step += 1
            window_samples += sum(int(b["input_ids"].shape[0]) for b in micro)
            window_tokens += sum(int(b["attention_mask"].sum()) if "attention_mask" in b else 0 for b in micro)
            micro = []
            if not math.isfinite(loss_value):
                raise TrainingError(f"training loss became {loss_value} at step {state.step}; lower learningRate")
            window_loss += loss_value
            window_n += 1
            elapsed = time.monotonic() - window_start
            if rank == 0 and (elapsed >= PUSH_INTERVAL_S or state.step == total_steps):
                loss = window_loss / max(window_n, 1)
                state.history.append({"step": state.step, "epoch": state.step / steps_per_epoch, "loss": loss})
                board.push(
                    {
                        "step": state.step,
                        "epoch": state.step / steps_per_epoch,
                        "loss": loss,
                        "samples_per_second": window_samples * world / max(elapsed, 1e-9),
                        "tokens_per_second": window_tokens * world / max(elapsed, 1e-9),
                    },
                    force=True,
                )
                window_loss, window_n, window_samples, window_tokens, window_start = 0.0, 0, 0, 0, time.monotonic()
            at_epoch_end = state.step % steps_per_epoch == 0
            due_eval = (hp.eval_every_steps is not None and state.step % hp.eval_every_steps == 0) or (
                hp.eval_every_steps is None and at_epoch_end
            )
            metrics: dict[str, float] = {}
            if due_eval:
                metrics = run_eval()
                last_eval_step = state.step
            due_ckpt = state.step % spec.checkpoint.every_steps == 0 and state.step < total_steps
            if due_ckpt or metrics:
                report(metrics, save=due_ckpt and not state.stopped_early)
            if state.step >= total_steps or state.stopped_early or at_epoch_end:
                break

    if last_eval_step != state.step:
        final = run_eval()
    else:
        final = {k: v for k, v in state.history[-1].items() if k.startswith("eval_")}
    board.push({"phase": TrainerPhase.SAVING.value}, force=True)
    summary = {
        **summary_base,
        "steps": state.step,
        "epochs": state.step / steps_per_epoch,
        "resumedFromStep": state.resumed_from_step,
        "stoppedEarly": state.stopped_early,
        "wallSeconds": time.monotonic() - started,
        "final": final,
        "evalMetric": eval_metric,
    }
    files: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ftdone-") as tmp:
        done_ckpt = None
        if rank == 0:
            files = save_artifacts(
                _unwrap(model),
                tokenizer,
                spec=spec,
                summary=summary,
                history=state.history,
                output_uri=config["output_uri"],
                name=config["run_name"],
                base_dir=base_dir,
            )
            # The completion record is itself a (tiny) checkpoint: Ray Train V2 returns the metrics of the latest
            # checkpoint, and a relaunch after this point finds it and only has to write the manifest.
            done = {"step": state.step, "done": True, "final": final, "summary": summary, "files": files}
            (Path(tmp) / META_FILE).write_text(json.dumps(done))
            done_ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(
            {"step": state.step, "done": True, "final": final, "summary": summary, "files": files},
            checkpoint=done_ckpt,
            checkpoint_dir_name=f"checkpoint_step_{state.step:08d}_done",
        )


def _optimizer_step(
    model: nn.Module,
    micro: list[dict[str, torch.Tensor]],
    *,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    autocast: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
    plan: strategies.StrategyPlan,
    owners: list[int],
    epoch: int,
) -> float:
    """Forward/backward over the micro-batches (DDP syncs on the last one), then one optimizer step."""
    total = 0.0
    for i, cpu_batch in enumerate(micro):
        sync = i == len(micro) - 1
        no_sync = model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and not sync else None
        with no_sync or contextlib.nullcontext():
            batch = {k: v.to(device) for k, v in cpu_batch.items()}
            with _autocast(device, autocast):
                loss = model(**batch).loss / len(micro)
            (scaler.scale(loss) if scaler else loss).backward()
        total += float(loss.detach())
    if plan.strategy is Strategy.GRADUAL:
        strategies.drop_frozen_grads(optimizer, plan=plan, owners=owners, epoch=epoch)
    if scaler:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"] if p.grad is not None], 1.0)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def save_artifacts(
    model: nn.Module,
    tokenizer: Any,
    *,
    spec: FineTuneJobSpec,
    summary: dict[str, Any],
    history: list[dict[str, Any]],
    output_uri: str,
    name: str,
    base_dir: Path | None,
) -> list[dict[str, Any]]:
    """Rank 0: write model/adapter/metrics/card/curves locally, hash them, upload them; returns the inventory."""
    output = storage.resolve(output_uri, storage=spec.storage, base_dir=base_dir)
    with tempfile.TemporaryDirectory(prefix="ftart-") as tmp:
        out = Path(tmp)
        hf_model: Any = model.cpu()  # a transformers PreTrainedModel or a peft PeftModel
        is_lora = spec.method.strategy is Strategy.LORA
        if is_lora:
            hf_model.save_pretrained(out / ADAPTER_DIR)
            tokenizer.save_pretrained(out / ADAPTER_DIR)
            if spec.method.lora_spec.merge:
                merged = hf_model.merge_and_unload()
                merged.save_pretrained(out / MODEL_DIR, safe_serialization=True)
                tokenizer.save_pretrained(out / MODEL_DIR)
        else:
            hf_model.save_pretrained(out / MODEL_DIR, safe_serialization=True)
            tokenizer.save_pretrained(out / MODEL_DIR)
        summary = {**summary, "adapter": is_lora, "merged": is_lora and spec.method.lora_spec.merge}
        (out / METRICS_FILE).write_text(json.dumps({**summary, "history": history}, indent=2))
        artifacts.plot_curves(history, out / CURVES_FILE, metric=str(summary["evalMetric"]))
        (out / REPORT_FILE).write_text(artifacts.model_card(name=name, spec=spec.wire(), summary=summary))
        files = artifacts.file_entries(out)
        storage.upload_dir(out, output)
    return files


def iter_batches(loader: DataLoader[Any]) -> Iterator[dict[str, torch.Tensor]]:
    """All batches of a loader (helper for benchmarks that reuse the same data pipeline)."""
    yield from loader
