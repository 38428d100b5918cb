"""The trainer's report line: always fits the kubelet's termination-message limit and round-trips."""

from __future__ import annotations

import dataclasses

import pytest
from finetune_trainer import contract
from finetune_trainer.contract import TERMINATION_MESSAGE_LIMIT, TrainerReport, parse_report


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    report: TrainerReport
    keeps_tail: int  # log lines that survive
    message_truncated: bool


CASES = [
    Case("small", TrainerReport(reason="TrainingError", message="loss is NaN", log_tail=("a", "b")), 2, False),
    Case(
        "400 labels",
        TrainerReport(reason="InvalidDataset", message=", ".join(f"label-{i}" for i in range(400))),
        0,
        True,
    ),
    Case(
        "long tail, short message",
        TrainerReport(reason="TrainingError", message="boom", log_tail=tuple("y" * 300 for _ in range(20))),
        13,
        False,
    ),
    Case(
        "success summary",
        TrainerReport(
            reason=contract.SUCCEEDED,
            metric_name="eval_accuracy",
            metric=0.91,
            baseline=0.5,
            kept_step=7,
            resumed_from_step=40,
        ),
        0,
        False,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_report_line_fits_and_round_trips(case: Case) -> None:
    line = case.report.to_line()
    assert len(line.encode("utf-8")) <= TERMINATION_MESSAGE_LIMIT
    back = parse_report("some log line\n" + line + "\n")
    assert back is not None
    assert back.reason == case.report.reason
    assert len(back.log_tail) == case.keeps_tail
    assert back.log_tail == case.report.log_tail[len(case.report.log_tail) - case.keeps_tail :]
    assert back.message.endswith(contract.TRUNCATED) is case.message_truncated
    if not case.message_truncated:
        assert back == dataclasses.replace(case.report, log_tail=back.log_tail)


def test_failure_line_is_not_a_success() -> None:
    assert contract.parse_failure_line(TrainerReport(reason=contract.SUCCEEDED).to_line()) is None
    line = contract.failure_line(contract.Reason.STORAGE_ERROR, "timeout")
    assert contract.parse_failure_line(line) == ("StorageError", "timeout")
