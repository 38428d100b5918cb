"""The operator's RBAC, as data: every rule with the reason it is needed.

Why in Python: the same rules are rendered into deploy/rbac.yaml (reviewed by humans, copied by the Helm chart)
and granted to the ServiceAccount the integration tests run the operator under, so the documented RBAC is the
tested RBAC. No wildcards, no Secrets: pods reference the storage Secret by name, the operator never reads it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from finetune_operator import names

SERVICE_ACCOUNT = "finetune-operator"
CLUSTER_ROLE = "finetune-operator"
LEASE_ROLE = "finetune-operator-leader-election"
KUEUE_ROLE = "finetune-operator-kueue"
KUEUE_GROUP = "kueue.x-k8s.io"


@dataclasses.dataclass(frozen=True)
class Rule:
    api_group: str
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    why: str

    def manifest(self) -> dict[str, Any]:
        return {"apiGroups": [self.api_group], "resources": list(self.resources), "verbs": list(self.verbs)}


# Cluster-wide (ClusterRole) or per watched namespace (Role) in namespaced mode.
JOB_RULES: tuple[Rule, ...] = (
    Rule(
        names.GROUP, ("finetunejobs",), ("get", "list", "watch"), "read jobs: kopf watch + a fresh read per reconcile"
    ),
    Rule(names.GROUP, ("finetunejobs",), ("delete",), "ttlSecondsAfterFinished deletes finished jobs"),
    Rule(names.GROUP, ("finetunejobs/status",), ("get", "patch"), "write status (phase, conditions, progress)"),
    Rule(
        names.GROUP,
        ("finetunejobs/finalizers",),
        ("update",),
        "children carry ownerReferences with blockOwnerDeletion (OwnerReferencesPermissionEnforcement)",
    ),
    Rule("", ("pods",), ("get", "list", "watch"), "observe the Ray pods (phase, termination reason, IP)"),
    Rule("", ("pods",), ("create", "delete"), "create the Ray head/worker pods; delete them on finish/suspend/retry"),
    Rule(
        "",
        ("pods/log",),
        ("get",),
        "the log tail of a failed pod whose trainer left no report (OOM kill), kept in status.lastFailure",
    ),
    Rule(
        "",
        ("services", "configmaps"),
        ("get", "list", "create", "delete"),
        "head Service and trainer config per job; get/list to check ownership (never touch what is not ours)",
    ),
    Rule(
        "networking.k8s.io",
        ("networkpolicies",),
        ("get", "list", "create", "delete"),
        "restrict Ray's ports to the job; get/list to check ownership",
    ),
    Rule("", ("events",), ("create", "patch"), "Kubernetes Events for every transition (kubectl describe)"),
)
# Only with the Kueue integration on (settings.kueue_enabled): namespaced like the job rules.
KUEUE_RULES: tuple[Rule, ...] = (
    Rule(
        KUEUE_GROUP,
        ("workloads",),
        ("get", "list", "watch", "create", "patch"),
        "the Workload a labelled job waits as: created (owned by the job, so GC deletes it), watched for admission "
        "and eviction, spec.active patched for spec.suspend",
    ),
    Rule(
        KUEUE_GROUP,
        ("workloads/status",),
        ("patch",),
        "hand the quota back after an eviction (once the pods are gone) and mark the Workload Finished",
    ),
)
# Cluster-scoped reads the Kueue integration needs (always a ClusterRole, also in namespaced mode).
KUEUE_CLUSTER_RULES: tuple[Rule, ...] = (
    Rule(KUEUE_GROUP, ("resourceflavors",), ("get",), "the assigned flavor's nodeLabels/tolerations for the pods"),
    Rule(
        KUEUE_GROUP,
        ("workloadpriorityclasses",),
        ("get",),
        "the Workload's priority from the job's kueue.x-k8s.io/priority-class label",
    ),
    Rule(
        "scheduling.k8s.io",
        ("priorityclasses",),
        ("get",),
        "else the Workload's priority from spec.resources.priorityClassName",
    ),
)
# Only in the operator's own namespace (Role).
LEASE_RULES: tuple[Rule, ...] = (
    Rule("coordination.k8s.io", ("leases",), ("get", "create", "update"), "leader election: one active replica"),
)


def cluster_role(name: str = CLUSTER_ROLE) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "finetune-operator"}},
        "rules": [r.manifest() for r in JOB_RULES],
    }


def job_role(namespace: str, name: str = CLUSTER_ROLE) -> dict[str, Any]:
    """Namespaced mode: the same rules as a Role in one watched namespace."""
    role = cluster_role(name)
    return {**role, "kind": "Role", "metadata": {**role["metadata"], "namespace": namespace}}


def kueue_role(namespace: str, name: str = KUEUE_ROLE) -> dict[str, Any]:
    """Namespaced mode with Kueue: the Workload rules as a Role in one watched namespace."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "finetune-operator"}},
        "rules": [r.manifest() for r in KUEUE_RULES],
    }


def kueue_cluster_role(name: str = KUEUE_ROLE, *, namespaced: bool = False) -> dict[str, Any]:
    """With Kueue: the cluster-scoped reads, plus (cluster-wide mode) the Workload rules."""
    rules = KUEUE_CLUSTER_RULES if namespaced else KUEUE_RULES + KUEUE_CLUSTER_RULES
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "finetune-operator"}},
        "rules": [r.manifest() for r in rules],
    }


def lease_role(namespace: str, name: str = LEASE_ROLE) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "finetune-operator"}},
        "rules": [r.manifest() for r in LEASE_RULES],
    }


def binding(*, role: dict[str, Any], namespace: str, service_account: str = SERVICE_ACCOUNT) -> dict[str, Any]:
    kind = "ClusterRoleBinding" if role["kind"] == "ClusterRole" else "RoleBinding"
    meta: dict[str, Any] = {"name": role["metadata"]["name"], "labels": role["metadata"]["labels"]}
    if kind == "RoleBinding":
        meta["namespace"] = role["metadata"]["namespace"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role["kind"], "name": role["metadata"]["name"]},
        "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
    }


def manifests(namespace: str) -> list[dict[str, Any]]:
    """ServiceAccount + cluster-wide RBAC + the lease Role, in apply order."""
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": SERVICE_ACCOUNT, "namespace": namespace},
    }
    role = cluster_role()
    lease = lease_role(namespace)
    return [account, role, binding(role=role, namespace=namespace), lease, binding(role=lease, namespace=namespace)]


def kueue_manifests(namespace: str) -> list[dict[str, Any]]:
    """What the Kueue integration adds (cluster-wide mode): one ClusterRole and its binding."""
    role = kueue_cluster_role()
    return [role, binding(role=role, namespace=namespace)]


def markdown_table() -> str:
    lines = ["| API group | Resources | Verbs | Scope | Why |", "|---|---|---|---|---|"]
    for scope, rules in (
        ("cluster (or watched namespace)", JOB_RULES),
        ("operator namespace", LEASE_RULES),
        ("cluster (or watched namespace), Kueue on", KUEUE_RULES),
        ("cluster, Kueue on", KUEUE_CLUSTER_RULES),
    ):
        for r in rules:
            group = r.api_group or '"" (core)'
            lines.append(f"| {group} | {', '.join(r.resources)} | {', '.join(r.verbs)} | {scope} | {r.why} |")
    return "\n".join(lines)


def render_yaml(namespace: str, *, kueue: bool = False) -> str:
    import yaml  # noqa: PLC0415  (only for this generator)

    command = "python -m finetune_operator.rbac" + (" kueue" if kueue else "")
    header = f"# Generated from finetune_operator/rbac.py ({command}); do not edit.\n"
    objects = kueue_manifests(namespace) if kueue else manifests(namespace)
    return header + yaml.safe_dump_all(objects, sort_keys=False)


if __name__ == "__main__":
    import sys

    print(render_yaml("finetune-system", kueue=sys.argv[1:] == ["kueue"]), end="")
