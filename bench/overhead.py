"""Ray Train overhead: samples/s of the same model and data through Ray Train (1 worker) and through a plain
in-process Hugging Face `Trainer`, and their ratio, in one run.

Both sides train all-MiniLM-L6-v2 (full fine-tuning, fp32, batch 32, maxSeqLength 64) on the same SST-2 rows for
the same number of optimizer steps, with the same torch thread count. Throughput is measured on the training
steps only (the Ray side reports it from the rank-0 worker; the HF side from the Trainer's train_samples_per_second),
so start-up costs are reported separately as wall time.

    HF_HOME=.cache/hf HF_HUB_OFFLINE=1 .venv/bin/python bench/overhead.py [--samples 640]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from finetune_trainer import sources
from finetune_trainer.data import prepare
from finetune_trainer.driver import RunOptions, run_training
from finetune_trainer.spec import parse_spec
from finetune_trainer.train_loop import encode, make_collate
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT / "examples" / "data" / "sst2"  # the quick-start subset shipped in the repo
MODEL = "hf://sentence-transformers/all-MiniLM-L6-v2"


def spec_for(samples: int) -> Any:
    return parse_spec(
        {
            "model": {"uri": MODEL},
            "dataset": {
                "train": str(SST2 / "train.tsv"),
                "validation": str(SST2 / "dev.tsv"),
                "textColumn": "sentence",
                "maxTrainSamples": samples,
                "maxEvalSamples": 64,
            },
            "method": {"strategy": "full"},
            "hyperparameters": {"learningRate": "1e-4", "epochs": 1, "batchSize": 32, "maxSeqLength": 64},
            "checkpoint": {"everySteps": 100_000, "keep": 1},
        }
    )


def hf_trainer(samples: int, threads: int) -> dict[str, float]:
    """The same data pipeline (our tokenisation and padding) through transformers.Trainer, in this process."""
    torch.set_num_threads(threads)
    spec = spec_for(samples)
    data = prepare(spec)
    model_dir = sources.resolve_model(spec.model, storage_spec=None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    feats = encode(tok, data.train, task=spec.task, max_length=64)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=32, num_train_epochs=1, learning_rate=1e-4,
            report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
            seed=42,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=feats, data_collator=make_collate(tok.pad_token_id))
        started = time.monotonic()
        out = trainer.train()
        wall = time.monotonic() - started
    return {"samples_per_second": float(out.metrics["train_samples_per_second"]), "train_wall_seconds": wall}


def ray_train(samples: int, threads: int) -> dict[str, float]:
    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    rates: list[float] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            result = run_training(
                spec_for(samples),
                options=RunOptions(
                    run_name="overhead", output_uri=tmp, workers=1, cpus_per_worker=threads, gpus_per_worker=0,
                    on_progress=lambda snap: rates.append(float(snap.get("samples_per_second") or 0.0)),
                ),
            )  # fmt: skip
            wall = time.monotonic() - started
    finally:
        ray.shutdown()
    steps = int(result.summary["steps"])
    train_seconds = float(result.summary["wallSeconds"])
    return {
        # whole training loop of the worker (includes its per-epoch eval of 64 rows and the final save)
        "samples_per_second": steps * 32 / train_seconds if train_seconds else 0.0,
        "median_window_samples_per_second": sorted(r for r in rates if r > 0)[len([r for r in rates if r > 0]) // 2]
        if any(r > 0 for r in rates)
        else 0.0,
        "wall_seconds_including_startup": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each side; the best counts")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    # Interleave the two sides (HF, Ray, HF, Ray, ...) so a change in background load hits both alike, and
    # compare like with like: samples over the whole training loop on both sides, best run of each.
    hf_runs, ray_runs = [], []
    for _ in range(args.repeats):
        hf_runs.append(hf_trainer(args.samples, threads))
        ray_runs.append(ray_train(args.samples, threads))
    hf = max(hf_runs, key=lambda r: r["samples_per_second"])
    rt = max(ray_runs, key=lambda r: r["samples_per_second"])
    ratio = rt["samples_per_second"] / hf["samples_per_second"]
    report = {
        "samples": args.samples,
        "threads": threads,
        "hf_trainer_runs": hf_runs,
        "ray_train_runs": ray_runs,
        "ray_over_hf": ratio,
    }
    print(json.dumps(report, indent=2))
    print(
        f"HF Trainer: {hf['samples_per_second']:.1f} samples/s | Ray Train (1 worker): "
        f"{rt['samples_per_second']:.1f} samples/s | ratio Ray/HF = {ratio:.2f} "
        f"(best of {args.repeats} interleaved runs each, whole training loop)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
