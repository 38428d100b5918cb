"""Why the feature-extraction head under-trains, measured offline on cached features (no Ray, one process).

Encodes bench/transfer.py's data (the first 1,000 rows of the quick-start SST-2 subset, the 872-row dev set) once
with the frozen all-MiniLM-L6-v2 body, mean- and cls-pooled, exactly as strategy `head` does (the trainer's own
`features.extract`), caches the features in bench/out/head-features.pt, then trains linear heads on them with
different recipes and prints dev accuracy for each:

- the trainer's recipe before the fix: AdamW lr 1e-3, weight decay 0.01, batch 32, 10 % warm-up then linear decay,
  gradient clipping at 1.0, on raw features, for 3 epochs (bench/transfer.py's settings) and for more epochs;
- the same on features standardised with train-set statistics;
- full-batch L-BFGS logistic regression (to convergence) on standardised features, at a few L2 strengths: what a
  linear probe can reach on these features.

    HF_HOME=.cache/hf HF_HUB_OFFLINE=1 .venv/bin/python bench/head_probe.py [--epochs 3,10,30,100]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import time
from pathlib import Path

import torch
from finetune_trainer import data, features, sources
from finetune_trainer.spec import Pooling, Task, parse_spec
from transformers import AutoModel, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT / "examples" / "data" / "sst2"
CACHE = ROOT / "bench" / "out" / "head-features.pt"  # suffixed with the number of training rows


def encode_features(train_samples: int) -> dict[str, torch.Tensor]:
    spec = parse_spec(
        {
            "model": {"uri": "hf://sentence-transformers/all-MiniLM-L6-v2"},
            "dataset": {
                "train": str(SST2 / "train.tsv"),
                "validation": str(SST2 / "dev.tsv"),
                "textColumn": "sentence",
                "maxTrainSamples": train_samples,
            },
            "method": {"strategy": "head"},
        }
    )
    prepared = data.prepare(spec)
    model_dir = sources.resolve_model(spec.model, storage_spec=spec.storage, base_dir=None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    body = AutoModel.from_pretrained(model_dir).eval()
    collate = features.make_collate(int(tokenizer.pad_token_id), task=Task.SEQUENCE_CLASSIFICATION)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for split, examples in (("train", prepared.train), ("dev", prepared.validation)):
            encoded = features.encode(tokenizer, examples, task=Task.SEQUENCE_CLASSIFICATION, max_length=64)
            pooled: dict[str, list[torch.Tensor]] = {"mean": [], "cls": [], "labels": []}
            for start in range(0, len(encoded), 64):  # the body runs once; both poolings read its output
                batch = collate(encoded[start : start + 64])
                pooled["labels"].append(batch.pop("labels"))
                hidden = body(**batch).last_hidden_state
                for pooling in (Pooling.MEAN, Pooling.CLS):
                    vectors = features.pool(hidden, batch["attention_mask"], pooling=pooling, first_token=True)
                    pooled[pooling.value].append(vectors)
            for key, parts in pooled.items():
                out[f"{split}_{key}"] = torch.cat(parts)
    return out


def accuracy(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x @ weight.T + bias).argmax(-1) == y).float().mean())


def adamw(
    x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 1e-3, batch: int = 32, seed: int = 42
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's pre-fix recipe for the head: AdamW, warm-up 10 %, linear decay, clip 1.0, batch 32."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], 2)
    decay = [head.weight]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": [head.bias], "weight_decay": 0.0}])
    for group in opt.param_groups:
        group["lr"] = lr
    per_epoch = math.ceil(len(y) / batch)
    total, warm = epochs * per_epoch, int(0.1 * epochs * per_epoch)

    def factor(step: int) -> float:
        return (step + 1) / max(1, warm) if step < warm else max(0.0, (total - step) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch):
            idx = order[start : start + batch]
            loss = torch.nn.functional.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]  # torch's stubs leave it untyped
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            sched.step()
    return head.weight.detach(), head.bias.detach()


def lbfgs(x: torch.Tensor, y: torch.Tensor, *, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised multinomial logistic regression to convergence (full batch)."""
    weight = torch.zeros(2, x.shape[1], requires_grad=True)
    bias = torch.zeros(2, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=500, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + l2 / 2 * weight.pow(2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return weight.detach(), bias.detach()


def standardise(train: torch.Tensor, dev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Train-set mean and standard deviation (constant dimensions left unscaled), as the trainer does."""
    mean, std = train.mean(0), train.std(0)
    scale = torch.where(std > 1e-6, std, torch.ones_like(std))
    return (train - mean) / scale, (dev - mean) / scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-samples", type=int, default=1000)
    parser.add_argument("--epochs", default="3,32")
    parser.add_argument("--seeds", default="42,1,2")
    args = parser.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip())
    cache = CACHE.with_name(f"head-features-{args.train_samples}.pt")
    if not cache.exists():
        started = time.monotonic()
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(encode_features(args.train_samples), cache)
        print(f"encoded train + dev once in {time.monotonic() - started:.1f}s -> {cache}")
    cached = torch.load(cache)
    ytr, ydev = cached["train_labels"], cached["dev_labels"]
    torch.set_num_threads(1)  # a 384 x 2 linear layer: more threads only spin
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"train {len(ytr)}, dev {len(ydev)}; AdamW rows: dev accuracy of seeds {seeds} (mean, min-max)")
    for pooling in ("mean", "cls"):
        xtr, xdev = cached[f"train_{pooling}"], cached[f"dev_{pooling}"]
        ztr, zdev = standardise(xtr, xdev)
        std = xtr.std(0)
        print(
            f"\n{pooling} pooling: feature norm {xtr.norm(dim=1).mean():.2f}, per-dimension std median "
            f"{std.median():.3f}, {int((std < 1e-6).sum())} constant dimensions"
        )
        print(f"{'recipe':64} {'dev accuracy':>24} {'seconds':>8}")
        for epochs in [int(e) for e in args.epochs.split(",")]:
            steps = epochs * math.ceil(len(ytr) / 32)
            for name, (tr, dev) in (("raw", (xtr, xdev)), ("standardised", (ztr, zdev))):
                started = time.monotonic()
                accs = [accuracy(*adamw(tr, ytr, epochs=epochs, seed=seed), dev, ydev) for seed in seeds]
                label = f"AdamW lr 1e-3 batch 32, {epochs} epochs ({steps} steps), {name}"
                spread = f"{sum(accs) / len(accs):.4f} ({min(accs):.4f}-{max(accs):.4f})"
                print(f"{label:64} {spread:>24} {time.monotonic() - started:8.2f}")
        for l2 in (1e-2, 1e-1, 1.0):
            started = time.monotonic()
            w, b = lbfgs(ztr, ytr, l2=l2)
            label = f"L-BFGS logistic regression to convergence, L2 {l2:g}, standardised"
            print(f"{label:64} {accuracy(w, b, zdev, ydev):24.4f} {time.monotonic() - started:8.2f}")


if __name__ == "__main__":
    main()
