"""`finetune train` asks Ray for exactly the CPUs/GPUs each worker pod advertises (finetune_trainer.shape).

The output is a local directory: with an unreachable `s3://` output the driver log's best-effort upload at exit
waited out its whole 15 s budget (driverlog.UPLOAD_TIMEOUT_S) in every case.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_trainer import cli
from finetune_trainer.driver import RunOptions, RunResult


@pytest.mark.parametrize(
    ("cpus", "gpus", "asked"), [("1.5", 0, 1), ("500m", 0, 1), ("4", 0, 4), ("2500m", 1, 2)], ids=str
)
def test_train_waits_for_the_worker_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpus: str, gpus: int, asked: int
) -> None:
    seen: list[RunOptions] = []

    def run_training(_spec: Any, *, options: RunOptions) -> RunResult:
        seen.append(options)
        return RunResult(output_uri="s3://o/x/", summary={}, manifest={"files": []})

    monkeypatch.setattr(cli, "preflight", lambda *_a, **_k: None)
    monkeypatch.setattr(cli.ray, "init", lambda *_a, **_k: None)
    monkeypatch.setattr(cli.ray, "shutdown", lambda *_a, **_k: None)
    monkeypatch.setattr(cli, "run_training", run_training)
    job = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j"},
        "spec": {
            "model": {"uri": "hf://o/m"},
            "dataset": {"train": "s3://d/t.csv"},
            "output": {"uri": str(tmp_path / "out")},
            "resources": {"workers": 2, "cpusPerWorker": cpus, "gpusPerWorker": gpus},
        },
    }
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job), encoding="utf-8")
    assert cli.train_main(["--config", str(config), "--metrics-port", "0"]) == 0
    assert (seen[0].cpus_per_worker, seen[0].gpus_per_worker, seen[0].workers) == (asked, gpus, 2)
