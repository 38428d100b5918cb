"""Simulated nodes with kwok (sigs.k8s.io/kwok), the upstream tool for "many nodes, or GPU nodes, without machines".

The kwok controller runs next to the control plane and acts as the kubelet of every Node annotated
`kwok.x-k8s.io/node: fake`: it keeps the node Ready (heartbeats, Lease) and moves pods bound there through
kwok's default stages (Running with an IP from the cluster's kwok range at once; Succeeded for Job pods;
removed on delete). Nothing runs. `end_pod_status` builds what a kubelet would report for a container that
exited, so a test can end a pod on a kwok node with any exit code and termination message.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_LABEL = "devcluster.finetune.dev/node"
GPU_RESOURCE = "nvidia.com/gpu"
MAX_TERMINATION_MESSAGE = 4096  # the kubelet's cap for state.terminated.message


@dataclass(frozen=True)
class KwokNode:
    """What a simulated machine offers."""

    name: str
    cpu: str = "8"
    memory: str = "32Gi"
    pods: int = 110
    gpus: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: Sequence[Mapping[str, str]] = ()


def node_manifest(node: KwokNode) -> dict[str, Any]:
    """The Node object kwok will manage (kwok fills in conditions, addresses and heartbeats)."""
    capacity = {"cpu": node.cpu, "memory": node.memory, "pods": str(node.pods), "ephemeral-storage": "100Gi"}
    if node.gpus:
        capacity[GPU_RESOURCE] = str(node.gpus)
    labels = {
        "kubernetes.io/hostname": node.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        KWOK_LABEL: "kwok",
        **node.labels,
    }
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": labels, "annotations": {KWOK_ANNOTATION: "fake"}},
        "spec": {"taints": [dict(t) for t in node.taints]} if node.taints else {},
        "status": {"capacity": capacity, "allocatable": capacity},
    }
    return body


def controller_args(*, kubeconfig: str, cidr: str, node_ip: str) -> list[str]:
    """kwok controller flags: manage only annotated nodes, hand out pod IPs from `cidr`, use node Leases."""
    return [
        f"--kubeconfig={kubeconfig}",
        f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
        f"--cidr={cidr}",
        f"--node-ip={node_ip}",
        "--node-lease-duration-seconds=40",
        "--server-address=",
    ]


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def end_pod_status(pod: Mapping[str, Any], *, exit_code: int, message: str | None = None) -> dict[str, Any]:
    """The status patch of a pod whose containers all exited with `exit_code` (the first with `message`).

    Mirrors what a kubelet reports: phase Succeeded for 0 else Failed, each container terminated with reason
    Completed/Error, its start time kept, and the termination message capped like the kubelet caps it.
    """
    now = _now()
    old = {c.get("name"): c for c in (pod.get("status") or {}).get("containerStatuses") or []}
    statuses = []
    for i, c in enumerate((pod.get("spec") or {}).get("containers") or []):
        prev = old.get(c["name"]) or {}
        started = ((prev.get("state") or {}).get("running") or {}).get("startedAt") or now
        term: dict[str, Any] = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": started,
            "finishedAt": now,
        }
        if i == 0 and message:
            term["message"] = message[:MAX_TERMINATION_MESSAGE]
        statuses.append(
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": prev.get("imageID", ""),
                "ready": False,
                "started": False,
                "restartCount": int(prev.get("restartCount") or 0),
                "state": {"terminated": term},
            }
        )
    ready = {"status": "False", "reason": "PodCompleted", "lastTransitionTime": now}
    return {
        "status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": statuses,
            "conditions": [{"type": "Ready", **ready}, {"type": "ContainersReady", **ready}],
        }
    }
