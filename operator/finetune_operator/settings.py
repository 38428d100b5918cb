"""Operator settings: one typed object, loaded once at start-up from the environment and command-line flags.

Why: configuration read at import time makes an operator untestable and its behaviour depend on import order.
`load_settings(argv, environ)` is called by `finetune operator` only; everything else receives the object
explicitly (through the kopf memo), so tests build a `Settings(...)` directly. Environment variables are
`FINETUNE_<FIELD>` (e.g. FINETUNE_NAMESPACES=team-a,team-b); flags override them (`--namespaces team-a`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "FINETUNE_"
DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-operator/trainer:0.1.0"


class LogFormat(StrEnum):
    JSON = "json"
    TEXT = "text"


class MetricsSource(StrEnum):
    """Where training progress comes from: the trainer's /metrics (always, in production) or a simulation.

    `simulated` exists only for tests whose pods run on simulated (kwok) nodes, where no trainer process runs:
    it derives a plausible step from the head pod's age. It is never the default and the operator logs a warning
    when set.
    """

    HTTP = "http"
    SIMULATED = "simulated"


class SettingsError(ValueError):
    """Bad operator configuration; the message names the environment variable / flag."""


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    namespaces: tuple[str, ...] = Field(
        default=(), description="Namespaces to watch; empty = cluster-wide (needs the ClusterRole)."
    )
    trainer_image: str = Field(default=DEFAULT_TRAINER_IMAGE, min_length=1, description="Default trainer image.")
    image_pull_policy: str = Field(
        default="IfNotPresent", pattern=r"^(Always|IfNotPresent|Never)$", description="imagePullPolicy of Ray pods."
    )
    storage_endpoint: str | None = Field(default=None, description="Default S3 endpoint for jobs without one.")
    storage_region: str | None = Field(default=None, description="Default S3 region for jobs without one.")
    storage_credentials_secret: str | None = Field(
        default=None, description="Default Secret (in the job's namespace) holding AWS_* keys."
    )
    output_base_uri: str | None = Field(
        default=None, description="Default artifact base (e.g. s3://models/); a job's output is <base><ns>/<name>/."
    )
    metrics_port: int = Field(default=8080, ge=0, le=65535, description="Operator /metrics port (0 = off).")
    health_port: int = Field(default=8081, ge=0, le=65535, description="/healthz and /readyz port (0 = off).")
    bind_address: str = Field(default="0.0.0.0", description="Address the metrics and health servers bind.")
    max_concurrency: int = Field(default=8, ge=1, le=256, description="Jobs reconciled at the same time.")
    resync_seconds: float = Field(default=10.0, gt=0, description="Period of the full resync of all jobs.")
    leader_election: bool = Field(default=True, description="Take a coordination.k8s.io Lease before acting.")
    lease_name: str = Field(default="finetune-operator", min_length=1, description="Leader-election Lease name.")
    lease_namespace: str = Field(
        default="default", min_length=1, description="Namespace of the Lease; POD_NAMESPACE when set."
    )
    lease_duration_seconds: float = Field(default=15.0, gt=1, description="A leader unrenewed this long is replaced.")
    lease_renew_seconds: float = Field(default=5.0, gt=0, description="How often the leader renews the Lease.")
    identity: str = Field(default="", description="Lease holder identity; POD_NAME, else host name + pid.")
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$", description="Log level.")
    log_format: LogFormat = Field(default=LogFormat.JSON, description="json (one object per line) or text.")
    keep_cluster_on_finish: bool = Field(
        default=False, description="Debugging: keep the Ray cluster pods after Succeeded/Failed."
    )
    operator_pod_labels: dict[str, str] = Field(
        default_factory=lambda: {"app.kubernetes.io/name": "finetune-operator"},
        description="Labels of the operator pods; job NetworkPolicies admit them (in operator_namespace) to the "
        "trainer metrics port.",
    )
    operator_namespace: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Namespace the operator pods run in; POD_NAMESPACE when set. Unset (operator outside the "
        "cluster): job NetworkPolicies admit no operator pod.",
    )
    metrics_scraper_namespace_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels of the namespaces (e.g. kubernetes.io/metadata.name=monitoring) whose pods may scrape "
        "the trainer metrics port of job pods (Prometheus); empty = nobody but the operator.",
    )
    metrics_scraper_pod_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels of the scraper pods inside those namespaces (e.g. app.kubernetes.io/name=prometheus); "
        "empty = every pod there.",
    )
    metrics_source: MetricsSource = Field(
        default=MetricsSource.HTTP, description="http (the trainer's /metrics); simulated is for the test node only."
    )
    trainer_metrics_timeout_seconds: float = Field(default=3.0, gt=0, description="Timeout of one progress scrape.")
    kubeconfig: str | None = Field(default=None, description="Kubeconfig path; in-cluster config when absent.")
    stop_drain_seconds: int = Field(
        default=90,
        ge=0,
        le=3600,
        description="When a running job is suspended or preempted by Kueue: how long its trainer may take to write a "
        "checkpoint at the next step before its pods go (the head pod is deleted first, with a grace period 30 s "
        "longer, the workers once it has stopped). 0: every pod is deleted at once and the work since the last "
        "periodic checkpoint is lost.",
    )
    kueue_enabled: bool = Field(
        default=False,
        description="Queue FineTuneJobs labelled kueue.x-k8s.io/queue-name through Kueue (docs/kueue.md); off: the "
        "label is ignored.",
    )

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator(
        "operator_pod_labels", "metrics_scraper_namespace_labels", "metrics_scraper_pod_labels", mode="before"
    )
    @classmethod
    def _labels(cls, value: Any) -> Any:
        if isinstance(value, str):
            pairs = [p.strip() for p in value.split(",") if p.strip()]
            if any("=" not in p for p in pairs):
                raise ValueError("expected key=value[,key=value]")
            return dict(p.split("=", 1) for p in pairs)
        return value

    @model_validator(mode="after")
    def _scrapers(self) -> Self:
        if self.metrics_scraper_pod_labels and not self.metrics_scraper_namespace_labels:
            raise ValueError(
                "metrics_scraper_pod_labels needs metrics_scraper_namespace_labels (the namespaces the scrapers run in)"
            )
        return self

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces


_BOOL_FIELDS = {name for name, f in Settings.model_fields.items() if f.annotation is bool}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune operator",
        description="Run the FineTuneJob operator. Every flag can also be set as FINETUNE_<NAME> in the environment.",
    )
    for name, field in Settings.model_fields.items():
        if name in _BOOL_FIELDS:
            parser.add_argument(
                _flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=field.description
            )
        else:
            parser.add_argument(_flag(name), dest=name, default=None, help=field.description)
    return parser


def load_settings(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    """Merge FINETUNE_* variables and flags (flags win) into Settings; SettingsError names the bad input."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in Settings.model_fields:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            raw = environ[key]
            values[name] = raw.lower() in {"1", "true", "yes", "on"} if name in _BOOL_FIELDS else raw
            sources[name] = key
    args = _parser().parse_args(list(argv))
    for name, value in vars(args).items():
        if value is not None:
            values[name] = value
            sources[name] = _flag(name)
    if not values.get("identity"):
        values["identity"] = environ.get("POD_NAME") or f"{os.uname().nodename}-{os.getpid()}"
    for name in ("lease_namespace", "operator_namespace"):
        if name not in values and environ.get("POD_NAMESPACE"):
            values[name] = environ["POD_NAMESPACE"]
    try:
        return Settings.model_validate(values)
    except ValidationError as e:
        problems = [
            f"{sources.get(str(err['loc'][0]), str(err['loc'][0]))}: {err['msg']}" if err["loc"] else err["msg"]
            for err in e.errors(include_url=False)
        ]
        raise SettingsError("invalid operator settings: " + "; ".join(problems)) from e


def markdown_table() -> str:
    """The settings reference (docs/operator.md embeds it; a test keeps them in sync)."""
    rows = ["| Setting | Environment | Flag | Default | Meaning |", "|---|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default: Any = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        if isinstance(default, tuple):
            default = ",".join(default) or "(all namespaces)"
        elif isinstance(default, dict):
            default = ",".join(f"{k}={v}" for k, v in default.items())
        elif isinstance(default, StrEnum):
            default = default.value
        shown = "(unset)" if default in (None, "") else f"`{default}`"
        rows.append(f"| {name} | `{ENV_PREFIX}{name.upper()}` | `{_flag(name)}` | {shown} | {field.description} |")
    return "\n".join(rows)
