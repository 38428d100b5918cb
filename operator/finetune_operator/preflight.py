"""Preflight: refuse requests no node can satisfy, before anything is created.

Why: a job asking for 8 GPUs per worker on nodes with 4 stays Pending until pendingDeadlineSeconds; when the node
list is known (`finetune render --nodes` / `--kubeconfig`) we can say so at once, naming the field to change.
Pure: it looks at Node objects (dict form) and the typed spec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finetune_trainer import spec as ftspec
from finetune_trainer.shape import head_shape, worker_shape

from finetune_operator.builders import GPU_RESOURCE


def _tolerated(taint: Mapping[str, Any], tolerations: Sequence[Mapping[str, Any]]) -> bool:
    if taint.get("effect") not in {"NoSchedule", "NoExecute"}:
        return True
    for tol in tolerations:
        if tol.get("effect") not in (None, "", taint.get("effect")):
            continue
        if tol.get("operator") == "Exists" and tol.get("key") in (None, "", taint.get("key")):
            return True
        if tol.get("key") == taint.get("key") and tol.get("value") == taint.get("value"):
            return True
    return False


def _amount(value: Any) -> float:
    """An allocatable quantity; unknown or unparsable counts as unlimited (preflight must never refuse wrongly)."""
    if value is None:
        return float("inf")
    try:
        return ftspec.parse_quantity(value)
    except ValueError:
        return float("inf")


def _fits(node: Mapping[str, Any], *, spec: ftspec.FineTuneJobSpec, cpu: float, memory: float, gpus: int) -> str | None:
    """None when the node could host the pod, else why not."""
    labels = node.get("metadata", {}).get("labels") or {}
    for key, value in spec.resources.node_selector.items():
        if labels.get(key) != value:
            return f"label {key}={value} missing"
    tolerations = list(spec.resources.tolerations)
    if gpus:
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    for taint in node.get("spec", {}).get("taints") or []:
        if not _tolerated(taint, tolerations):
            return f"taint {taint.get('key')}:{taint.get('effect')} not tolerated"
    alloc = node.get("status", {}).get("allocatable") or {}
    if gpus > _amount(alloc.get(GPU_RESOURCE, "0")):
        return f"{alloc.get(GPU_RESOURCE, 0)} GPUs"
    if cpu > _amount(alloc.get("cpu")):
        return f"{alloc.get('cpu', 0)} CPUs"
    if memory > _amount(alloc.get("memory")):
        return f"{alloc.get('memory', 0)} memory"
    return None


def preflight(spec: ftspec.FineTuneJobSpec, nodes: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(field path, message) for every pod kind no node can host; empty when everything fits somewhere."""
    if not nodes:
        return []
    problems: list[tuple[str, str]] = []
    # The same shapes the builders give the pods (requests = limits).
    checks = [
        ("spec.resources", "worker", worker_shape(spec.resources)),
        ("spec.resources.head", "head", head_shape(spec.resources)),
    ]
    for path, role, shape in checks:
        gpus = shape.gpus
        reasons = {}
        for node in nodes:
            why = _fits(node, spec=spec, cpu=shape.cpu_cores, memory=shape.memory_bytes, gpus=gpus)
            if why is None:
                break
            reasons[node.get("metadata", {}).get("name", "?")] = why
        else:
            field = path
            if role == "worker" and gpus and all("GPUs" in r for r in reasons.values()):
                field = "spec.resources.gpusPerWorker"
            elif role == "worker" and all("CPUs" in r for r in reasons.values()):
                field = "spec.resources.cpusPerWorker"
            elif role == "worker" and all("memory" in r for r in reasons.values()):
                field = "spec.resources.memoryPerWorker"
            elif all("label" in r for r in reasons.values()):
                field = "spec.resources.nodeSelector"
            detail = "; ".join(f"{name}: {why}" for name, why in sorted(reasons.items()))
            problems.append((field, f"no node can run a {role} pod ({detail})"))
    return problems
