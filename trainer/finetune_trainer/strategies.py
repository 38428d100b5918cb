"""Transfer-learning strategies: which parameters train, in which groups, at which learning rates, from when.

Why generic: users bring BERT-, DistilBERT- and GPT-2-like models (and their many cousins). Rather than a table of
attribute paths per architecture, `find_layout` finds the transformer block list (the largest ModuleList of
identical blocks) and splits the remaining parameters by registration order into what sits below the blocks
(embeddings) and above them (pooler / final norm / task head). Every strategy is then a choice of groups.

Gradual unfreezing (ULMFiT) under DDP: DDP fixes the set of parameters that need gradients when it wraps the model,
so toggling requires_grad per epoch breaks gradient synchronisation. Instead every parameter is trainable and in the
optimizer from the start, each group has its own learning rate (discriminative: divided by lrDecay per block going
down), and the schedule multiplies a group's rate by 0 until its epoch comes; the training loop also drops the
gradients of still-frozen groups before the optimizer step so their Adam state and weight decay stay untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, TaskType, get_peft_model
from torch import nn

from finetune_trainer.errors import InvalidSpecError
from finetune_trainer.spec import MethodSpec, Strategy, Task

# LoRA target modules per model_type (HF config.model_type); anything else is found by scanning for these names.
LORA_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
}
_LORA_FALLBACK = [["q_proj", "v_proj"], ["query", "value"], ["q_lin", "v_lin"], ["c_attn"], ["qkv"]]
_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "ln_", "norm.weight")


@dataclass(frozen=True)
class Layout:
    """Parameter names of a model, split into embeddings (below), blocks (bottom to top) and top (above)."""

    embeddings: list[str]
    blocks: list[list[str]]
    top: list[str]
    block_path: str  # e.g. "bert.encoder.layer"


@dataclass(frozen=True)
class GroupPlan:
    name: str
    params: list[str]
    lr_scale: float = 1.0
    unfreeze_epoch: int = 0


@dataclass(frozen=True)
class StrategyPlan:
    strategy: Strategy
    groups: list[GroupPlan]
    trainable_parameters: int  # parameters that train at some point of the run
    total_parameters: int
    details: dict[str, Any] = field(default_factory=dict)

    def active(self, epoch: int) -> list[bool]:
        """Which groups train in this epoch (gradual unfreezing); all True for the other strategies."""
        return [epoch >= g.unfreeze_epoch for g in self.groups]


def find_layout(model: nn.Module) -> Layout:
    """Locate the transformer block list and classify every (deduplicated) parameter around it."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            size = sum(p.numel() for p in module.parameters())
            if len(kinds) == 1 and size > 0 and (best is None or size > best[0]):
                best = (size, name, module)
    if best is None:
        raise InvalidSpecError(f"spec.method.strategy: cannot find the transformer blocks of {type(model).__name__}")
    _, path, blocks_module = best
    prefixes = [f"{path}.{i}." for i in range(len(blocks_module))]
    embeddings: list[str] = []
    blocks: list[list[str]] = [[] for _ in prefixes]
    top: list[str] = []
    seen_block = False
    for name, _ in model.named_parameters():
        for i, prefix in enumerate(prefixes):
            if name.startswith(prefix):
                blocks[i].append(name)
                seen_block = True
                break
        else:
            (top if seen_block else embeddings).append(name)
    return Layout(embeddings=embeddings, blocks=blocks, top=top, block_path=path)


def _count(model: nn.Module, names: list[str]) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


def lora_targets(model: nn.Module, *, override: list[str] | None) -> list[str]:
    """Module names LoRA adapts: the override, else the table for config.model_type, else a scan."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if len(list(m.children())) == 0}
    if override:
        unknown = [t for t in override if t not in leaf_names]
        if unknown:
            raise InvalidSpecError(
                f"spec.method.lora.targetModules: {', '.join(unknown)} not found in the model; "
                f"linear-like modules include: {', '.join(sorted(leaf_names)[:40])}"
            )
        return list(override)
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    if model_type in LORA_TARGETS and all(t in leaf_names for t in LORA_TARGETS[model_type]):
        return LORA_TARGETS[model_type]
    for candidate in _LORA_FALLBACK:
        if all(t in leaf_names for t in candidate):
            return candidate
    raise InvalidSpecError(
        f"spec.method.lora.targetModules: no default LoRA targets for model_type {model_type!r}; set them explicitly"
    )


def head_modules(model: nn.Module) -> list[str]:
    """Top-level modules outside the pretrained body (the new task head), excluding weights tied to the body."""
    prefix = str(getattr(model, "base_model_prefix", ""))
    body_ids = {id(p) for p in getattr(model, prefix).parameters()} if prefix and hasattr(model, prefix) else set()
    names = []
    for name, child in model.named_children():
        if name == prefix:
            continue
        params = list(child.parameters())
        if params and not any(id(p) in body_ids for p in params):
            names.append(name)
    return names


def apply_strategy(model: nn.Module, *, method: MethodSpec, task: Task, epochs: int) -> tuple[nn.Module, StrategyPlan]:
    """Freeze/unfreeze (or wrap with LoRA) before DDP wraps the model; returns the possibly wrapped model."""
    strategy = method.strategy
    total = sum(p.numel() for p in model.parameters())
    if strategy is Strategy.LORA:
        return _apply_lora(model, method=method, task=task, total=total)
    layout = find_layout(model)
    n_blocks = len(layout.blocks)
    all_names = [n for n, _ in model.named_parameters()]
    if strategy is Strategy.FULL:
        groups = [GroupPlan("all", all_names)]
    elif strategy is Strategy.HEAD:
        groups = [GroupPlan("top", layout.top)]
    elif strategy is Strategy.TOP_LAYERS:
        n = method.top_layers
        if n > n_blocks:
            raise InvalidSpecError(f"spec.method.unfreezeLayers: {n} exceeds the model's {n_blocks} transformer blocks")
        top_blocks = [name for block in layout.blocks[n_blocks - n :] for name in block]
        groups = [GroupPlan("top", layout.top + top_blocks)]
    else:  # gradual
        g = method.gradual_spec
        groups = [GroupPlan("top", layout.top)]
        for depth in range(1, n_blocks + 1):
            groups.append(
                GroupPlan(
                    f"block{n_blocks - depth}",
                    layout.blocks[n_blocks - depth],
                    lr_scale=g.lr_decay**-depth,
                    unfreeze_epoch=(depth - 1) // g.layers_per_epoch + 1,
                )
            )
        groups.append(
            GroupPlan(
                "embeddings",
                layout.embeddings,
                lr_scale=g.lr_decay ** -(n_blocks + 1),
                unfreeze_epoch=(n_blocks - 1) // g.layers_per_epoch + 2,
            )
        )
    groups = [grp for grp in groups if grp.params]
    trainable_names = {n for grp in groups for n in grp.params}
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable_names)
    ever = [n for grp in groups if grp.unfreeze_epoch < epochs for n in grp.params]
    details: dict[str, Any] = {"blocks": n_blocks, "block_path": layout.block_path}
    if strategy is Strategy.GRADUAL:
        details["schedule"] = [
            {"group": grp.name, "unfreezeEpoch": grp.unfreeze_epoch, "lrScale": grp.lr_scale} for grp in groups
        ]
    plan = StrategyPlan(strategy, groups, _count(model, ever), total, details)
    return model, plan


def _apply_lora(model: nn.Module, *, method: MethodSpec, task: Task, total: int) -> tuple[nn.Module, StrategyPlan]:
    spec = method.lora_spec
    targets = lora_targets(model, override=spec.target_modules)
    is_cls = task is Task.SEQUENCE_CLASSIFICATION
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        modules_to_save=head_modules(model) if is_cls else None,
        task_type=TaskType.SEQ_CLS if is_cls else TaskType.CAUSAL_LM,
        fan_in_fan_out=str(getattr(getattr(model, "config", None), "model_type", "")) == "gpt2",
    )
    wrapped: nn.Module = get_peft_model(model, config)
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    plan = StrategyPlan(
        Strategy.LORA,
        [GroupPlan("lora", names)],
        sum(p.numel() for p in wrapped.parameters() if p.requires_grad),
        total,
        {"targetModules": targets, "modulesToSave": config.modules_to_save or []},
    )
    return wrapped, plan


def optimizer_groups(
    model: nn.Module, *, plan: StrategyPlan, learning_rate: float, weight_decay: float
) -> tuple[list[dict[str, Any]], list[int]]:
    """AdamW parameter groups (decay / no-decay per plan group) and, for each, the index of its plan group."""
    params = dict(_unwrapped(model).named_parameters())
    groups: list[dict[str, Any]] = []
    owners: list[int] = []
    for index, grp in enumerate(plan.groups):
        for decay in (True, False):
            chosen = [params[n] for n in grp.params if n in params and (not any(k in n for k in _NO_DECAY)) == decay]
            if chosen:
                groups.append(
                    {"params": chosen, "lr": learning_rate * grp.lr_scale, "weight_decay": weight_decay * decay}
                )
                owners.append(index)
    return groups, owners


def lr_lambdas(
    *, plan: StrategyPlan, owners: list[int], total_steps: int, warmup_steps: int, steps_per_epoch: int
) -> list[Callable[[int], float]]:
    """One multiplier per optimizer group: linear warm-up then linear decay, times 0 while the group is frozen."""

    def base(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    def make(unfreeze_epoch: int) -> Callable[[int], float]:
        return lambda step: base(step) if step // max(1, steps_per_epoch) >= unfreeze_epoch else 0.0

    return [make(plan.groups[i].unfreeze_epoch) for i in owners]


def drop_frozen_grads(optimizer: torch.optim.Optimizer, *, plan: StrategyPlan, owners: list[int], epoch: int) -> None:
    """Clear gradients of groups not yet unfrozen so AdamW skips them entirely (no moments, no weight decay)."""
    active = plan.active(epoch)
    for group, owner in zip(optimizer.param_groups, owners, strict=True):
        if not active[owner]:
            for p in group["params"]:
                p.grad = None


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
