"""Final artifacts: model card, curves, file inventory, and manifest.json written last.

Why manifest-last: the output prefix is filled file by file (and in S3 there is no atomic directory rename), so a
reader could see a half-written model. manifest.json is written only after every other file is in place and lists
each with its size and sha256; `read_manifest` / `verify` treat a prefix without it as incomplete. The exit code 0
of the trainer means exactly "the manifest was written".
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: pods and CI have no display
import matplotlib.pyplot as plt

from finetune_trainer import storage
from finetune_trainer.contract import CHECKPOINTS_DIR, CURVES_FILE, MANIFEST
from finetune_trainer.errors import StorageError

MANIFEST_VERSION = 1


def file_entries(local_dir: Path) -> list[dict[str, Any]]:
    """Every file below local_dir with its size and sha256 (computed where the bytes were produced)."""
    return [
        {"path": p.relative_to(local_dir).as_posix(), "size": p.stat().st_size, "sha256": storage.sha256_file(p)}
        for p in sorted(local_dir.rglob("*"))
        if p.is_file()
    ]


def plot_curves(history: list[dict[str, Any]], path: Path, *, metric: str) -> None:
    """Training loss and the eval metric against the optimizer step, as a PNG (matplotlib, Agg backend)."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h[metric]) for h in history if metric in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals, strict=True), "o-", label=metric, color="tab:orange")
        ax2.set_ylabel(metric)
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title("fine-tuning curves")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def model_card(*, name: str, spec: dict[str, Any], summary: dict[str, Any]) -> str:
    """README.md for the output: what was adapted, on what data, how, and how well."""
    model = spec.get("model", {})
    method = spec.get("method", {})
    dataset = spec.get("dataset", {})
    final = summary.get("final", {})
    results = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(final.items()) if isinstance(v, int | float))
    hp = json.dumps(spec.get("hyperparameters", {}), indent=2, sort_keys=True)
    labels = ", ".join(summary.get("labels", [])) or "(causal language modelling)"
    loading = (
        "from peft import AutoPeftModelForSequenceClassification\n"
        "model = AutoPeftModelForSequenceClassification.from_pretrained('adapter')"
        if summary.get("adapter") and not summary.get("merged")
        else "from transformers import AutoModel, AutoTokenizer\n"
        "model = AutoModel.from_pretrained('model')  # or the Auto class of the task"
    )
    return f"""# {name}

Fine-tuned with finetune-operator (Ray Train, {summary.get("workers", 1)} worker(s)).

- **Base model:** `{model.get("uri")}`{f" @ {model['revision']}" if model.get("revision") else ""}
- **Task:** {spec.get("task", "sequence-classification")}
- **Method:** `{method.get("strategy", "lora")}` — trainable parameters {summary.get("trainableParameters", 0):,} of \
{summary.get("totalParameters", 0):,}
- **Data:** train `{dataset.get("train")}` ({summary.get("trainSamples", 0):,} examples), validation \
`{dataset.get("validation") or f"{dataset.get('validationSplit', 0.1)} of train"}` ({summary.get("evalSamples", 0):,} \
examples)
- **Labels:** {labels}
- **Steps:** {summary.get("steps", 0)} optimizer steps, {summary.get("epochs", 0):.2f} epochs, \
{summary.get("wallSeconds", 0):.0f} s; resumed from step {summary.get("resumedFromStep", 0)}

## Results (validation)

| metric | value |
|---|---|
{results}

![curves]({CURVES_FILE})

## Hyperparameters

```json
{hp}
```

## Loading

```python
{loading}
```
"""


def write_manifest(output: storage.Location, *, files: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    """Check every listed file is stored with its size, then write manifest.json (the completion marker)."""
    stored = storage.list_files(output)
    problems = [
        f"{f['path']} (expected {f['size']} bytes, found {stored.get(f['path'])})"
        for f in files
        if stored.get(f["path"]) != f["size"]
    ]
    if problems:
        raise StorageError(f"artifacts under {output.uri} are incomplete: {', '.join(problems)}")
    manifest = {
        "version": MANIFEST_VERSION,
        "complete": True,
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": run,
        "files": sorted(files, key=lambda f: str(f["path"])),
    }
    storage.write_bytes(output.child(MANIFEST), json.dumps(manifest, indent=2).encode())
    return manifest


def read_manifest(output: storage.Location) -> dict[str, Any] | None:
    """The manifest, or None when the prefix is incomplete (no manifest yet)."""
    try:
        data = storage.read_bytes(output.child(MANIFEST))
    except FileNotFoundError:
        return None
    manifest: dict[str, Any] = json.loads(data)
    return manifest


def verify(output: storage.Location) -> list[str]:
    """Problems with a finished output (empty list = complete and intact): missing manifest, size or hash mismatch."""
    manifest = read_manifest(output)
    if manifest is None:
        return [f"{output.uri} has no {MANIFEST}: incomplete"]
    stored = storage.list_files(output)
    problems = []
    for f in manifest["files"]:
        if stored.get(f["path"]) != f["size"]:
            problems.append(f"{f['path']}: size {stored.get(f['path'])} != {f['size']}")
        elif storage.sha256_location(output.child(f["path"])) != f["sha256"]:
            problems.append(f"{f['path']}: sha256 mismatch")
    listed = {f["path"] for f in manifest["files"]} | {MANIFEST}
    extra = [p for p in stored if p not in listed and not p.startswith(CHECKPOINTS_DIR + "/")]
    problems += [f"{p}: not in the manifest" for p in extra]
    return problems
