"""Full-data figure (not in CI, not in `make bench`): all-MiniLM-L6-v2 `full` on the whole SST-2 train split.

The repository ships only the quick-start subset (examples/data/sst2); the whole split (67,349 rows) must be given
with --sst2-dir (default: $SST2_FULL_DIR, else ../shared/datasets/sst2 next to this checkout or, from a git worktree,
next to its main checkout, where the development machine keeps it). The script says which files it read, and
refuses to run (exit 2, saying so) when the full split is absent or a file has fewer rows than the full split;
`--check` only says which data it would read. It trains through `finetune run`'s code path
(local Ray, 1 worker with every CPU), evaluates on the 872-row dev set every --eval-every steps, checkpoints
(a rerun with the same --output resumes), and prints dev accuracy and wall time as one JSON line at the end.
Published small-model references on the SST-2 dev set: MiniLM-L6-H384 91.3, DistilBERT 91.3.

    HF_HOME=.cache/hf HF_HUB_OFFLINE=1 nohup .venv/bin/python bench/sst2_full.py > sst2_full.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ray
from finetune_trainer.driver import RunOptions, run_training
from finetune_trainer.local import start_local_ray
from finetune_trainer.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
FULL_TRAIN_ROWS = 67_349  # GLUE SST-2 train split


def candidate_dirs() -> list[Path]:
    """$SST2_FULL_DIR, else ../shared/datasets/sst2 next to this checkout or, from a git worktree, next to the
    main checkout (the development machine keeps the split at /work/shared, beside /work/main and /work/wt/*)."""
    if os.environ.get("SST2_FULL_DIR"):
        return [Path(os.environ["SST2_FULL_DIR"])]
    roots = [ROOT]
    common = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--path-format=absolute", "--git-common-dir"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    if common:
        roots.append(Path(common).parent)  # the main checkout of a worktree
    return list(dict.fromkeys(root.parent / "shared" / "datasets" / "sst2" for root in roots))


def default_dir() -> Path:
    dirs = candidate_dirs()
    return next((d for d in dirs if (d / "train.tsv").is_file()), dirs[0])


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sst2-dir", type=Path, default=None, help="directory with the full train.tsv/dev.tsv")
    parser.add_argument("--check", action="store_true", help="only say which data would be read, then exit")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "out" / "sst2-full")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", default="5e-5")
    parser.add_argument("--eval-every", type=int, default=500)
    args = parser.parse_args()
    looked = [args.sst2_dir] if args.sst2_dir is not None else candidate_dirs()
    sst2_dir = args.sst2_dir or default_dir()
    train, dev = sst2_dir / "train.tsv", sst2_dir / "dev.tsv"
    if not train.is_file() or not dev.is_file():
        where = ", ".join(map(str, looked))
        print(f"sst2_full: the full SST-2 split is ABSENT: no train.tsv and dev.tsv in {where} (it is not shipped "
              "in the repository); pass --sst2-dir or set SST2_FULL_DIR", file=sys.stderr)  # fmt: skip
        return 2
    rows = sum(1 for _ in train.open(encoding="utf-8")) - 1
    if rows < FULL_TRAIN_ROWS:
        print(f"sst2_full: {train} has {rows:,} rows, NOT the full split ({FULL_TRAIN_ROWS:,}); point --sst2-dir "
              "or SST2_FULL_DIR at the whole split", file=sys.stderr)  # fmt: skip
        return 2
    if args.check:
        print(f"sst2_full: would read the FULL SST-2 train split {train} ({rows:,} rows) and {dev}")
        return 0
    print(f"sst2_full: reading the FULL SST-2 train split {train} ({rows:,} rows) and {dev}; {uptime()}", flush=True)
    spec = parse_spec(
        {
            "model": {"uri": "hf://sentence-transformers/all-MiniLM-L6-v2"},
            "dataset": {"train": str(train), "validation": str(dev), "textColumn": "sentence"},
            "method": {"strategy": "full"},
            "hyperparameters": {
                "learningRate": args.learning_rate, "epochs": args.epochs, "batchSize": 32, "maxSeqLength": 64,
                "warmupRatio": 0.06, "evalEverySteps": args.eval_every,
            },
            "checkpoint": {"everySteps": args.eval_every, "keep": 1},
        }
    )  # fmt: skip
    cpus = os.cpu_count() or 1
    start_local_ray(num_cpus=cpus, log_to_driver=True)  # as `finetune run`: workers at our priority
    started = time.monotonic()
    try:
        result = run_training(
            spec,
            options=RunOptions(
                run_name="sst2-full", output_uri=str(args.output), workers=1, cpus_per_worker=float(cpus),
                gpus_per_worker=0,
            ),
        )  # fmt: skip
    finally:
        ray.shutdown()
    wall = time.monotonic() - started
    summary = result.summary
    history = json.loads((args.output / "metrics.json").read_text())["history"]
    evals = [h for h in history if "eval_accuracy" in h]
    row = {
        "train_rows": rows,
        "dev_accuracy": summary["final"]["eval_accuracy"],
        "dev_f1": summary["final"]["eval_f1"],
        "steps": summary["steps"],
        "resumed_from_step": summary["resumedFromStep"],
        "wall_seconds": wall,
        "loop_seconds": summary["timing"]["loop"],
        "evals": [(h["step"], round(h["eval_accuracy"], 4)) for h in evals],
        "uptime": uptime(),
    }
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
