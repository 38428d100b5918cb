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

from finetune_trainer import spec as ftspec

from finetune_operator import builders, names
from finetune_operator import status as st
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.services.kube import ApiError, Body, Kube
from finetune_operator.services.progress import ProgressSource
from finetune_operator.settings import Settings
from finetune_operator.status_model import Artifacts, Phase, Status

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


def _owned(pod: Mapping[str, Any], uid: str) -> bool:
    refs = pod.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)


async def observe(ctx: Context, job: Body, *, scrape: bool) -> tuple[st.Observed, ftspec.FineTuneJobSpec | None]:
    meta = job["metadata"]
    old = st.parse_status(job.get("status"))
    ident = names.JobIdentity(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"], attempt=old.attempt or 1)
    spec: ftspec.FineTuneJobSpec | None = None
    error: ftspec.SpecError | None = None
    try:
        spec = builders.resolve_spec(ftspec.parse_spec(job.get("spec")), settings=ctx.settings, ident=ident)
    except ftspec.SpecError as e:
        error = e
    raw_pods = await ctx.kube.list("Pod", namespace=ident.namespace, selector=names.job_selector(ident.name))
    pods = tuple(v for p in raw_pods if _owned(p, ident.uid) and (v := st.pod_view(p)) is not None)
    now = ctx.clock()
    sample = None
    if scrape and spec is not None and not spec.suspend and not (old.phase and old.phase.terminal):
        head = next(
            (p for p in pods if p.role == names.ROLE_HEAD and p.attempt == ident.attempt and p.phase == "Running"),
            None,
        )
        if head is not None:
            sample = await ctx.progress.sample(head=head, spec=spec, now=now)
    artifacts = Artifacts(**builders.artifact_uris(spec, ident=ident)) if spec is not None else None
    observed = st.Observed(
        ident=ident,
        generation=int(meta.get("generation") or 0),
        spec=spec,
        old=old,
        pods=pods,
        now=now,
        metrics=sample,
        spec_error=error,
        keep_cluster=ctx.settings.keep_cluster_on_finish,
        artifacts=artifacts,
    )
    return observed, spec


async def _event(ctx: Context, *, job: Body, event: st.Event) -> None:
    meta = job["metadata"]
    now = st.rfc3339(ctx.clock())
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": names.API_VERSION,
            "kind": names.KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "reason": event.reason,
        "message": event.message[:1024],
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


async def delete_cluster(ctx: Context, *, ident: names.JobIdentity, pods: tuple[st.PodView, ...]) -> None:
    """Delete every child of every attempt; names are deterministic, so no listing is needed beyond the pods."""
    kube, ns = ctx.kube, ident.namespace
    for pod in pods:
        if not pod.deleting:
            await kube.delete("Pod", namespace=ns, name=pod.name)
    for attempt in range(1, ident.attempt + 1):
        await kube.delete("Service", namespace=ns, name=names.head_name(ident.name, attempt))
    await kube.delete("ConfigMap", namespace=ns, name=names.config_map_name(ident.name))
    await kube.delete("NetworkPolicy", namespace=ns, name=names.network_policy_name(ident.name))


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
    if new.phase is old.phase or new.phase is None:
        return
    if new.phase is Phase.RUNNING and (new.attempt or 1) == 1:
        began = st.parse_time(created)
        if began is not None:
            m.time_to_running.observe(max(0.0, (ctx.clock() - began).total_seconds()))
    if new.phase.terminal:
        start, end = st.parse_time(new.start_time), st.parse_time(new.completion_time)
        if start is not None and end is not None:
            m.job_duration.labels(result=new.phase.value).observe(max(0.0, (end - start).total_seconds()))
        if new.phase is Phase.FAILED:
            m.failures.labels(reason=new.reason or "Unknown").inc()


async def apply_plan(
    ctx: Context, *, job: Body, observed: st.Observed, spec: ftspec.FineTuneJobSpec | None, plan: st.Plan
) -> None:
    meta = job["metadata"]
    ident = dataclasses.replace(observed.ident, attempt=plan.attempt)
    old_wire = observed.old.wire()
    new_wire = plan.status.wire()
    if old_wire != new_wire:
        try:
            await ctx.kube.patch_job_status(
                namespace=ident.namespace,
                name=ident.name,
                resource_version=meta["resourceVersion"],
                status=merge_patch(old_wire, new_wire),
            )
        except ApiError as e:
            if e.status in {404, 409}:
                raise ConflictError(f"{ident.namespace}/{ident.name} changed while reconciling ({e.message})") from e
            raise
    _record_metrics(ctx, old=observed.old, new=plan.status, ident=ident, created=meta.get("creationTimestamp"))
    for event in plan.events:
        await _event(ctx, job=job, event=event)
    for name in plan.delete_pods:
        await ctx.kube.delete("Pod", namespace=ident.namespace, name=name)
    if plan.delete_cluster:
        await delete_cluster(ctx, ident=ident, pods=observed.pods)
    if spec is not None and (plan.create_support or plan.create_head or plan.create_workers):
        rendered = builders.build_children(spec, settings=ctx.settings, ident=ident)
        todo = []
        if plan.create_support:
            todo += [rendered.config_map, rendered.network_policy, rendered.service]
        if plan.create_head:
            todo.append(rendered.head)
        todo += [rendered.workers[i] for i in plan.create_workers]
        for manifest in todo:
            await ctx.kube.create(manifest)
    if plan.delete_job:
        await ctx.kube.delete(names.KIND, namespace=ident.namespace, name=ident.name, uid=ident.uid)
        ctx.forget(ident.namespace, ident.name)


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
