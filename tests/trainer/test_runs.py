"""Real Ray Train runs on tiny models: artifacts and manifest, live metrics, gradual unfreezing under 2-worker DDP,
causal-LM LoRA, resume after the driver is killed, and recovery after a worker process is killed.

All runs share the session's Ray head (fixture `ray_cluster`); the in-process ones use this pytest process as the
driver, the subprocess ones (`finetune run` with RAY_ADDRESS) can be killed like a real driver pod.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml
from finetune_trainer import artifacts, storage
from finetune_trainer.contract import CHECKPOINTS_DIR, MANIFEST, Metric
from finetune_trainer.driver import RunResult
from finetune_trainer.metrics import TrainerMetrics
from peft import AutoPeftModelForSequenceClassification
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests.trainer.conftest import VENV_BIN, RayCluster, TrainerEnv, free_port
from tests.trainer.datafiles import job_manifest
from tests.trainer.jobs import cls_spec, run

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.timeout(240)
def test_lora_run_writes_loadable_artifacts_and_serves_live_metrics(
    ray_cluster: RayCluster, tiny_models: dict[str, Path], sst_data: dict[str, Path], tmp_path: Path
) -> None:
    metrics = TrainerMetrics()
    port = free_port()
    server = metrics.serve(port, addr="127.0.0.1")
    scraped: list[float] = []
    stop = threading.Event()

    def scrape() -> None:
        while not stop.wait(0.3):
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith(Metric.STEP.value + " "):
                    scraped.append(float(line.split()[1]))

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    out = tmp_path / "out"
    spec = cls_spec(tiny_models["bert"], sst_data, strategy="lora", method={"lora": {"r": 4, "merge": True}})
    try:
        result = run(spec, out, workers=2, metrics=metrics, poll_seconds=0.2)
    finally:
        stop.set()
        scraper.join(timeout=5)
        server.shutdown()

    # live: the step gauge was seen advancing while training ran, and ends at the final step
    assert scraped and max(scraped) == result.summary["steps"] == 10  # 160 rows / (2 workers x 16) x 2 epochs
    assert len(set(scraped)) >= 2, scraped
    # complete: manifest last, every file listed with the right hash
    loc = storage.resolve(str(out), storage=None)
    assert artifacts.verify(loc) == []
    manifest = json.loads((out / MANIFEST).read_text())
    listed = {f["path"] for f in manifest["files"]}
    assert {"model/model.safetensors", "adapter/adapter_model.safetensors", "metrics.json", "README.md"} <= listed
    assert "curves.png" in listed and (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["trainableParameters"] == result.summary["trainableParameters"] < summary["totalParameters"] / 10
    # loadable: the merged model and the adapter predict the same labels
    tok = AutoTokenizer.from_pretrained(out / "model")
    merged = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    assert merged.config.id2label == {0: "0", 1: "1"}
    adapted = AutoPeftModelForSequenceClassification.from_pretrained(out / "adapter").eval()
    batch = tok(["a great movie", "a terrible movie"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, adapted(**batch).logits, atol=1e-4)


@pytest.mark.timeout(240)
def test_gradual_unfreezing_under_two_worker_ddp(
    ray_cluster: RayCluster, tiny_models: dict[str, Path], sst_data: dict[str, Path], tmp_path: Path
) -> None:
    """2 blocks, 2 epochs, 1 block per epoch: epoch 0 trains the head only, epoch 1 adds the top block.

    So after the run the embeddings and block 0 must be bit-identical to the pretrained weights, block 1 and the
    head must have moved, and both workers must have agreed (DDP) on the frozen set.
    """
    out = tmp_path / "out"
    spec = cls_spec(
        tiny_models["bert"], sst_data, strategy="gradual", fmt="parquet", method={"gradual": {"lrDecay": 2.0}}
    )
    result = run(spec, out, workers=2)
    before = load_file(tiny_models["bert"] / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")

    def same(prefix: str) -> bool:
        keys = [k for k in before if k.startswith(prefix)]
        assert keys, prefix
        return all(torch.equal(before[k], after["bert." + k] if "bert." + k in after else after[k]) for k in keys)

    assert same("embeddings.")
    assert same("encoder.layer.0.")
    assert not same("encoder.layer.1.")
    assert not same("pooler.")
    schedule = result.summary["strategyDetails"]["schedule"]
    assert [(g["group"], g["unfreezeEpoch"], g["lrScale"]) for g in schedule] == [
        ("top", 0, 1.0),
        ("block1", 1, 0.5),
        ("block0", 2, 0.25),
        ("embeddings", 3, 0.125),
    ]
    assert result.summary["workers"] == 2


@pytest.mark.timeout(240)
def test_causal_lm_lora_on_gpt2(
    ray_cluster: RayCluster, tiny_models: dict[str, Path], tmp_path: Path, trainer_env: TrainerEnv
) -> None:
    texts = tmp_path / "lm.jsonl"
    texts.write_text("".join(json.dumps({"text": f"the film number {i} was good"}) + "\n" for i in range(64)))
    spec = {
        "model": {"uri": "hf://tiny-org/gpt2"},
        "task": "causal-lm",
        "dataset": {"train": str(texts), "validationSplit": 0.25},
        "method": {"strategy": "lora"},
        "hyperparameters": {"learningRate": "1e-2", "epochs": 2, "batchSize": 8, "maxSeqLength": 16},
    }
    out = tmp_path / "out"
    result = run(spec, out)
    history = json.loads((out / "metrics.json").read_text())["history"]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(evals) == 2 and evals[-1] < evals[0]
    assert result.summary["strategyDetails"]["targetModules"] == ["c_attn"]
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    generated = model.generate(**tok("the film", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > 2


def registered_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (its snapshot), not merely started uploading."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        state = json.loads(snapshot.read_text())
    except (OSError, ValueError):
        return []
    return sorted(
        int(r["metrics"]["step"]) for r in state.get("checkpoint_results", []) if not r["metrics"].get("done")
    )


@pytest.mark.timeout(300)
def test_relaunch_after_killed_driver_resumes_from_checkpoint(
    ray_cluster: RayCluster, tiny_models: dict[str, Path], sst_data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    spec = cls_spec(
        tiny_models["distilbert"], sst_data, strategy="full", fmt="csv",
        hyperparameters={"batchSize": 2, "maxSteps": 60, "epochs": 10, "learningRate": "1e-4"},
        checkpoint={"everySteps": 5, "keep": 2},
        output={"uri": str(out)},
    )  # fmt: skip
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_manifest(name="resume-me", spec=spec)))
    env = {**os.environ, **ray_cluster.env(), "FINETUNE_TERMINATION_LOG": str(tmp_path / "term")}
    cmd = [str(VENV_BIN / "finetune"), "run", str(job), "--no-progress"]
    first = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    run_dir = out / CHECKPOINTS_DIR / "resume-me"
    while not registered_steps(run_dir):
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # like a node loss: no cleanup at all
    first.wait(timeout=30)
    assert not (out / MANIFEST).exists()
    killed_at = registered_steps(run_dir)[-1]
    assert killed_at < 60

    second = subprocess.run(
        [*cmd, "--verbose"], check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=200
    )
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 60
    assert summary["resumedFromStep"] >= killed_at > 0  # continued, not restarted
    assert artifacts.verify(storage.resolve(str(out), storage=None)) == []
    assert len(list(run_dir.glob("checkpoint_step_*"))) <= 2  # keep: 2 (the last one is the completion record)


@pytest.mark.timeout(300)
def test_killed_worker_process_is_recovered_from_last_checkpoint(
    ray_cluster: RayCluster, tiny_models: dict[str, Path], sst_data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    spec = cls_spec(
        tiny_models["bert"], sst_data, strategy="top-layers", fmt="jsonl",
        method={"unfreezeLayers": 1},
        hyperparameters={"batchSize": 2, "maxSteps": 60, "epochs": 10, "learningRate": "1e-4"},
        checkpoint={"everySteps": 5, "keep": 3},
    )  # fmt: skip
    snapshots: list[dict[str, Any]] = []
    holder: dict[str, Any] = {}

    def target() -> None:
        try:
            holder["result"] = run(spec, out, max_failures=2, on_progress=snapshots.append, poll_seconds=0.2)
        except BaseException as e:  # surfaced by the assertions below
            holder["result"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    # wait until a checkpoint is registered (reported back after upload) and training went past it
    run_dir = out / CHECKPOINTS_DIR / "t"
    while (
        not (snapshots and registered_steps(run_dir)) or snapshots[-1].get("step", 0) <= registered_steps(run_dir)[-1]
    ):
        assert thread.is_alive(), holder
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.1)
    victim = snapshots[-1]["worker_pid"]
    assert psutil.Process(victim).ppid() in {p.pid for p in psutil.Process(ray_cluster.pid).children(recursive=True)}
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=240)
    result = holder["result"]
    assert isinstance(result, RunResult), result
    assert result.summary["steps"] == 60
    assert result.summary["resumedFromStep"] >= 5
    assert snapshots[-1]["worker_pid"] != victim
    assert artifacts.verify(storage.resolve(str(out), storage=None)) == []
