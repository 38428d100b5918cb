"""The `finetune` dispatcher: unknown commands fail with the list of known ones; help lists every command."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from finetune_operator import cli


@dataclass(frozen=True)
class Case:
    name: str
    argv: list[str]
    code: int
    out: str
    err: str


CASES = [
    Case("no args prints usage and fails", [], 2, "usage: finetune", ""),
    Case("help prints every command", ["--help"], 0, "render", ""),
    Case("unknown command names the known ones", ["frobnicate"], 2, "", "expected one of: run, train"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_dispatch(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(case.argv) == case.code
    captured = capsys.readouterr()
    assert case.out in captured.out
    assert case.err in captured.err


def test_every_subcommand_target_is_module_colon_function() -> None:
    for name, (target, help_) in cli.SUBCOMMANDS.items():
        module, _, func = target.partition(":")
        assert module.startswith(("finetune_operator.", "finetune_trainer.")), name
        assert func.endswith("_main") and help_, name
