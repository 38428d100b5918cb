"""The training loop reports to Ray Train only with a checkpoint, and Ray Train's controller polls every half second
unless the user said otherwise (issue 11: the `head` strategy's speed, Ray Train overhead).

Each `ray.train.report` waits until Ray Train's controller has taken the worker's previous report (a one-slot queue
drained once per poll, 2 s by default). A `head` run evaluates after each of its many short passes; when every
evaluation reported, such a run spent most of its time waiting. The in-process test runs the real loop on a head
trainee (tiny BERT body, no Ray) with `ray.train.report` replaced by a recorder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from finetune_trainer import checkpoints, loop
from finetune_trainer.checkpoints import Progress
from finetune_trainer.driver import CONTROLLER_POLL_ENV, controller_env, environment
from finetune_trainer.loop import Checkpointer, EvalPolicy, Loop, StopPoll, periodic_checkpoint
from finetune_trainer.worker import build_trainee, load_inputs

from tests.unit.test_trainer_head import tiny_head_context


@dataclass(frozen=True)
class ReportCase:
    name: str
    step: int
    every_steps: int
    total_steps: int
    stopped_early: bool
    report: bool


REPORTS = [
    ReportCase("a step between checkpoints (evaluated or not) does not report", 10, 250, 1000, False, False),
    ReportCase("the periodic checkpoint reports", 250, 250, 1000, False, True),
    ReportCase("a later periodic checkpoint reports", 750, 250, 1000, False, True),
    ReportCase("the last step does not: the finish reports the completion", 1000, 250, 1000, False, False),
    ReportCase("a step that stopped early does not: the finish checkpoints what it keeps", 500, 250, 1000, True,
               False),
    ReportCase("checkpoint every step", 3, 1, 1000, False, True),
    ReportCase("an interval longer than the run never reports", 20, 100_000, 20, False, False),
]  # fmt: skip


@pytest.mark.parametrize("case", REPORTS, ids=lambda c: c.name)
def test_which_steps_report_to_ray_train(case: ReportCase) -> None:
    decided = periodic_checkpoint(
        step=case.step, every_steps=case.every_steps, total_steps=case.total_steps, stopped_early=case.stopped_early
    )
    assert decided is case.report


@dataclass
class Recorder:
    """Stands in for `ray.train.report` and Ray Train's controller (every reported checkpoint is committed)."""

    calls: list[tuple[int, bool, set[str]]]

    def report(self, metrics: dict[str, Any], checkpoint: Any = None, **_: Any) -> None:
        self.calls.append((int(metrics["step"]), checkpoint is not None, set(metrics)))

    def committed(self, _wait_s: float) -> list[dict[str, Any]]:
        return [{"step": step} for step, _, _ in self.calls]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    rec = Recorder(calls=[])
    monkeypatch.setattr(loop.ray.train, "report", rec.report)
    monkeypatch.setattr(loop, "committed_checkpoints", rec.committed)

    @contextmanager
    def written(_ctx: Any, _trainee: Any, progress: Progress) -> Iterator[object]:
        progress.state.last_checkpoint_step, progress.state.last_checkpoint_time = progress.state.step, 1.0
        yield object()  # a checkpoint, as far as report is concerned

    monkeypatch.setattr(checkpoints, "written", written)
    yield rec


def test_a_head_run_with_100_evaluations_reports_only_its_checkpoints(recorder: Recorder, tmp_path: Path) -> None:
    ctx = tiny_head_context(tmp_path, checkpoint={"everySteps": 250})
    trainee = build_trainee(ctx, load_inputs(ctx))
    assert (trainee.budget.steps_per_epoch, trainee.budget.total_steps) == (10, 1000)  # 100 passes
    run = Loop(ctx, trainee, Progress(), policy=EvalPolicy.of(ctx.spec),
               checkpointer=Checkpointer(ctx, every_steps=250))  # fmt: skip
    run.run()
    evaluated = [h["step"] for h in run.state.history if "eval_accuracy" in h]
    assert len(evaluated) == 100  # the evaluations still happen (and reach metrics.json through the history)
    assert [(step, ckpt) for step, ckpt, _ in recorder.calls] == [(250, True), (500, True), (750, True)]
    assert all("eval_accuracy" in keys for _, _, keys in recorder.calls)  # a checkpoint carries its evaluation


@dataclass(frozen=True)
class EnvCase:
    name: str
    environ: dict[str, str]
    added: dict[str, str]


ENVS = [
    EnvCase("unset: the controller polls every half second", {}, {CONTROLLER_POLL_ENV: "0.5"}),
    EnvCase("the user's value is kept", {CONTROLLER_POLL_ENV: "5"}, {}),
    EnvCase("even an empty one (Ray reads it as set)", {CONTROLLER_POLL_ENV: ""}, {}),
    EnvCase("other variables do not matter", {"RAY_ADDRESS": "auto"}, {CONTROLLER_POLL_ENV: "0.5"}),
]


@pytest.mark.parametrize("case", ENVS, ids=lambda c: c.name)
def test_the_controller_poll_interval_unless_the_user_set_one(case: EnvCase) -> None:
    assert controller_env(case.environ) == case.added


def test_the_environment_is_restored_after_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONTROLLER_POLL_ENV, raising=False)
    monkeypatch.setenv("FT_TEST_KEPT", "before")
    with environment({CONTROLLER_POLL_ENV: "0.5", "FT_TEST_KEPT": "during"}):
        assert (os.environ[CONTROLLER_POLL_ENV], os.environ["FT_TEST_KEPT"]) == ("0.5", "during")
    assert CONTROLLER_POLL_ENV not in os.environ and os.environ["FT_TEST_KEPT"] == "before"


class StopBoard:
    """The driver's ProgressBoard as rank 0's stop poll sees it: counts the questions; says stop once told to."""

    def __init__(self) -> None:
        self.questions, self.stop = 0, False
        self.stop_requested = self  # board.stop_requested.remote()

    def remote(self) -> bool:
        self.questions += 1
        return self.stop


def test_the_stop_request_is_asked_at_most_twice_a_second_not_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop.ray, "wait", lambda refs, timeout: (list(refs), []))
    monkeypatch.setattr(loop.ray, "get", lambda ref: ref)
    now = [0.0]
    board = StopBoard()
    ctx: Any = SimpleNamespace(is_chief=True, device=torch.device("cpu"), world=1)
    poll = StopPoll(board, ctx, clock=lambda: now[0])
    for _ in range(1000):  # a thousand head steps of a millisecond each: one second
        assert not poll()
        now[0] += 0.001
    assert board.questions == 2
    board.stop = True
    now[0] += loop.STOP_POLL_S
    assert poll()  # the request is seen within one interval
