"""Create and delete a job's children, touching only objects the job owns.

Why not "a 409 on create is success, delete by name": names are predictable, so a user's own ConfigMap called
`<job>-config` would be mounted into the job and deleted when it ends, and a re-created job could adopt its
previous incarnation's pods while the garbage collector catches up. Here an existing object counts as ours only
if it carries an ownerReference to this job's uid; deletes carry a uid precondition; and whatever the API server
refuses (quota, admission, a missing PriorityClass) comes back as a CreationProblem for the status, instead of a
log line and a job Pending forever.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from finetune_operator import names, reasons
from finetune_operator.builders import Rendered
from finetune_operator.observe import PodRef, owned_by
from finetune_operator.services.kube import CHILD_KINDS, ApiError, Kube
from finetune_operator.status import CreationProblem

logger = logging.getLogger(__name__)

# Statuses with which the API server refuses an object for a reason a retry of the same request will not fix soon:
# 400 bad request, 403 forbidden (quota, admission, RBAC), 404 (namespace or referenced object gone),
# 422 invalid (a webhook, a PriorityClass that does not exist).
REFUSED = frozenset({400, 403, 404, 422})


def _owner(obj: Mapping[str, Any]) -> str:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    if not refs:
        return "it has no owner"
    return "owned by " + ", ".join(f"{r.get('kind')}/{r.get('name')} (uid {r.get('uid')})" for r in refs)


async def ensure(kube: Kube, manifest: Mapping[str, Any], *, uid: str) -> CreationProblem | None:
    """Create one child; None when it exists now and is ours, else what went wrong (nothing is touched)."""
    kind, meta = manifest["kind"], manifest["metadata"]
    try:
        if await kube.create(manifest):
            return None
    except ApiError as e:
        if e.status in REFUSED:
            return CreationProblem(reasons.FAILED_CREATE, kind, meta["name"], e.message)
        raise
    existing = await kube.get(kind, namespace=meta["namespace"], name=meta["name"])
    if existing is None:  # deleted in between: the next reconcile creates it
        return None
    if owned_by(existing, uid):
        return None
    return CreationProblem(reasons.NAME_CONFLICT, kind, meta["name"], _owner(existing))


async def create_children(
    kube: Kube, rendered: Rendered, *, uid: str, support: bool, head: bool, workers: Sequence[int]
) -> CreationProblem | None:
    """Create what the plan asks for, support objects first; stop at the first problem (pods never start with a
    ConfigMap or Service that is not ours)."""
    todo = []
    if support:
        todo += [rendered.config_map, rendered.network_policy, rendered.service]
    if head:
        todo.append(rendered.head)
    todo += [rendered.workers[i] for i in workers]
    for manifest in todo:
        problem = await ensure(kube, manifest, uid=uid)
        if problem is not None:
            logger.warning(
                "%s/%s: %s", manifest["metadata"]["namespace"], manifest["metadata"]["name"], problem.message
            )
            return problem
    return None


async def delete_pods(kube: Kube, *, namespace: str, pods: Sequence[PodRef]) -> None:
    for pod in pods:
        await kube.delete("Pod", namespace=namespace, name=pod.name, uid=pod.uid or None)


async def delete_owned(kube: Kube, *, ident: names.JobIdentity) -> None:
    """Delete every child of every attempt that this job owns (listed by label, checked by owner uid)."""
    for kind in reversed(CHILD_KINDS):
        items = await kube.list(kind, namespace=ident.namespace, selector=names.job_selector(ident.name))
        for item in items:
            meta = item.get("metadata", {})
            if owned_by(item, ident.uid) and not meta.get("deletionTimestamp"):
                await kube.delete(kind, namespace=ident.namespace, name=meta["name"], uid=meta.get("uid"))
