"""The process node's pure scheduling and service-resolution logic (no cluster needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest

from tests.devcluster import network, scheduling


def node(
    name: str, *, cpu: str = "8", gpu: str = "0", labels: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    alloc = {"cpu": cpu, "memory": "16Gi", "pods": "110"}
    if gpu != "0":
        alloc["nvidia.com/gpu"] = gpu
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": spec, "status": {"allocatable": alloc}}


def pod(requests: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"containers": [{"name": "c", "resources": {"requests": requests or {}}}], **spec},
    }


@dataclass
class Case:
    name: str
    pod: dict[str, Any]
    node: dict[str, Any]
    reasons: list[str]
    used: dict[str, Decimal] = field(default_factory=dict)


TAINT = {"key": "gpu", "value": "true", "effect": "NoSchedule"}
CASES = [
    Case("fits", pod({"cpu": "2"}), node("a"), []),
    Case("cpu exhausted by bound pods", pod({"cpu": "2"}), node("a"), ["Insufficient cpu"], {"cpu": Decimal(7)}),
    Case("milli-cpu sums", pod({"cpu": "500m"}), node("a", cpu="1"), [], {"cpu": Decimal("0.5")}),
    Case("no gpu on node", pod({"nvidia.com/gpu": "1"}), node("a"), ["Insufficient nvidia.com/gpu"]),
    Case("gpu present", pod({"nvidia.com/gpu": "1"}), node("a", gpu="2"), []),
    Case(
        "nodeSelector mismatch",
        pod(nodeSelector={"pool": "gpu"}),
        node("a", labels={"pool": "cpu"}),
        [scheduling.REASON_AFFINITY],
    ),
    Case("untolerated taint", pod(), node("a", taints=[TAINT]), [scheduling.REASON_TAINT]),
    Case("tolerated taint", pod(tolerations=[{"key": "gpu", "operator": "Exists"}]), node("a", taints=[TAINT]), []),
    Case("cordoned", pod(), node("a", unschedulable=True), [scheduling.REASON_CORDONED]),
    Case(
        "required affinity NotIn",
        pod(
            affinity={
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "pool", "operator": "NotIn", "values": ["cpu"]}]}
                        ]
                    }
                }
            }
        ),
        node("a", labels={"pool": "cpu"}),
        [scheduling.REASON_AFFINITY],
    ),
    Case(
        "required affinity terms are ORed",
        pod(
            affinity={
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "zone", "operator": "Exists"}]},
                            {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["cpu"]}]},
                        ]
                    }
                }
            }
        ),
        node("a", labels={"pool": "cpu"}),
        [],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fit_reasons(case: Case) -> None:
    assert scheduling.fit_reasons(case.pod, case.node, used=case.used, pod_count=0) == case.reasons


def test_fit_error_matches_kube_scheduler_format() -> None:
    target, msg = scheduling.choose_node(
        pod({"nvidia.com/gpu": "1"}), [node("a"), node("b", taints=[TAINT])], used={}, counts={}
    )
    assert target is None
    assert msg == (
        "0/2 nodes are available: 1 Insufficient nvidia.com/gpu, 1 node(s) had untolerated taint(s). "
        "preemption: 0/2 nodes are available: 1 No preemption victims found for incoming pod, "
        "1 Preemption is not helpful for scheduling."
    )


def test_least_allocated_node_wins() -> None:
    target, _ = scheduling.choose_node(
        pod({"cpu": "1"}), [node("a"), node("b")], used={"a": {"cpu": Decimal(4)}}, counts={"a": 1}
    )
    assert target == "b"


def test_hosts_file_resolves_services_like_cluster_dns() -> None:
    def p(name: str, ns: str, ip: str, ready: bool, **spec: Any) -> dict[str, Any]:
        return {
            "metadata": {"name": name, "namespace": ns, "uid": name, "labels": {"app": "web"}},
            "spec": spec,
            "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": str(ready)}]},
        }

    pods = [p("w1", "a", "10.0.0.2", False), p("w2", "a", "10.0.0.3", True), p("w3", "b", "10.0.0.4", True)]
    services: list[dict[str, Any]] = [
        {"metadata": {"name": "web", "namespace": "a"}, "spec": {"selector": {"app": "web"}}},
        {"metadata": {"name": "minio", "namespace": "minio"}, "spec": {}},
    ]
    slices = [
        {
            "metadata": {"namespace": "minio", "labels": {"kubernetes.io/service-name": "minio"}},
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}],
        }
    ]
    me = p("client", "b", "10.0.0.9", True, hostname="c0", subdomain="grp")
    text = network.hosts_file(pod=me, pod_ip="10.0.0.9", services=services, pods=pods, slices=slices)
    lines = text.splitlines()
    assert "10.0.0.9\tc0.grp.b.svc.cluster.local c0" in lines
    # Ready pods first, only the service's namespace, no short name from another namespace.
    assert lines.index("10.0.0.3\tweb.a.svc.cluster.local web.a.svc web.a") < lines.index(
        "10.0.0.2\tweb.a.svc.cluster.local web.a.svc web.a"
    )
    assert not any(line.startswith("10.0.0.4") for line in lines)
    assert "10.0.0.1\tminio.minio.svc.cluster.local minio.minio.svc minio.minio" in lines
