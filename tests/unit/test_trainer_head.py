"""Strategy `head` (feature extraction) trains its linear head enough, on standardised features, and exports a plain
linear layer that gives the trained head's predictions (issue 11, item 2). Synthetic features and a tiny BERT body:
no Ray, no download."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_trainer import features
from finetune_trainer.artifacts import model_card
from finetune_trainer.checkpoints import Progress
from finetune_trainer.finish import export_model
from finetune_trainer.hfcache import packaged_model_dir
from finetune_trainer.loop import EvalPolicy, Loop
from finetune_trainer.progress import Board
from finetune_trainer.spec import Pooling, parse_spec
from finetune_trainer.worker import (
    HEAD_MIN_STEPS,
    Budget,
    WorkerContext,
    baseline_steps,
    build_trainee,
    feature_budget,
    head_epochs,
    load_inputs,
    torch_threads,
)
from transformers import AutoTokenizer, BertConfig, BertModel

BASE: dict[str, Any] = {"model": {"uri": "/m"}, "dataset": {"train": "t.csv"}}
SST2 = Path(__file__).resolve().parents[2] / "examples" / "data" / "sst2"


def head_spec(*, method: dict[str, Any] | None = None, **hyperparameters: Any) -> Any:
    return parse_spec({**BASE, "method": {"strategy": "head", **(method or {})}, "hyperparameters": hyperparameters})


# ---- how long the head trains over the cached features ----
@dataclass(frozen=True)
class BudgetCase:
    name: str
    batches_per_epoch: int
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    epochs: int
    total_steps: int


BUDGETS = [
    BudgetCase("1,000 rows, 3 epochs: raised to 1,000 steps", 32, {"epochs": 3}, {}, 32, 1024),
    BudgetCase("67k rows: the user's epochs already give 1,000 steps", 2105, {"epochs": 3}, {}, 3, 6315),
    BudgetCase("more epochs than the floor are kept", 32, {"epochs": 40}, {}, 40, 1280),
    BudgetCase("gradient accumulation: optimizer steps count", 32, {"epochs": 3, "gradientAccumulationSteps": 4}, {},
               125, 1000),
    BudgetCase("headEpochs is taken as given", 32, {"epochs": 3}, {"headEpochs": 5}, 5, 160),
    BudgetCase("maxSteps still caps", 32, {"epochs": 3, "maxSteps": 200}, {}, 7, 200),
    BudgetCase("a tiny data set gets many passes", 1, {"epochs": 3}, {}, HEAD_MIN_STEPS, HEAD_MIN_STEPS),
]  # fmt: skip


@pytest.mark.parametrize("case", BUDGETS, ids=lambda c: c.name)
def test_head_budget_reaches_the_minimum_steps(case: BudgetCase) -> None:
    spec = head_spec(method=case.method, **case.hyperparameters)
    budget = feature_budget(spec, batches_per_epoch=case.batches_per_epoch)
    assert (budget.epochs, budget.total_steps) == (case.epochs, case.total_steps)


def test_head_epochs_is_per_pass_of_the_optimizer_steps() -> None:
    assert head_epochs(head_spec(epochs=1), steps_per_epoch=HEAD_MIN_STEPS - 1) == 2
    assert head_epochs(head_spec(epochs=1), steps_per_epoch=HEAD_MIN_STEPS) == 1


@pytest.mark.parametrize(
    ("baseline", "expected"), [("none", 0), ("scratch", 96), ("probe", 1024)], ids=["none", "scratch", "probe"]
)
def test_baseline_steps_follow_the_baseline_kind(baseline: str, expected: int) -> None:
    spec = parse_spec({**BASE, "method": {"strategy": "full"}, "evaluation": {"baseline": baseline},
                       "hyperparameters": {"epochs": 3}})  # fmt: skip
    job = Budget.of(batches_per_epoch=32, hp=spec.hyperparameters)
    assert baseline_steps(spec, budget=job) == expected


# ---- standardised features, folded into the exported weights ----
def test_standardisation_uses_train_statistics_and_leaves_constant_dimensions_unscaled() -> None:
    rows = torch.tensor([[1.0, 5.0, 0.0], [3.0, 5.0, 0.0], [5.0, 5.0, 0.0]])
    std = features.Standardisation.of(rows)
    assert std.mean.tolist() == [3.0, 5.0, 0.0]
    assert std.scale.tolist() == [2.0, 1.0, 1.0]
    one = features.Standardisation.of(rows[:1])  # a single row has no spread: identity
    assert (one.mean.tolist(), one.scale.tolist()) == ([0.0] * 3, [1.0] * 3)


def test_folded_head_gives_the_same_logits_on_raw_features() -> None:
    torch.manual_seed(0)
    raw = torch.randn(50, 8) * 0.05 + 3.0
    head = features.LinearHead(8, 3, standardisation=features.Standardisation.of(raw))
    folded = head.folded()
    torch.testing.assert_close(raw @ folded["weight"].T + folded["bias"], head(raw).logits, rtol=1e-4, atol=1e-4)


def synthetic(rows: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled-embedding-like features: a large common offset, small per-dimension spread, the label in 4 dims."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (rows,), generator=gen)
    x = 1.0 + 0.02 * torch.randn(rows, 16, generator=gen)
    x[:, :4] += 0.02 * (labels.float().unsqueeze(1) * 2 - 1)
    return x, labels


def train_head(head: features.LinearHead, x: torch.Tensor, y: torch.Tensor, *, steps: int) -> float:
    """The trainer's optimiser for a head (AdamW lr 1e-3, batch 32) for a number of steps; train accuracy."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    with torch_threads(1):  # as the trainer trains a head
        for step in range(steps):
            index = torch.arange(step * 32, step * 32 + 32) % len(y)
            loss = head(x[index], y[index]).loss
            assert loss is not None
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return float((head(x).logits.argmax(-1) == y).float().mean())


def test_a_head_on_small_scale_features_learns_within_a_short_budget() -> None:
    x, y = synthetic(1000, seed=1)
    torch.manual_seed(0)
    head = features.LinearHead(16, 2, standardisation=features.Standardisation.of(x))
    assert train_head(head, x, y, steps=320) > 0.9  # the Bayes rate of these features is ~0.98
    torch.manual_seed(0)
    raw = features.LinearHead(16, 2)  # the head before standardisation: the same steps stay near chance
    assert train_head(raw, x, y, steps=320) < 0.7


def test_saved_head_reloads_as_a_plain_linear_layer_with_the_same_predictions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    body = BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32)).eval()  # fmt: skip
    ids = torch.randint(1, 60, (12, 10))
    mask = torch.ones_like(ids)
    mask[::2, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        pooled = features.pool(body(**batch).last_hidden_state, mask, pooling=Pooling.MEAN, first_token=True)
    head = features.LinearHead(16, 2, standardisation=features.Standardisation.of(pooled))
    with torch.no_grad():
        head.classifier.weight.normal_()
        expected = head(pooled).logits
    body.save_pretrained(tmp_path)
    features.save_head(head, tmp_path, pooling=Pooling.MEAN, first_token=True, labels=["neg", "pos"])
    with torch.no_grad():
        reloaded = features.load_probe(tmp_path)(**batch)
    torch.testing.assert_close(reloaded, expected, rtol=1e-4, atol=1e-4)
    assert reloaded.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_head_trains_on_one_thread_and_restores_the_workers_count() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_model_card_says_how_the_head_was_trained() -> None:
    summary = {"probe": True, "pooling": "mean", "strategyDetails": {"headEpochs": 32, "standardised": True}}
    card = model_card(name="run", spec={"method": {"strategy": "head"}}, summary=summary)
    assert "32 passes" in card and "standardised" in card


# ---- the head trainee through the real training loop (in process, no Ray), exported and reloaded ----
def tiny_bert(directory: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(packaged_model_dir())
    torch.manual_seed(0)
    body = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))  # fmt: skip
    body.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_head_context(tmp_path: Path, **extra: Any) -> WorkerContext:
    """Rank 0 of a `head` job on a tiny BERT and 160 SST-2 rows (10 steps per pass), no board; `extra` adds spec
    sections (e.g. checkpoint)."""
    spec = parse_spec(
        {
            "model": {"uri": str(tiny_bert(tmp_path / "bert"))},
            "dataset": {"train": str(SST2 / "train.tsv"), "validation": str(SST2 / "dev.tsv"),
                        "textColumn": "sentence", "maxTrainSamples": 160, "maxEvalSamples": 64},
            "method": {"strategy": "head", "pooling": "mean"},
            "hyperparameters": {"learningRate": "1e-3", "epochs": 3, "batchSize": 16, "maxSeqLength": 32},
            **extra,
        }
    )  # fmt: skip
    return WorkerContext(spec=spec, rank=0, world=1, device=torch.device("cpu"), dtype=None, base_dir=None,
                         output_uri=str(tmp_path / "out"), run_name="t", board=Board(None, enabled=False))  # fmt: skip


def test_head_trainee_trains_on_cached_features_and_its_export_reproduces_the_accuracy(tmp_path: Path) -> None:
    ctx = tiny_head_context(tmp_path)
    inputs = load_inputs(ctx)
    trainee = build_trainee(ctx, inputs)
    assert trainee.budget.total_steps == HEAD_MIN_STEPS  # 10 steps per epoch: 100 passes, not the spec's 3
    assert trainee.plan.details["headEpochs"] == 100 and trainee.threads == 1
    loop = Loop(ctx, trainee, Progress(), policy=EvalPolicy.of(ctx.spec), checkpointer=None)
    loop.run()
    assert loop.state.step == HEAD_MIN_STEPS
    final = loop.state.history[-1]
    export_model(trainee, inputs, tmp_path / "export", lora_merge=False)
    probe = features.load_probe(tmp_path / "export" / "model")
    rows = [line.rstrip("\n").split("\t", 1) for line in (SST2 / "dev.tsv").read_text().splitlines()[1:65]]
    batch = inputs.tokenizer([s for _, s in rows], truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = probe(**batch).argmax(-1)
    accuracy = float((predicted == torch.tensor([int(label) for label, _ in rows])).float().mean())
    assert accuracy == pytest.approx(final["eval_accuracy"])
