"""Simulated nodes with kwok on the control plane: the real kube-scheduler places pods on them by their resources,
kwok reports them Running, and the cluster handle ends them with an exit code and message. No real node is needed
(the same works next to one: `real_cluster.add_kwok_node`)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as k8s

from devcluster import DevCluster
from devcluster.kube import call_json
from devcluster.testing import container_state, get_pod, pod_manifest, wait_for, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.kwok]
TAINT = {"key": "devcluster.test/kwok", "value": "true", "effect": "NoSchedule"}


@pytest.fixture
def gpu_node(cluster: DevCluster) -> Iterator[str]:
    """A kwok node with 4 GPUs, tainted so that only this test's pods go there."""
    name = f"kwok-gpu-{secrets.token_hex(3)}"
    cluster.add_kwok_node(name, cpu="16", memory="64Gi", gpus=4, labels={"pool": name}, taints=[TAINT])
    yield name
    cluster.remove_node(name)


def gpu_pod(name: str, *, node: str, gpus: int) -> dict[str, Any]:
    body = pod_manifest(name, ["train"], image="trainer:any", resources={"limits": {"nvidia.com/gpu": str(gpus)}})
    body["spec"]["nodeSelector"] = {"pool": node}
    body["spec"]["tolerations"] = [{"key": TAINT["key"], "operator": "Exists"}]
    return body


def test_pod_on_a_kwok_node_runs_and_ends_with_exit_code_and_message(
    cluster: DevCluster, namespace: str, gpu_node: str
) -> None:
    with cluster.api() as api:
        call_json(k8s.CoreV1Api(api).create_namespaced_pod, namespace, gpu_pod("head", node=gpu_node, gpus=2))
        running = wait_phase(api, namespace, "head", ("Running",), timeout=60)
        assert running["spec"]["nodeName"] == gpu_node
        assert running["status"]["podIP"].startswith(str(cluster.net.kwok_cidr.network_address)[:-2])
        cluster.end_pod(namespace, "head", exit_code=3, message='{"reason": "NaNLoss"}')
        done = wait_phase(api, namespace, "head", ("Failed",), timeout=30)
    term = container_state(done)["terminated"]
    assert (term["exitCode"], term["reason"], term["message"]) == (3, "Error", '{"reason": "NaNLoss"}')


def test_kube_scheduler_explains_a_pod_no_kwok_node_fits(cluster: DevCluster, namespace: str, gpu_node: str) -> None:
    with cluster.api() as api:
        call_json(k8s.CoreV1Api(api).create_namespaced_pod, namespace, gpu_pod("big", node=gpu_node, gpus=8))

        def unschedulable() -> dict[str, Any] | None:
            pod = get_pod(api, namespace, "big") or {}
            conds = (pod.get("status") or {}).get("conditions") or []
            return next(
                (c for c in conds if c.get("type") == "PodScheduled" and c.get("reason") == "Unschedulable"), None
            )

        cond = wait_for(unschedulable, timeout=60, what="PodScheduled=False/Unschedulable from kube-scheduler")
    assert "Insufficient nvidia.com/gpu" in cond["message"], cond
