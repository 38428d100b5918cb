"""The Ray Train driver: pre-flight checks, TorchTrainer from the spec, progress polling, manifest last.

Why a driver separate from the workers: the driver is the one long-lived process of a job (the head pod's container
on a cluster, the `finetune run` process locally). It fails fast on bad data or a missing model before any worker
starts, waits (bounded) for the Ray cluster to have room for the workers, serves Prometheus metrics, turns worker
failures into the contract's reasons, and writes manifest.json only after Ray Train reports success. Checkpoints go
to <output>/checkpoints/<run name>; Ray Train V2 restores its checkpoint manager from there, so a relaunch with the
same run name continues from the latest complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from finetune_trainer import artifacts, data, oom, signals, sources, storage
from finetune_trainer.contract import CHECKPOINTS_DIR, MANIFEST, TrainerPhase
from finetune_trainer.errors import (
    InterruptedRunError,
    QualityGateFailedError,
    StorageError,
    TrainerError,
    TrainingError,
    classify_failure,
    find_trainer_error,
)
from finetune_trainer.metrics import TrainerMetrics
from finetune_trainer.progress import ProgressBoard, should_drain
from finetune_trainer.spec import FineTuneJobSpec
from finetune_trainer.train_loop import train_func

log = logging.getLogger(__name__)
ProgressCallback = Callable[[dict[str, Any]], None]
# Ray Train V2's controller takes the workers' reports (each worker holds one at a time), registers checkpoints and
# notices the end of the run once per poll of the worker group, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default). Half a second shortens the wait for the next poll (a checkpoint's commit, the end of every run) from up to
# 2 s to up to 0.5 s, for four times as many polls (docs/benchmarks.md has what that costs).
CONTROLLER_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
CONTROLLER_POLL_SECONDS = "0.5"


@dataclass(frozen=True)
class RunOptions:
    """How to run one job (everything the spec does not say)."""

    run_name: str
    output_uri: str
    workers: int
    cpus_per_worker: float
    gpus_per_worker: int
    attempt: int = 1
    base_dir: Path | None = None
    max_failures: int = 3
    resource_wait_seconds: float = 600.0
    metrics: TrainerMetrics | None = None
    on_progress: ProgressCallback | None = None
    poll_seconds: float = 1.0
    extra_config: dict[str, Any] = field(default_factory=dict)
    stop: signals.StopRequest | None = None  # SIGTERM with a drain budget: checkpoint at the next step, then stop


@dataclass(frozen=True)
class RunResult:
    output_uri: str
    summary: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def outcome(self) -> dict[str, Any]:
        """Kept step, watched metric and its value, baseline, negative transfer, gate failures (finish.py)."""
        return dict(self.summary.get("outcome") or {})


def preflight(spec: FineTuneJobSpec, *, output_uri: str, base_dir: Path | None) -> data.PreparedData:
    """Fail fast (before Ray starts workers): data readable and valid, model present, output writable.

    The first write to the output removes an old manifest.json: from here until this run's manifest is written,
    readers see the prefix as incomplete rather than an earlier run's manifest over files this run replaces.
    """
    prepared = data.prepare(spec, base_dir=base_dir)
    sources.check_model(spec.model, storage_spec=spec.storage, base_dir=base_dir)
    output = storage.resolve(output_uri, storage=spec.storage, base_dir=base_dir)
    if artifacts.invalidate(output):
        log.warning("removed the previous run's %s from %s before writing", MANIFEST, output.uri)
    probe = output.child(".write-probe")
    storage.write_bytes(probe, b"ok")
    try:
        probe.fs.delete_file(probe.path)
    except OSError as e:
        raise StorageError(f"cannot delete {probe.uri}: {e}") from e
    return prepared


def wait_for_resources(*, workers: int, cpus: float, gpus: int, timeout: float) -> None:
    """Block until the Ray cluster has CPUs/GPUs for every worker (worker pods join over time)."""
    need_cpu, need_gpu = workers * cpus, workers * gpus
    deadline = time.monotonic() + timeout
    next_log = 0.0
    while True:
        have = ray.cluster_resources()  # type: ignore[no-untyped-call]
        cpu, gpu = float(have.get("CPU", 0.0)), float(have.get("GPU", 0.0))
        if cpu >= need_cpu and gpu >= need_gpu:
            return
        now = time.monotonic()
        if now >= deadline:
            raise TrainingError(
                f"the Ray cluster has {cpu:g} CPU / {gpu:g} GPU after {timeout:.0f}s but {workers} worker(s) need "
                f"{need_cpu:g} CPU / {need_gpu:g} GPU; check that the worker pods are running and joined the head"
            )
        if now >= next_log:
            log.warning(
                "waiting for %d worker(s): cluster has %g/%g CPU, %g/%g GPU (giving up in %.0fs)",
                workers,
                cpu,
                need_cpu,
                gpu,
                need_gpu,
                deadline - now,
            )
            next_log = now + 10
        time.sleep(1.0)


def controller_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Variables to add to the driver's environment for Ray Train's controller: our poll interval unless the user
    set one (a value in the environment always wins, as Ray's own `env_set_by_user` decides)."""
    return {} if CONTROLLER_POLL_ENV in environ else {CONTROLLER_POLL_ENV: CONTROLLER_POLL_SECONDS}


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """This process's environment with `values` added for the block, restored after.

    Why the driver's environment: `TorchTrainer.fit()` copies Ray Train's own variables (the poll interval among
    them: `ENV_VARS_TO_PROPAGATE`) from the driver's `os.environ` into the runtime_env of the controller actor it
    starts on the driver's node, and the controller passes them on to the workers. So one setting here reaches the
    controller on a local Ray (`finetune run`) and on a cluster the driver joined, whose raylet started long before.
    """
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _Poller:
    """Copies the ProgressBoard into the metrics and the progress callback about once a second, and passes a stop
    request (SIGTERM with a drain budget) on to the workers through the board."""

    def __init__(self, board: Any, options: RunOptions) -> None:
        self.board, self.options = board, options
        self.stop = threading.Event()
        self.stop_passed = False
        self.last: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, name="finetune-progress", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.options.poll_seconds):
            self.poll()
            self.pass_stop()

    def pass_stop(self) -> None:
        """Once SIGTERM asked for a drain: the workers checkpoint at their next step if the loop runs; else there is
        nothing to wait for and the driver stops now."""
        request = self.options.stop
        if request is None or self.stop_passed or not request.requested.is_set():
            return
        self.stop_passed = True
        if should_drain(self.last):
            log.warning("SIGTERM: the workers checkpoint at their next step, then stop (within %.0fs)",
                        request.drain_seconds)  # fmt: skip
            try:
                self.board.request_stop.remote()
            except Exception:  # no board: the drain timer ends the run
                log.warning("could not reach the progress board; stopping when the drain time is up")
            return
        log.warning("SIGTERM while %s: nothing to checkpoint, stopping now", self.last.get("phase", "starting"))
        signals.interrupt_now()

    def poll(self) -> None:
        try:
            snap: dict[str, Any] = ray.get(self.board.snapshot.remote(), timeout=10)
        except Exception:  # the board is best effort; training goes on without it
            return
        self.last = snap
        if self.options.metrics is not None:
            self.options.metrics.update(snap)
            if snap.get("strategy") and snap.get("task"):
                self.options.metrics.set_info(strategy=str(snap["strategy"]), task=str(snap["task"]))
        if self.options.on_progress is not None:
            self.options.on_progress(snap)


class MemoryProbe:
    """Reads the memory cgroup of every Ray node's container (oom.py) when the run starts and when it fails, so a
    training process the kernel killed for memory is reported as OOMKilled. The first reading runs in the
    background (zero-CPU tasks pinned to each node); it is only awaited if the run fails."""

    def __init__(self, *, timeout: float = 20.0) -> None:
        self.timeout = timeout
        self.head_node = str(ray.get_runtime_context().get_node_id())
        self.before = self._launch()

    @classmethod
    def start(cls) -> MemoryProbe | None:
        """A probe, or None when the nodes cannot be listed (the run goes on without memory evidence)."""
        try:
            return cls()
        except Exception as e:
            log.warning("cannot read the nodes' memory cgroups: %s", e)
            return None

    @staticmethod
    def _launch() -> dict[str, Any]:
        read = ray.remote(num_cpus=0, max_retries=0)(oom.read_node_memory)
        refs: dict[str, Any] = {}
        for node in ray.nodes():  # type: ignore[no-untyped-call]
            if node.get("Alive"):
                where = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
                refs[str(node["NodeID"])] = read.options(scheduling_strategy=where).remote()
        return refs

    def _resolve(self, refs: dict[str, Any], deadline: float) -> dict[str, oom.NodeMemory]:
        out: dict[str, oom.NodeMemory] = {}
        for node, ref in refs.items():
            try:
                out[node] = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except Exception as e:  # a node that died with the run, or no answer in time: no evidence from it
                log.warning("memory of Ray node %s not readable: %s", node[:8], type(e).__name__)
        return out

    def kills(self) -> list[oom.OomKills]:
        """Nodes whose OOM-kill counter rose since the start (best effort: [] when nothing can be read)."""
        try:
            after_refs = self._launch()
            deadline = time.monotonic() + self.timeout
            before, after = self._resolve(self.before, deadline), self._resolve(after_refs, deadline)
        except Exception as e:
            log.warning("could not read the nodes' memory cgroups: %s", e)
            return []
        return oom.kills_during(before, after, head_node=self.head_node)


def classified(error: BaseException, probe: MemoryProbe | None) -> TrainerError:
    """The contract's error for a failed run; the memory probe is asked only when no worker raised a domain error."""
    if find_trainer_error(error) is not None or probe is None:
        return classify_failure(error)
    return classify_failure(error, oom_kills=probe.kills())


def checkpoint_storage(output: storage.Location) -> tuple[str, Any]:
    """Ray Train's storage_path and storage_filesystem for <output>/checkpoints."""
    ckpt = output.child(CHECKPOINTS_DIR)
    if output.is_s3:
        return ckpt.path, ckpt.fs
    Path(ckpt.path).mkdir(parents=True, exist_ok=True)
    return ckpt.path, None


def run_training(spec: FineTuneJobSpec, *, options: RunOptions) -> RunResult:
    """Run the job on the connected Ray cluster; returns once manifest.json is written."""
    metrics = options.metrics
    if metrics is not None:
        metrics.set_phase(TrainerPhase.LOADING)
    output = storage.resolve(options.output_uri, storage=spec.storage, base_dir=options.base_dir)
    wait_for_resources(
        workers=options.workers,
        cpus=options.cpus_per_worker,
        gpus=options.gpus_per_worker,
        timeout=options.resource_wait_seconds,
    )
    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    probe = MemoryProbe.start()
    storage_path, storage_fs = checkpoint_storage(output)
    resources: dict[str, float] = {"CPU": options.cpus_per_worker}
    if options.gpus_per_worker:
        resources["GPU"] = float(options.gpus_per_worker)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "spec": spec.wire(),
            "board": board,
            "output_uri": output.uri,
            "run_name": options.run_name,
            "base_dir": str(options.base_dir) if options.base_dir else None,
            "threads": max(1, int(options.cpus_per_worker)),
            "attempt": options.attempt,
            **options.extra_config,
        },
        scaling_config=ScalingConfig(
            num_workers=options.workers, use_gpu=options.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=options.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=options.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
        ),
    )
    poller = _Poller(board, options)
    poller.thread.start()
    try:
        with environment(controller_env(os.environ)):
            result = trainer.fit()
    except TrainerError:
        raise
    except SystemExit as e:  # Ray Train's own SIGINT handler aborts the run and may call sys.exit(0)
        raise InterruptedRunError("training was aborted (SIGINT); relaunch with the same run name to resume") from e
    except Exception as e:
        raise classified(e, probe) from e
    finally:
        poller.stop.set()
        poller.thread.join(timeout=5)
        poller.poll()
    if result.error is not None:
        raise classified(result.error, probe) from result.error
    final: dict[str, Any] = dict(result.metrics or {})
    if not final.get("done") and options.stop is not None and options.stop.requested.is_set():
        raise InterruptedRunError(
            f"stopped on SIGTERM at step {final.get('step', 0)} after writing a checkpoint there; relaunch with the "
            "same run name to resume from it"
        )
    if not final.get("done"):
        # fit() returns without an error and without the final report only when the run was aborted.
        raise InterruptedRunError(
            f"training was aborted at step {final.get('step', 0)}; relaunch with the same run name to resume"
        )
    if metrics is not None:
        metrics.set_phase(TrainerPhase.SAVING)
    summary = dict(final["summary"])
    outcome = dict(summary.get("outcome") or {})
    manifest = artifacts.write_manifest(
        output,
        files=list(final["files"]),
        run={"name": options.run_name, "attempt": options.attempt, "steps": final["step"], "final": final["final"]},
        outcome=outcome,
    )
    if outcome.get("rejected"):
        raise QualityGateFailedError(gate_message(outcome), outcome=outcome)
    if metrics is not None:
        metrics.set_phase(TrainerPhase.SUCCEEDED)
    return RunResult(output_uri=output.uri, summary=summary, manifest=manifest)


def gate_message(outcome: dict[str, Any]) -> str:
    """Both numbers for every missed gate, and where the model went."""
    return (
        f"the model kept at step {outcome.get('keptStep')} misses spec.output.minMetric: "
        f"{'; '.join(outcome.get('gateFailures', []))}; not published: its artifacts are under rejected/ "
        "(manifest.json says rejected)"
    )
