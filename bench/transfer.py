"""Transfer-learning benchmark: SST-2 with 1,000 training examples, full dev set, MiniLM.

Runs head / top-layers(2) / gradual / full / lora from pretrained all-MiniLM-L6-v2, `head` once more with CLS
pooling (the pooling comparison docs/benchmarks.md explains), and `full` from the same architecture randomly
initialised, each through `finetune run`'s code path (local Ray, 1 worker), and records dev accuracy, wall time and
trainable parameters. Data: the quick-start subset shipped in examples/data/sst2 (its first 1,000 rows).
Writes bench/out/transfer.md, bench/out/transfer.json and bench/out/transfer.png.

    HF_HOME=.cache/hf HF_HUB_OFFLINE=1 python -m finetune_trainer.hfcache seed
    HF_HOME=.cache/hf HF_HUB_OFFLINE=1 .venv/bin/python bench/transfer.py [--epochs 3] [--only head,lora]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import ray
from finetune_trainer.driver import RunOptions, run_training
from finetune_trainer.hfcache import packaged_model_dir
from finetune_trainer.local import start_local_ray
from finetune_trainer.spec import parse_spec
from transformers import AutoConfig, AutoModel, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT / "examples" / "data" / "sst2"  # the quick-start subset shipped in the repo
OUT = ROOT / "bench" / "out"

# (label, method, learning rate): rates chosen per strategy as usual (frozen bodies tolerate larger rates).
RUNS: list[tuple[str, dict[str, Any], str]] = [
    ("head", {"strategy": "head"}, "1e-3"),  # pooling auto: mean for this sentence-transformers checkpoint
    ("head (pooling: cls)", {"strategy": "head", "pooling": "cls"}, "1e-3"),
    ("top-layers(2)", {"strategy": "top-layers", "unfreezeLayers": 2}, "1e-4"),
    ("gradual", {"strategy": "gradual", "gradual": {"layersPerEpoch": 2, "lrDecay": 2.6}}, "2e-4"),
    ("full", {"strategy": "full"}, "1e-4"),
    ("lora", {"strategy": "lora", "lora": {"r": 8, "alpha": 16, "merge": True}}, "1e-3"),
    ("full (random init)", {"strategy": "full"}, "1e-4"),
]


def random_init_model(target: Path) -> Path:
    """The same architecture and tokenizer as MiniLM, with freshly initialised weights."""
    source = packaged_model_dir()
    config = AutoConfig.from_pretrained(source)
    AutoModel.from_config(config).save_pretrained(target)  # type: ignore[no-untyped-call]
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def write_outputs(rows: list[dict[str, Any]], *, args: argparse.Namespace) -> str:
    """bench/out/transfer.{md,json,png} for the rows so far; returns the table."""
    header = (
        f"SST-2, {args.train_samples} training examples, full dev set (872), {args.epochs} epochs, batch 32, "
        f"maxSeqLength 64, 1 Ray Train worker, {os.cpu_count()} CPU cores; {len(rows)} of {len(selected(args))} "
        f"runs; after the last: {uptime()}\n\n"
        "| method | dev accuracy | dev macro-F1 | wall time (s) | training loop (s) | optimizer steps "
        "| trainable parameters | learning rate | load before (1, 5, 15 min) |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    table = header + "".join(
        f"| {r['method']} | {r['dev_accuracy']:.4f} | {r['dev_f1']:.4f} | {r['wall_seconds']:.0f} | "
        f"{r['loop_seconds']:.1f} | {r['steps']} | "
        f"{r['trainable_parameters']:,} / {r['total_parameters']:,} | {r['learning_rate']} | {r['load_before']} |\n"
        for r in rows
    )
    (OUT / "transfer.md").write_text(table)
    (OUT / "transfer.json").write_text(json.dumps(rows, indent=2))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([r["method"] for r in rows], [r["dev_accuracy"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(i, r["dev_accuracy"] + 0.005, f"{r['dev_accuracy']:.3f}\n{r['wall_seconds']:.0f}s", ha="center")
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("SST-2 dev accuracy")
    ax.set_title(f"MiniLM transfer strategies, {args.train_samples} SST-2 examples (label: accuracy, wall time)")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(OUT / "transfer.png")
    plt.close(fig)
    return table


def selected(args: argparse.Namespace) -> list[tuple[str, dict[str, Any], str]]:
    return [run for run in RUNS if not args.only or run[0] in args.only.split(",")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-samples", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    start_local_ray(num_cpus=os.cpu_count() or 1, log_to_driver=False, attempts=10)  # as `finetune run` starts Ray
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        random_dir = random_init_model(Path(tmp) / "random-minilm")
        table = ""
        for label, method, lr in selected(args):
            model = str(random_dir) if "random" in label else "hf://sentence-transformers/all-MiniLM-L6-v2"
            spec = parse_spec(
                {
                    "model": {"uri": model},
                    "dataset": {
                        "train": str(SST2 / "train.tsv"),
                        "validation": str(SST2 / "dev.tsv"),
                        "textColumn": "sentence",
                        "maxTrainSamples": args.train_samples,
                    },
                    "method": method,
                    "hyperparameters": {
                        "learningRate": lr, "epochs": args.epochs, "batchSize": 32, "maxSeqLength": 64,
                        "warmupRatio": 0.1,
                    },
                    "checkpoint": {"everySteps": 10_000, "keep": 1},
                }
            )  # fmt: skip
            load = uptime()
            started = time.monotonic()
            result = run_training(
                spec,
                options=RunOptions(
                    run_name=f"bench-{len(rows)}", output_uri=str(Path(tmp) / f"out-{len(rows)}"), workers=1,
                    cpus_per_worker=float(os.cpu_count() or 1), gpus_per_worker=0,
                ),
            )  # fmt: skip
            wall = time.monotonic() - started
            final = result.summary["final"]
            row = {
                "method": label,
                "dev_accuracy": final["eval_accuracy"],
                "dev_f1": final["eval_f1"],
                "wall_seconds": wall,
                "loop_seconds": result.summary["timing"]["loop"],
                "steps": result.summary["steps"],
                "trainable_parameters": result.summary["trainableParameters"],
                "total_parameters": result.summary["totalParameters"],
                "learning_rate": lr,
                "load_before": load.split("load average:")[-1].strip(),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            table = write_outputs(rows, args=args)  # after every row: a run cut short still leaves agreeing files
    ray.shutdown()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
