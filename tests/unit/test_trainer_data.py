"""Data loading: every format, column mapping, stable label ids, splits, and a table of bad files.

Each bad input must fail with InvalidDataset (or InvalidSpec) and a message that names the file and the row or
column, because that message is what the user sees in `kubectl describe ftj`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer import data
from finetune_trainer.errors import InvalidDatasetError, InvalidSpecError, TrainerError
from finetune_trainer.spec import load_job, parse_spec

from tests.trainer.datafiles import write_table

ROWS = [
    {"label": "pos", "sentence": "a fine film", "extra": "x"},
    {"label": "neg", "sentence": "dull and long", "extra": "y"},
    {"label": "pos", "sentence": "wonderful", "extra": "z"},
    {"label": "neg", "sentence": "bad", "extra": "w"},
]


def spec_for(train: Path, validation: Path | None = None, **dataset: Any) -> Any:
    ds: dict[str, Any] = {"train": str(train), "textColumn": "sentence", "labelColumn": "label", **dataset}
    if validation is not None:
        ds["validation"] = str(validation)
    return parse_spec({"model": {"uri": "/m"}, "dataset": ds})


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_every_format_loads_the_same_examples(tmp_path: Path, fmt: str) -> None:
    train = write_table(tmp_path / f"train.{fmt}", ROWS)
    dev = write_table(tmp_path / f"dev.{fmt}", ROWS[:2])
    prepared = data.prepare(spec_for(train, dev))
    assert prepared.label_names == ["neg", "pos"]
    assert prepared.train.texts == [r["sentence"] for r in ROWS]
    assert prepared.train.labels == [1, 0, 1, 0]
    assert prepared.validation.labels == [1, 0]


def test_explicit_format_overrides_extension(tmp_path: Path) -> None:
    path = write_table(tmp_path / "train.csv", ROWS)
    renamed = path.rename(tmp_path / "train.data")
    prepared = data.prepare(spec_for(renamed, format="csv", validationSplit=0.25))
    assert len(prepared.train) + len(prepared.validation) == len(ROWS)


def test_numeric_labels_sort_numerically_and_match_across_formats(tmp_path: Path) -> None:
    rows = [{"label": n, "sentence": f"s{n}"} for n in (10, 2, 1, 2)]
    train = write_table(tmp_path / "train.jsonl", rows)
    dev = write_table(tmp_path / "dev.tsv", [{"label": 2, "sentence": "x"}])  # tsv reads "2" as int 2
    prepared = data.prepare(spec_for(train, dev))
    assert prepared.label_names == ["1", "2", "10"]  # not "1", "10", "2"
    assert prepared.train.labels == [2, 1, 0, 1]
    assert prepared.validation.labels == [1]


def test_text_pair_column(tmp_path: Path) -> None:
    rows = [{"label": i % 2, "a": f"q{i}", "b": f"p{i}"} for i in range(4)]
    train = write_table(tmp_path / "train.csv", rows)
    spec = parse_spec(
        {
            "model": {"uri": "/m"},
            "dataset": {"train": str(train), "textColumn": "a", "textPairColumn": "b", "validationSplit": 0.5},
        }
    )
    prepared = data.prepare(spec)
    assert prepared.train.pairs is not None
    assert [t.replace("q", "p") for t in prepared.train.texts] == prepared.train.pairs


def test_validation_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    rows = [{"label": i % 3, "sentence": f"sentence {i}"} for i in range(50)]
    train = write_table(tmp_path / "train.parquet", rows)
    first = data.prepare(spec_for(train, validationSplit=0.2))
    second = data.prepare(spec_for(train, validationSplit=0.2))
    assert first == second
    assert len(first.validation) == 10 and len(first.train) == 40
    assert not set(first.train.texts) & set(first.validation.texts)


def test_max_samples_take_the_first_rows(tmp_path: Path) -> None:
    rows = [{"label": i % 2, "sentence": f"s{i}"} for i in range(20)]
    train = write_table(tmp_path / "train.csv", rows)
    dev = write_table(tmp_path / "dev.csv", rows)
    prepared = data.prepare(spec_for(train, dev, maxTrainSamples=5, maxEvalSamples=3))
    assert prepared.train.texts == [f"s{i}" for i in range(5)]
    assert len(prepared.validation) == 3
    assert prepared.train_rows_total == 20


def test_causal_lm_needs_only_text(tmp_path: Path) -> None:
    train = write_table(tmp_path / "train.jsonl", [{"text": f"line {i}"} for i in range(10)])
    spec = parse_spec(
        {"model": {"uri": "/m"}, "task": "causal-lm", "method": {"strategy": "lora"}, "dataset": {"train": str(train)}}
    )
    prepared = data.prepare(spec)
    assert prepared.label_names == [] and prepared.train.labels is None


@dataclass(frozen=True)
class Bad:
    name: str
    train: str | list[dict[str, Any]] | bytes
    error: type[TrainerError]
    expect: list[str]
    fmt: str = "csv"
    dev: list[dict[str, Any]] | None = None
    dataset: dict[str, Any] = field(default_factory=dict)


BAD = [
    Bad("missing file", "<missing>", InvalidDatasetError, ["train.csv", "does not exist"]),
    Bad("empty file", b"", InvalidDatasetError, ["train.csv", "empty"]),
    Bad("header only", b"label,sentence\n", InvalidDatasetError, ["train.csv"]),
    Bad("missing text column", [{"label": 1, "text": "x"}], InvalidDatasetError, ["'sentence'", "textColumn", "text"]),
    Bad("missing label column", [{"y": 1, "sentence": "x"}], InvalidDatasetError, ["'label'", "labelColumn"]),
    Bad(
        "unknown label in validation",
        ROWS,
        InvalidDatasetError,
        ["dev.csv", "row 2", "'maybe'", "neg, pos"],
        dev=[{"label": "pos", "sentence": "a"}, {"label": "maybe", "sentence": "b"}],
    ),
    Bad(
        "empty label cell",
        [{"label": "pos", "sentence": "a"}, {"label": "", "sentence": "b"}],
        InvalidDatasetError,
        ["row 2", "'label'"],
    ),
    Bad("single label", [{"label": 1, "sentence": "a"}, {"label": 1, "sentence": "b"}], InvalidDatasetError, ["two"]),
    Bad("bad json line", b'{"label": 1, "sentence": "a"}\n{oops\n', InvalidDatasetError, ["line 2"], fmt="jsonl"),
    Bad("not parquet", b"this is not parquet", InvalidDatasetError, ["train.parquet", "parquet"], fmt="parquet"),
    Bad("unknown extension", ROWS, InvalidSpecError, ["spec.dataset.format"], fmt="txt"),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.name)
def test_bad_data_fails_naming_file_row_column(tmp_path: Path, case: Bad) -> None:
    train = tmp_path / f"train.{case.fmt}"
    if isinstance(case.train, bytes):
        train.write_bytes(case.train)
    elif isinstance(case.train, list):
        write_table(train, case.train) if case.fmt != "txt" else train.write_text(json.dumps(case.train))
    dev = write_table(tmp_path / "dev.csv", case.dev) if case.dev else None
    with pytest.raises(case.error) as info:
        data.prepare(spec_for(train, dev, **case.dataset))
    for fragment in case.expect:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_label_key_normalises_equivalent_labels() -> None:
    assert {data.label_key(v) for v in (1, 1.0, "1", " 1 ")} == {"1"}
    assert data.label_key(True) == "true"
    assert data.sort_labels({"b", "a", "10"}) == ["10", "a", "b"]


REPO = Path(__file__).resolve().parents[2]


def test_quickstart_data_ships_in_the_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make run` reads only files inside the clone: the quick-start job's data resolves below the repo root."""
    job = load_job(REPO / "examples" / "quickstart.yaml")
    monkeypatch.chdir(REPO)  # `make run` runs from the repo root; relative paths resolve against it
    prepared = data.prepare(job.spec)
    assert (len(prepared.train), len(prepared.validation)) == (4000, 872)
    for uri in (job.spec.dataset.train, job.spec.dataset.validation):
        assert uri is not None and (REPO / uri).resolve().is_relative_to(REPO / "examples" / "data")
    shipped = sum(p.stat().st_size for p in (REPO / "examples" / "data").rglob("*") if p.is_file())
    assert shipped < 1_000_000


def test_nothing_a_user_runs_reads_the_development_share() -> None:
    """A user's clone has no ../shared: examples, the Makefile and the test data helpers must not point there."""
    offenders = [
        str(p.relative_to(REPO))
        for pattern in ("examples/**/*.yaml", "Makefile", "tests/trainer/*.py", "hack/*.py", "hack/*.sh")
        for p in REPO.glob(pattern)
        if "shared/datasets" in p.read_text(encoding="utf-8")
    ]
    assert offenders == []
