"""kopf handlers: a few lines each, translating watch events into reconciles (services/reconcile.py).

Why only event handlers: every decision is recomputed from the cluster (status + pods), so no handler progress has
to be stored on the object (no kopf annotations, no finalizer: deleting a job never hangs on a stopped operator).
Watch events make reactions fast; the resync loop is the safety net for deadlines, progress and missed events.
The registry is built per operator instance (no import-time registration into kopf's global registry).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from finetune_operator import kueue as kq
from finetune_operator import names
from finetune_operator.services.reconcile import ConflictError, Context, reconcile

POD_SELECTOR = ",".join(f"{k}={v}" for k, v in sorted(names.MANAGED_SELECTOR.items()))


def _ctx(memo: Any) -> Context:
    ctx: Context = memo["ctx"]
    return ctx


async def on_job_event(
    *, event: kopf.RawEvent, body: kopf.Body, memo: Any, logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any
) -> None:
    """ADDED (also at start-up) or a spec change: reconcile now. Status-only changes are our own writes."""
    meta, ctx = body.metadata, _ctx(memo)
    namespace, name = str(meta.namespace), str(meta.name)
    if event.get("type") == "DELETED":
        ctx.forget(namespace, name)
        return
    observed = body.status.get("observedGeneration")
    if event.get("type") in {None, "ADDED"} or observed != meta.get("generation"):
        await _safe(ctx, namespace=namespace, name=name, logger=logger)


def owning_job(meta: Mapping[str, Any]) -> str | None:
    """The FineTuneJob that controls a pod (its ownerReference: the job label may be a shortened name)."""
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == names.KIND and ref.get("apiVersion") == names.GROUP_VERSION and ref.get("controller"):
            return str(ref.get("name"))
    return None


async def on_pod_event(
    *,
    meta: Mapping[str, Any],
    namespace: str | None,
    memo: Any,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    **_: Any,
) -> None:
    """A child pod changed (scheduled, ready, exited, deleted): reconcile its job at once."""
    job = owning_job(meta)
    if job and namespace:
        await _safe(_ctx(memo), namespace=namespace, name=job, logger=logger)


async def on_workload_event(
    *,
    meta: Mapping[str, Any],
    namespace: str | None,
    memo: Any,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    **_: Any,
) -> None:
    """Kueue admitted, evicted or requeued a job's Workload: reconcile the job at once."""
    await on_pod_event(meta=meta, namespace=namespace, memo=memo, logger=logger)


async def _safe(
    ctx: Context, *, namespace: str, name: str, logger: logging.Logger | logging.LoggerAdapter[Any]
) -> None:
    # Event handlers are not retried by kopf; a failure is logged and the resync loop tries again.
    try:
        await reconcile(ctx, namespace=namespace, name=name, scrape=False)
    except ConflictError as e:
        logger.debug("%s", e)
    except Exception as e:
        logger.warning("reconcile of %s/%s failed (the resync will retry): %s", namespace, name, e)


def build_registry(*, connection: kopf.ConnectionInfo, kueue: bool = False) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection

    kopf.on.login(registry=registry)(login)
    kopf.on.event(names.GROUP, names.VERSION, names.PLURAL, registry=registry)(on_job_event)
    kopf.on.event("", "v1", "pods", labels=dict(names.MANAGED_SELECTOR), registry=registry)(on_pod_event)
    if kueue:  # only with the integration on: the Workload CRD may not exist otherwise
        kopf.on.event(kq.GROUP, kq.VERSION, kq.WORKLOAD_PLURAL, labels=dict(names.MANAGED_SELECTOR), registry=registry)(
            on_workload_event
        )
    return registry


def kopf_settings(*, max_workers: int) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.posting.enabled = False  # we post our own, purposeful Events
    settings.scanning.disabled = True  # no CRD/namespace watching: fewer permissions, the CRD is installed first
    settings.execution.max_workers = max_workers
    # The pod watch asks the API server for our pods only (kopf's handler label filter alone is client-side: the
    # operator would stream every pod of the cluster).
    settings.watching.label_selectors["", "v1", "pods"] = POD_SELECTOR
    settings.watching.label_selectors[kq.GROUP, kq.VERSION, kq.WORKLOAD_PLURAL] = POD_SELECTOR
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.error_backoffs = [1, 2, 5, 10]
    return settings
