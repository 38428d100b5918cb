"""The end of a run: the kept model, the baseline, the verdict, and the artifacts.

Why one module: what is published depends on all of it. Early stopping keeps the best evaluation's weights, not
the last ones; the baseline (scratch or probe) runs with the same step budget and is reported beside the result;
the quality gate decides whether the artifacts are the job's result or go under `rejected/`. Rank 0 writes the
files; every rank reports the completion record, which Ray Train keeps as the run's last checkpoint so a relaunch
after this point only rewrites the manifest.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train

from finetune_trainer import artifacts, checkpoints, commits, evaluation, features, storage
from finetune_trainer.checkpoints import Progress
from finetune_trainer.contract import (
    ADAPTER_DIR,
    CURVES_FILE,
    METRICS_FILE,
    MODEL_DIR,
    REJECTED_DIR,
    REPORT_FILE,
    TrainerPhase,
)
from finetune_trainer.loop import EvalPolicy, Loop
from finetune_trainer.spec import Baseline, Strategy
from finetune_trainer.worker import Inputs, Trainee, WorkerContext, build_trainee, seed_everything, unwrap, wrap_ddp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kept:
    """Which weights are published and why."""

    step: int
    metrics: dict[str, float]
    reason: str


def keep(loop: Loop) -> Kept:
    """Early stopping keeps the best evaluation's weights (restored into the model on rank 0); else the final."""
    state, policy, progress = loop.state, loop.policy, loop.progress
    metric = policy.metric
    final = last_eval(state.history)
    if not policy.keep_best or state.best_step is None or state.best_metrics is None:
        return Kept(state.step, final, f"final step {state.step} (no earlyStopping: the final weights are kept)")
    best = state.best_metrics[metric]
    if state.best_step == state.step:
        return Kept(state.step, final, f"the final step {state.step} has the best {metric} ({best:.4f})")
    if loop.ctx.is_chief:
        if progress.best_weights is None:
            raise RuntimeError(f"the weights of step {state.best_step} were not kept")
        unwrap(loop.trainee.model).load_state_dict(progress.best_weights, strict=False)
    why = (
        f"early stopping: {metric} did not improve for {policy.patience} evaluations after step {state.best_step}, "
        f"stopped at step {state.step}"
        if state.stopped_early
        else f"step {state.best_step} had the best {metric} of the run"
    )
    return Kept(
        state.best_step,
        dict(state.best_metrics),
        f"{why}; kept step {state.best_step} ({metric}={best:.4f}) rather than step {state.step} "
        f"({metric}={final.get(metric, float('nan')):.4f})",
    )


def last_eval(history: list[dict[str, Any]]) -> dict[str, float]:
    evals = [h for h in history if any(k.startswith("eval_") for k in h)]
    return {k: float(v) for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {}


def run_baseline(ctx: WorkerContext, inputs: Inputs, *, policy: EvalPolicy, step_offset: int) -> dict[str, Any]:
    """Train the spec's baseline with the job's step budget (same data, same seed) and return its result."""
    kind = ctx.spec.evaluation.baseline
    seed_everything(ctx.spec.hyperparameters.seed)
    trainee = build_trainee(ctx, inputs, name=kind.value)
    wrap_ddp(trainee, ctx)
    progress = Progress()
    loop = Loop(ctx, trainee, progress, policy=policy, checkpointer=None, step_offset=step_offset)
    loop.run()
    if progress.state.last_eval_step != progress.state.step:
        loop.evaluate()
    state = progress.state
    metrics = state.best_metrics if policy.keep_best and state.best_metrics else last_eval(state.history)
    history = [h for h in state.history if policy.metric in h]
    return {
        "kind": kind.value,
        "metric": policy.metric,
        "value": metrics[policy.metric],
        "metrics": metrics,
        "steps": state.step,
        "trainableParameters": trainee.plan.trainable_parameters,
        "history": history,
    }


def finish(ctx: WorkerContext, inputs: Inputs, loop: Loop, *, summary_base: dict[str, Any]) -> None:
    """Final evaluation, baseline, kept model, verdict, artifacts (rank 0) and the completion record."""
    state, policy = loop.state, loop.policy
    if state.last_eval_step != state.step:
        loop.evaluate()
    wall = loop.wall_seconds()
    if ctx.spec.evaluation.baseline is not Baseline.NONE and state.baseline is None:
        if loop.checkpointer is not None and state.last_checkpoint_step != state.step:
            loop.checkpointer.checkpoint(loop.trainee, loop.progress, {})  # the baseline never redoes this
        state.baseline = run_baseline(ctx, inputs, policy=policy, step_offset=loop.trainee.budget.total_steps)
    kept = keep(loop)
    ctx.board.push({"phase": TrainerPhase.SAVING.value, "eval": kept.metrics}, force=True)
    baseline_value = state.baseline["value"] if state.baseline else None
    verdict = evaluation.judge(
        kept.metrics, metric=policy.metric, baseline=baseline_value,
        min_gain=ctx.spec.evaluation.min_gain, min_metric=ctx.spec.output.min_metric,
    )  # fmt: skip
    outcome = {
        "metric": policy.metric,
        "value": kept.metrics.get(policy.metric),
        "keptStep": kept.step,
        "keptReason": kept.reason,
        "baseline": baseline_value,
        "baselineKind": state.baseline["kind"] if state.baseline else None,
        "negativeTransfer": verdict.negative_transfer,
        "gateFailures": list(verdict.gate_failures),
        "rejected": bool(verdict.gate_failures),
    }
    summary = {
        **summary_base,
        **run_summary(loop, kept),
        "wallSeconds": wall,
        "outcome": outcome,
        "baseline": state.baseline,
    }
    files = publish(ctx, inputs, loop.trainee, summary=summary, history=state.history) if ctx.is_chief else []
    if loop.checkpointer is not None and loop.checkpointer.commits is not None:
        loop.checkpointer.commits.drain(timeout=commits.COMMIT_WAIT_S * 3)  # the last checkpoint shows at the end
    done = {"step": state.step, "done": True, "final": kept.metrics, "summary": summary, "files": files}
    with tempfile.TemporaryDirectory(prefix="ftdone-") as tmp:
        done_ckpt = None
        if ctx.is_chief:
            (Path(tmp) / checkpoints.META_FILE).write_text(json.dumps(done))
            done_ckpt = ray.train.Checkpoint.from_directory(tmp)
        name = f"{checkpoints.checkpoint_name(state.step)}_done"
        ray.train.report(done, checkpoint=done_ckpt, checkpoint_dir_name=name)


def run_summary(loop: Loop, kept: Kept) -> dict[str, Any]:
    state, trainee = loop.state, loop.trainee
    return {
        "steps": state.step,
        "epochs": state.step / trainee.budget.steps_per_epoch,
        "resumedFromStep": state.resumed_from_step,
        "stoppedEarly": state.stopped_early,
        "timing": loop.timing(),
        "final": kept.metrics,
        "lastEval": last_eval(state.history),
        "keptStep": kept.step,
        "keptReason": kept.reason,
        "evalMetric": loop.policy.metric,
    }


def publish(
    ctx: WorkerContext, inputs: Inputs, trainee: Trainee, *, summary: dict[str, Any], history: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Rank 0: write the model files, metrics, card and curves, hash them, replace the previous run's files under
    the output (or under rejected/ when the gate failed); returns the inventory (paths relative to the output)."""
    spec = ctx.spec
    rejected = bool(summary["outcome"]["rejected"])
    output = storage.resolve(ctx.output_uri, storage=spec.storage, base_dir=ctx.base_dir)
    with tempfile.TemporaryDirectory(prefix="ftart-") as tmp:
        root = Path(tmp)
        out = root / REJECTED_DIR if rejected else root
        out.mkdir(parents=True, exist_ok=True)
        flags = export_model(trainee, inputs, out, lora_merge=spec.method.lora_spec.merge)
        summary = {**summary, **flags}
        (out / METRICS_FILE).write_text(json.dumps({**summary, "history": history}, indent=2))
        artifacts.plot_curves(history, out / CURVES_FILE, metric=str(summary["evalMetric"]), summary=summary)
        (out / REPORT_FILE).write_text(artifacts.model_card(name=ctx.run_name, spec=spec.wire(), summary=summary))
        files = artifacts.file_entries(root)
        artifacts.remove_stale(output, keep={f["path"] for f in files})
        storage.upload_dir(root, output)
    return files


def export_model(trainee: Trainee, inputs: Inputs, out: Path, *, lora_merge: bool) -> dict[str, Any]:
    """model/ (and adapter/ for LoRA) as loadable files; returns what the summary says about them."""
    model: Any = unwrap(trainee.model).cpu()  # a PreTrainedModel, a peft PeftModel or a LinearHead
    tokenizer = inputs.tokenizer
    if trainee.body is not None:  # feature extraction: the unchanged body + the linear head
        assert trainee.pooling is not None
        body: Any = trainee.body.cpu()
        body.save_pretrained(out / MODEL_DIR, safe_serialization=True)
        tokenizer.save_pretrained(out / MODEL_DIR)
        features.save_head(
            model, out / MODEL_DIR, pooling=trainee.pooling, first_token=trainee.first_token,
            labels=inputs.label_names,
        )  # fmt: skip
        return {"adapter": False, "merged": False, "probe": True, "pooling": trainee.pooling.value}
    if trainee.plan.strategy is Strategy.LORA:
        model.save_pretrained(out / ADAPTER_DIR)
        tokenizer.save_pretrained(out / ADAPTER_DIR)
        if lora_merge:
            model.merge_and_unload().save_pretrained(out / MODEL_DIR, safe_serialization=True)
            tokenizer.save_pretrained(out / MODEL_DIR)
        return {"adapter": True, "merged": lora_merge, "probe": False}
    model.save_pretrained(out / MODEL_DIR, safe_serialization=True)
    tokenizer.save_pretrained(out / MODEL_DIR)
    return {"adapter": False, "merged": False, "probe": False}
