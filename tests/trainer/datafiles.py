"""Small real data files for trainer tests: SST-2 subsets written as jsonl / csv / tsv / parquet.

Kept free of torch/transformers imports so the pure unit tests that use it stay fast.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parents[2]
SST2 = REPO_ROOT / "examples" / "data" / "sst2"  # the quick-start subset shipped in the repo


def sst2_rows(split: str, n: int) -> list[tuple[int, str]]:
    """The first n (label, sentence) rows of the real SST-2 split (train/dev)."""
    rows: list[tuple[int, str]] = []
    with (SST2 / f"{split}.tsv").open(encoding="utf-8") as f:
        next(f)
        for line in f:
            label, sentence = line.rstrip("\n").split("\t", 1)
            rows.append((int(label), sentence))
            if len(rows) >= n:
                break
    return rows


def write_table(path: Path, rows: list[dict[str, object]]) -> Path:
    """Write rows in the format named by the extension (.jsonl .csv .tsv .parquet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".")
    columns = list(rows[0]) if rows else ["label", "sentence"]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "tsv":
        path.write_text(
            "\t".join(columns) + "\n" + "".join("\t".join(str(r[c]) for c in columns) + "\n" for r in rows),
            encoding="utf-8",
        )
    else:
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return path


def write_sst_data(root: Path, *, n_train: int = 160, n_dev: int = 64) -> dict[str, Path]:
    """SST-2 subsets in every format: {fmt}_train / {fmt}_dev paths."""
    train = [{"label": lab, "sentence": s} for lab, s in sst2_rows("train", n_train)]
    dev = [{"label": lab, "sentence": s} for lab, s in sst2_rows("dev", n_dev)]
    paths: dict[str, Path] = {}
    for fmt in ("jsonl", "csv", "tsv", "parquet"):
        paths[f"{fmt}_train"] = write_table(root / f"train.{fmt}", train)
        paths[f"{fmt}_dev"] = write_table(root / f"dev.{fmt}", dev)
    return paths


def job_manifest(*, name: str, spec: dict[str, object]) -> dict[str, object]:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}
