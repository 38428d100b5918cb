"""The typed FineTuneJob spec: the one source of truth for the API.

Why it lives in the trainer package: the trainer validates the job it runs and the operator validates the job it
reconciles, and both must agree to the letter. The operator generates the CRD schema from these models, so every
field carries a description (it becomes `kubectl explain` text). This module imports only pydantic and yaml: the
operator image has no torch or ray, and must be able to import it.

Field names are snake_case in Python and camelCase on the wire (aliases), as in docs/api-reference.md.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

API_GROUP = "finetune.dev"
API_VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SHORT_NAME = "ftj"

MODEL_URI_SCHEMES = ("hf://", "s3://", "file://", "pvc://")
DATA_URI_SCHEMES = ("s3://", "file://")
OUTPUT_URI_SCHEMES = ("s3://", "file://")
DATA_FORMATS = ("jsonl", "csv", "tsv", "parquet")

# Kubernetes resource quantities (the subset we accept): plain/decimal numbers with an optional suffix.
_QUANTITY = re.compile(r"^(?P<num>[0-9]+(\.[0-9]+)?)(?P<suffix>m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$")
_SUFFIX = {
    None: 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
}
QUANTITY_PATTERN = _QUANTITY.pattern


class SpecError(ValueError):
    """A FineTuneJob that cannot be run; `errors` are (field path, message) pairs, path in wire (camelCase) form."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{path}: {message}" for path, message in errors))


def parse_quantity(value: str | int | float) -> float:
    """Parse a Kubernetes quantity ("500m", "4", "16Gi") into a float of base units (cores or bytes)."""
    match = _QUANTITY.match(str(value).strip())
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (examples: 500m, 2, 1.5, 16Gi, 512Mi)")
    return float(match.group("num")) * _SUFFIX[match.group("suffix")]


def _quantity(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("must be a Kubernetes quantity string such as '2', '500m' or '16Gi'")
    if parse_quantity(value) <= 0:
        raise ValueError(f"{value!r} must be greater than zero")
    return str(value)


def _float_from_string(value: Any) -> Any:
    # learningRate may be written "2e-5" (YAML reads that as a string) or 2.0e-5: accept both.
    if isinstance(value, bool):  # pydantic would read true as 1.0
        raise ValueError("must be a number or a numeric string such as '2e-5', not a boolean")
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError as e:
            raise ValueError(f"{value!r} is not a number (examples: 2e-5, 0.0001)") from e
    return value


Quantity = Annotated[str, BeforeValidator(_quantity)]


def _check_scheme(value: str, schemes: tuple[str, ...], *, allow_local_path: bool) -> str:
    if value.startswith(schemes):
        if value.rstrip("/") in {s.rstrip("/") for s in schemes} or value.endswith("://"):
            raise ValueError(f"{value!r} has a scheme but no location")
        return value
    if allow_local_path and "://" not in value and value:
        return value
    allowed = ", ".join(schemes) + (" or a local path" if allow_local_path else "")
    raise ValueError(f"{value!r} has an unsupported scheme; allowed: {allowed}")


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_enum_values=False,
    )

    def wire(self) -> dict[str, Any]:
        """The object as it appears in a manifest (camelCase, JSON types, no unset optionals)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Task(StrEnum):
    SEQUENCE_CLASSIFICATION = "sequence-classification"
    CAUSAL_LM = "causal-lm"


class Strategy(StrEnum):
    HEAD = "head"
    TOP_LAYERS = "top-layers"
    GRADUAL = "gradual"
    FULL = "full"
    LORA = "lora"


class Pooling(StrEnum):
    AUTO = "auto"
    CLS = "cls"
    MEAN = "mean"


class Baseline(StrEnum):
    NONE = "none"
    SCRATCH = "scratch"
    PROBE = "probe"


# The validation metrics the trainer computes per task; loss-like ones are minimised, the others maximised.
EVAL_METRICS: dict[Task, tuple[str, ...]] = {
    Task.SEQUENCE_CLASSIFICATION: ("eval_accuracy", "eval_f1", "eval_loss"),
    Task.CAUSAL_LM: ("eval_loss", "eval_perplexity"),
}
DEFAULT_METRIC: dict[Task, str] = {Task.SEQUENCE_CLASSIFICATION: "eval_accuracy", Task.CAUSAL_LM: "eval_loss"}
MetricName = Literal["eval_accuracy", "eval_f1", "eval_loss", "eval_perplexity"]


def minimized(metric: str) -> bool:
    """Whether lower is better for this metric (losses and perplexity)."""
    return metric.endswith(("loss", "perplexity"))


class Precision(StrEnum):
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class ModelSource(_Model):
    uri: str = Field(
        description="Pretrained model to adapt: hf://org/name (Hugging Face id; honours HF_HUB_OFFLINE and the HF "
        "cache), s3://bucket/prefix or file:///path (save_pretrained layout), or pvc://claim/path (a mounted "
        "PersistentVolumeClaim). The tokenizer is loaded from the same place.",
        min_length=1,
    )
    revision: str | None = Field(
        default=None, description="Revision (branch, tag or commit) of an hf:// model; only valid with hf://."
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return _check_scheme(value, MODEL_URI_SCHEMES, allow_local_path=True)

    @model_validator(mode="after")
    def _revision_only_for_hf(self) -> Self:
        if self.revision is not None and not self.uri.startswith("hf://"):
            raise ValueError("revision is only allowed with an hf:// model uri")
        return self


class DatasetSpec(_Model):
    train: str = Field(
        description="Training data: s3://bucket/key or file:///path (or a local path) to a .jsonl, .csv, .tsv or "
        ".parquet file.",
        min_length=1,
    )
    validation: str | None = Field(
        default=None, description="Validation data (same forms as train). When absent, validationSplit of train."
    )
    validation_split: float = Field(
        default=0.1,
        gt=0.0,
        lt=1.0,
        description="Fraction of train held out for validation when no validation file is given (0 < x < 1).",
    )
    format: Literal["jsonl", "csv", "tsv", "parquet"] | None = Field(
        default=None, description="File format; inferred from the file extension when absent."
    )
    text_column: str = Field(default="text", min_length=1, description="Column holding the input text.")
    text_pair_column: str | None = Field(default=None, description="Optional second text column (sentence-pair tasks).")
    label_column: str = Field(
        default="label",
        min_length=1,
        description="Column holding the label (sequence-classification). Labels are mapped to ids in sorted order "
        "and stored in the model's config.json (id2label/label2id).",
    )
    max_train_samples: int | None = Field(
        default=None, ge=1, description="Use only the first N training rows (quick runs)."
    )
    max_eval_samples: int | None = Field(default=None, ge=1, description="Use only the first N validation rows.")

    @field_validator("train", "validation")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return None if value is None else _check_scheme(value, DATA_URI_SCHEMES, allow_local_path=True)


class GradualSpec(_Model):
    layers_per_epoch: int = Field(default=1, ge=1, description="Transformer blocks unfrozen per epoch, from the top.")
    lr_decay: float = Field(
        default=2.6,
        ge=1.0,
        description="Discriminative learning rates: each block below the top trains at the rate of the block "
        "above divided by this factor (ULMFiT uses 2.6).",
    )


class LoraSpec(_Model):
    r: int = Field(default=8, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(default=16, ge=1, description="LoRA scaling alpha.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="LoRA dropout (0 <= x < 1).")
    target_modules: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Module names to adapt; chosen per architecture when absent (e.g. query/value for BERT, "
        "q_lin/v_lin for DistilBERT, c_attn for GPT-2).",
    )
    merge: bool = Field(default=True, description="Also save the base model with the adapter merged into it.")


class MethodSpec(_Model):
    strategy: Strategy = Field(
        default=Strategy.LORA,
        description="How the pretrained model is adapted: head (train a new head on a frozen body), top-layers "
        "(unfreeze the top unfreezeLayers blocks + head), gradual (ULMFiT-style gradual unfreezing with "
        "discriminative learning rates), full (train everything), lora (low-rank adapters, peft).",
    )
    unfreeze_layers: int | None = Field(
        default=None, ge=1, description="top-layers only: how many top transformer blocks train (default 2)."
    )
    gradual: GradualSpec | None = Field(default=None, description="gradual only: unfreezing schedule.")
    lora: LoraSpec | None = Field(default=None, description="lora only: adapter settings.")
    pooling: Pooling = Field(
        default=Pooling.AUTO,
        description="How a frozen body's token states become one feature vector for a linear head (strategy "
        "head and evaluation.baseline probe: feature extraction): mean (average of the non-padding tokens), cls "
        "(the first token, [CLS], for encoders; the last non-padding token for decoders), or auto (what the "
        "checkpoint was trained for: a sentence-transformers checkpoint's pooling config, else cls).",
    )
    head_epochs: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Strategy head and evaluation.baseline probe (feature extraction): passes of the linear head "
        "over the cached features; the frozen body encodes the data once whatever this says. Default: "
        "hyperparameters.epochs, raised until the head gets at least 1,000 optimizer steps (a linear head on "
        "cached features costs about a millisecond per step and under-trains in a few dozen). "
        "hyperparameters.maxSteps still caps the steps.",
    )

    @model_validator(mode="after")
    def _strategy_fields(self) -> Self:
        owned = {"unfreeze_layers": Strategy.TOP_LAYERS, "gradual": Strategy.GRADUAL, "lora": Strategy.LORA}
        for name, strategy in owned.items():
            if getattr(self, name) is not None and self.strategy is not strategy:
                raise ValueError(
                    f"{to_camel(name)} is only allowed with strategy {strategy.value!r} "
                    f"(strategy is {self.strategy.value!r})"
                )
        return self

    @property
    def top_layers(self) -> int:
        return self.unfreeze_layers if self.unfreeze_layers is not None else 2

    @property
    def gradual_spec(self) -> GradualSpec:
        return self.gradual or GradualSpec()

    @property
    def lora_spec(self) -> LoraSpec:
        return self.lora or LoraSpec()


class EarlyStoppingSpec(_Model):
    patience: int = Field(default=3, ge=1, description="Evaluations without improvement before stopping.")
    metric: MetricName | None = Field(
        default=None,
        description="Metric watched: eval_accuracy, eval_f1 or eval_loss (sequence-classification), eval_loss or "
        "eval_perplexity (causal-lm); default eval_accuracy / eval_loss. Loss-like metrics are minimised, the "
        "others maximised. The model of the best evaluation is the one kept.",
    )


class HyperparametersSpec(_Model):
    learning_rate: Annotated[float, BeforeValidator(_float_from_string)] = Field(
        default=2e-5, gt=0.0, le=1.0, description='Peak learning rate; a number or a string such as "2e-5".'
    )
    epochs: int = Field(default=3, ge=1, le=1000, description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (overrides epochs when smaller)."
    )
    batch_size: int = Field(default=32, ge=1, le=65536, description="Examples per worker per step.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(default=0.06, ge=0.0, lt=1.0, description="Fraction of steps of linear warm-up.")
    weight_decay: float = Field(default=0.01, ge=0.0, description="AdamW weight decay.")
    max_seq_length: int = Field(default=128, ge=8, le=32768, description="Tokens per example after truncation.")
    precision: Precision = Field(
        default=Precision.AUTO, description="auto (bf16 on capable GPUs, fp32 on CPU), fp32, bf16 or fp16."
    )
    seed: int = Field(default=42, ge=0, description="Random seed (data order, head initialisation).")
    eval_every_steps: int | None = Field(
        default=None, ge=1, description="Evaluate every N optimizer steps; default: at the end of each epoch."
    )
    early_stopping: EarlyStoppingSpec | None = Field(
        default=None, description="Stop when the metric has not improved for patience evaluations."
    )


class HeadResources(_Model):
    cpu: Quantity = Field(default="1", description="CPU for the Ray head pod (runs the trainer driver).")
    memory: Quantity = Field(default="2Gi", description="Memory for the Ray head pod.")


class ResourcesSpec(_Model):
    workers: int = Field(default=1, ge=1, le=1024, description="Ray Train workers, one pod each.")
    gpus_per_worker: int = Field(default=0, ge=0, le=64, description="nvidia.com/gpu per worker; 0 = CPU workers.")
    cpus_per_worker: Quantity = Field(default="1", description="CPU request and limit of each worker pod.")
    memory_per_worker: Quantity = Field(default="4Gi", description="Memory request and limit of each worker pod.")
    head: HeadResources = Field(default_factory=HeadResources, description="Resources of the Ray head pod.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels every pod must match.")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Tolerations added to every pod (Kubernetes Toleration objects)."
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict, description="Affinity of every pod (Kubernetes Affinity object)."
    )
    priority_class_name: str | None = Field(default=None, description="PriorityClass of every pod.")

    @property
    def cpus(self) -> float:
        return parse_quantity(self.cpus_per_worker)


class StorageSpec(_Model):
    endpoint: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/]+(/.*)?$",
        description="S3 endpoint for every s3:// URI of this job (e.g. http://minio.minio.svc:9000); default "
        "from the operator settings, else AWS.",
    )
    region: str = Field(default="us-east-1", min_length=1, description="S3 region.")
    credentials_secret: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Name of a Secret in the job's namespace with keys AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY. Secrets are referenced, never copied.",
    )


class OutputSpec(_Model):
    uri: str | None = Field(
        default=None,
        description="Where artifacts and checkpoints go (s3://bucket/prefix/ or file:///path); default from the "
        "operator settings plus <namespace>/<name>/, or ./runs/<name>/ for finetune run.",
    )
    min_metric: dict[str, Annotated[float, BeforeValidator(_float_from_string)]] | None = Field(
        default=None,
        description="Quality gate, e.g. {eval_accuracy: 0.85}: the kept model must reach every listed validation "
        "metric (at least the value; at most for eval_loss / eval_perplexity). Below it the model is not "
        "published: its artifacts go under rejected/, the manifest says rejected and the job fails with reason "
        "QualityGateFailed.",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return None if value is None else _check_scheme(value, OUTPUT_URI_SCHEMES, allow_local_path=True)


class EvaluationSpec(_Model):
    baseline: Baseline = Field(
        default=Baseline.NONE,
        description="Negative-transfer guard: also train a baseline with the same budget on the same data and "
        "report it beside the result: scratch (the same architecture from random initialisation, all weights "
        "trained), probe (a linear head on the frozen pretrained body, sequence-classification only), or none.",
    )
    min_gain: Annotated[float, BeforeValidator(_float_from_string)] = Field(
        default=0.0,
        ge=0.0,
        description="How much the fine-tuned model must beat the baseline by, in units of the watched metric "
        "(earlyStopping.metric or the task default); less is reported as negative transfer (condition "
        "NegativeTransfer=True).",
    )


class CheckpointSpec(_Model):
    every_steps: int = Field(default=200, ge=1, description="Save a checkpoint every N optimizer steps.")
    keep: int = Field(default=2, ge=1, le=100, description="How many recent checkpoints to keep.")


class FineTuneJobSpec(_Model):
    model: ModelSource = Field(description="The pretrained model to adapt.")
    task: Task = Field(default=Task.SEQUENCE_CLASSIFICATION, description="sequence-classification or causal-lm.")
    dataset: DatasetSpec = Field(description="Training and validation data.")
    method: MethodSpec = Field(default_factory=MethodSpec, description="The adaptation strategy.")
    hyperparameters: HyperparametersSpec = Field(
        default_factory=HyperparametersSpec, description="Optimisation settings."
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Pods, GPUs and placement.")
    image: str | None = Field(default=None, description="Trainer image; default from the operator settings.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Object storage for s3:// URIs.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where final artifacts are written.")
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="Negative-transfer guard: a baseline reported beside the result."
    )
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpointing.")
    backoff_limit: int = Field(
        default=2, ge=0, le=100, description="Failed attempts retried (each resumes from the latest checkpoint)."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail the job when it has been active longer than this."
    )
    pending_deadline_seconds: int = Field(
        default=600, ge=1, description="Fail when pods stay unschedulable or unpulled longer than this."
    )
    progress_deadline_seconds: int = Field(
        default=1800,
        ge=1,
        description="Fail with reason NoProgress when no new training step is reported for this long.",
    )
    suspend: bool = Field(
        default=False, description="true deletes the Ray cluster and keeps checkpoints; false resumes from them."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the job this long after it Succeeded or Failed."
    )

    @model_validator(mode="after")
    def _task_fits(self) -> Self:
        if self.task is Task.CAUSAL_LM and self.method.strategy is Strategy.HEAD:
            raise ValueError("strategy 'head' needs a new task head; causal-lm reuses the LM head (use lora or full)")
        errors = task_errors(self)
        if errors:
            raise FieldRulesError(errors)
        return self

    @property
    def watched_metric(self) -> str:
        """The metric early stopping, the quality gate report and the baseline comparison use."""
        es = self.hyperparameters.early_stopping
        return es.metric if es is not None and es.metric is not None else DEFAULT_METRIC[self.task]


class FieldRulesError(ValueError):
    """Cross-field rule violations, each with the path (below spec) of the field it is about."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{path}: {message}" for path, message in errors))


def task_errors(spec: FineTuneJobSpec) -> list[tuple[str, str]]:
    """Cross-field rules that depend on the task and the method (metric names, pooling, baselines)."""
    allowed = EVAL_METRICS[spec.task]
    names = ", ".join(allowed)
    errors: list[tuple[str, str]] = []
    es = spec.hyperparameters.early_stopping
    if es is not None and es.metric is not None and es.metric not in allowed:
        errors.append(
            (
                "hyperparameters.earlyStopping.metric",
                f"{es.metric} is not computed for {spec.task.value}; use one of {names}",
            )
        )
    for metric in spec.output.min_metric or {}:
        if metric not in allowed:
            errors.append(("output.minMetric", f"{metric!r} is not computed for {spec.task.value}; use one of {names}"))
    baseline = spec.evaluation.baseline
    probes = spec.method.strategy is Strategy.HEAD or baseline is Baseline.PROBE
    if spec.method.pooling is not Pooling.AUTO and not probes:
        errors.append(
            ("method.pooling", "only used by strategy 'head' and evaluation.baseline 'probe' (leave it auto)")
        )
    if spec.method.head_epochs is not None and not probes:
        errors.append(("method.headEpochs", "only used by strategy 'head' and evaluation.baseline 'probe'"))
    if baseline is Baseline.PROBE and spec.task is not Task.SEQUENCE_CLASSIFICATION:
        errors.append(("evaluation.baseline", "probe needs sequence-classification (use scratch for causal-lm)"))
    if baseline is Baseline.PROBE and spec.method.strategy is Strategy.HEAD:
        errors.append(
            ("evaluation.baseline", "strategy 'head' already is a linear probe of the frozen body; use scratch")
        )
    return errors


class ObjectMeta(BaseModel):
    """The part of metadata the trainer cares about; everything else in metadata is kept as-is."""

    model_config = ConfigDict(extra="allow", frozen=True)
    # Any Kubernetes object name (a DNS subdomain): the operator shortens child names itself.
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$", max_length=253)
    namespace: str | None = None


class FineTuneJob(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)
    api_version: Literal["finetune.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta
    spec: FineTuneJobSpec


def _wire_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif item in {"function-after", "function-before"} or item.startswith(("function-", "literal[")):
            continue
        else:
            parts.append(item)
    return ".".join(parts)


def spec_errors(error: ValidationError, *, prefix: str = "") -> SpecError:
    """Turn pydantic's error into field paths in wire form (spec.method.strategy) with readable messages."""
    errors: list[tuple[str, str]] = []
    for item in error.errors(include_url=False):
        path = _wire_path(tuple(item["loc"]))
        path = ".".join(p for p in (prefix, path) if p)
        rules = (item.get("ctx") or {}).get("error")
        if isinstance(rules, FieldRulesError):
            errors += [(".".join(p for p in (path, sub) if p), message) for sub, message in rules.errors]
            continue
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see `kubectl explain finetunejob.spec`)"
        errors.append((path or "<root>", message))
    return SpecError(errors)


def parse_spec(data: Any) -> FineTuneJobSpec:
    """Validate a spec mapping (wire form); raises SpecError naming every bad field as spec.<path>."""
    try:
        return FineTuneJobSpec.model_validate(data)
    except ValidationError as e:
        raise spec_errors(e, prefix="spec") from e


def parse_job(data: Any) -> FineTuneJob:
    """Validate a whole FineTuneJob manifest; raises SpecError naming every bad field."""
    if not isinstance(data, dict):
        raise SpecError([("<root>", "a FineTuneJob manifest must be a YAML mapping")])
    try:
        return FineTuneJob.model_validate(data)
    except ValidationError as e:
        raise spec_errors(e) from e


def load_job(path: str | Path) -> FineTuneJob:
    """Read a FineTuneJob manifest from a YAML file (the first document of kind FineTuneJob)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise SpecError([("<file>", f"{path} is not valid YAML: {e}")]) from e
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
    if not jobs:
        raise SpecError([("kind", f"{path} holds no document of kind {KIND}")])
    return parse_job(jobs[0])
