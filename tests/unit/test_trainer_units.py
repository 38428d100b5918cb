"""Pure pieces of the trainer: metrics exposition, local placement, progress board, failure classification,
artifact inventory and manifest verification on a local directory, and the exit-contract guard.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest
from finetune_trainer import artifacts, storage
from finetune_trainer.cli import success_report
from finetune_trainer.contract import SUCCEEDED, Metric, TrainerPhase, parse_report
from finetune_trainer.driver import RunResult
from finetune_trainer.errors import InvalidDatasetError, ModelNotFoundError, TrainingError, classify_failure
from finetune_trainer.metrics import TrainerMetrics
from finetune_trainer.placement import fit_placement
from finetune_trainer.progress import ProgressBoard
from prometheus_client import generate_latest


def test_metrics_follow_the_board_with_bounded_labels() -> None:
    board = ProgressBoard()
    board.update({"step": 7, "total_steps": 20, "epoch": 0.35, "loss": 0.5, "phase": "Training"})
    board.update({"eval": {"eval_accuracy": 0.9, "eval_bogus": 1.0}})
    board.update({"eval": {"eval_loss": 0.3}})
    metrics = TrainerMetrics()
    metrics.update(board.snapshot())
    metrics.set_info(strategy="lora", task="sequence-classification")
    text = generate_latest(metrics.registry).decode()
    assert f"{Metric.STEP.value} 7.0" in text
    assert f"{Metric.TOTAL_STEPS.value} 20.0" in text
    assert f'{Metric.EVAL_METRIC.value}{{metric="eval_accuracy"}} 0.9' in text
    assert f'{Metric.EVAL_METRIC.value}{{metric="eval_loss"}} 0.3' in text
    assert "eval_bogus" not in text  # only known metric names become label values
    assert f'{Metric.PHASE.value}{{phase="Training"}} 1.0' in text
    assert f'{Metric.PHASE.value}{{phase="Initializing"}} 0.0' in text
    assert sum(line.startswith(Metric.PHASE.value + "{") for line in text.splitlines()) == len(TrainerPhase)


@dataclass(frozen=True)
class P:
    workers: int
    cpus: float
    gpus: int
    have_cpu: float
    have_gpu: float
    expect: tuple[int, float, int]
    note: str | None


PLACEMENTS = [
    P(1, 2, 0, 2, 0, (1, 2, 0), None),
    P(2, 4, 0, 2, 0, (2, 1, 0), "each worker uses 1 CPU"),
    P(4, 1, 0, 2, 0, (2, 1, 0), "spec asks for 4 worker(s); 2 fit"),
    P(1, 1, 1, 8, 0, (1, 8, 0), "training on CPU"),
    P(2, 1, 1, 8, 2, (2, 4, 1), "each worker uses 4 CPU"),
]


@pytest.mark.parametrize("p", PLACEMENTS)
def test_local_placement_caps_to_the_machine(p: P) -> None:
    got = fit_placement(
        workers=p.workers, cpus=p.cpus, gpus=p.gpus, available_cpus=p.have_cpu, available_gpus=p.have_gpu
    )
    assert (got.workers, got.cpus_per_worker, got.gpus_per_worker) == p.expect
    assert (got.note is None) if p.note is None else (p.note in (got.note or ""))


class FakeWorkerGroupError(Exception):
    def __init__(self, failures: dict[int, BaseException]) -> None:
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


def test_worker_errors_keep_their_reason() -> None:
    err = FakeWorkerGroupError({1: RuntimeError("boom"), 0: InvalidDatasetError("dev.csv: row 3: bad")})
    assert isinstance(classify_failure(err), InvalidDatasetError)
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = ModelNotFoundError("gone")
    assert isinstance(classify_failure(wrapped), ModelNotFoundError)
    generic = classify_failure(FakeWorkerGroupError({0: ValueError("line1\nthe real problem")}))
    assert isinstance(generic, TrainingError) and "the real problem" in generic.message


def test_errors_survive_pickling_with_their_reason() -> None:
    err = pickle.loads(pickle.dumps(InvalidDatasetError("x.csv: empty")))
    assert isinstance(err, InvalidDatasetError) and err.message == "x.csv: empty" and err.exit_code == 3


def test_manifest_lists_every_file_and_a_reader_rejects_prefixes_without_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    (out / "README.md").write_text("# card")
    loc = storage.resolve(str(out), storage=None)
    assert artifacts.read_manifest(loc) is None
    assert artifacts.verify(loc)  # incomplete
    files = artifacts.file_entries(out)
    manifest = artifacts.write_manifest(loc, files=files, run={"name": "x"})
    assert [f["path"] for f in manifest["files"]] == ["README.md", "model/config.json"]
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    assert artifacts.verify(loc) == []
    (out / "stray.txt").write_text("late")
    assert artifacts.verify(loc) == ["stray.txt: not in the manifest"]


@dataclass(frozen=True)
class ReportCase:
    name: str
    summary: dict[str, object]
    resumed: int | None


REPORT_CASES = [
    ReportCase("fresh start", {"resumedFromStep": 0, "outcome": {"keptStep": 20}}, 0),
    ReportCase("workers restarted within the attempt", {"resumedFromStep": 40, "outcome": {"keptStep": 100}}, 40),
    ReportCase("older summary without the field", {"outcome": {}}, None),
    ReportCase("not a step", {"resumedFromStep": True, "outcome": {}}, None),
]


@pytest.mark.parametrize("case", REPORT_CASES, ids=lambda c: c.name)
def test_the_success_report_carries_the_step_the_run_resumed_from(case: ReportCase) -> None:
    # What the operator records durably in status.attempts[].resumedFromStep comes from this line, not a scrape.
    result = RunResult(output_uri="s3://out/job/", summary=dict(case.summary), manifest={"files": [{}, {}]})
    back = parse_report(success_report(result).to_line())
    assert back is not None and back.reason == SUCCEEDED
    assert back.resumed_from_step == case.resumed
    assert "2 files under s3://out/job/" in back.message
