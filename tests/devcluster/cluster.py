"""A dev cluster whose nodes are the process node: devcluster's control plane plus pods as local processes.

The existing e2e suite runs here until it moves to the real node (devcluster.realnode); then this package is
retired. `up()` starts devcluster's control plane without kube-scheduler (the process node binds pods
itself, and two schedulers would fight) and then the process node; `ProcessCluster` adds the process
node's controls (simulated nodes, simulated exits, lost nodes, logs read from its files).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

import devcluster
from devcluster import procs
from devcluster.binaries import REPO_ROOT
from devcluster.cluster import DevCluster
from devcluster.controlplane import api_client, free_port, tail_file
from devcluster.kube import call_json
from tests.devcluster.node import ANN_LOST, NodeSpec, find_log, node_conditions, node_manifest
from tests.devcluster.runtime import ANN_SIMULATE_EXIT, ANN_SIMULATE_MESSAGE, Mountpoints

CPU_POOL_LABEL = "finetune.dev/pool"


def default_nodes() -> list[NodeSpec]:
    """Two CPU nodes big enough for a Ray head + workers."""
    return [NodeSpec(name=n, cpu="8", memory="16Gi", labels={CPU_POOL_LABEL: "cpu"}) for n in ("node-a", "node-b")]


@dataclass(frozen=True)
class ProcessCluster(DevCluster):
    """A DevCluster whose nodes are served by the process node."""

    @property
    def node_state_dir(self) -> Path:
        """Where the process node keeps pod logs, volumes and pidfiles."""
        return self.state_dir / "node"

    def pod_logs(self, namespace: str, name: str, container: str | None = None, *, previous: bool = False) -> str:
        """A container's log as the process node recorded it ('' if it has not started); works after deletion.

        Without `container`, the pod's default container is used (annotation
        kubectl.kubernetes.io/default-container, else the first app container), as `kubectl logs` does.
        """
        if container is None:
            container = self._default_container(namespace, name)
        path = find_log(self.node_state_dir, namespace, name, container, previous=previous)
        return path.read_text(errors="replace") if path else ""

    def _default_container(self, namespace: str, name: str) -> str | None:
        with self.api() as api:
            try:
                pod = call_json(k8s.CoreV1Api(api).read_namespaced_pod, name, namespace)
            except k8s.ApiException:
                return None  # deleted already: fall back to whatever the node recorded
        ann = (pod.get("metadata") or {}).get("annotations") or {}
        if ann.get("kubectl.kubernetes.io/default-container"):
            return str(ann["kubectl.kubernetes.io/default-container"])
        containers = (pod.get("spec") or {}).get("containers") or []
        return str(containers[0]["name"]) if containers else None

    def simulate_exit(self, namespace: str, name: str, *, exit_code: int, message: str | None = None) -> None:
        """End a pod on a simulated process-node node with `exit_code` (and a termination message)."""
        ann = {ANN_SIMULATE_EXIT: str(exit_code)}
        if message is not None:
            ann[ANN_SIMULATE_MESSAGE] = message
        with self.api() as api:
            call_json(k8s.CoreV1Api(api).patch_namespaced_pod, name, namespace, {"metadata": {"annotations": ann}})

    def add_node(self, spec: NodeSpec) -> None:
        """Register another node served by the running process node (e.g. a simulated GPU node)."""
        body = node_manifest(spec, host_ip=self.gateway_ip, kubelet_port=int(self.info()["kubelet_port"]))
        with self.api() as api:
            call_json(k8s.CoreV1Api(api).create_node, body)

    def lose_node(self, name: str, *, mark_not_ready: bool = True, delete: bool = False) -> None:
        """Simulate a machine failure: its pod processes are SIGKILLed and heartbeats stop.

        With `mark_not_ready` the Ready condition becomes Unknown at once (what the node lifecycle controller
        does after --node-monitor-grace-period=20s anyway); with `delete` the Node object is removed too.
        """
        with self.api() as api:
            core = k8s.CoreV1Api(api)
            call_json(core.patch_node, name, {"metadata": {"annotations": {ANN_LOST: "true"}}})
            deadline = time.monotonic() + 15
            marker = self.node_state_dir / "lost"
            while time.monotonic() < deadline and not (marker / name).exists():
                time.sleep(0.1)
            if mark_not_ready:
                call_json(core.patch_node_status, name, {"status": {"conditions": node_conditions(ready=False)}})
            if delete:
                self.remove_node(name)


def _wait_nodes_ready(kubeconfig: Path, names: Sequence[str], *, deadline: float, check: Callable[[], None]) -> None:
    with api_client(kubeconfig) as api:
        core = k8s.CoreV1Api(api)
        while time.monotonic() < deadline:
            check()
            ready = set()
            for n in call_json(core.list_node).get("items") or []:
                for c in (n.get("status") or {}).get("conditions") or []:
                    if c.get("type") == "Ready" and c.get("status") == "True":
                        ready.add(n["metadata"]["name"])
            if set(names) <= ready:
                return
            time.sleep(0.2)
    raise TimeoutError(f"nodes {list(names)} not Ready in time")


def _start_process_node(
    base: DevCluster, *, nodes: Sequence[NodeSpec], backoff_base: float, die_with_caller: bool
) -> dict[str, Any]:
    info = base.info()
    node_dir = base.state_dir / "node"
    node_dir.mkdir(parents=True, exist_ok=True)
    info["kubelet_port"] = free_port()
    node_cfg: dict[str, Any] = {
        "state_dir": str(node_dir),
        "net_index": base.net_index,
        "kubelet_port": info["kubelet_port"],
        "apiserver_port": info["apiserver_port"],
        "pki_dir": str(base.state_dir / "pki"),
        "backoff_base": backoff_base,
        "nodes": [n.to_dict() for n in nodes],
    }
    cfg_path = base.state_dir / "node-config.json"
    cfg_path.write_text(json.dumps(node_cfg, indent=2))
    procs.spawn(
        name="node",
        argv=[sys.executable, "-m", "tests.devcluster.node", f"--kubeconfig={base.kubeconfig}", f"--config={cfg_path}"],
        log_path=base.log_dir / "node.log",
        pid_dir=base.pid_dir,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        die_with_parent=die_with_caller,
    )

    def alive() -> None:
        for rec in procs.recorded(base.pid_dir):
            if rec.name == "node" and not rec.alive():
                raise RuntimeError("process node exited:\n" + tail_file(base.log_dir / "node.log", lines=30))

    t1 = time.monotonic()
    _wait_nodes_ready(base.kubeconfig, [n.name for n in nodes], deadline=t1 + 60, check=alive)
    info["timings"]["node_ready"] = time.monotonic() - t1
    info["with_node"] = True
    return info


def up(
    state_dir: Path,
    *,
    nodes: Sequence[NodeSpec] | None = None,
    with_node: bool = True,
    backoff_base: float = 10.0,
    log: Callable[[str], None] = print,
    die_with_caller: bool = False,
) -> ProcessCluster:
    """Start the control plane (no kube-scheduler) and the process node; returns once the nodes are Ready."""
    base = devcluster.up(state_dir, nodes=0, scheduler=False, log=log, die_with_caller=die_with_caller)
    cluster = ProcessCluster(**{f: getattr(base, f) for f in base.__dataclass_fields__})
    if not with_node:
        return cluster
    try:
        specs = default_nodes() if nodes is None else nodes
        info = _start_process_node(cluster, nodes=specs, backoff_base=backoff_base, die_with_caller=die_with_caller)
    except BaseException:
        down(cluster.state_dir, log=lambda _m: None)
        raise
    (cluster.state_dir / "cluster.json").write_text(json.dumps(info, indent=2))
    log(f"process node ready after {info['timings']['node_ready']:.1f}s")
    return cluster


def attach(state_dir: Path) -> ProcessCluster:
    """Handles to a running process-node cluster."""
    base = devcluster.attach(state_dir)
    if not base.info().get("with_node"):
        raise RuntimeError(f"{state_dir} holds no process-node cluster (`python -m tests.devcluster up` starts one)")
    return ProcessCluster(**{f: getattr(base, f) for f in base.__dataclass_fields__})


def down(state_dir: Path, *, log: Callable[[str], None] = print) -> None:
    """Stop the cluster (devcluster.down) and remove the mountpoints the process node created on the host."""
    devcluster.down(state_dir, log=log)
    registry = state_dir.resolve() / "node" / "mountpoints.json"
    if registry.exists():
        Mountpoints(registry).sweep()
