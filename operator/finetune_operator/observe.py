"""What one reconcile looks at: raw Pods read into views, and the whole snapshot calculate() decides from.

Why a module of its own: reading the API's loosely typed Pod dicts (conditions, container states, termination
messages) is a different job from deciding what to do about them; keeping it here lets status.py work only with
typed, already-interpreted facts. Pure: no client, no clock (the time is part of the snapshot).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import signal
from collections.abc import Mapping
from typing import Any, Literal

from finetune_trainer import contract
from finetune_trainer import spec as ftspec

from finetune_operator import names
from finetune_operator.kueue import QueueObserved
from finetune_operator.reasons import UNSCHEDULABLE
from finetune_operator.status_model import Artifacts, OperatorDefaults, Status, parse_time
from finetune_operator.trainer_metrics import MetricsSample


@dataclasses.dataclass(frozen=True)
class ContainerView:
    state: Literal["waiting", "running", "terminated", "unknown"] = "unknown"
    reason: str | None = None
    message: str | None = None
    exit_code: int | None = None

    @property
    def report(self) -> contract.TrainerReport | None:
        """The trainer's report line, when the termination message holds one."""
        return contract.parse_report(self.message) if self.message else None

    @property
    def killed_by(self) -> signal.Signals | None:
        """The signal that ended the container's main process, read from its exit code (128 + N, as runc and the
        shells report a death by signal); None for an ordinary exit."""
        return signal_of(self.exit_code) if self.state == "terminated" else None


def signal_of(exit_code: int | None) -> signal.Signals | None:
    """SIGKILL for 137, SIGTERM for 143, ...; None when the code is not 128 + a known signal."""
    if exit_code is None or not 128 < exit_code <= 128 + signal.NSIG:
        return None
    try:
        return signal.Signals(exit_code - 128)
    except ValueError:
        return None


@dataclasses.dataclass(frozen=True)
class PodView:
    """The facts about one child pod that decisions depend on."""

    name: str
    role: str
    attempt: int
    uid: str = ""
    phase: str = "Pending"
    ready: bool = False
    deleting: bool = False
    scheduled: bool = False
    unschedulable_message: str | None = None
    ip: str | None = None
    reason: str | None = None  # pod-level (Evicted, NodeLost, ...)
    message: str | None = None
    container: ContainerView = ContainerView()
    created: dt.datetime | None = None

    @property
    def finished(self) -> bool:
        return self.phase in {"Succeeded", "Failed"}

    @property
    def not_running(self) -> bool:
        """Still pending: not scheduled, pulling, creating its container, or waiting to (re)start it."""
        return self.phase == "Pending" and not self.deleting


@dataclasses.dataclass(frozen=True)
class PodRef:
    """A pod to delete: the uid makes the delete conditional (never someone else's pod of the same name)."""

    name: str
    uid: str


def _condition(pod: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for cond in pod.get("status", {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond  # type: ignore[no-any-return]
    return None


def _container(status: Mapping[str, Any]) -> ContainerView:
    statuses = status.get("containerStatuses") or []
    if not statuses:
        return ContainerView()
    state = statuses[0].get("state") or {}
    if state.get("terminated"):
        term = state["terminated"]
        return ContainerView(
            state="terminated", reason=term.get("reason"), message=term.get("message"), exit_code=term.get("exitCode")
        )
    if state.get("waiting"):
        waiting = state["waiting"]
        return ContainerView(state="waiting", reason=waiting.get("reason"), message=waiting.get("message"))
    if state.get("running") is not None:
        return ContainerView(state="running")
    return ContainerView()


def pod_view(pod: Mapping[str, Any]) -> PodView | None:
    """Read a Pod (API dict form) into a PodView; None when it is not one of ours (labels missing)."""
    meta = pod.get("metadata", {})
    labels = meta.get("labels") or {}
    try:
        attempt = int(labels[names.LABEL_ATTEMPT])
        role = str(labels[names.LABEL_ROLE])
    except (KeyError, ValueError):
        return None
    status = pod.get("status") or {}
    scheduled_cond = _condition(pod, "PodScheduled")
    ready_cond = _condition(pod, "Ready")
    unschedulable = (
        scheduled_cond is not None
        and scheduled_cond.get("status") == "False"
        and scheduled_cond.get("reason") == UNSCHEDULABLE
    )
    created = meta.get("creationTimestamp")
    return PodView(
        name=str(meta.get("name", "")),
        role=role,
        attempt=attempt,
        uid=str(meta.get("uid") or ""),
        phase=str(status.get("phase") or "Pending"),
        ready=ready_cond is not None and ready_cond.get("status") == "True",
        deleting=bool(meta.get("deletionTimestamp")),
        scheduled=scheduled_cond is not None and scheduled_cond.get("status") == "True",
        unschedulable_message=scheduled_cond.get("message") if unschedulable and scheduled_cond else None,
        ip=status.get("podIP"),
        reason=status.get("reason"),
        message=status.get("message"),
        container=_container(status),
        created=created if isinstance(created, dt.datetime) else parse_time(created),
    )


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    """Whether the object carries an ownerReference to the job with this uid (not merely its name or labels)."""
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)


@dataclasses.dataclass(frozen=True)
class Observed:
    """Everything one reconcile looks at. `spec` is None exactly when `spec_error` is set.

    `metrics` is a scrape made during this reconcile (None when none was made or it failed): decisions that need
    fresh progress (the NoProgress watchdog) are taken only when it is set.
    """

    ident: names.JobIdentity
    generation: int
    spec: ftspec.FineTuneJobSpec | None
    old: Status
    pods: tuple[PodView, ...]
    now: dt.datetime
    metrics: MetricsSample | None = None
    spec_error: ftspec.SpecError | None = None
    keep_cluster: bool = False
    artifacts: Artifacts | None = None  # where the trainer writes, from the resolved spec
    created: str | None = None  # the job's metadata.creationTimestamp
    defaults: OperatorDefaults | None = None  # the operator defaults the spec was resolved with
    log_tails: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # failed pod -> last lines
    queue: QueueObserved | None = None  # set only for a job under Kueue (labelled, integration enabled)
    drain_on_stop: bool = False  # suspend/eviction: head first, workers once it stopped (settings.stop_drain_seconds)
