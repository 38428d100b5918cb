"""Strategies on tiny BERT / DistilBERT / GPT-2: frozen really frozen, trainable counts right, gradual schedule.

These run the real optimizer groups and LR schedule in-process (no Ray) for a few steps and compare every weight
before and after, so "frozen" means bit-identical, not merely requires_grad=False.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_trainer import strategies
from finetune_trainer.errors import InvalidSpecError
from finetune_trainer.spec import MethodSpec, Strategy, Task
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

BLOCKS = {"bert": "bert.encoder.layer", "distilbert": "distilbert.transformer.layer", "gpt2": "transformer.h"}
HEAD = {"bert": ["classifier"], "distilbert": ["pre_classifier", "classifier"], "gpt2": ["score"]}


def load(models: dict[str, Path], arch: str, task: Task = Task.SEQUENCE_CLASSIFICATION) -> nn.Module:
    torch.manual_seed(0)
    if task is Task.CAUSAL_LM:
        model: nn.Module = AutoModelForCausalLM.from_pretrained(models[arch])
    else:
        model = AutoModelForSequenceClassification.from_pretrained(models[arch], num_labels=2)
        model.config.pad_token_id = model.config.eos_token_id if arch == "gpt2" else 0
    return model


def train_steps(model: nn.Module, plan: strategies.StrategyPlan, *, steps: int, epoch: int = 0) -> None:
    groups, owners = strategies.optimizer_groups(model, plan=plan, learning_rate=1e-2, weight_decay=0.01)
    optimizer = torch.optim.AdamW(groups)
    lambdas = strategies.lr_lambdas(plan=plan, owners=owners, total_steps=100, warmup_steps=0, steps_per_epoch=1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    for _ in range(epoch):  # advance the schedule to the wanted epoch (steps_per_epoch=1)
        scheduler.step()
    model.train()
    for _ in range(steps):
        ids = torch.randint(5, 300, (4, 12))
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 0, 1]))
        out.loss.backward()
        if plan.strategy is Strategy.GRADUAL:
            strategies.drop_frozen_grads(optimizer, plan=plan, owners=owners, epoch=epoch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    after = {n: p.detach() for n, p in model.named_parameters()}
    return {n for n, t in before.items() if not torch.equal(t, after[n])}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2"])
def test_layout_finds_blocks_and_head(tiny_models: dict[str, Path], arch: str) -> None:
    model = load(tiny_models, arch)
    layout = strategies.find_layout(model)
    assert layout.block_path == BLOCKS[arch]
    assert len(layout.blocks) == 2
    assert layout.embeddings and all("emb" in n or "wte" in n or "wpe" in n for n in layout.embeddings)
    assert strategies.head_modules(model) == HEAD[arch]
    for head in HEAD[arch]:
        assert any(n.startswith(head + ".") for n in layout.top)


CASES: list[tuple[str, dict[str, Any]]] = [
    ("head", {"strategy": "head"}),
    ("top-layers", {"strategy": "top-layers", "unfreezeLayers": 1}),
    ("full", {"strategy": "full"}),
]


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2"])
@pytest.mark.parametrize(("name", "method"), CASES, ids=[c[0] for c in CASES])
def test_frozen_parameters_stay_bit_identical(
    tiny_models: dict[str, Path], arch: str, name: str, method: dict[str, Any]
) -> None:
    model = load(tiny_models, arch)
    layout = strategies.find_layout(model)
    model, plan = strategies.apply_strategy(
        model, method=MethodSpec.model_validate(method), task=Task.SEQUENCE_CLASSIFICATION, epochs=1
    )
    expected = {
        "head": set(layout.top),
        "top-layers": set(layout.top) | set(layout.blocks[-1]),
        "full": {n for n, _ in model.named_parameters()},
    }[name]
    params = dict(model.named_parameters())
    assert plan.trainable_parameters == sum(params[n].numel() for n in expected)
    assert plan.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = snapshot(model)
    train_steps(model, plan, steps=2)
    moved = changed(before, model)
    assert moved <= expected, sorted(moved - expected)[:5]
    assert moved, "nothing trained"
    assert any(n in moved for n in layout.top)


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2"])
def test_lora_trains_only_adapters_and_the_new_head(tiny_models: dict[str, Path], arch: str) -> None:
    model = load(tiny_models, arch)
    model, plan = strategies.apply_strategy(
        model, method=MethodSpec(strategy=Strategy.LORA), task=Task.SEQUENCE_CLASSIFICATION, epochs=1
    )
    assert plan.details["targetModules"] == strategies.LORA_TARGETS[arch if arch != "bert" else "bert"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        "lora_" in n or any(f".{h}." in n or n.startswith(h) for h in HEAD[arch]) or "modules_to_save" in n
        for n in trainable
    )
    before = snapshot(model)
    train_steps(model, plan, steps=2)
    assert changed(before, model) <= trainable


def test_lora_causal_lm_keeps_tied_embeddings_frozen(tiny_models: dict[str, Path]) -> None:
    model = load(tiny_models, "gpt2", Task.CAUSAL_LM)
    model, plan = strategies.apply_strategy(
        model, method=MethodSpec(strategy=Strategy.LORA), task=Task.CAUSAL_LM, epochs=1
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert plan.details["modulesToSave"] == []


def test_gradual_schedule_unfreezes_top_down_with_discriminative_rates(tiny_models: dict[str, Path]) -> None:
    model = load(tiny_models, "bert")
    layout = strategies.find_layout(model)
    method = MethodSpec.model_validate({"strategy": "gradual", "gradual": {"layersPerEpoch": 1, "lrDecay": 2.0}})
    model, plan = strategies.apply_strategy(model, method=method, task=Task.SEQUENCE_CLASSIFICATION, epochs=2)
    assert [g.name for g in plan.groups] == ["top", "block1", "block0", "embeddings"]
    assert [g.unfreeze_epoch for g in plan.groups] == [0, 1, 2, 3]
    assert [g.lr_scale for g in plan.groups] == [1.0, 0.5, 0.25, 0.125]
    # every parameter requires grad from the start (DDP-safe); 2 epochs => only top + block1 ever train
    assert all(p.requires_grad for p in model.parameters())
    params = dict(model.named_parameters())
    assert plan.trainable_parameters == sum(params[n].numel() for n in layout.top + layout.blocks[1])

    groups, owners = strategies.optimizer_groups(model, plan=plan, learning_rate=1.0, weight_decay=0.0)
    lambdas = strategies.lr_lambdas(plan=plan, owners=owners, total_steps=40, warmup_steps=0, steps_per_epoch=10)
    lrs_at = {
        epoch: {plan.groups[o].name: round(groups[i]["lr"] * lambdas[i](epoch * 10), 4) for i, o in enumerate(owners)}
        for epoch in range(4)
    }
    assert lrs_at[0] == {"top": 1.0, "block1": 0.0, "block0": 0.0, "embeddings": 0.0}
    assert lrs_at[1] == {"top": 0.75, "block1": 0.375, "block0": 0.0, "embeddings": 0.0}
    assert lrs_at[3]["embeddings"] == round(0.125 * 0.25, 4)

    for epoch, moving in ((0, {"top"}), (1, {"top", "block1"})):
        before = snapshot(model)
        train_steps(model, plan, steps=2, epoch=epoch)
        moved = changed(before, model)
        allowed = {n for g in plan.groups if g.name in moving for n in g.params}
        assert moved <= allowed and moved & set(layout.top)
        if "block1" in moving:
            assert moved & set(layout.blocks[1])


def test_bad_strategy_settings_are_invalid_spec(tiny_models: dict[str, Path]) -> None:
    model = load(tiny_models, "bert")
    with pytest.raises(InvalidSpecError, match="unfreezeLayers"):
        strategies.apply_strategy(
            model, method=MethodSpec.model_validate({"strategy": "top-layers", "unfreezeLayers": 5}),
            task=Task.SEQUENCE_CLASSIFICATION, epochs=1,
        )  # fmt: skip
    with pytest.raises(InvalidSpecError, match="targetModules"):
        strategies.lora_targets(model, override=["no_such_module"])
