"""Worker set-up: what one Ray Train worker needs before its first step, built from the spec alone.

Why a module: `train_func` must be self-contained (workers are other processes, other pods, restarted by Ray
Train), so each worker reads the data, resolves and loads the model, tokenises, applies the strategy and builds its
optimizer itself. A `Trainee` is one trainable thing with its data and optimizer: the job's model, or a baseline
(the same architecture from random weights, or a linear probe of the frozen body). The loop trains any of them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from finetune_trainer import data, features, sources, strategies
from finetune_trainer.errors import InvalidSpecError, ModelNotFoundError
from finetune_trainer.progress import Board
from finetune_trainer.spec import (
    Baseline,
    FineTuneJobSpec,
    HyperparametersSpec,
    Pooling,
    Precision,
    Strategy,
    Task,
    parse_spec,
)

log = logging.getLogger(__name__)
# A new linear head over frozen features learns at the usual rate for a freshly initialised head, whatever rate
# the spec sets for its own strategy (the probe baseline; strategy head itself uses the spec's rate).
PROBE_LEARNING_RATE = 1e-3
# A linear head over cached features trains for at least this many optimizer steps unless method.headEpochs says
# otherwise: bench/head_probe.py measured 96 steps (3 epochs of 1,000 SST-2 rows) at 0.72-0.75 dev accuracy and
# 1,024 steps at 0.76-0.77, the level of L-BFGS logistic regression run to convergence on the same features.
HEAD_MIN_STEPS = 1000
# The head's steps are a (batch x hidden) by (hidden x labels) product: too small to split over threads, and on a
# busy machine OpenMP's waiting threads dominate (bench/head_probe.py's recipe, 320 steps at load 6 on 2 cores:
# 13-15 s on 2 threads, 0.35-0.45 s on 1). The body's encoding pass keeps the worker's threads.
HEAD_THREADS = 1
FUSED_ADAMW_DEVICES = frozenset({"cpu", "cuda"})


@dataclass(frozen=True)
class WorkerContext:
    """Who this worker is and where the run writes; the same for every trainee of the run."""

    spec: FineTuneJobSpec
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None = fp32
    base_dir: Path | None
    output_uri: str
    run_name: str
    board: Board

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


def worker_context(config: dict[str, Any]) -> WorkerContext:
    """Parse the driver's config, seed every RNG, set the thread count and pick the device."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = parse_spec(config["spec"])
    seed_everything(spec.hyperparameters.seed)
    threads = int(config.get("threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    return WorkerContext(
        spec=spec,
        rank=rank,
        world=world,
        device=device,
        dtype=resolve_precision(spec.hyperparameters.precision, device),
        base_dir=Path(config["base_dir"]) if config.get("base_dir") else None,
        output_uri=str(config["output_uri"]),
        run_name=str(config["run_name"]),
        board=Board(config.get("board"), enabled=rank == 0),
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. auto = bf16 on a GPU that supports it, else fp32."""
    if precision is Precision.FP32:
        return None
    if precision is Precision.AUTO:
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if precision is Precision.FP16 and device.type != "cuda":
        raise InvalidSpecError("spec.hyperparameters.precision: fp16 needs a GPU (use auto, fp32 or bf16)")
    return torch.bfloat16 if precision is Precision.BF16 else torch.float16


@dataclass(frozen=True)
class Inputs:
    """The run's data, tokenised once and shared by the job's model and its baseline."""

    model_dir: Path
    tokenizer: Any
    label_names: list[str]
    train: list[dict[str, list[int]]]
    validation: list[dict[str, list[int]]]
    collate: features.Collate
    train_rows: int
    eval_rows: int


def load_inputs(ctx: WorkerContext) -> Inputs:
    spec = ctx.spec
    prepared = data.prepare(spec, base_dir=ctx.base_dir)
    model_dir = sources.resolve_model(spec.model, storage_spec=spec.storage, base_dir=ctx.base_dir)
    tokenizer = load_tokenizer(spec, model_dir=model_dir)
    hp = spec.hyperparameters
    return Inputs(
        model_dir=model_dir,
        tokenizer=tokenizer,
        label_names=prepared.label_names,
        train=features.encode(tokenizer, prepared.train, task=spec.task, max_length=hp.max_seq_length),
        validation=features.encode(tokenizer, prepared.validation, task=spec.task, max_length=hp.max_seq_length),
        collate=features.make_collate(int(tokenizer.pad_token_id), task=spec.task),
        train_rows=len(prepared.train),
        eval_rows=len(prepared.validation),
    )


def load_tokenizer(spec: FineTuneJobSpec, *, model_dir: Path) -> Any:
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise ModelNotFoundError(f"tokenizer of {spec.model.uri} cannot be loaded: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(spec: FineTuneJobSpec, inputs: Inputs, *, scratch: bool = False, body_only: bool = False) -> nn.Module:
    """The pretrained model for the task (or its body, or the same architecture with random weights)."""
    labels = inputs.label_names
    extra: dict[str, Any] = {}
    if spec.task is Task.SEQUENCE_CLASSIFICATION:
        extra = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }
    auto: Any = AutoModel if body_only else _auto_class(spec.task)
    try:
        if scratch:
            config = AutoConfig.from_pretrained(inputs.model_dir, **extra)
            model = auto.from_config(config)
        else:
            model = auto.from_pretrained(inputs.model_dir, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise ModelNotFoundError(f"model {spec.model.uri} cannot be loaded for {spec.task.value}: {e}") from e
    model.config.pad_token_id = inputs.tokenizer.pad_token_id
    return model  # type: ignore[no-any-return]


def _auto_class(task: Task) -> Any:
    return AutoModelForSequenceClassification if task is Task.SEQUENCE_CLASSIFICATION else AutoModelForCausalLM


@dataclass(frozen=True)
class Budget:
    """How many optimizer steps a trainee takes: the same for the job's model and its baseline."""

    accum: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int  # epochs the run touches

    @staticmethod
    def of(*, batches_per_epoch: int, hp: HyperparametersSpec, epochs: int | None = None) -> Budget:
        """epochs: passes over the training data, hyperparameters.epochs unless given (a head on cached features)."""
        accum = hp.gradient_accumulation_steps
        per_epoch = max(1, math.ceil(batches_per_epoch / accum))
        passes = hp.epochs if epochs is None else epochs
        total = passes * per_epoch if hp.max_steps is None else min(passes * per_epoch, hp.max_steps)
        return Budget(accum, batches_per_epoch, per_epoch, total, math.ceil(total / per_epoch))


def head_epochs(spec: FineTuneJobSpec, *, steps_per_epoch: int) -> int:
    """Passes of a linear head over the cached features: method.headEpochs, else hyperparameters.epochs raised
    until the head gets HEAD_MIN_STEPS optimizer steps (the body's single encoding pass does not depend on it)."""
    if spec.method.head_epochs is not None:
        return spec.method.head_epochs
    return max(spec.hyperparameters.epochs, math.ceil(HEAD_MIN_STEPS / max(1, steps_per_epoch)))


def baseline_steps(spec: FineTuneJobSpec, *, budget: Budget) -> int:
    """Optimizer steps of the spec's baseline: the job's budget (scratch), a head's on cached features (probe)."""
    if spec.evaluation.baseline is Baseline.NONE:
        return 0
    if spec.evaluation.baseline is Baseline.PROBE:
        return feature_budget(spec, batches_per_epoch=budget.batches_per_epoch).total_steps
    return budget.total_steps


def feature_budget(spec: FineTuneJobSpec, *, batches_per_epoch: int) -> Budget:
    """The step budget of a head on cached features (strategy head, the probe baseline)."""
    hp = spec.hyperparameters
    per_epoch = Budget.of(batches_per_epoch=batches_per_epoch, hp=hp).steps_per_epoch
    return Budget.of(batches_per_epoch=batches_per_epoch, hp=hp, epochs=head_epochs(spec, steps_per_epoch=per_epoch))


@dataclass
class Trainee:
    """One trainable thing and its data and optimizer; `forward(**batch)` returns `.loss` and `.logits`."""

    name: str  # "model" (the job's), "scratch" or "probe" (baselines)
    model: nn.Module
    num_labels: int  # classes predicted (0 for causal LM)
    plan: strategies.StrategyPlan
    sampler: DistributedSampler[Any]
    train_loader: DataLoader[Any]
    eval_loader: DataLoader[Any]
    budget: Budget
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    owners: list[int]
    scaler: torch.amp.GradScaler | None
    body: nn.Module | None = None  # the frozen body of a probe (saved with the head)
    threads: int | None = None  # torch intra-op threads while this trainee trains (None: the worker's setting)
    pooling: Pooling | None = None
    first_token: bool = True


def build_trainee(ctx: WorkerContext, inputs: Inputs, *, name: str = "model") -> Trainee:
    """The job's model (name "model") or a baseline ("scratch": random init, all weights; "probe")."""
    spec = ctx.spec
    if name == "probe" or (name == "model" and spec.method.strategy is Strategy.HEAD):
        return _probe_trainee(ctx, inputs, name=name)
    model = load_model(spec, inputs, scratch=name == "scratch")
    if name == "model":
        ctx.board.push({"model_loaded_time": time.time()}, force=True)
    loader, sampler = _train_loader(ctx, features.Encoded(inputs.train), collate=inputs.collate)
    eval_loader = DataLoader(
        features.Encoded(inputs.validation[ctx.rank :: ctx.world]),
        batch_size=spec.hyperparameters.batch_size * 2,
        shuffle=False,
        collate_fn=inputs.collate,
    )
    budget = Budget.of(batches_per_epoch=len(loader), hp=spec.hyperparameters)
    method = spec.method if name == "model" else spec.method.model_copy(update={"strategy": Strategy.FULL})
    model, plan = strategies.apply_strategy(model, method=method, task=spec.task, epochs=budget.epochs)
    model.to(ctx.device)
    return _with_optimizer(
        ctx, name=name, model=model, plan=plan, loaders=(loader, eval_loader, sampler), budget=budget,
        num_labels=len(inputs.label_names),
    )  # fmt: skip


def _train_loader(
    ctx: WorkerContext, dataset: torch.utils.data.Dataset[Any], *, collate: Any
) -> tuple[DataLoader[Any], DistributedSampler[Any]]:
    hp = ctx.spec.hyperparameters
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=hp.seed
    )
    return DataLoader(dataset, batch_size=hp.batch_size, sampler=sampler, collate_fn=collate), sampler


def _probe_trainee(ctx: WorkerContext, inputs: Inputs, *, name: str) -> Trainee:
    """Feature extraction: the frozen body runs once over both splits; only a linear head trains."""
    spec = ctx.spec
    body = load_model(spec, inputs, body_only=True).to(ctx.device)
    body.requires_grad_(False)
    if name == "model":
        ctx.board.push({"model_loaded_time": time.time()}, force=True)
    pooling = features.resolve_pooling(spec.method.pooling, model_dir=inputs.model_dir)
    first_token = inputs.tokenizer.cls_token is not None  # encoders: [CLS]; decoders: the last token

    def extract(rows: list[dict[str, list[int]]]) -> features.FeatureSet:
        batch = spec.hyperparameters.batch_size * 2
        return features.extract(
            body, rows, collate=inputs.collate, pooling=pooling, first_token=first_token, batch_size=batch,
            device=ctx.device,
        )  # fmt: skip

    started = time.monotonic()
    train_rows = features.gather(extract(inputs.train[ctx.rank :: ctx.world]), world=ctx.world)
    eval_rows = extract(inputs.validation[ctx.rank :: ctx.world])
    if ctx.is_chief:
        log.warning(
            "feature extraction (%s pooling): %d train + %d validation rows encoded once in %.1fs",
            pooling.value, len(inputs.train), len(inputs.validation), time.monotonic() - started,
        )  # fmt: skip
    hidden = int(train_rows.features.shape[1])
    standardisation = features.Standardisation.of(train_rows.features)
    head = features.LinearHead(hidden, len(inputs.label_names), standardisation=standardisation).to(ctx.device)
    loader, sampler = _train_loader(ctx, features.FeatureDataset(train_rows), collate=None)
    eval_loader = DataLoader(features.FeatureDataset(eval_rows), batch_size=spec.hyperparameters.batch_size * 2)
    budget = feature_budget(spec, batches_per_epoch=len(loader))
    names = [n for n, _ in head.named_parameters()]
    total = sum(p.numel() for p in body.parameters()) + sum(p.numel() for p in head.parameters())
    details = {
        "pooling": pooling.value,
        "featureExtraction": True,
        "hiddenSize": hidden,
        "standardised": True,
        "headEpochs": budget.epochs,
    }
    plan = strategies.StrategyPlan(
        Strategy.HEAD, [strategies.GroupPlan("head", names)], sum(p.numel() for p in head.parameters()), total, details
    )
    trainee = _with_optimizer(
        ctx, name=name, model=head, plan=plan, loaders=(loader, eval_loader, sampler), budget=budget,
        num_labels=len(inputs.label_names), learning_rate=PROBE_LEARNING_RATE if name == "probe" else None,
    )  # fmt: skip
    trainee.body, trainee.pooling, trainee.first_token = body, pooling, first_token
    trainee.threads = HEAD_THREADS
    return trainee


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with this many torch intra-op threads (None: unchanged), then restore the worker's count."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _with_optimizer(
    ctx: WorkerContext,
    *,
    name: str,
    model: nn.Module,
    plan: strategies.StrategyPlan,
    loaders: tuple[DataLoader[Any], DataLoader[Any], DistributedSampler[Any]],
    budget: Budget,
    num_labels: int,
    learning_rate: float | None = None,
) -> Trainee:
    hp = ctx.spec.hyperparameters
    lr = learning_rate if learning_rate is not None else hp.learning_rate
    groups, owners = strategies.optimizer_groups(model, plan=plan, learning_rate=lr, weight_decay=hp.weight_decay)
    # The fused kernel: on CPU a MiniLM step's AdamW update takes ~35 ms fused against ~600 ms in the default
    # per-parameter loop (measured on the 2-core dev machine); HF Trainer uses it by default too.
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=ctx.device.type in FUSED_ADAMW_DEVICES)
    schedule = strategies.lr_lambdas(
        plan=plan,
        owners=owners,
        total_steps=budget.total_steps,
        warmup_steps=int(hp.warmup_ratio * budget.total_steps),
        steps_per_epoch=budget.steps_per_epoch,
    )
    train_loader, eval_loader, sampler = loaders
    return Trainee(
        name=name,
        model=model,
        num_labels=num_labels,
        plan=plan,
        sampler=sampler,
        train_loader=train_loader,
        eval_loader=eval_loader,
        budget=budget,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        owners=owners,
        scaler=torch.amp.GradScaler("cuda") if ctx.dtype is torch.float16 else None,
    )


def wrap_ddp(trainee: Trainee, ctx: WorkerContext) -> None:
    """DDP after the strategy and any resumed weights are in place (DDP fixes the trainable set when it wraps)."""
    if ctx.world > 1:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        trainee.model = nn.parallel.DistributedDataParallel(trainee.model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that train, copied to CPU (frozen ones reload from the pretrained source)."""
    return {n: p.detach().cpu().clone() for n, p in unwrap(model).named_parameters() if p.requires_grad}
