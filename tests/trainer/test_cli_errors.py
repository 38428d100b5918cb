"""The exit contract for bad input: each case gives its own reason and exit code, the JSON reason is the last
stderr line, and the same line lands in the termination message file. These fail in pre-flight, before Ray starts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_trainer import cli
from finetune_trainer.contract import ExitCode, Reason, parse_failure_line
from finetune_trainer.errors import ModelNotFoundError

from tests.servers.s3 import S3Server
from tests.trainer.conftest import TrainerEnv
from tests.trainer.datafiles import job_manifest, write_table


@dataclass(frozen=True)
class Case:
    name: str
    edit: Callable[[dict[str, Any], Path], None]
    code: ExitCode
    reason: Reason
    message: list[str] = field(default_factory=list)
    command: str = "run"


def _set(path: str, value: Any) -> Callable[[dict[str, Any], Path], None]:
    def edit(spec: dict[str, Any], tmp: Path) -> None:
        *parents, last = path.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value(tmp) if callable(value) else value

    return edit


CASES = [
    Case("unknown strategy", _set("method.strategy", "bogus"), ExitCode.INVALID_SPEC, Reason.INVALID_SPEC,
         ["spec.method.strategy"]),
    Case("learning rate not a number", _set("hyperparameters.learningRate", "fast"), ExitCode.INVALID_SPEC,
         Reason.INVALID_SPEC, ["spec.hyperparameters.learningRate", "not a number"]),
    Case("unknown data extension", _set("dataset.train", lambda t: str(t / "train.txt")), ExitCode.INVALID_SPEC,
         Reason.INVALID_SPEC, ["spec.dataset.format"]),
    Case("missing train file", _set("dataset.train", lambda t: str(t / "nope.csv")), ExitCode.INVALID_DATASET,
         Reason.INVALID_DATASET, ["nope.csv", "does not exist"]),
    Case("missing text column", _set("dataset.textColumn", "review"), ExitCode.INVALID_DATASET,
         Reason.INVALID_DATASET, ["'review'", "textColumn", "columns are: label, sentence"]),
    Case("unknown label in validation", _set("dataset.validation", lambda t: str(write_table(
        t / "dev.csv", [{"label": 0, "sentence": "x"}, {"label": 7, "sentence": "y"}]))),
         ExitCode.INVALID_DATASET, Reason.INVALID_DATASET, ["dev.csv", "row 2", "'7'"]),
    Case("model dir without config", _set("model.uri", str), ExitCode.MODEL_NOT_FOUND,
         Reason.MODEL_NOT_FOUND, ["config.json"]),
    Case("hf model not in the offline cache", _set("model.uri", "hf://nobody/missing-model"),
         ExitCode.MODEL_NOT_FOUND, Reason.MODEL_NOT_FOUND, ["hf://nobody/missing-model", "HF_HUB_OFFLINE"]),
    Case("train without output uri", lambda s, t: None, ExitCode.INVALID_SPEC, Reason.INVALID_SPEC,
         ["spec.output.uri"], command="train"),
]  # fmt: skip


def run_cli(command: str, job: Path, tmp: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    argv = [str(job), "--no-progress"] if command == "run" else ["--config", str(job), "--metrics-port", "0"]
    code = (cli.run_main if command == "run" else cli.train_main)(argv)
    err = capsys.readouterr().err
    return code, err, (tmp / "termination-log").read_text()


@pytest.fixture
def base_spec(tiny_models: dict[str, Path], sst_data: dict[str, Path], trainer_env: TrainerEnv) -> dict[str, Any]:
    return {
        "model": {"uri": str(tiny_models["bert"])},
        "dataset": {"train": str(sst_data["csv_train"]), "textColumn": "sentence"},
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_gives_its_reason(
    case: Case,
    tmp_path: Path,
    base_spec: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.txt").write_text("label,sentence\n0,a\n")
    spec = json.loads(json.dumps(base_spec))
    case.edit(spec, tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_manifest(name="bad", spec=spec)))
    code, err, termination = run_cli(case.command, job, tmp_path, capsys)
    assert code == case.code
    last = err.strip().splitlines()[-1]
    assert parse_failure_line(last) is not None and termination.strip() == last
    reason, message = json.loads(last)["reason"], json.loads(last)["message"]
    assert reason == case.reason.value
    for fragment in case.message:
        assert fragment in message, (fragment, message)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("manifest.json"))


def test_not_a_finetunejob_is_invalid_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    job = tmp_path / "pod.yaml"
    job.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n")
    code, err, _ = run_cli("run", job, tmp_path, capsys)
    assert code == ExitCode.INVALID_SPEC and "no document of kind FineTuneJob" in err.splitlines()[-1]


def test_unwritable_s3_output_is_storage_error(
    tmp_path: Path,
    base_spec: dict[str, Any],
    s3_server: S3Server,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    spec = {
        **base_spec,
        "storage": {"endpoint": s3_server.endpoint},
        "output": {"uri": "s3://no-access/out/"},
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_manifest(name="bad-s3", spec=spec)))
    code, err, _ = run_cli("run", job, tmp_path, capsys)
    assert code == ExitCode.STORAGE_ERROR
    reason, message = parse_failure_line(err) or ("", "")
    assert reason == Reason.STORAGE_ERROR.value and "s3://no-access/out" in message
    assert "not-the-secret" not in err  # secrets never reach logs


def test_guard_never_turns_sys_exit_into_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(tmp_path / "term"))

    def body() -> int:
        raise SystemExit(0)

    assert cli.guarded(body, verbose=False) == ExitCode.TRAINING_ERROR
    assert parse_failure_line(capsys.readouterr().err) is not None

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert cli.guarded(interrupted, verbose=False) == ExitCode.INTERRUPTED
    assert json.loads((tmp_path / "term").read_text())["reason"] == "Interrupted"


def test_termination_log_that_cannot_be_written_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", "/proc/no/such/dir/log")

    def body() -> int:
        raise ModelNotFoundError("nope")

    assert cli.guarded(body, verbose=False) == ExitCode.MODEL_NOT_FOUND
