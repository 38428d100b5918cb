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
from finetune_trainer.contract import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    CURVES_FILE,
    LOGS_DIR,
    MANIFEST,
    METRICS_FILE,
    MODEL_DIR,
    REJECTED_DIR,
    REPORT_FILE,
)
from finetune_trainer.errors import StorageError

MANIFEST_VERSION = 1
# What a run publishes under its output; a new run replaces exactly these (never checkpoints/ or logs/, never
# anything else a user keeps under the prefix).
ARTIFACT_DIRS = (MODEL_DIR, ADAPTER_DIR, REJECTED_DIR)
ARTIFACT_FILES = (METRICS_FILE, REPORT_FILE, CURVES_FILE)
# Written after the manifest or managed by Ray Train: never listed in it, never reported as extra by verify.
UNLISTED_DIRS = (CHECKPOINTS_DIR, LOGS_DIR)


def file_entries(local_dir: Path) -> list[dict[str, Any]]:
    """Every file below local_dir with its size and sha256 (computed where the bytes were produced)."""
    return [
        {"path": p.relative_to(local_dir).as_posix(), "size": p.stat().st_size, "sha256": storage.sha256_file(p)}
        for p in sorted(local_dir.rglob("*"))
        if p.is_file()
    ]


def plot_curves(
    history: list[dict[str, Any]], path: Path, *, metric: str, summary: dict[str, Any] | None = None
) -> None:
    """Training loss and the eval metric against the optimizer step, the baseline's metric beside it and the kept
    step marked, as a PNG (matplotlib, Agg backend)."""
    summary = summary or {}
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h[metric]) for h in history if metric in h]
    baseline = summary.get("baseline") or {}
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if evals or baseline:
        ax2 = ax.twinx()
        if evals:
            ax2.plot(*zip(*evals, strict=True), "o-", label=metric, color="tab:orange")
        base = [(h["step"], h[metric]) for h in baseline.get("history", []) if metric in h]
        if base:
            ax2.plot(*zip(*base, strict=True), "s--", label=f"{metric} ({baseline['kind']} baseline)", color="gray")
        if summary.get("keptStep") is not None:
            ax2.axvline(
                summary["keptStep"], color="tab:green", linestyle=":", label=f"kept: step {summary['keptStep']}"
            )
        ax2.set_ylabel(metric)
        ax2.legend(loc="upper right", fontsize="small")
    ax.legend(loc="upper left")
    ax.set_title("fine-tuning curves")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def model_card(*, name: str, spec: dict[str, Any], summary: dict[str, Any]) -> str:
    """README.md for the output: what was adapted, on what data, how, how well, which step, against what."""
    model = spec.get("model", {})
    method = spec.get("method", {})
    dataset = spec.get("dataset", {})
    final = summary.get("final", {})
    results = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(final.items()) if isinstance(v, int | float))
    hp = json.dumps(spec.get("hyperparameters", {}), indent=2, sort_keys=True)
    labels = ", ".join(summary.get("labels", [])) or "(causal language modelling)"
    validation = dataset.get("validation") or f"{dataset.get('validationSplit', 0.1)} of train"
    return f"""# {name}

{_status_line(summary)}Fine-tuned with finetune-operator (Ray Train, {summary.get("workers", 1)} worker(s)).

- **Base model:** `{model.get("uri")}`{f" @ {model['revision']}" if model.get("revision") else ""}
- **Task:** {spec.get("task", "sequence-classification")}
- **Method:** `{method.get("strategy", "lora")}` — trainable parameters {summary.get("trainableParameters", 0):,} of \
{summary.get("totalParameters", 0):,}{_pooling_note(summary)}
- **Data:** train `{dataset.get("train")}` ({summary.get("trainSamples", 0):,} examples), validation \
`{validation}` ({summary.get("evalSamples", 0):,} examples)
- **Labels:** {labels}
- **Steps:** {summary.get("steps", 0)} optimizer steps, {summary.get("epochs", 0):.2f} epochs, \
{summary.get("wallSeconds", 0):.0f} s; resumed from step {summary.get("resumedFromStep", 0)}
- **Kept model:** step {summary.get("keptStep", summary.get("steps", 0))}: {summary.get("keptReason", "final step")}

## Results (validation, kept model)

| metric | value |
|---|---|
{results}
{_baseline_section(summary)}
![curves]({CURVES_FILE})

## Hyperparameters

```json
{hp}
```

## Loading

```python
{_loading(summary)}
```
"""


def _status_line(summary: dict[str, Any]) -> str:
    outcome = summary.get("outcome") or {}
    if not outcome.get("rejected"):
        return ""
    misses = "; ".join(outcome.get("gateFailures", []))
    return f"**Rejected by the quality gate (spec.output.minMetric): {misses}. Not published as the job's result.**\n\n"


def _pooling_note(summary: dict[str, Any]) -> str:
    if not summary.get("probe"):
        return ""
    details = summary.get("strategyDetails") or {}
    return (
        f"; feature extraction: the frozen body's {summary.get('pooling')}-pooled outputs, encoded once, feed a "
        f"linear head trained for {details.get('headEpochs', '?')} passes over them on standardised features "
        "(train-set mean and scale, folded into `classifier.safetensors`: a plain linear layer on the pooled outputs)"
    )


def _baseline_section(summary: dict[str, Any]) -> str:
    baseline = summary.get("baseline")
    outcome = summary.get("outcome") or {}
    if not baseline:
        return ""
    metric = baseline["metric"]
    verdict = (
        "**negative transfer**: fine-tuning did not beat the baseline by evaluation.minGain"
        if outcome.get("negativeTransfer")
        else "fine-tuning beat the baseline"
    )
    return f"""
## Baseline (negative-transfer guard)

| model | {metric} | optimizer steps |
|---|---|---|
| this model (kept step {summary.get("keptStep")}) | {outcome.get("value", float("nan")):.4f} | {summary.get("steps")} |
| {baseline["kind"]} baseline | {baseline["value"]:.4f} | {baseline["steps"]} |

Verdict: {verdict}.
"""


def _loading(summary: dict[str, Any]) -> str:
    if summary.get("probe"):
        return (
            "import torch, json\n"
            "from safetensors.torch import load_file\n"
            "from transformers import AutoModel, AutoTokenizer\n"
            "body, tok = AutoModel.from_pretrained('model'), AutoTokenizer.from_pretrained('model')\n"
            "head, cfg = load_file('model/classifier.safetensors'), json.load(open('model/classifier.json'))\n"
            "batch = tok(['a great film'], return_tensors='pt', padding=True)\n"
            "hidden, mask = body(**batch).last_hidden_state, batch['attention_mask'].unsqueeze(-1)\n"
            "pooled = (hidden * mask).sum(1) / mask.sum(1) if cfg['pooling'] == 'mean' else hidden[:, 0]\n"
            "logits = pooled @ head['weight'].T + head['bias']\n"
            "# or: from finetune_trainer.features import load_probe; load_probe(Path('model'))(**batch)"
        )
    if summary.get("adapter") and not summary.get("merged"):
        return (
            "from peft import AutoPeftModelForSequenceClassification\n"
            "model = AutoPeftModelForSequenceClassification.from_pretrained('adapter')"
        )
    return (
        "from transformers import AutoModel, AutoTokenizer\n"
        "model = AutoModel.from_pretrained('model')  # or the Auto class of the task"
    )


def write_manifest(
    output: storage.Location,
    *,
    files: list[dict[str, Any]],
    run: dict[str, Any],
    outcome: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Check every listed file is stored with its size, then write manifest.json (the completion marker).

    `status` is "published" (model/ is the job's result) or "rejected" (the quality gate failed; the files are
    under rejected/). logs/ and checkpoints/ are never listed: they are written after the manifest or by Ray Train.
    """
    stored = storage.list_files(output)
    problems = [
        f"{f['path']} (expected {f['size']} bytes, found {stored.get(f['path'])})"
        for f in files
        if stored.get(f["path"]) != f["size"]
    ]
    if problems:
        raise StorageError(f"artifacts under {output.uri} are incomplete: {', '.join(problems)}")
    outcome = outcome or {}
    manifest = {
        "version": MANIFEST_VERSION,
        "complete": True,
        "status": "rejected" if outcome.get("rejected") else "published",
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": run,
        "result": {k: v for k, v in outcome.items() if k != "keptReason"},
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


def remove_stale(output: storage.Location, *, keep: set[str]) -> list[str]:
    """Delete an earlier run's artifacts that this run does not write (e.g. adapter/ of a former LoRA run), so
    the prefix holds exactly the files the new manifest lists; returns the paths removed."""
    stale = [
        path
        for path in storage.list_files(output)
        if path not in keep and (path in ARTIFACT_FILES or path.split("/", 1)[0] in ARTIFACT_DIRS)
    ]
    for path in stale:
        storage.delete_file(output.child(path))
    return stale


def invalidate(output: storage.Location) -> bool:
    """Delete manifest.json before a run writes anything: an old manifest must never vouch for new files."""
    location = output.child(MANIFEST)
    if not storage.exists(location):
        return False
    storage.delete_file(location)
    return True


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
    extra = [p for p in stored if p not in listed and p.split("/", 1)[0] not in UNLISTED_DIRS]
    problems += [f"{p}: not in the manifest" for p in extra]
    return problems
