"""One reconcile of one FineTuneJob: read -> observe -> calculate (pure) -> write status -> act.

Why this order: the status (with an optimistic resourceVersion lock) is written *before* any child is created or
deleted, so a decision such as "Succeeded" or "attempt 3" is durable before it has effects; an operator killed in
between repeats the same idempotent actions on restart and never re-creates a finished job's cluster. Each job is
reconciled by one task at a time (a per-job lock kept in the operator context, not in a module global).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from finetune_trainer import contract
from finetune_trainer import spec as ftspec

from finetune_operator import builders, names, reasons
from finetune_operator import kueue as kq
from finetune_operator import status as st
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.observe import Observed, PodView, owned_by, pod_view
from finetune_operator.services import children, queue
from finetune_operator.services.kube import ApiError, Body, Kube
from finetune_operator.services.progress import ProgressSource
from finetune_operator.settings import Settings
from finetune_operator.status import parse_status
from finetune_operator.status_model import Artifacts, OperatorDefaults, Phase, Status, clip, parse_time, rfc3339
from finetune_operator.trainer_metrics import MetricsSample

logger = logging.getLogger(__name__)


class ConflictError(Exception):
    """The job changed while we were deciding; the next reconcile decides again from fresh data."""


@dataclasses.dataclass
class Context:
    """Operator-scoped state (kept in the kopf memo): clients, settings, metrics, per-job locks."""

    settings: Settings
    kube: Kube
    metrics: OperatorMetrics
    progress: ProgressSource
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    locks: dict[tuple[str, str], asyncio.Lock] = dataclasses.field(default_factory=dict)
    queued: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    ready: bool = False

    @contextlib.asynccontextmanager
    async def job_lock(self, namespace: str, name: str) -> AsyncIterator[None]:
        lock = self.locks.setdefault((namespace, name), asyncio.Lock())
        async with lock:
            yield

    def forget(self, namespace: str, name: str) -> None:
        self.metrics.forget(namespace=namespace, name=name)
        lock = self.locks.get((namespace, name))
        if lock is not None and not lock.locked():
            del self.locks[(namespace, name)]


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge patch turning old into new (removed keys become null)."""
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif value != before:
            patch[key] = value
    return patch


def _resolve(
    ctx: Context, job: Body, *, ident: names.JobIdentity, old: Status
) -> tuple[ftspec.FineTuneJobSpec | None, ftspec.SpecError | None, OperatorDefaults]:
    """The typed spec with the operator defaults this job pinned at its first reconcile (else today's settings)."""
    defaults = old.operator_defaults or builders.operator_defaults(ctx.settings)
    try:
        spec = builders.resolve_spec(ftspec.parse_spec(job.get("spec")), defaults=defaults, ident=ident)
    except ftspec.SpecError as e:
        return None, e, defaults
    return spec, None, defaults


async def _sample(
    ctx: Context, *, spec: ftspec.FineTuneJobSpec | None, old: Status, pods: tuple[PodView, ...], attempt: int
) -> MetricsSample | None:
    if spec is None or spec.suspend or (old.phase is not None and old.phase.terminal):
        return None
    head = next((p for p in pods if p.role == names.ROLE_HEAD and p.attempt == attempt and p.phase == "Running"), None)
    return await ctx.progress.sample(head=head, spec=spec, now=ctx.clock()) if head is not None else None


async def _log_tails(ctx: Context, *, namespace: str, pods: tuple[PodView, ...]) -> dict[str, tuple[str, ...]]:
    """Best effort: the log tail of each failed pod whose trainer left no report (OOM kill, crash, node loss)."""
    tails: dict[str, tuple[str, ...]] = {}
    for pod in pods:
        if pod.phase == "Failed" and pod.container.report is None:
            lines = await ctx.kube.pod_log_tail(namespace=namespace, name=pod.name, lines=contract.LOG_TAIL_LINES)
            if lines:
                tails[pod.name] = tuple(lines)
    return tails


async def observe(ctx: Context, job: Body, *, scrape: bool) -> tuple[Observed, ftspec.FineTuneJobSpec | None]:
    meta = job["metadata"]
    old = parse_status(job.get("status"))
    ident = names.JobIdentity(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"], attempt=old.attempt or 1)
    spec, error, defaults = _resolve(ctx, job, ident=ident, old=old)
    raw_pods = await ctx.kube.list("Pod", namespace=ident.namespace, selector=names.job_selector(ident.name))
    # Only pods this job owns (by uid): a previous incarnation's pods, still being collected, are not ours.
    pods = tuple(v for p in raw_pods if owned_by(p, ident.uid) and (v := pod_view(p)) is not None)
    sample = await _sample(ctx, spec=spec, old=old, pods=pods, attempt=ident.attempt) if scrape else None
    terminal = old.phase is not None and old.phase.terminal
    tails = {} if terminal else await _log_tails(ctx, namespace=ident.namespace, pods=pods)
    queued = (
        await queue.observe(ctx.kube, labels=meta.get("labels"), ident=ident) if ctx.settings.kueue_enabled else None
    )
    observed = Observed(
        ident=ident,
        generation=int(meta.get("generation") or 0),
        spec=spec,
        old=old,
        pods=pods,
        now=ctx.clock(),
        metrics=sample,
        spec_error=error,
        keep_cluster=ctx.settings.keep_cluster_on_finish,
        drain_on_stop=ctx.settings.stop_drain_seconds > 0,
        artifacts=Artifacts(**builders.artifact_uris(spec, ident=ident)) if spec is not None else None,
        created=meta.get("creationTimestamp"),
        defaults=defaults,
        log_tails=tails,
        queue=queued,
    )
    return observed, spec


async def _event(ctx: Context, *, job: Body, event: st.Event) -> None:
    meta = job["metadata"]
    now = rfc3339(ctx.clock())
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{names.child_base(meta['name'])}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": names.GROUP_VERSION,
            "kind": names.KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "reason": event.reason,
        "message": clip(event.message, st.EVENT_MESSAGE_MAX),
        "type": event.type,
        "source": {"component": names.MANAGER},
        "reportingComponent": f"{names.GROUP}/operator",
        "reportingInstance": ctx.settings.identity or names.MANAGER,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        await ctx.kube.create(body)
    except ApiError as e:  # events are best effort: never fail a reconcile because of one
        logger.warning("could not post event %s for %s/%s: %s", event.reason, meta["namespace"], meta["name"], e)


def _record_metrics(ctx: Context, *, old: Status, new: Status, ident: names.JobIdentity, created: str | None) -> None:
    """Operator metrics from a status transition (computed from old/new status, so a restart does not skew them)."""
    m = ctx.metrics
    m.observe_status(namespace=ident.namespace, name=ident.name, status=new)
    if old.phase is None and new.phase is not None:
        m.attempts.inc()  # the first attempt
    elif new.attempt and new.attempt != (old.attempt or 0):
        m.attempts.inc()  # a retry or a resume
        if (new.failed_attempts or 0) > (old.failed_attempts or 0):
            m.retries.inc()
    first_step = new.timeline.first_step if new.timeline else None
    if first_step is not None and (old.timeline is None or old.timeline.first_step is None):
        began, stepped = parse_time(created), parse_time(first_step)
        if began is not None and stepped is not None:
            m.time_to_first_step.observe(max(0.0, (stepped - began).total_seconds()))
    _record_queued(ctx, old=old, new=new)
    if new.phase is old.phase or new.phase is None:
        return
    if new.phase is Phase.RUNNING and (new.attempt or 1) == 1:
        began = parse_time(created)
        if began is not None:
            m.time_to_running.observe(max(0.0, (ctx.clock() - began).total_seconds()))
    if new.phase.terminal:
        start, end = parse_time(new.start_time), parse_time(new.completion_time)
        if start is not None and end is not None:
            m.job_duration.labels(result=new.phase.value).observe(max(0.0, (end - start).total_seconds()))
        if new.phase is Phase.FAILED:
            m.failures.labels(reason=new.reason or "Unknown").inc()


def _record_queued(ctx: Context, *, old: Status, new: Status) -> None:
    """Time spent queued, observed when Kueue admits the job (first admission and every re-admission)."""
    before, after = old.queue, new.queue
    if after is None or not after.admitted or before is None or before.admitted:
        return
    since, admitted = parse_time(before.queued_since), parse_time(after.admitted_time)
    if since is not None and admitted is not None:
        ctx.metrics.queued.observe(max(0.0, (admitted - since).total_seconds()))


async def _write_status(
    ctx: Context, *, ident: names.JobIdentity, resource_version: str, old: Status, new: Status
) -> str:
    """Merge-patch the status under the resourceVersion it was decided from; returns the new resourceVersion."""
    old_wire, new_wire = old.wire(), new.wire()
    if old_wire == new_wire:
        return resource_version
    try:
        body = await ctx.kube.patch_job_status(
            namespace=ident.namespace,
            name=ident.name,
            resource_version=resource_version,
            status=merge_patch(old_wire, new_wire),
        )
    except ApiError as e:
        if e.status in {404, 409}:
            raise ConflictError(f"{ident.namespace}/{ident.name} changed while reconciling ({e.message})") from e
        raise
    return str(body.get("metadata", {}).get("resourceVersion") or resource_version)


async def apply_plan(
    ctx: Context, *, job: Body, observed: Observed, spec: ftspec.FineTuneJobSpec | None, plan: st.Plan
) -> None:
    """Write the status, then act; a child the API server refuses is reported in the status right away."""
    meta = job["metadata"]
    ident = dataclasses.replace(observed.ident, attempt=plan.attempt)
    version = await _write_status(
        ctx, ident=ident, resource_version=meta["resourceVersion"], old=observed.old, new=plan.status
    )
    _record_metrics(ctx, old=observed.old, new=plan.status, ident=ident, created=meta.get("creationTimestamp"))
    for event in plan.events:
        await _event(ctx, job=job, event=event)
    actions = plan.actions
    await children.delete_pods(ctx.kube, namespace=ident.namespace, pods=actions.delete_pods)
    if actions.delete_cluster:
        await children.delete_owned(ctx.kube, ident=ident)
    problem = None
    if actions.workload is not None and observed.queue is not None:
        problem = await queue.write(
            ctx.kube,
            actions=actions.workload,
            queue=observed.queue,
            spec=spec,
            labels=meta.get("labels"),
            settings=ctx.settings,
            ident=ident,
        )
    if spec is not None and actions.creates and problem is None:
        problem = await _create_children(ctx, spec=spec, ident=ident, actions=actions)
    if problem is not None:
        status, events = st.record_creation_problem(
            plan.status, problem, now=ctx.clock(), generation=observed.generation
        )
        await _write_status(ctx, ident=ident, resource_version=version, old=plan.status, new=status)
        for event in events:
            await _event(ctx, job=job, event=event)
    if actions.delete_job:
        await ctx.kube.delete(names.KIND, namespace=ident.namespace, name=ident.name, uid=ident.uid)
        ctx.forget(ident.namespace, ident.name)


async def _create_children(
    ctx: Context, *, spec: ftspec.FineTuneJobSpec, ident: names.JobIdentity, actions: st.Actions
) -> st.CreationProblem | None:
    rendered = builders.build_children(spec, settings=ctx.settings, ident=ident)
    if actions.workload is not None:
        try:
            rendered = kq.place_children(rendered, actions.workload.placements)
        except kq.PlacementError as e:
            return st.CreationProblem(reasons.FAILED_CREATE, "Pod", rendered.head["metadata"]["name"], str(e))
    return await children.create_children(
        ctx.kube,
        rendered,
        uid=ident.uid,
        support=actions.create_support,
        head=actions.create_head,
        workers=actions.create_workers,
    )


async def reconcile(ctx: Context, *, namespace: str, name: str, scrape: bool) -> st.Plan | None:
    """Reconcile one job from fresh reads; returns the plan carried out (None if gone or coalesced).

    Triggers coalesce: when a reconcile of this job is already waiting for the lock, it has not read anything yet
    and will see this change too, so a burst of pod events costs one reconcile, not one each.
    """
    key = (namespace, name)
    if key in ctx.queued:
        return None
    ctx.queued.add(key)
    async with ctx.job_lock(namespace, name):
        ctx.queued.discard(key)
        started = time.monotonic()
        try:
            job = await ctx.kube.get(names.KIND, namespace=namespace, name=name)
            if job is None:
                ctx.forget(namespace, name)
                return None
            if job["metadata"].get("deletionTimestamp"):
                return None
            observed, spec = await observe(ctx, job, scrape=scrape)
            plan = st.calculate(observed)
            await apply_plan(ctx, job=job, observed=observed, spec=spec, plan=plan)
            return plan
        except ConflictError:
            raise
        except Exception:
            ctx.metrics.reconcile_errors.inc()
            raise
        finally:
            ctx.metrics.reconcile_duration.observe(time.monotonic() - started)


async def resync_once(ctx: Context) -> int:
    """Reconcile every job once (with a progress scrape); returns how many were reconciled."""
    namespaces: tuple[str | None, ...] = ctx.settings.namespaces or (None,)
    keys: list[tuple[str, str]] = []
    for namespace in namespaces:
        for job in await ctx.kube.list(names.KIND, namespace=namespace):
            keys.append((job["metadata"]["namespace"], job["metadata"]["name"]))
    limit = asyncio.Semaphore(ctx.settings.max_concurrency)

    async def one(namespace: str, name: str) -> None:
        async with limit:
            try:
                await reconcile(ctx, namespace=namespace, name=name, scrape=True)
            except ConflictError as e:
                logger.info("%s", e)
            except Exception:
                logger.exception("reconcile of %s/%s failed; retrying on the next resync", namespace, name)

    await asyncio.gather(*(one(ns, n) for ns, n in keys))
    return len(keys)


async def resync_forever(ctx: Context) -> None:
    """The periodic safety net (deadlines, progress, TTL, missed events): every settings.resync_seconds."""
    while True:
        started = time.monotonic()
        try:
            await resync_once(ctx)
        except Exception:
            logger.exception("resync failed; retrying")
        await asyncio.sleep(max(0.5, ctx.settings.resync_seconds - (time.monotonic() - started)))
