"""A checkpoint is announced (status.checkpoint) only once Ray Train has committed it (issue 9, finding a).

On the real node the status said 8 while Ray Train resumed from 4: rank 0 announced step 8 as soon as its own
`ray.train.report` returned, before the controller had polled every rank and registered it. These tests drive
the announcer with a fake controller that commits when the test says so.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from finetune_trainer import checkpoints, commits, loop
from finetune_trainer.progress import ProgressBoard

WAIT = 30.0  # upper bound for the watch's thread to act; it normally does so within milliseconds


@dataclasses.dataclass(frozen=True)
class SettleCase:
    name: str
    pending: dict[int, float]
    committed: set[int]
    found: tuple[int, float] | None
    rest: dict[int, float]


SETTLE = [
    SettleCase("nothing committed yet", {8: 1.0}, {4}, None, {8: 1.0}),
    SettleCase("committed", {8: 1.0}, {4, 8}, (8, 1.0), {}),
    SettleCase("newest of several", {8: 1.0, 12: 2.0}, {8, 12}, (12, 2.0), {}),
    SettleCase("newer one still in flight", {8: 1.0, 12: 2.0}, {8}, (8, 1.0), {12: 2.0}),
    SettleCase("older one never registered", {8: 1.0, 12: 2.0}, {12}, (12, 2.0), {}),
    SettleCase("older ones deleted by keep", {8: 1.0, 12: 2.0, 16: 3.0}, {16, 20}, (16, 3.0), {}),
]


@pytest.mark.parametrize("case", SETTLE, ids=[c.name for c in SETTLE])
def test_settle(case: SettleCase) -> None:
    assert commits.settle(case.pending, case.committed) == (case.found, case.rest)


@pytest.mark.parametrize(
    ("metrics", "steps"),
    [
        ([], set()),
        ([{"step": 4, "epoch": 1.0}, {"step": 8.0}], {4, 8}),
        ([{"step": 8}, {"step": 60, "done": True, "summary": {}}], {8}),  # the completion record is not one
        ([{"epoch": 1.0}, {"step": True}, {"step": "8"}], set()),
    ],
    ids=["none", "steps", "done-excluded", "malformed"],
)
def test_committed_steps(metrics: list[dict[str, Any]], steps: set[int]) -> None:
    assert commits.committed_steps(metrics) == steps


def test_the_board_never_moves_the_checkpoint_back() -> None:
    board = ProgressBoard()
    board.update(checkpoints_at(8))
    board.update(checkpoints_at(4) | {"step": 9})  # a late, older announcement
    snap = board.snapshot()
    assert (snap["last_checkpoint_step"], snap["checkpoint_uri"], snap["step"]) == (8, "s3://o/c/8", 9)
    board.update(checkpoints_at(12))
    assert board.snapshot()["last_checkpoint_step"] == 12


def checkpoints_at(step: int) -> dict[str, Any]:
    return {"last_checkpoint_step": step, "last_checkpoint_time": float(step), "checkpoint_uri": f"s3://o/c/{step}"}


class FakeController:
    """Commits a reported checkpoint only when the test says so (as Ray Train's controller does on its poll)."""

    def __init__(self) -> None:
        self.committed: set[int] = set()
        self.asked = threading.Condition()
        self.questions = 0

    def fetch(self, _wait_s: float) -> list[dict[str, Any]]:
        with self.asked:
            self.questions += 1
            self.asked.notify_all()
            return [{"step": s} for s in sorted(self.committed)]

    def wait_questions(self, count: int) -> None:
        with self.asked:
            assert self.asked.wait_for(lambda: self.questions >= count, timeout=WAIT), "never asked the controller"


class Board:
    def __init__(self) -> None:
        self.pushed: list[dict[str, Any]] = []
        self.cond = threading.Condition()

    def push(self, values: Mapping[str, Any], *, force: bool = False) -> None:
        with self.cond:
            self.pushed.append(dict(values))
            self.cond.notify_all()

    def announced(self) -> list[int]:
        with self.cond:
            return [p["last_checkpoint_step"] for p in self.pushed if "last_checkpoint_step" in p]

    def wait_announced(self, step: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: step in self.announced(), timeout=WAIT), self.pushed


@pytest.fixture
def controller(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeController]:
    fake = FakeController()
    monkeypatch.setattr(loop, "committed_checkpoints", fake.fetch)
    monkeypatch.setattr(commits, "MIN_INTERVAL_S", 0.0)
    monkeypatch.setattr(loop.ray.train, "report", lambda *_a, **_k: None)

    @contextmanager
    def written(_ctx: Any, _trainee: Any, progress: checkpoints.Progress) -> Iterator[None]:
        progress.state.last_checkpoint_step, progress.state.last_checkpoint_time = progress.state.step, 100.0
        yield None

    monkeypatch.setattr(checkpoints, "written", written)
    yield fake


def test_a_checkpoint_is_announced_once_ray_train_committed_it(controller: FakeController) -> None:
    board = Board()
    ctx: Any = SimpleNamespace(is_chief=True, board=board, output_uri="s3://out/job", run_name="run")
    checkpointer = loop.Checkpointer(ctx, every_steps=4)
    trainee: Any = SimpleNamespace(budget=SimpleNamespace(steps_per_epoch=4))
    progress = checkpoints.Progress(state=checkpoints.RunState(step=8))
    checkpointer.checkpoint(trainee, progress, {})
    controller.wait_questions(2)  # asked, and asked again: the controller has not committed step 8
    assert board.announced() == [], "announced a checkpoint Ray Train had not committed"
    controller.committed.add(8)
    board.wait_announced(8)
    assert board.pushed[-1]["checkpoint_uri"] == "s3://out/job/checkpoints/run/checkpoint_step_00000008"
    assert board.pushed[-1]["last_checkpoint_time"] == 100.0


def test_other_ranks_announce_nothing(controller: FakeController) -> None:
    board = Board()
    ctx: Any = SimpleNamespace(is_chief=False, board=board, output_uri="s3://out/job", run_name="run")
    checkpointer = loop.Checkpointer(ctx, every_steps=4)
    assert checkpointer.commits is None
    trainee: Any = SimpleNamespace(budget=SimpleNamespace(steps_per_epoch=4))
    checkpointer.checkpoint(trainee, checkpoints.Progress(state=checkpoints.RunState(step=4)), {})
    assert board.pushed == [] and controller.questions == 0


def test_drain_waits_until_the_last_checkpoint_is_announced(controller: FakeController) -> None:
    board = Board()
    watch = commits.CommitWatch(fetch=controller.fetch, announce=lambda step, _at: board.push(checkpoints_at(step)))
    watch.reported(4, 1.0)
    controller.wait_questions(1)
    assert not watch.drain(timeout=0.05)  # step 4 not committed yet
    controller.committed.add(4)
    assert watch.drain(timeout=WAIT) and board.announced() == [4]
