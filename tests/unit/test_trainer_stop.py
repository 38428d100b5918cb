"""Stopping on request (suspend, Kueue preemption): what SIGTERM means to the driver, when a drain is worth waiting
for, and whether the loop must write a checkpoint before it leaves. The whole path with Ray:
tests/trainer/test_transfer_quality.py::test_sigterm_with_a_drain_budget_checkpoints_the_next_step."""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Iterator

import pytest
from finetune_trainer import signals
from finetune_trainer.contract import STOP_DRAIN_ENV, TrainerPhase
from finetune_trainer.loop import stop_needs_checkpoint
from finetune_trainer.progress import ProgressBoard, should_drain
from finetune_trainer.signals import StopAction, StopRequest


@dataclasses.dataclass(frozen=True)
class SignalCase:
    name: str
    drain_seconds: float
    signals: tuple[int, ...]
    actions: tuple[StopAction, ...]


SIGNAL_CASES = [
    SignalCase("no budget: SIGTERM interrupts", 0, (signal.SIGTERM,), (StopAction.INTERRUPT,)),
    SignalCase("budget: the first SIGTERM drains", 60, (signal.SIGTERM,), (StopAction.DRAIN,)),
    SignalCase(
        "budget: a second SIGTERM interrupts",
        60,
        (signal.SIGTERM, signal.SIGTERM),
        (StopAction.DRAIN, StopAction.INTERRUPT),
    ),
    SignalCase("budget: SIGINT interrupts", 60, (signal.SIGINT,), (StopAction.INTERRUPT,)),
]


@pytest.mark.parametrize("case", SIGNAL_CASES, ids=lambda c: c.name)
def test_what_a_stop_signal_means(case: SignalCase) -> None:
    stop = StopRequest(drain_seconds=case.drain_seconds)
    assert tuple(stop.on_signal(s) for s in case.signals) == case.actions
    assert stop.requested.is_set() is (StopAction.DRAIN in case.actions)


@pytest.mark.parametrize(
    ("value", "seconds"), [(None, 0.0), ("", 0.0), ("90", 90.0), ("2.5", 2.5), ("-3", 0.0), ("soon", 0.0)]
)
def test_the_drain_budget_comes_from_the_environment(value: str | None, seconds: float) -> None:
    environ = {} if value is None else {STOP_DRAIN_ENV: value}
    assert StopRequest.from_env(environ, STOP_DRAIN_ENV).drain_seconds == seconds


@pytest.mark.parametrize(
    ("phase", "drain"),
    [
        (None, False),
        (TrainerPhase.INITIALIZING, False),
        (TrainerPhase.LOADING, False),
        (TrainerPhase.TRAINING, True),
        (TrainerPhase.EVALUATING, True),
        (TrainerPhase.SAVING, False),
    ],
)
def test_a_drain_is_waited_for_only_while_the_training_loop_runs(phase: TrainerPhase | None, drain: bool) -> None:
    assert should_drain({"phase": phase.value} if phase else {}) is drain


@pytest.mark.parametrize(
    ("saved", "last", "stopped_early", "needed"),
    [
        (False, False, False, True),  # mid-interval: write one now
        (True, False, False, False),  # this step's periodic checkpoint was just written
        (False, True, False, None),  # the last step: the run finishes anyway
        (False, False, True, None),  # early stopping ends the loop anyway
    ],
)
def test_a_stop_request_checkpoints_unless_this_step_has_one(
    saved: bool, last: bool, stopped_early: bool, needed: bool | None
) -> None:
    assert stop_needs_checkpoint(saved=saved, last=last, stopped_early=stopped_early) is needed


def test_the_board_carries_the_stop_request() -> None:
    board = ProgressBoard()
    assert not board.stop_requested()
    board.request_stop()
    assert board.stop_requested()


@pytest.fixture
def restore_handlers() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGALRM)}
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in saved.items():
            signal.signal(s, handler)


@pytest.mark.usefixtures("restore_handlers")
def test_sigterm_with_a_budget_arms_a_timer_and_a_second_one_interrupts() -> None:
    stop = StopRequest(drain_seconds=600)
    signals.install(stop)
    signal.raise_signal(signal.SIGTERM)  # no exception: the drain is requested and the timer runs
    assert stop.requested.is_set()
    assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 600
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        signal.raise_signal(signal.SIGTERM)
    signals.disarm()
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0


@pytest.mark.usefixtures("restore_handlers")
def test_the_spent_budget_or_nothing_to_wait_for_interrupts_as_sigterm_did() -> None:
    signals.install(StopRequest(drain_seconds=600))
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        signal.raise_signal(signal.SIGALRM)  # what the timer, or interrupt_now from the poller, delivers


@pytest.mark.usefixtures("restore_handlers")
def test_without_a_budget_sigterm_interrupts_at_once() -> None:
    signals.install(None)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        signal.raise_signal(signal.SIGTERM)
