"""Pure pieces behind issue 11: per-task batching, metrics, pooling choice, the verdict (baseline and gate), the
spec rules per task, transient-error classification, the progress board's attempt timeline, the new gauges, the
driver log, and replacing an earlier run's artifacts. Table-driven where the rule is a table.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_trainer import artifacts, evaluation, features, storage
from finetune_trainer.contract import MANIFEST, Metric, TrainerReport, parse_report
from finetune_trainer.driverlog import DriverLog
from finetune_trainer.hfcache import packaged_model_dir
from finetune_trainer.metrics import TrainerMetrics
from finetune_trainer.progress import ProgressBoard
from finetune_trainer.spec import Pooling, SpecError, Task, parse_spec
from prometheus_client import generate_latest


# ---- item 8: labels are shaped by the task, never guessed from lengths ----
@dataclass(frozen=True)
class CollateCase:
    name: str
    task: Task
    batch: list[dict[str, list[int]]]
    labels: list[Any]


COLLATE = [
    CollateCase(
        "classification, first example one token (GPT-2/Qwen add no BOS)",
        Task.SEQUENCE_CLASSIFICATION,
        [{"input_ids": [7], "labels": [1]}, {"input_ids": [7, 8, 9], "labels": [0]}],
        [1, 0],
    ),
    CollateCase(
        "classification, every example one token",
        Task.SEQUENCE_CLASSIFICATION,
        [{"input_ids": [7], "labels": [1]}, {"input_ids": [8], "labels": [0]}],
        [1, 0],
    ),
    CollateCase(
        "causal LM, first example one token: labels padded per token",
        Task.CAUSAL_LM,
        [{"input_ids": [7], "labels": [7]}, {"input_ids": [7, 8, 9], "labels": [7, 8, 9]}],
        [[7, -100, -100], [7, 8, 9]],
    ),
]


@pytest.mark.parametrize("case", COLLATE, ids=lambda c: c.name)
def test_collate_shapes_labels_by_task(case: CollateCase) -> None:
    batch = features.make_collate(0, task=case.task)(case.batch)
    assert batch["labels"].tolist() == case.labels


# ---- item 8: macro-F1 over the classes that occur ----
@dataclass(frozen=True)
class F1Case:
    name: str
    confusion: list[list[float]]
    f1: float
    accuracy: float


F1 = [
    F1Case("perfect on 2 of 3 classes, class 2 absent", [[5, 0, 0], [0, 5, 0], [0, 0, 0]], 1.0, 1.0),
    F1Case("absent class predicted once counts as 0", [[4, 0, 1], [0, 5, 0], [0, 0, 0]], (8 / 9 + 1 + 0) / 3, 0.9),
    F1Case("binary, one mistake", [[4, 1], [0, 5]], (2 * 0.8 / 1.8 + 2 * 5 / 6 / (1 + 5 / 6)) / 2, 0.9),
]


@pytest.mark.parametrize("case", F1, ids=lambda c: c.name)
def test_macro_f1_averages_over_classes_that_occur(case: F1Case) -> None:
    confusion = torch.tensor(case.confusion, dtype=torch.float64)
    metrics = evaluation.classification_metrics(confusion, loss_sum=1.0, count=float(confusion.sum()))
    assert metrics["eval_f1"] == pytest.approx(case.f1)
    assert metrics["eval_accuracy"] == pytest.approx(case.accuracy)


# ---- item 8: earlyStopping.metric and output.minMetric are validated per task ----
@dataclass(frozen=True)
class SpecCase:
    name: str
    spec: dict[str, Any]
    error: str | None = None  # the field path the error names
    watched: str | None = None


BASE: dict[str, Any] = {"model": {"uri": "/m"}, "dataset": {"train": "t.csv"}}
LM: dict[str, Any] = {**BASE, "task": "causal-lm", "method": {"strategy": "lora"}}
SPECS = [
    SpecCase("classification default", BASE, watched="eval_accuracy"),
    SpecCase("causal-lm default is eval_loss", {**LM, "hyperparameters": {"earlyStopping": {"patience": 2}}},
             watched="eval_loss"),
    SpecCase("causal-lm cannot watch accuracy",
             {**LM, "hyperparameters": {"earlyStopping": {"metric": "eval_accuracy"}}},
             error="spec.hyperparameters.earlyStopping.metric"),
    SpecCase("classification cannot watch perplexity",
             {**BASE, "hyperparameters": {"earlyStopping": {"metric": "eval_perplexity"}}},
             error="spec.hyperparameters.earlyStopping.metric"),
    SpecCase("unknown metric name", {**BASE, "hyperparameters": {"earlyStopping": {"metric": "eval_auc"}}},
             error="spec.hyperparameters.earlyStopping.metric"),
    SpecCase("f1 for classification", {**BASE, "hyperparameters": {"earlyStopping": {"metric": "eval_f1"}}},
             watched="eval_f1"),
    SpecCase("gate on a metric the task lacks", {**LM, "output": {"minMetric": {"eval_accuracy": 0.8}}},
             error="spec.output.minMetric"),
    SpecCase("gate value as a string", {**BASE, "output": {"minMetric": {"eval_accuracy": "0.85"}}},
             watched="eval_accuracy"),
    SpecCase("pooling without a probe", {**BASE, "method": {"strategy": "full", "pooling": "mean"}},
             error="spec.method.pooling"),
    SpecCase("pooling for the probe baseline",
             {**BASE, "method": {"strategy": "full", "pooling": "mean"}, "evaluation": {"baseline": "probe"}},
             watched="eval_accuracy"),
    SpecCase("headEpochs without a probe", {**BASE, "method": {"strategy": "full", "headEpochs": 10}},
             error="spec.method.headEpochs"),
    SpecCase("headEpochs for the probe baseline",
             {**BASE, "method": {"strategy": "full", "headEpochs": 10}, "evaluation": {"baseline": "probe"}},
             watched="eval_accuracy"),
    SpecCase("probe baseline of a head job", {**BASE, "method": {"strategy": "head"},
                                              "evaluation": {"baseline": "probe"}}, error="spec.evaluation.baseline"),
    SpecCase("probe baseline for causal-lm", {**LM, "evaluation": {"baseline": "probe"}},
             error="spec.evaluation.baseline"),
    SpecCase("negative minGain", {**BASE, "evaluation": {"baseline": "scratch", "minGain": -0.1}},
             error="spec.evaluation.minGain"),
]  # fmt: skip


@pytest.mark.parametrize("case", SPECS, ids=lambda c: c.name)
def test_spec_rules_per_task(case: SpecCase) -> None:
    if case.error is None:
        assert parse_spec(case.spec).watched_metric == case.watched
        return
    with pytest.raises(SpecError) as info:
        parse_spec(case.spec)
    assert case.error in [path for path, _ in info.value.errors], info.value.errors


# ---- item 2: auto pooling asks the checkpoint ----
def test_auto_pooling_follows_the_checkpoint(tmp_path: Path) -> None:
    assert (
        features.resolve_pooling(Pooling.AUTO, model_dir=packaged_model_dir()) is Pooling.MEAN
    )  # sentence-transformers
    assert features.resolve_pooling(Pooling.AUTO, model_dir=tmp_path) is Pooling.CLS  # a plain checkpoint
    assert features.resolve_pooling(Pooling.CLS, model_dir=packaged_model_dir()) is Pooling.CLS  # explicit wins


def test_pooling_reads_real_tokens_only() -> None:
    hidden = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [4.0], [6.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert features.pool(hidden, mask, pooling=Pooling.MEAN, first_token=True).flatten().tolist() == [2.0, 4.0]
    assert features.pool(hidden, mask, pooling=Pooling.CLS, first_token=True).flatten().tolist() == [1.0, 2.0]
    assert features.pool(hidden, mask, pooling=Pooling.CLS, first_token=False).flatten().tolist() == [3.0, 6.0]


# ---- items 9 and 10: the verdict ----
@dataclass(frozen=True)
class VerdictCase:
    name: str
    metrics: dict[str, float]
    metric: str
    baseline: float | None
    min_gain: float
    gate: dict[str, float] | None
    negative: bool | None
    misses: list[str] = field(default_factory=list)


VERDICTS = [
    VerdictCase("no baseline, no gate", {"eval_accuracy": 0.8}, "eval_accuracy", None, 0.0, None, None),
    VerdictCase("beats the baseline", {"eval_accuracy": 0.8}, "eval_accuracy", 0.6, 0.1, None, False),
    VerdictCase("beats it by less than minGain", {"eval_accuracy": 0.8}, "eval_accuracy", 0.75, 0.1, None, True),
    VerdictCase("loss: lower is better", {"eval_loss": 0.5}, "eval_loss", 0.7, 0.1, None, False),
    VerdictCase("loss: worse than the baseline", {"eval_loss": 0.9}, "eval_loss", 0.7, 0.0, None, True),
    VerdictCase("gate met exactly", {"eval_accuracy": 0.85}, "eval_accuracy", None, 0.0, {"eval_accuracy": 0.85},
                None),
    VerdictCase("gate missed, both numbers", {"eval_accuracy": 0.8}, "eval_accuracy", None, 0.0,
                {"eval_accuracy": 0.85}, None, ["eval_accuracy = 0.8000, required at least 0.85"]),
    VerdictCase("loss gate is a ceiling", {"eval_loss": 0.5, "eval_accuracy": 0.9}, "eval_accuracy", None, 0.0,
                {"eval_loss": 0.4}, None, ["eval_loss = 0.5000, required at most 0.4"]),
]  # fmt: skip


@pytest.mark.parametrize("case", VERDICTS, ids=lambda c: c.name)
def test_verdict(case: VerdictCase) -> None:
    verdict = evaluation.judge(
        case.metrics, metric=case.metric, baseline=case.baseline, min_gain=case.min_gain, min_metric=case.gate
    )
    assert verdict.negative_transfer is case.negative
    assert list(verdict.gate_failures) == case.misses


# ---- item 5: which storage errors are blips ----
@pytest.mark.parametrize(
    ("message", "transient"),
    [
        ("AWS Error UNKNOWN (HTTP status 503) during HeadObject operation", True),
        ("AWS Error UNKNOWN (HTTP status 429) during GetObject operation", True),
        ("AWS Error SLOW_DOWN during PutObject operation", True),
        ("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 56, Recv failure", True),
        ("curlCode: 28, Timeout was reached", True),
        ("AWS Error ACCESS_DENIED during HeadObject operation: No response body.", False),
        ("AWS Error NO_SUCH_BUCKET during ListObjectsV2", False),
        ("AWS Error UNKNOWN (HTTP status 404) during HeadObject operation", False),
    ],
)
def test_transient_storage_errors(message: str, transient: bool) -> None:
    assert storage.is_transient(OSError(message)) is transient


def test_retry_backoff_doubles_up_to_the_cap() -> None:
    policy = storage.RetryPolicy(attempts=6, first_delay=1.0, max_delay=8.0)
    assert [policy.delay(a) for a in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 8.0]


# ---- contract: the attempt's timeline and the latest checkpoint ----
def test_board_keeps_the_attempts_first_timeline_values() -> None:
    board = ProgressBoard()
    board.update({"model_loaded_time": 100.0, "first_step_time": 110.0, "step": 1})
    board.update({"model_loaded_time": 200.0, "first_step_time": 210.0, "step": 2})  # a restarted worker group
    snap = board.snapshot()
    assert (snap["model_loaded_time"], snap["first_step_time"], snap["step"]) == (100.0, 110.0, 2)


def test_new_gauges_watched_metric_timeline_and_one_checkpoint_series() -> None:
    metrics = TrainerMetrics()
    metrics.update({"eval_metric_name": "eval_f1", "eval": {"eval_f1": 0.7, "eval_loss": 0.4}})
    metrics.update({"model_loaded_time": 100.0, "first_step_time": 110.0})
    metrics.update({"checkpoint_uri": "s3://b/out/checkpoints/r/checkpoint_step_00000005", "last_checkpoint_step": 5})
    metrics.update({"checkpoint_uri": "s3://b/out/checkpoints/r/checkpoint_step_00000010", "last_checkpoint_step": 10})
    text = generate_latest(metrics.registry).decode()
    assert f'{Metric.WATCHED_METRIC.value}{{metric="eval_f1"}} 0.7' in text
    assert f"{Metric.MODEL_LOADED_TIMESTAMP.value} 100.0" in text
    assert f"{Metric.FIRST_STEP_TIMESTAMP.value} 110.0" in text
    series = [line for line in text.splitlines() if line.startswith(Metric.CHECKPOINT_INFO.value + "{")]
    assert series == [f'{Metric.CHECKPOINT_INFO.value}{{uri="s3://b/out/checkpoints/r/checkpoint_step_00000010"}} 10.0']


# ---- contract: the driver log ----
def test_driver_log_captures_output_and_uploads_with_the_report(tmp_path: Path) -> None:
    log = DriverLog(attempt=2)
    log.target(str(tmp_path / "out"), storage_spec=None)
    with log.capture():
        for i in range(30):
            print(f"line {i}")
        print("progress 1%\rprogress 50%\rprogress 100%", file=sys.stderr)
        tail = log.tail()
        report = TrainerReport(reason="TrainingError", message="boom", log_tail=tail, log_uri=log.uri())
        assert log.upload(last_line=report.to_line())
    assert len(tail) == 20 and tail[-1] == "progress 100%" and tail[0] == "line 11"
    assert not log.path.exists()  # the local copy goes away with the capture
    uploaded = (tmp_path / "out" / "logs" / "attempt-2.log").read_text()
    assert uploaded.startswith("line 0\n") and parse_report(uploaded) == report
    assert log.uri() == str(tmp_path / "out" / "logs" / "attempt-2.log")


# ---- item 6: an earlier run's files ----
def test_new_run_invalidates_the_manifest_and_replaces_only_artifacts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for rel in ("adapter/adapter_model.safetensors", "model/config.json", "metrics.json", "notes/mine.txt",
                "checkpoints/r/x", "logs/attempt-1.log", MANIFEST):  # fmt: skip
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("old")
    loc = storage.resolve(str(out), storage=None)
    assert artifacts.invalidate(loc) and not (out / MANIFEST).exists() and not artifacts.invalidate(loc)
    removed = artifacts.remove_stale(loc, keep={"model/config.json", "metrics.json"})
    assert removed == ["adapter/adapter_model.safetensors"]
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert left == ["checkpoints/r/x", "logs/attempt-1.log", "metrics.json", "model/config.json", "notes/mine.txt"]


def test_verify_ignores_logs_written_after_the_manifest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    loc = storage.resolve(str(out), storage=None)
    manifest = artifacts.write_manifest(
        loc, files=artifacts.file_entries(out), run={"name": "x"}, outcome={"rejected": True, "metric": "m"}
    )
    (out / "logs").mkdir()
    (out / "logs" / "attempt-1.log").write_text("log")
    assert artifacts.verify(loc) == []
    assert manifest["status"] == "rejected" and json.loads((out / MANIFEST).read_text())["status"] == "rejected"
