"""Issue 11 on real Ray Train runs with tiny models: early stopping keeps the best model (item 3), `head` is
feature extraction (item 2), decoder classification with one-token examples (item 8), the baseline and negative
transfer (item 9), the quality gate (item 10), a reused output prefix (item 6), and the trainer's side of the
operator contract: the report line on success and failure, the attempt's log, the timeline and checkpoint gauges.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from finetune_trainer import artifacts, cli, storage
from finetune_trainer.contract import MANIFEST, STOP_DRAIN_ENV, SUCCEEDED, ExitCode, Metric, Reason, parse_report
from finetune_trainer.driver import preflight
from finetune_trainer.features import load_probe
from finetune_trainer.metrics import TrainerMetrics
from finetune_trainer.spec import parse_spec
from prometheus_client import generate_latest
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.trainer.conftest import VENV_BIN, RayCluster, TrainerEnv
from tests.trainer.datafiles import job_manifest, sst2_rows, write_table
from tests.trainer.jobs import cls_spec, run
from tests.trainer.test_runs import registered_steps

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def dev_rows(path: Path) -> tuple[list[str], list[int]]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    pairs = [line.split("\t", 1) for line in lines]
    return [s for _, s in pairs], [int(label) for label, _ in pairs]


@torch.no_grad()
def eval_saved(model_dir: Path, dev: Path) -> tuple[float, float]:
    """(eval_loss, eval_accuracy) of a saved sequence-classification model on the dev file."""
    texts, labels = dev_rows(dev)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    batch = tok(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    out = model(**batch, labels=torch.tensor(labels))
    accuracy = float((out.logits.argmax(-1) == torch.tensor(labels)).float().mean())
    return float(out.loss), accuracy


@pytest.mark.timeout(300)
def test_early_stopping_keeps_the_best_evaluation_and_exports_the_timeline(
    ray_cluster: RayCluster, tiny_models: dict[str, Path], sst_data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    spec = cls_spec(
        tiny_models["bert"], sst_data, strategy="full",
        hyperparameters={"learningRate": "2e-2", "epochs": 20, "maxSteps": 80, "batchSize": 8, "evalEverySteps": 2,
                         "warmupRatio": 0.0, "earlyStopping": {"patience": 3, "metric": "eval_loss"}},
        checkpoint={"everySteps": 4, "keep": 2},
    )  # fmt: skip
    metrics = TrainerMetrics()
    result = run(spec, out, metrics=metrics, poll_seconds=0.2)
    summary = json.loads((out / "metrics.json").read_text())
    evals = [h for h in summary["history"] if "eval_loss" in h]
    best = min(evals, key=lambda h: h["eval_loss"])
    assert summary["stoppedEarly"] and summary["steps"] < 80
    assert summary["keptStep"] == best["step"] < summary["steps"]  # not the model `patience` evaluations later
    assert "early stopping" in summary["keptReason"] and f"kept step {best['step']}" in summary["keptReason"]
    assert summary["final"]["eval_loss"] == pytest.approx(best["eval_loss"])
    # the published weights are the best evaluation's: re-evaluating them reproduces its numbers
    loss, accuracy = eval_saved(out / "model", sst_data["tsv_dev"])
    assert loss == pytest.approx(best["eval_loss"], abs=1e-4)
    assert accuracy == pytest.approx(best["eval_accuracy"])
    assert f"step {best['step']}" in (out / "README.md").read_text()
    assert result.outcome["keptStep"] == best["step"] and result.outcome["metric"] == "eval_loss"
    # timeline and latest-checkpoint gauges
    text = generate_latest(metrics.registry).decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line[:1] != "#"}
    loaded, first = values[Metric.MODEL_LOADED_TIMESTAMP.value], values[Metric.FIRST_STEP_TIMESTAMP.value]
    assert time.time() - 300 < loaded <= first
    last_ckpt = max(registered_steps(out / "checkpoints" / "t"))
    uri = str(out / "checkpoints" / "t" / f"checkpoint_step_{last_ckpt:08d}")
    assert [k for k in values if k.startswith(Metric.CHECKPOINT_INFO.value)] == [
        f'{Metric.CHECKPOINT_INFO.value}{{uri="{uri}"}}'
    ]
    assert values[f'{Metric.WATCHED_METRIC.value}{{metric="eval_loss"}}'] == pytest.approx(best["eval_loss"])


@pytest.mark.timeout(300)
def test_head_trains_a_linear_probe_on_features_extracted_once(
    ray_cluster: RayCluster, tiny_models: dict[str, Path], sst_data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    spec = cls_spec(tiny_models["bert"], sst_data, strategy="head", method={"pooling": "mean", "headEpochs": 30})
    result = run(spec, out, workers=2)
    details = result.summary["strategyDetails"]
    assert details["featureExtraction"] and details["pooling"] == "mean" and details["headEpochs"] == 30
    assert result.summary["trainableParameters"] == 32 * 2 + 2  # the linear head only: no pooler, no body
    assert result.summary["steps"] == 30 * 5  # 160 rows / (2 workers x 16) per epoch
    # the body is the pretrained one, unchanged; the head is beside it; loading them reproduces the accuracy
    before, after = load_file(tiny_models["bert"] / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    probe = load_probe(out / "model")
    texts, labels = dev_rows(sst_data["tsv_dev"])
    tok = AutoTokenizer.from_pretrained(out / "model")
    with torch.no_grad():
        logits = probe(**tok(texts, truncation=True, max_length=32, padding=True, return_tensors="pt"))
    accuracy = float((logits.argmax(-1) == torch.tensor(labels)).float().mean())
    assert accuracy == pytest.approx(result.summary["final"]["eval_accuracy"])
    assert "classifier.safetensors" in (out / "README.md").read_text()


@pytest.mark.timeout(300)
def test_decoder_classification_with_a_one_token_first_example(
    ray_cluster: RayCluster, tiny_models: dict[str, Path], sst_data: dict[str, Path], tmp_path: Path,
    trainer_env: TrainerEnv,
) -> None:  # fmt: skip
    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    word = next(w for w in ("the", "a", "it", "good", "bad") if len(tok(w)["input_ids"]) == 1)
    dev = [{"label": 1, "sentence": word}] + [{"label": lab, "sentence": s} for lab, s in sst2_rows("dev", 31)]
    spec = cls_spec("hf://tiny-org/gpt2", sst_data, strategy="full", hyperparameters={"epochs": 1})
    spec["dataset"]["validation"] = str(write_table(tmp_path / "dev.tsv", dev))
    result = run(spec, tmp_path / "out")
    assert 0.0 <= result.summary["final"]["eval_accuracy"] <= 1.0 and result.summary["evalSamples"] == 32


CliRun = Callable[[dict[str, Any]], tuple[int, str, str]]


@pytest.fixture
def cli_run(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> CliRun:
    """`finetune run` in this process (joining the session's Ray): (exit code, stderr, termination message)."""
    term = tmp_path / "term"
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(term))

    def run_job(job: dict[str, Any]) -> tuple[int, str, str]:
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(job))
        code = cli.run_main([str(path), "--no-progress"])
        return code, capsys.readouterr().err, term.read_text()

    return run_job


@pytest.mark.timeout(420)
def test_scratch_baseline_and_negative_transfer_in_the_success_report(
    ray_cluster: RayCluster, tiny_models: dict[str, Path], sst_data: dict[str, Path], tmp_path: Path, cli_run: CliRun
) -> None:
    out = tmp_path / "out"
    spec = cls_spec(tiny_models["bert"], sst_data, strategy="full", output={"uri": str(out)},
                    evaluation={"baseline": "scratch", "minGain": 0.5})  # fmt: skip
    code, err, term = cli_run(job_manifest(name="guarded", spec=spec))
    assert code == ExitCode.SUCCEEDED, err[-3000:]
    report = parse_report(err)
    assert report is not None and err.strip().splitlines()[-1] == term.strip()
    summary = json.loads((out / "metrics.json").read_text())
    baseline = summary["baseline"]
    assert baseline["kind"] == "scratch" and baseline["steps"] == summary["steps"] == 20  # the same budget
    assert len(baseline["history"]) == 2  # evaluated like the model, each epoch
    assert report.reason == SUCCEEDED and report.metric_name == "eval_accuracy" and report.kept_step == 20
    assert report.metric == pytest.approx(summary["final"]["eval_accuracy"])
    assert report.baseline == pytest.approx(baseline["value"])
    assert report.negative_transfer is True  # nothing beats a baseline by 0.5 accuracy here
    assert "negative transfer" in (out / "README.md").read_text()
    # the attempt's log is uploaded after the manifest, ends with the report, and is not an unlisted artifact
    assert report.log_uri == str(out / "logs" / "attempt-1.log")
    assert parse_report((out / "logs" / "attempt-1.log").read_text()) == report
    assert artifacts.verify(storage.resolve(str(out), storage=None)) == []


@pytest.mark.timeout(420)
def test_quality_gate_keeps_the_model_under_rejected(
    ray_cluster: RayCluster, tiny_models: dict[str, Path], sst_data: dict[str, Path], tmp_path: Path, cli_run: CliRun
) -> None:
    out = tmp_path / "out"
    spec = cls_spec(tiny_models["bert"], sst_data, strategy="top-layers", output={"uri": str(out),
                    "minMetric": {"eval_accuracy": 0.99}}, evaluation={"baseline": "probe"},
                    method={"headEpochs": 2})  # fmt: skip
    code, err, term = cli_run(job_manifest(name="gated", spec=spec))
    assert code == ExitCode.QUALITY_GATE_FAILED, err[-3000:]
    report = parse_report(err)
    assert report is not None and report.reason == Reason.QUALITY_GATE_FAILED.value and parse_report(term) == report
    manifest = json.loads((out / MANIFEST).read_text())
    accuracy = manifest["result"]["value"]
    assert f"eval_accuracy = {accuracy:.4f}, required at least 0.99" in report.message
    assert report.metric == pytest.approx(accuracy) and report.baseline is not None
    assert report.log_tail and report.log_uri == str(out / "logs" / "attempt-1.log")
    assert manifest["status"] == "rejected" and manifest["complete"]
    assert all(f["path"].startswith("rejected/") for f in manifest["files"])
    assert not (out / "model").exists() and (out / "rejected" / "model" / "config.json").is_file()
    assert json.loads((out / "rejected" / "metrics.json").read_text())["baseline"]["kind"] == "probe"
    assert "Rejected by the quality gate" in (out / "rejected" / "README.md").read_text()


@pytest.mark.timeout(420)
def test_reused_output_prefix_never_shows_an_old_manifest_or_old_files(
    ray_cluster: RayCluster, tiny_models: dict[str, Path], sst_data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = cls_spec(tiny_models["bert"], sst_data, strategy="lora", hyperparameters={"epochs": 1})
    run(first, out, run_name="first")
    assert (out / "adapter").is_dir() and (out / MANIFEST).is_file()
    second = cls_spec(tiny_models["bert"], sst_data, strategy="head", method={"headEpochs": 1})
    preflight(parse_spec(second), output_uri=str(out), base_dir=None)
    assert not (out / MANIFEST).exists()  # before this run writes anything, the old manifest is gone
    result = run(second, out, run_name="second")
    stored = storage.list_files(storage.resolve(str(out), storage=None))
    published = {p for p in stored if not p.startswith(("checkpoints/", "logs/"))}
    assert not any(p.startswith("adapter/") for p in stored)
    assert published == {f["path"] for f in result.manifest["files"]} | {MANIFEST}
    assert artifacts.verify(storage.resolve(str(out), storage=None)) == []


def train_until_a_checkpoint(
    ray_cluster: RayCluster,
    spec: dict[str, Any],
    tmp_path: Path,
    *,
    name: str,
    attempt: int,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """`finetune train` (as the head pod runs it) on the local Ray cluster, returned once Ray Train has registered
    its first checkpoint; its termination log is <tmp_path>/term."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_manifest(name=name, spec=spec)))
    full_env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(tmp_path / "term"), **(env or {})}
    cmd = [str(VENV_BIN / "finetune"), "train", "--config", str(job), "--attempt", str(attempt), "--metrics-port",
           "0", "--ray-address", ray_cluster.address]  # fmt: skip
    proc = subprocess.Popen(cmd, env=full_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not registered_steps(Path(spec["output"]["uri"]) / "checkpoints" / name):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    return proc


@pytest.mark.timeout(420)
def test_sigterm_reports_interrupted_with_the_log_of_attempt_n(
    ray_cluster: RayCluster, tiny_models: dict[str, Path], sst_data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    spec = cls_spec(
        tiny_models["distilbert"], sst_data, strategy="full", output={"uri": str(out)},
        hyperparameters={"batchSize": 2, "maxSteps": 400, "epochs": 10, "learningRate": "1e-4"},
        checkpoint={"everySteps": 5, "keep": 2},
    )  # fmt: skip
    proc = train_until_a_checkpoint(ray_cluster, spec, tmp_path, name="term-me", attempt=3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.INTERRUPTED, err[-3000:]
    report = parse_report(err)
    assert report is not None and report.reason == Reason.INTERRUPTED.value
    assert err.strip().splitlines()[-1] == (tmp_path / "term").read_text().strip()
    assert report.log_uri == str(out / "logs" / "attempt-3.log") and report.log_tail
    assert "Interrupted" in (out / "logs" / "attempt-3.log").read_text()


@pytest.mark.timeout(420)
def test_sigterm_with_a_drain_budget_checkpoints_the_next_step(
    ray_cluster: RayCluster, tiny_models: dict[str, Path], sst_data: dict[str, Path], tmp_path: Path
) -> None:
    """What the operator's head pod does on suspend/preemption (FINETUNE_STOP_DRAIN_SECONDS): SIGTERM has both
    workers write a checkpoint at their next step, Ray Train registers it, and the driver exits Interrupted."""
    out = tmp_path / "out"
    spec = cls_spec(
        tiny_models["distilbert"], sst_data, strategy="full", output={"uri": str(out)},
        hyperparameters={"batchSize": 2, "maxSteps": 400, "epochs": 10, "learningRate": "1e-4"},
        checkpoint={"everySteps": 20, "keep": 2}, resources={"workers": 2, "cpusPerWorker": "1"},
    )  # fmt: skip
    proc = train_until_a_checkpoint(
        ray_cluster, spec, tmp_path, name="drain-me", attempt=1, env={STOP_DRAIN_ENV: "120"}
    )
    before = max(registered_steps(out / "checkpoints" / "drain-me"))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == ExitCode.INTERRUPTED, err[-3000:]
    report = parse_report(err)
    assert report is not None and report.reason == Reason.INTERRUPTED.value, err[-3000:]
    match = re.search(r"stopped on SIGTERM at step (\d+) after writing a checkpoint", report.message)
    assert match is not None, report.message
    stopped = int(match.group(1))
    registered = registered_steps(out / "checkpoints" / "drain-me")
    print(f"[drain] registered before SIGTERM: step {before}; stopped at step {stopped}; registered {registered}")
    assert stopped > before and max(registered) == stopped, (before, stopped, registered)
