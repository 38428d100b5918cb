"""Kueue's objects for one labelled FineTuneJob: read its Workload (with the flavors and priority it needs), and
carry out the one Workload write a plan asks for.

Why a module: the decisions live in kueue.py and status.py (pure); this is only the I/O, kept apart from the
reconcile so that a job without the kueue.x-k8s.io/queue-name label (or an operator with the integration off)
never makes a Kueue request. Workload writes are merge patches conditional on the resourceVersion read, so a
concurrent change by Kueue is a 409: nothing is lost, the Workload event that follows triggers a fresh reconcile.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from finetune_trainer import spec as ftspec

from finetune_operator import kueue as kq
from finetune_operator import names, reasons
from finetune_operator.observe import owned_by
from finetune_operator.services.kube import ApiError, Body, Kube
from finetune_operator.settings import Settings
from finetune_operator.status import CreationProblem

logger = logging.getLogger(__name__)


async def observe(kube: Kube, *, labels: Mapping[str, str] | None, ident: names.JobIdentity) -> kq.QueueObserved | None:
    """The job's Workload and Kueue's answer; None when the job is not labelled for a queue."""
    queue = kq.queue_name(labels)
    if queue is None:
        return None
    workload = await kube.get("Workload", namespace=ident.namespace, name=kq.workload_name(ident))
    if workload is not None and not owned_by(workload, ident.uid):
        workload = None  # a previous incarnation's, still being collected: ours is created after it is gone
    flavors: dict[str, Body] = {}
    for name in sorted(kq.assigned_flavors(workload)):
        flavor = await kube.get("ResourceFlavor", namespace="", name=name)
        if flavor is not None:
            flavors[name] = flavor
    return kq.QueueObserved(name=queue, workload=workload, admission=kq.read_admission(workload, flavors=flavors))


async def _priority(
    kube: Kube, *, labels: Mapping[str, str] | None, spec: ftspec.FineTuneJobSpec
) -> kq.Priority | None:
    """The value of the class Kueue's rules pick (a missing class: no priority, Kueue's default 0)."""
    source = kq.priority_source(labels, spec)
    if source is None:
        return None
    kind, name = source
    found = await kube.get(kind.value, namespace="", name=name)
    if found is None:
        logger.warning("%s %s not found: the Workload gets no priority", kind.value, name)
        return None
    return kq.Priority(kind, name, int(found.get("value") or 0))


async def write(
    kube: Kube,
    *,
    actions: kq.WorkloadActions,
    queue: kq.QueueObserved,
    spec: ftspec.FineTuneJobSpec | None,
    labels: Mapping[str, str] | None,
    settings: Settings,
    ident: names.JobIdentity,
) -> CreationProblem | None:
    """Create or patch the Workload as the plan says; a refused create comes back for the status."""
    workload = queue.workload
    try:
        if actions.create and spec is not None:
            manifest = kq.build_workload(
                spec,
                settings=settings,
                ident=ident,
                queue=queue.name,
                priority=await _priority(kube, labels=labels, spec=spec),
                active=actions.active,
            )
            await kube.create(manifest)
        elif workload is not None and actions.spec_patch is not None:
            await kube.merge_patch("Workload", namespace=ident.namespace, name=_name(workload), body=actions.spec_patch)
        elif workload is not None and actions.status_patch is not None:
            await kube.merge_patch(
                "Workload",
                namespace=ident.namespace,
                name=_name(workload),
                body=actions.status_patch,
                subresource="status",
            )
    except ApiError as e:
        if e.status == 409:  # Kueue wrote in between: its Workload event brings a fresh reconcile
            logger.info("%s/%s: Workload changed meanwhile (%s)", ident.namespace, ident.name, e.message)
            return None
        if actions.create and e.status in {400, 403, 404, 422}:
            return CreationProblem(reasons.FAILED_CREATE, kq.WORKLOAD_KIND, kq.workload_name(ident), e.message)
        raise
    return None


def _name(workload: Mapping[str, Any]) -> str:
    return str(workload.get("metadata", {}).get("name"))
