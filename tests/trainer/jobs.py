"""Job specs and an in-process run for the trainer's real-Ray tests (tiny models, small real data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_trainer.driver import RunOptions, RunResult, run_training
from finetune_trainer.spec import parse_spec


def cls_spec(
    model: Path | str, data: dict[str, Path], *, strategy: str, fmt: str = "tsv", **overrides: Any
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": str(model)},
        "dataset": {
            "train": str(data[f"{fmt}_train"]),
            "validation": str(data[f"{fmt}_dev"]),
            "textColumn": "sentence",
            "labelColumn": "label",
        },
        "method": {"strategy": strategy},
        "hyperparameters": {"learningRate": "5e-3", "epochs": 2, "batchSize": 16, "maxSeqLength": 32},
        "checkpoint": {"everySteps": 5, "keep": 2},
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def run(spec: dict[str, Any], out: Path, *, workers: int = 1, run_name: str = "t", **kwargs: Any) -> RunResult:
    return run_training(
        parse_spec(spec),
        options=RunOptions(
            run_name=run_name, output_uri=str(out), workers=workers, cpus_per_worker=1, gpus_per_worker=0,
            resource_wait_seconds=60, **kwargs,
        ),
    )  # fmt: skip
