"""Ray Train overhead: samples/s of the same model and data through Ray Train (1 worker) and through a plain
in-process Hugging Face `Trainer`, their ratio, and where the time goes, in one run.

Both sides train all-MiniLM-L6-v2 (full fine-tuning, fp32, batch 32, maxSeqLength 64) on the same SST-2 rows
(the quick-start subset shipped in examples/data/sst2) for the same number of optimizer steps, with the same torch
thread count, the same tokenisation and padding, and the same batches in the same order (the HF side draws them
with the Ray worker's sampler, so both pad the same batches to the same lengths). Like for like means the training
loop on both sides: the HF side's `train_samples_per_second` (its whole `train()`, no evaluation, no saving)
against the Ray worker's loop minus the evaluations and Ray Train reports/checkpoints it makes inside the loop
(printed separately). The runs are interleaved (HF, Ray, HF, Ray, ...) so a change in background load hits both
alike; the best run of each side counts, and every run is printed.

    HF_HOME=.cache/hf HF_HUB_OFFLINE=1 .venv/bin/python bench/overhead.py [--samples 640] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import ray
import torch
from finetune_trainer import sources
from finetune_trainer.data import prepare
from finetune_trainer.driver import CONTROLLER_POLL_ENV, RunOptions, controller_env, run_training
from finetune_trainer.features import encode, make_collate
from finetune_trainer.local import start_local_ray
from finetune_trainer.spec import FineTuneJobSpec, parse_spec
from torch.utils.data import DistributedSampler
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT / "examples" / "data" / "sst2"  # the quick-start subset shipped in the repo
MODEL = "hf://sentence-transformers/all-MiniLM-L6-v2"
BATCH = 32
SEED = 42  # the spec's default hyperparameters.seed, which the Ray worker's sampler uses


def spec_for(samples: int) -> FineTuneJobSpec:
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
            "hyperparameters": {"learningRate": "1e-4", "epochs": 1, "batchSize": BATCH, "maxSeqLength": 64},
            "checkpoint": {"everySteps": 100_000, "keep": 1},
        }
    )


class SameOrderTrainer(Trainer):
    """HF's Trainer drawing the Ray worker's batches in the Ray worker's order (worker.py: a DistributedSampler of
    one replica, shuffled with the spec's seed, epoch 0), so both sides pad the same batches to the same lengths."""

    def _get_train_sampler(self, train_dataset: Any = None) -> DistributedSampler[Any]:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        assert dataset is not None, "the bench always gives a train dataset"
        return DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=SEED)


class StepTimer(TrainerCallback):
    """Seconds inside HF's optimizer steps (forward, backward, clip, step), like the Ray loop's `steps` timing."""

    def __init__(self) -> None:
        self.seconds, self.started = 0.0, 0.0

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self.started = time.monotonic()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.seconds += time.monotonic() - self.started


def hf_trainer(samples: int, threads: int) -> dict[str, Any]:
    """The same data pipeline (our tokenisation and padding) through transformers.Trainer, in this process."""
    with CpuSampler():  # sampling costs this process the same on both sides
        result = _hf_train(samples, threads)
    return {**result, "nice": os.nice(0), "torch_threads": torch.get_num_threads()}


def _hf_train(samples: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    spec = spec_for(samples)
    data = prepare(spec)
    model_dir = sources.resolve_model(spec.model, storage_spec=None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    feats = encode(tok, data.train, task=spec.task, max_length=64)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=1e-4,
            report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
            seed=SEED,
        )  # fmt: skip
        collate = make_collate(tok.pad_token_id, task=spec.task)
        trainer = SameOrderTrainer(
            model=model, args=args, train_dataset=feats, data_collator=collate, callbacks=[timer]
        )
        cpu_before = time.process_time()
        out = trainer.train()
        cpu = time.process_time() - cpu_before
    loop = float(out.metrics["train_runtime"])
    steps = int(out.global_step)
    return {
        "samples_per_second": float(out.metrics["train_samples_per_second"]),
        "loop_seconds": loop,
        "step_seconds": timer.seconds,
        "steps": steps,
        "step_samples_per_second": samples / timer.seconds if timer.seconds else 0.0,
        "cpu_seconds_training_process": cpu,
    }


class CpuSampler:
    """CPU seconds of this process and every process it started (Ray's GCS, raylet, agents, the Train controller
    and its helper actors, the training worker), sampled twice a second with their names, niceness and OS thread
    counts. It runs during both sides' training so that its own cost (in this process) falls on both alike."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self.procs: dict[str, dict[str, int]] = {}  # process name -> {"nice", "os_threads"} (last seen)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self.stop.wait(0.5):
            seen: dict[int, tuple[str, float]] = {}
            for proc in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    name = " ".join(proc.cmdline()[:1]) or proc.name()
                    seen[proc.pid] = (name, times.user + times.system)
                    self.procs[name] = {"nice": proc.nice(), "os_threads": proc.num_threads()}
            self.samples.append((time.time(), seen))

    def between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per process name used in [start, end] (processes alive at both ends)."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return {}
        (_, first), (_, last) = inside[0], inside[-1]
        used: dict[str, float] = {}
        for pid, (name, cpu) in last.items():
            if pid in first:
                used[name] = used.get(name, 0.0) + cpu - first[pid][1]
        return used


def ray_train(samples: int, threads: int) -> dict[str, Any]:
    """`finetune run`'s path: a local Ray started as `finetune run` starts it, one Ray Train worker."""
    started = time.monotonic()
    with CpuSampler() as sampler:
        start_local_ray(num_cpus=threads, log_to_driver=False)
        ray_up = time.monotonic() - started
        try:
            with tempfile.TemporaryDirectory() as tmp:
                result = run_training(
                    spec_for(samples),
                    options=RunOptions(
                        run_name="overhead", output_uri=tmp, workers=1, cpus_per_worker=threads, gpus_per_worker=0,
                    ),
                )  # fmt: skip
        finally:
            ray.shutdown()
    wall = time.monotonic() - started
    timing = result.summary["timing"]
    cpu = sampler.between(timing["startedAt"], timing["startedAt"] + timing["loop"])
    worker = sum(v for k, v in cpu.items() if "RayTrainWorker" in k)
    controller = sum(v for k, v in cpu.items() if "TrainController" in k)
    worker_proc = next((v for k, v in sampler.procs.items() if "RayTrainWorker" in k), {})
    steps = int(result.summary["steps"])
    like_for_like = timing["loop"] - timing["eval"] - timing["report"]
    return {
        "samples_per_second": samples / like_for_like if like_for_like else 0.0,
        "loop_seconds": timing["loop"],
        "step_seconds": timing["steps"],
        "eval_seconds_in_loop": timing["eval"],
        "report_seconds_in_loop": timing["report"],
        "steps": steps,
        "step_samples_per_second": samples / timing["steps"] if timing["steps"] else 0.0,
        "samples_per_second_whole_loop": samples / timing["loop"] if timing["loop"] else 0.0,
        "ray_init_seconds": ray_up,
        "wall_seconds_including_startup": wall,
        "cpu_seconds_in_loop_training_worker": worker,
        "cpu_seconds_in_loop_other_ray_processes": sum(cpu.values()) - worker,
        "cpu_seconds_in_loop_train_controller": controller,
        "controller_poll_seconds": os.environ.get(CONTROLLER_POLL_ENV) or controller_env({})[CONTROLLER_POLL_ENV],
        "cpu_seconds_in_loop_by_process": dict(sorted(cpu.items(), key=lambda kv: -kv[1])[:8]),
        "nice": worker_proc.get("nice"),
        "os_threads": worker_proc.get("os_threads"),
        "torch_threads": result.summary.get("torchThreads"),
    }


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def breakdown(hf: dict[str, Any], rt: dict[str, Any]) -> str:
    """Where the Ray side's time goes against the HF side's, per run of the same samples."""
    hf_other = hf["loop_seconds"] - hf["step_seconds"]
    rt_other = rt["loop_seconds"] - rt["step_seconds"] - rt["eval_seconds_in_loop"] - rt["report_seconds_in_loop"]
    rows = [
        ("optimizer steps (forward, backward, clip, AdamW)", hf["step_seconds"], rt["step_seconds"]),
        ("between steps (data loading, collate, progress, bookkeeping)", hf_other, rt_other),
        ("evaluation inside the loop (excluded from the ratio)", 0.0, rt["eval_seconds_in_loop"]),
        ("Ray Train report / checkpoint inside the loop (excluded)", 0.0, rt["report_seconds_in_loop"]),
    ]
    lines = [f"{'':62} {'HF (s)':>8} {'Ray (s)':>8}"]
    lines += [f"{name:62} {a:8.2f} {b:8.2f}" for name, a, b in rows]
    lines.append(
        f"{'optimizer-step throughput (samples/s)':62} {hf['step_samples_per_second']:8.1f} "
        f"{rt['step_samples_per_second']:8.1f}"
    )
    lines.append(
        f"{'CPU-s of the training process during the loop':62} {hf['cpu_seconds_training_process']:8.2f} "
        f"{rt['cpu_seconds_in_loop_training_worker']:8.2f}"
    )
    lines.append(
        f"{'CPU-s of Ray processes other than the worker, during the loop':62} {'':>8} "
        f"{rt['cpu_seconds_in_loop_other_ray_processes']:8.2f}"
    )
    lines.append(
        f"{'torch intra-op threads of the training process':62} {hf['torch_threads']!s:>8} {rt['torch_threads']!s:>8}"
    )
    lines.append(f"{'niceness of the training process':62} {hf['nice']!s:>8} {rt['nice']!s:>8}")
    lines.append(
        f"{'start-up outside the loop: Ray init + workers + model load':62} {'':>8} "
        f"{rt['wall_seconds_including_startup'] - rt['loop_seconds']:8.1f}"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each side; the best counts")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    before = uptime()
    hf_runs: list[dict[str, Any]] = []
    ray_runs: list[dict[str, Any]] = []
    for i in range(args.repeats):
        hf_runs.append(hf_trainer(args.samples, threads))
        ray_runs.append(ray_train(args.samples, threads))
        h, r = hf_runs[-1]["samples_per_second"], ray_runs[-1]["samples_per_second"]
        print(f"round {i + 1}: HF {h:.1f} | Ray {r:.1f} samples/s | ratio {r / h:.3f} | {uptime()}", flush=True)
        # Each round's runs and breakdown as they finish: a long run on a busy machine still leaves figures.
        print(json.dumps({"round": i + 1, "hf": hf_runs[-1], "ray": ray_runs[-1]}), flush=True)
        print(breakdown(hf_runs[-1], ray_runs[-1]), flush=True)
    hf = max(hf_runs, key=lambda r: r["samples_per_second"])
    rt = max(ray_runs, key=lambda r: r["samples_per_second"])
    ratio = rt["samples_per_second"] / hf["samples_per_second"]
    pairs = [r["samples_per_second"] / h["samples_per_second"] for h, r in zip(hf_runs, ray_runs, strict=True)]
    report = {
        "samples": args.samples,
        "threads": threads,
        "hf_trainer_runs": hf_runs,
        "ray_train_runs": ray_runs,
        "ray_over_hf_best": ratio,
        "ray_over_hf_per_round": pairs,
        "uptime_before": before,
        "uptime_after": uptime(),
    }
    print(json.dumps(report, indent=2))
    print(breakdown(hf, rt))
    print(
        f"HF Trainer: {hf['samples_per_second']:.1f} samples/s | Ray Train (1 worker): "
        f"{rt['samples_per_second']:.1f} samples/s | ratio Ray/HF = {ratio:.3f} (best of {args.repeats} "
        f"interleaved runs each, training loop like for like; per round: "
        f"{', '.join(f'{p:.3f}' for p in pairs)}) | load: {report['uptime_after']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
