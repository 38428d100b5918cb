"""Training data: read jsonl/csv/tsv/parquet from s3:// or local files, map columns and labels, validate.

Why it validates so much: bad data is the most common reason a fine-tuning job fails, and it is cheap to detect
before any worker starts. The driver runs `prepare` once as a pre-flight check (InvalidDataset naming the file,
row and column), and every worker runs it again to load its data (workers are other pods). Labels are mapped to
ids in a stable order (numeric when every label is an integer, else lexicographic) so every worker and every
relaunch agree, and the mapping is stored in the model's config.json (id2label/label2id).
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow.parquet as pq

from finetune_trainer import storage
from finetune_trainer.errors import InvalidDatasetError, InvalidSpecError
from finetune_trainer.spec import DATA_FORMATS, Task

if TYPE_CHECKING:
    from finetune_trainer.spec import DatasetSpec, FineTuneJobSpec, StorageSpec

_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Examples:
    """One split as plain Python lists (tokenisation happens in the worker)."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[int] | None  # None for causal-lm

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class PreparedData:
    train: Examples
    validation: Examples
    label_names: list[str]  # id -> name; empty for causal-lm
    train_rows_total: int  # rows read from the train file (before split / maxTrainSamples)


def infer_format(uri: str, explicit: str | None) -> str:
    if explicit is not None:
        return explicit
    suffix = Path(uri.split("?", maxsplit=1)[0].rstrip("/")).suffix.lower()
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    raise InvalidSpecError(
        f"spec.dataset.format: cannot infer the format of {uri!r} from its extension; "
        f"set dataset.format to one of {', '.join(DATA_FORMATS)}"
    )


def _read_jsonl(data: bytes, uri: str) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidDatasetError(f"{uri}: line {number} is not valid JSON: {e.msg}") from e
        if not isinstance(value, dict):
            raise InvalidDatasetError(f"{uri}: line {number} is not a JSON object")
        rows.append(value)
    return pd.DataFrame(rows)


def load_table(uri: str, *, fmt: str | None, storage_spec: StorageSpec | None, base_dir: Path | None) -> pd.DataFrame:
    """Read a whole data file into a DataFrame; InvalidDataset when missing, unreadable or empty."""
    kind = infer_format(uri, fmt)
    loc = storage.resolve(uri, storage=storage_spec, base_dir=base_dir)
    try:
        data = storage.read_bytes(loc)  # a storage failure stays a StorageError: retryable, not the data's fault
    except FileNotFoundError as e:
        raise InvalidDatasetError(f"{loc.uri}: file does not exist") from e
    if not data.strip():
        raise InvalidDatasetError(f"{loc.uri}: file is empty")
    try:
        if kind == "jsonl":
            frame = _read_jsonl(data, loc.uri)
        elif kind == "parquet":
            frame = pq.read_table(io.BytesIO(data)).to_pandas()
        else:
            frame = pd.read_csv(
                io.BytesIO(data),
                sep="\t" if kind == "tsv" else ",",
                # GLUE-style TSV has unbalanced quotes inside sentences: read it verbatim.
                quoting=csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL,
                keep_default_na=False,
                na_values=[],
                encoding="utf-8",
            )
    except InvalidDatasetError:
        raise
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise InvalidDatasetError(f"{loc.uri}: not readable as {kind}: {e}") from e
    except Exception as e:  # pyarrow's ArrowInvalid and friends
        raise InvalidDatasetError(f"{loc.uri}: not readable as {kind}: {e}") from e
    if len(frame) == 0:
        raise InvalidDatasetError(f"{loc.uri}: file has no data rows")
    return frame


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def label_key(value: Any) -> str:
    """Canonical label name: 1, 1.0, "1" and " 1 " are the same label; bools become "true"/"false"."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if hasattr(value, "item"):  # numpy scalar
        return label_key(value.item())
    return str(value).strip()


def sort_labels(names: set[str]) -> list[str]:
    """Stable id order: numeric when every label is an integer, else lexicographic."""
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def _column(frame: pd.DataFrame, name: str, *, uri: str, field: str) -> list[Any]:
    if name not in frame.columns:
        available = ", ".join(map(str, frame.columns))
        raise InvalidDatasetError(f"{uri}: no column {name!r} ({field}); columns are: {available}")
    return list(frame[name])


def _texts(frame: pd.DataFrame, name: str, *, uri: str, field: str) -> list[str]:
    values = _column(frame, name, uri=uri, field=field)
    for row, value in enumerate(values, start=1):
        if _missing(value):
            raise InvalidDatasetError(f"{uri}: row {row}: column {name!r} is empty")
    return [str(v) for v in values]


def _examples(
    frame: pd.DataFrame, *, ds: DatasetSpec, uri: str, task: Task, label_ids: dict[str, int] | None
) -> tuple[Examples, list[str]]:
    texts = _texts(frame, ds.text_column, uri=uri, field="textColumn")
    pairs = (
        _texts(frame, ds.text_pair_column, uri=uri, field="textPairColumn")
        if ds.text_pair_column and task is Task.SEQUENCE_CLASSIFICATION
        else None
    )
    if task is not Task.SEQUENCE_CLASSIFICATION:
        return Examples(texts=texts, pairs=None, labels=None), []
    raw = _column(frame, ds.label_column, uri=uri, field="labelColumn")
    keys: list[str] = []
    for row, value in enumerate(raw, start=1):
        if _missing(value) or label_key(value) == "":
            raise InvalidDatasetError(f"{uri}: row {row}: column {ds.label_column!r} (labelColumn) is empty")
        keys.append(label_key(value))
    names = sort_labels(set(keys)) if label_ids is None else list(label_ids)
    ids = label_ids or {name: i for i, name in enumerate(names)}
    for row, key in enumerate(keys, start=1):
        if key not in ids:
            raise InvalidDatasetError(
                f"{uri}: row {row}: label {key!r} does not occur in the training data (known labels: {', '.join(ids)})"
            )
    return Examples(texts=texts, pairs=pairs, labels=[ids[k] for k in keys]), names


def _take(examples: Examples, indices: list[int]) -> Examples:
    return Examples(
        texts=[examples.texts[i] for i in indices],
        pairs=None if examples.pairs is None else [examples.pairs[i] for i in indices],
        labels=None if examples.labels is None else [examples.labels[i] for i in indices],
    )


def prepare(spec: FineTuneJobSpec, *, base_dir: Path | None = None) -> PreparedData:
    """Load and validate train/validation data as the spec describes."""
    ds = spec.dataset
    frame = load_table(ds.train, fmt=ds.format, storage_spec=spec.storage, base_dir=base_dir)
    train, names = _examples(frame, ds=ds, uri=ds.train, task=spec.task, label_ids=None)
    if spec.task is Task.SEQUENCE_CLASSIFICATION and len(names) < 2:
        raise InvalidDatasetError(
            f"{ds.train}: column {ds.label_column!r} has a single label ({', '.join(names)}); "
            "sequence classification needs at least two"
        )
    label_ids = {name: i for i, name in enumerate(names)} if names else None
    if ds.validation is not None:
        vframe = load_table(ds.validation, fmt=ds.format, storage_spec=spec.storage, base_dir=base_dir)
        validation, _ = _examples(vframe, ds=ds, uri=ds.validation, task=spec.task, label_ids=label_ids)
    else:
        order = list(range(len(train)))
        random.Random(spec.hyperparameters.seed).shuffle(order)
        held_out = max(1, round(len(order) * ds.validation_split))
        if held_out >= len(order):
            raise InvalidDatasetError(
                f"{ds.train}: {len(order)} rows are too few to hold out validationSplit={ds.validation_split}"
            )
        validation, train = _take(train, sorted(order[:held_out])), _take(train, sorted(order[held_out:]))
    total = len(frame)
    if ds.max_train_samples is not None:
        train = _take(train, list(range(min(ds.max_train_samples, len(train)))))
    if ds.max_eval_samples is not None:
        validation = _take(validation, list(range(min(ds.max_eval_samples, len(validation)))))
    return PreparedData(train=train, validation=validation, label_names=names, train_rows_total=total)
