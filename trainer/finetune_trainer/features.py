"""Model inputs: tokenisation, per-task batching, and feature extraction from a frozen body.

Why feature extraction lives here: with a frozen body the body's output never changes, so strategy `head` (and the
`probe` baseline) run the body once over the train and validation sets (no grad, batched), pool each sequence into
one vector, and train only a linear head on those cached vectors. The pooling matters: sentence-transformers
checkpoints (all-MiniLM-L6-v2 and its cousins) were trained to be read through the mean of their token states, and
their [CLS] position and pooler were never trained for that, so `auto` asks the checkpoint (its
`1_Pooling/config.json`) before falling back to the first token.

The head trains on standardised features for as many passes over the cache as it needs (`worker.head_epochs`), and
its artifact is the unchanged body plus `classifier.safetensors` (the standardisation folded into a plain linear
layer on the raw pooled vectors) and `classifier.json` (pooling, labels): `load_probe` (and the model card's
snippet, in plain transformers) turns them back into a classifier.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel

from finetune_trainer import data
from finetune_trainer.spec import Pooling, Task

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"
Collate = Callable[[list[dict[str, list[int]]]], dict[str, torch.Tensor]]
STD_FLOOR = 1e-6  # dimensions whose train-set standard deviation is below this are left unscaled (constant ones)


class Encoded(torch.utils.data.Dataset[dict[str, list[int]]]):
    """Tokenised examples (lists of ids), padded per batch by the collate function."""

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


def make_collate(pad_id: int, *, task: Task) -> Collate:
    """Pad a batch to its longest sequence. Labels are one id per example for classification (shape (B,)) and
    one per token for causal LM (shape (B, L), padding ignored with -100): the task says which, not the lengths.
    """

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(b["input_ids"]) for b in batch)
        out: dict[str, torch.Tensor] = {}
        for key in batch[0]:
            if key == "labels" and task is Task.SEQUENCE_CLASSIFICATION:
                out[key] = torch.tensor([b["labels"][0] for b in batch])
                continue
            fill = {"input_ids": pad_id, "labels": -100}.get(key, 0)
            out[key] = torch.tensor([b[key] + [fill] * (longest - len(b[key])) for b in batch])
        return out

    return collate


def resolve_pooling(requested: Pooling, *, model_dir: Path) -> Pooling:
    """auto -> what the checkpoint was trained for: a sentence-transformers pooling config, else cls."""
    if requested is not Pooling.AUTO:
        return requested
    config = _sentence_transformers_pooling(model_dir)
    if config.get("pooling_mode_mean_tokens"):
        return Pooling.MEAN
    return Pooling.CLS


def _sentence_transformers_pooling(model_dir: Path) -> dict[str, Any]:
    try:
        modules = json.loads((model_dir / "modules.json").read_text(encoding="utf-8"))
        pooling = next(m for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        loaded: dict[str, Any] = json.loads((model_dir / pooling["path"] / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError):
        return {}
    return loaded


def pool(hidden: torch.Tensor, mask: torch.Tensor, *, pooling: Pooling, first_token: bool) -> torch.Tensor:
    """One vector per sequence: the mean of non-padding token states, or the first ([CLS]) / last token's state."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling is Pooling.MEAN:
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    if first_token:
        return hidden[:, 0]
    last = (mask.sum(1) - 1).clamp(min=0)  # right padding: the last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@dataclass(frozen=True)
class FeatureSet:
    """Pooled body outputs and their labels (one row per example)."""

    features: torch.Tensor  # (N, hidden), float32, on CPU
    labels: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class FeatureDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, rows: FeatureSet) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"features": self.rows.features[index], "labels": self.rows.labels[index]}


@torch.no_grad()
def extract(
    body: nn.Module,
    encoded: list[dict[str, list[int]]],
    *,
    collate: Collate,
    pooling: Pooling,
    first_token: bool,
    batch_size: int,
    device: torch.device,
) -> FeatureSet:
    """Run the frozen body once over the examples (no grad, batched) and pool each into one vector."""
    body.eval()
    rows, labels = [], []
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size])
        labels.append(batch.pop("labels"))
        inputs = {k: v.to(device) for k, v in batch.items()}
        hidden = body(**inputs).last_hidden_state
        rows.append(pool(hidden, inputs["attention_mask"], pooling=pooling, first_token=first_token).float().cpu())
    hidden_size = int(getattr(getattr(body, "config", None), "hidden_size", 0) or 0)
    features = torch.cat(rows) if rows else torch.zeros(0, hidden_size)
    return FeatureSet(features=features, labels=torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))


def gather(rows: FeatureSet, *, world: int) -> FeatureSet:
    """Every rank's FeatureSet concatenated in rank order (each rank extracted its own slice)."""
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return rows
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, (rows.features, rows.labels))
    return FeatureSet(features=torch.cat([p[0] for p in parts]), labels=torch.cat([p[1] for p in parts]))


@dataclass
class HeadOutput:
    """What the training loop and evaluation read from any model's forward: loss (with labels) and logits."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


@dataclass(frozen=True)
class Standardisation:
    """Per-dimension train-set mean and scale of the pooled features (scale 1 for constant dimensions)."""

    mean: torch.Tensor  # (hidden,)
    scale: torch.Tensor  # (hidden,)

    @staticmethod
    def of(features: torch.Tensor) -> Standardisation:
        """From the training features (every rank holds all of them, so every rank computes the same values)."""
        if features.shape[0] < 2:
            hidden = features.shape[1]
            return Standardisation(mean=torch.zeros(hidden), scale=torch.ones(hidden))
        mean, std = features.mean(0), features.std(0)
        return Standardisation(mean=mean, scale=torch.where(std > STD_FLOOR, std, torch.ones_like(std)))


class LinearHead(nn.Module):
    """A linear classifier over pooled features: the only thing `head` and the probe baseline train.

    It trains on standardised features (train-set mean and scale, fixed buffers): pooled sentence vectors have a
    small, uneven per-dimension scale (all-MiniLM-L6-v2, mean-pooled: median standard deviation 0.25), so a
    linear layer on the raw vectors moves slowly at a usual learning rate and its progress depends on the encoder's
    scale. `folded()` turns the standardisation into the weights, so the saved head is a plain linear layer on the
    raw pooled vectors.
    """

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, hidden_size: int, num_labels: int, *, standardisation: Standardisation | None = None) -> None:
        super().__init__()
        self.classifier = nn.Linear(hidden_size, num_labels)
        std = standardisation or Standardisation(mean=torch.zeros(hidden_size), scale=torch.ones(hidden_size))
        self.register_buffer("mean", std.mean.detach().clone().float())
        self.register_buffer("scale", std.scale.detach().clone().float())

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> HeadOutput:
        logits = self.classifier((features - self.mean) / self.scale)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return HeadOutput(logits=logits, loss=loss)

    def folded(self) -> dict[str, torch.Tensor]:
        """weight and bias of the same classifier on raw features: W (x - m) / s + b = (W / s) x + (b - (W / s) m)."""
        weight = self.classifier.weight.detach() / self.scale
        bias = self.classifier.bias.detach() - weight @ self.mean
        return {"weight": weight.cpu().contiguous(), "bias": bias.cpu().contiguous()}


def save_head(head: LinearHead, directory: Path, *, pooling: Pooling, first_token: bool, labels: list[str]) -> None:
    """classifier.safetensors (weight, bias on the raw pooled features) + classifier.json next to the saved body."""
    save_file(head.folded(), str(directory / CLASSIFIER_WEIGHTS))
    config = {"pooling": pooling.value, "firstToken": first_token, "labels": labels, "format": "finetune-probe/v1"}
    (directory / CLASSIFIER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")


class ProbeClassifier(nn.Module):
    """A saved `head` model loaded back: body -> pooling -> linear head. forward(**tokenizer_output) -> logits."""

    def __init__(self, body: nn.Module, head: LinearHead, *, pooling: Pooling, first_token: bool) -> None:
        super().__init__()
        self.body, self.head = body, head
        self.pooling, self.first_token = pooling, first_token

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.body(**inputs).last_hidden_state
        pooled = pool(hidden, inputs["attention_mask"], pooling=self.pooling, first_token=self.first_token)
        out: HeadOutput = self.head(pooled)
        return out.logits


def load_probe(directory: Path) -> ProbeClassifier:
    """Load a `head` artifact (model/ or rejected/model/) for inference."""
    config = json.loads((directory / CLASSIFIER_CONFIG).read_text(encoding="utf-8"))
    weights = load_file(str(directory / CLASSIFIER_WEIGHTS))
    head = LinearHead(int(weights["weight"].shape[1]), int(weights["weight"].shape[0]))
    head.classifier.load_state_dict(weights)
    body = AutoModel.from_pretrained(directory)
    return ProbeClassifier(
        body, head, pooling=Pooling(config["pooling"]), first_token=bool(config["firstToken"])
    ).eval()
