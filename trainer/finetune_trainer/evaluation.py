"""Validation metrics and the bookkeeping around them: which evaluation is the best, when to stop early.

Why apart from the loop: the metric formulas are pure functions of a confusion matrix or of summed losses (unit
tested with tables), and "is this evaluation better" is one rule used by early stopping, by the choice of the kept
model, by the baseline comparison and by the quality gate.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from finetune_trainer.spec import Task, minimized


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over the ranks (identity on one worker)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return [float(v) for v in tensor.tolist()]


def classification_metrics(confusion: torch.Tensor, *, loss_sum: float, count: float) -> dict[str, float]:
    """Accuracy, macro-F1 and mean loss from a (true x predicted) confusion matrix.

    Macro-F1 averages over the classes that occur in the labels or the predictions (as scikit-learn does): a class
    absent from the evaluation set and never predicted has no F1, and counting it as 0 would punish a perfect model.
    """
    tp = confusion.diag()
    support, predicted = confusion.sum(1), confusion.sum(0)
    present = (support + predicted) > 0
    precision = tp / predicted.clamp(min=1)
    recall = tp / support.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    macro = float(f1[present].mean()) if bool(present.any()) else 0.0
    return {
        "eval_loss": loss_sum / max(count, 1.0),
        "eval_accuracy": float(tp.sum()) / max(count, 1.0),
        "eval_f1": macro,
    }


def language_model_metrics(*, loss_sum: float, tokens: float) -> dict[str, float]:
    loss = loss_sum / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader[Any],
    *,
    task: Task,
    num_labels: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> dict[str, float]:
    """Metrics over the whole validation set (each rank evaluates its shard; sums are all-reduced)."""
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0.0
    size = max(num_labels, 1)
    confusion = torch.zeros(size, size, dtype=torch.float64)
    for cpu_batch in loader:
        batch = {k: v.to(device) for k, v in cpu_batch.items()}
        with autocast(device, dtype):
            out = model(**batch)
        if task is Task.SEQUENCE_CLASSIFICATION:
            n = float(batch["labels"].shape[0])
            preds = out.logits.float().argmax(-1).cpu()
            confusion.index_put_(
                (batch["labels"].cpu(), preds), torch.ones(len(preds), dtype=torch.float64), accumulate=True
            )
        else:
            n = float((batch["labels"][:, 1:] != -100).sum())
        loss_sum += float(out.loss) * n
        count += n
    model.train(was_training)
    if task is Task.SEQUENCE_CLASSIFICATION:
        flat = all_reduce([loss_sum, count, *confusion.flatten().tolist()], device)
        matrix = torch.tensor(flat[2:], dtype=torch.float64).view(size, size)
        return classification_metrics(matrix, loss_sum=flat[0], count=flat[1])
    loss_sum, count = all_reduce([loss_sum, count], device)
    return language_model_metrics(loss_sum=loss_sum, tokens=count)


def better(value: float, than: float | None, *, metric: str) -> bool:
    """Whether value improves on `than` (None: anything does) for this metric's direction."""
    if than is None:
        return True
    return value < than if minimized(metric) else value > than


def gain(value: float, *, over: float, metric: str) -> float:
    """How much value beats `over`, positive when better, in the metric's units."""
    return over - value if minimized(metric) else value - over


@dataclass(frozen=True)
class Verdict:
    """The outcome of comparing a result with the spec's baseline and quality gate."""

    negative_transfer: bool | None
    gate_failures: tuple[str, ...]


def judge(
    metrics: dict[str, float],
    *,
    metric: str,
    baseline: float | None,
    min_gain: float,
    min_metric: dict[str, float] | None,
) -> Verdict:
    """Negative transfer (the kept model does not beat the baseline by min_gain) and quality-gate misses."""
    negative = None
    if baseline is not None:
        negative = gain(metrics[metric], over=baseline, metric=metric) < min_gain
    misses = []
    for name, threshold in sorted((min_metric or {}).items()):
        value = metrics.get(name)
        if value is None:
            misses.append(f"{name} was not computed (required {_bound(name)} {threshold:g})")
        elif value != threshold and not better(value, threshold, metric=name):
            misses.append(f"{name} = {value:.4f}, required {_bound(name)} {threshold:g}")
    return Verdict(negative_transfer=negative, gate_failures=tuple(misses))


def _bound(metric: str) -> str:
    return "at most" if minimized(metric) else "at least"
