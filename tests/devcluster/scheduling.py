"""Pure pod-to-node fit logic for the process node's minimal scheduler.

It implements the default scheduler's *filter* plugins that matter to the operator (NodeResourcesFit,
NodeAffinity incl. nodeSelector, TaintToleration, NodeUnschedulable) and formats failures exactly like
kube-scheduler's FitError, because the operator copies that message into FineTuneJob status. Scoring is
"least allocated node" only. Objects are plain dicts as they come off the wire.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from kubernetes.utils import parse_quantity

Obj = Mapping[str, Any]

NO_VICTIMS = "No preemption victims found for incoming pod"
NOT_HELPFUL = "Preemption is not helpful for scheduling"
REASON_AFFINITY = "node(s) didn't match Pod's node affinity/selector"
REASON_TAINT = "node(s) had untolerated taint(s)"
REASON_CORDONED = "node(s) were unschedulable"
REASON_TOO_MANY = "Too many pods"
TERMINAL = ("Succeeded", "Failed")


def quantity(value: object) -> Decimal:
    """Parse a Kubernetes quantity ('500m', '16Gi', 2) into a Decimal; garbage counts as 0."""
    try:
        return Decimal(parse_quantity(value))  # type: ignore[no-untyped-call]
    except (ValueError, TypeError, ArithmeticError):
        return Decimal(0)


def pod_requests(pod: Obj) -> dict[str, Decimal]:
    """Effective requests: max(sum of app containers, each init container), as the scheduler computes them."""
    spec = pod.get("spec") or {}
    total: dict[str, Decimal] = {}
    for c in spec.get("containers") or []:
        for name, value in ((c.get("resources") or {}).get("requests") or {}).items():
            total[name] = total.get(name, Decimal(0)) + quantity(value)
    for c in spec.get("initContainers") or []:
        for name, value in ((c.get("resources") or {}).get("requests") or {}).items():
            total[name] = max(total.get(name, Decimal(0)), quantity(value))
    for name, value in (spec.get("overhead") or {}).items():
        total[name] = total.get(name, Decimal(0)) + quantity(value)
    return total


def occupies_node(pod: Obj) -> bool:
    """A bound, non-terminal pod counts against its node's allocatable."""
    return bool((pod.get("spec") or {}).get("nodeName")) and (pod.get("status") or {}).get("phase") not in TERMINAL


def _match_expression(expr: Obj, labels: Mapping[str, str]) -> bool:
    key, op, values = expr.get("key", ""), expr.get("operator", ""), list(expr.get("values") or [])
    if op == "In":
        return key in labels and labels[key] in values
    if op == "NotIn":
        return key not in labels or labels[key] not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt") and key in labels and values:
        try:
            have, want = int(labels[key]), int(values[0])
        except ValueError:
            return False
        return have > want if op == "Gt" else have < want
    return False


def _match_term(term: Obj, node: Obj) -> bool:
    labels = (node.get("metadata") or {}).get("labels") or {}
    fields = {"metadata.name": (node.get("metadata") or {}).get("name", "")}
    exprs = term.get("matchExpressions") or []
    field_exprs = term.get("matchFields") or []
    if not exprs and not field_exprs:
        return False  # an empty term matches nothing
    return all(_match_expression(e, labels) for e in exprs) and all(_match_expression(e, fields) for e in field_exprs)


def matches_affinity(pod: Obj, node: Obj) -> bool:
    """nodeSelector AND requiredDuringSchedulingIgnoredDuringExecution (terms are ORed)."""
    spec = pod.get("spec") or {}
    labels = (node.get("metadata") or {}).get("labels") or {}
    for k, v in (spec.get("nodeSelector") or {}).items():
        if labels.get(k) != v:
            return False
    required = (
        ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution")
        or {}
    ).get("nodeSelectorTerms")
    if required is None:
        return True
    return any(_match_term(t, node) for t in required)


def tolerates(tolerations: Iterable[Obj], taint: Obj) -> bool:
    """Whether any toleration matches the taint (same rules as k8s.io/api/core/v1 Toleration.ToleratesTaint)."""
    for tol in tolerations:
        effect = tol.get("effect") or ""
        if effect and effect != taint.get("effect"):
            continue
        key = tol.get("key") or ""
        op = tol.get("operator") or "Equal"
        if key and key != taint.get("key"):
            continue
        if op == "Exists":
            return True
        if not key and op != "Exists":
            continue
        if (tol.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def fit_reasons(pod: Obj, node: Obj, *, used: Mapping[str, Decimal], pod_count: int) -> list[str]:
    """Why `pod` cannot go to `node` (empty list: it fits). `used` sums requests of pods already there."""
    spec = pod.get("spec") or {}
    tolerations = spec.get("tolerations") or []
    if (node.get("spec") or {}).get("unschedulable") and not tolerates(
        tolerations, {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
    ):
        return [REASON_CORDONED]
    if not matches_affinity(pod, node):
        return [REASON_AFFINITY]
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(tolerations, taint):
            return [REASON_TAINT]
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    reasons = []
    if pod_count + 1 > quantity(allocatable.get("pods", "110")):
        reasons.append(REASON_TOO_MANY)
    for name, want in sorted(pod_requests(pod).items()):
        if want <= 0:
            continue
        if used.get(name, Decimal(0)) + want > quantity(allocatable.get(name, 0)):
            reasons.append(f"Insufficient {name}")
    return reasons


def fit_error(num_nodes: int, per_node: Mapping[str, Sequence[str]]) -> str:
    """kube-scheduler's FitError text, including the default preemption plugin's post-filter message."""
    reasons: Counter[str] = Counter()
    preemption: Counter[str] = Counter()
    for node_reasons in per_node.values():
        reasons.update(node_reasons)
        resolvable = all(r.startswith("Insufficient ") or r == REASON_TOO_MANY for r in node_reasons)
        preemption[NO_VICTIMS if resolvable else NOT_HELPFUL] += 1
    msg = f"0/{num_nodes} nodes are available"
    hist = sorted(f"{n} {r}" for r, n in reasons.items())
    msg += f": {', '.join(hist)}." if hist else "."
    if num_nodes:
        phist = sorted(f"{n} {r}" for r, n in preemption.items())
        msg += f" preemption: 0/{num_nodes} nodes are available: {', '.join(phist)}."
    return msg


def choose_node(
    pod: Obj, nodes: Sequence[Obj], *, used: Mapping[str, Mapping[str, Decimal]], counts: Mapping[str, int]
) -> tuple[str | None, str]:
    """Pick the least-allocated fitting node; else return (None, FitError message)."""
    failures: dict[str, list[str]] = {}
    best: tuple[Decimal, str] | None = None
    for node in nodes:
        name = (node.get("metadata") or {}).get("name", "")
        node_used = used.get(name, {})
        reasons = fit_reasons(pod, node, used=node_used, pod_count=counts.get(name, 0))
        if reasons:
            failures[name] = reasons
            continue
        alloc = (node.get("status") or {}).get("allocatable") or {}
        score = Decimal(0)
        for res in ("cpu", "memory"):
            cap = quantity(alloc.get(res, 0))
            if cap > 0:
                score += node_used.get(res, Decimal(0)) / cap
        if best is None or (score, name) < best:
            best = (score, name)
    if best is not None:
        return best[1], ""
    return None, fit_error(len(nodes), failures)
