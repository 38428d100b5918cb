"""One dev cluster = control plane + real nodes (+ kwok nodes) under a state directory, and the handle to drive it.

`up()` starts everything in the background and writes `cluster.json`; `attach()` finds a running cluster from
that file (that is how pytest reuses a `make cluster-up` cluster); `down()` stops it from any process and
removes what it made on the host: processes, the bridge and veths, host routes, cgroups, node state. Mounts,
pod network namespaces and iptables rules live inside each node's own namespaces and die with them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s

from devcluster import images, kwok, network, procs, realnode
from devcluster.binaries import Binaries, ensure_built
from devcluster.controlplane import api_client, tail_file
from devcluster.controlplane import mint_kubeconfig as _mint
from devcluster.kube import call_json
from devcluster.nodeconfig import NodePlan
from devcluster.testing import wait_for

Log = Callable[[str], None]
NODE_IMAGES = ("pause", "coredns")


def _silent(_msg: str) -> None:
    pass


@dataclass(frozen=True)
class DevCluster:
    """Handles to a running cluster; every method works from any process (state lives in the API/state dir)."""

    state_dir: Path
    kubeconfig: Path
    gateway_ip: str
    net_index: int
    binaries: Binaries

    # -- state ---------------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """cluster.json: ports, network index, nodes, timings."""
        data: dict[str, Any] = json.loads((self.state_dir / "cluster.json").read_text())
        return data

    @property
    def pid_dir(self) -> Path:
        """Pidfiles of every process the cluster started."""
        return self.state_dir / "pids"

    @property
    def log_dir(self) -> Path:
        """Logs of every component."""
        return self.state_dir / "logs"

    @property
    def net(self) -> network.NetConfig:
        """The cluster's network (bridge, addresses, cgroup root)."""
        return network.NetConfig(self.net_index)

    def node_plans(self) -> list[NodePlan]:
        """The real nodes of this cluster."""
        names = self.info().get("real_nodes") or []
        return [NodePlan(name=name, k=k, net=self.net, cluster_state=self.state_dir) for k, name in enumerate(names)]

    # -- clients -------------------------------------------------------------------------------------------

    def api(self) -> k8s.ApiClient:
        """A new admin ApiClient (close it, or use it as a context manager)."""
        return api_client(self.kubeconfig)

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        kubeconfig: Path | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against this cluster; raises with stderr when `check` and it fails."""
        res = subprocess.run(
            [str(self.binaries.kubectl), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            check=False,
        )
        if check and res.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def apply(self, objects: Sequence[Mapping[str, Any]]) -> None:
        """Server-side apply of a list of objects."""
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(objects))

    def mint_kubeconfig(self, namespace: str, serviceaccount: str) -> Path:
        """A kubeconfig acting as exactly that ServiceAccount (TokenRequest)."""
        out = self.state_dir / "sa-kubeconfigs" / f"{namespace}.{serviceaccount}.kubeconfig"
        return _mint(self.kubeconfig, namespace=namespace, serviceaccount=serviceaccount, out=out)

    def component_logs(self) -> dict[str, Path]:
        """Log file of every component (etcd, kube-apiserver, ..., <node>-kubelet, <node>-containerd, ...)."""
        return {p.stem: p for p in sorted(self.log_dir.glob("*.log"))}

    def log_tails(self, *, lines: int = 25) -> str:
        """Last lines of every component log, for test failure reports."""
        return "\n".join(
            f"----- {name} ({path}) -----\n{tail_file(path, lines=lines)}"
            for name, path in self.component_logs().items()
        )

    def timings(self) -> dict[str, float]:
        """Start-up durations measured by `up()` (seconds): apiserver_readyz, node_ready, dns_ready, total..."""
        return {str(k): float(v) for k, v in (self.info().get("timings") or {}).items()}

    # -- pods and nodes ------------------------------------------------------------------------------------

    def pod_logs(self, namespace: str, name: str, container: str | None = None, *, previous: bool = False) -> str:
        """A container's log through the API server and kubelet, as `kubectl logs` shows it ('' if none)."""
        args = ["logs", "-n", namespace, name, *(["-c", container] if container else [])]
        res = self.kubectl(*args, *(["--previous"] if previous else []), check=False)
        return res.stdout if res.returncode == 0 else ""

    def remove_node(self, name: str) -> None:
        """Delete a Node object (its pods are then garbage-collected by the pod GC controller)."""
        with self.api() as api:
            try:
                k8s.CoreV1Api(api).delete_node(name, _preload_content=False)
            except k8s.ApiException as e:
                if e.status != 404:
                    raise

    # -- real nodes ----------------------------------------------------------------------------------------

    def load_images(self, names: Sequence[str], *, log: Log = _silent) -> dict[str, images.Image]:
        """Build (cached) and import images into every real node's containerd; returns them by name."""
        built = images.ensure_images(names, log=log)
        for plan in self.node_plans():
            images.load_into_containerd(
                built.values(), address=plan.containerd_socket, registry_host=self.net.gateway, log=log
            )
        return built

    def in_node(self, node: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command inside a real node's namespaces (e.g. `iptables-save`, `ip route`)."""
        pid = realnode.init_pid(self.pid_dir, node)
        if pid is None:
            raise RuntimeError(f"real node {node} is not running in {self.state_dir}")
        return realnode.in_node(pid, *argv, timeout=timeout)

    def crictl(self, node: str, *args: str) -> subprocess.CompletedProcess[str]:
        """crictl against a real node's containerd."""
        plan = next(p for p in self.node_plans() if p.name == node)
        return subprocess.run(
            [str(self.binaries.node.crictl), f"--runtime-endpoint=unix://{plan.containerd_socket}", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def restart_node_component(self, node: str, component: str, *, timeout: float = 120) -> None:
        """Restart a real node's kubelet or containerd in place (realnode.restart_component); returns once it
        serves again: containerd answers crictl, the kubelet has renewed its node lease since the restart."""
        owner = int(self.info().get("owner_pid") or 0)
        started = dt.datetime.now(dt.UTC)
        realnode.restart_component(
            node,
            component,
            pid_dir=self.pid_dir,
            log_dir=self.log_dir,
            die_with_caller=bool(self.info().get("die_with_caller")) and owner == os.getpid(),
        )
        if component == "containerd":
            wait_for(lambda: self.crictl(node, "version").returncode == 0, timeout=timeout, what=f"{node} containerd")
        elif component == "kubelet":
            wait_for(lambda: self._lease_renewed(node, since=started), timeout=timeout, what=f"{node} kubelet")

    def _lease_renewed(self, node: str, *, since: dt.datetime) -> bool:
        with self.api() as api:
            lease = call_json(k8s.CoordinationV1Api(api).read_namespaced_lease, node, "kube-node-lease")
        return renewed_since(lease, since)

    # -- kwok nodes ----------------------------------------------------------------------------------------

    def add_kwok_node(
        self,
        name: str,
        *,
        cpu: str = "8",
        memory: str = "32Gi",
        gpus: int = 0,
        pods: int = 110,
        labels: Mapping[str, str] | None = None,
        taints: Sequence[Mapping[str, str]] = (),
    ) -> None:
        """Register a simulated node (kwok controller started on first use); returns once it is Ready."""
        self.ensure_kwok()
        node = kwok.KwokNode(
            name=name, cpu=cpu, memory=memory, gpus=gpus, pods=pods, labels=labels or {}, taints=taints
        )
        with self.api() as api:
            call_json(k8s.CoreV1Api(api).create_node, kwok.node_manifest(node))
            wait_for(lambda: _node_ready(api, name), timeout=60, what=f"kwok node {name} Ready")

    def end_pod(self, namespace: str, name: str, *, exit_code: int, message: str | None = None) -> None:
        """End a pod on a kwok node: its containers terminated with `exit_code` and `message`, as a kubelet reports.

        Waits until kwok has reported the pod Running first, so kwok never overwrites the ending.
        """
        with self.api() as api:
            core = k8s.CoreV1Api(api)

            def running() -> dict[str, Any] | None:
                pod = call_json(core.read_namespaced_pod, name, namespace)
                status = pod.get("status") or {}
                return pod if status.get("phase") == "Running" and status.get("podIP") else None

            pod = wait_for(running, timeout=60, what=f"pod {namespace}/{name} Running on its kwok node")
            call_json(
                core.patch_namespaced_pod_status,
                name,
                namespace,
                kwok.end_pod_status(pod, exit_code=exit_code, message=message),
            )

    def ensure_kwok(self) -> None:
        """Start the kwok controller unless it runs (kwok nodes need it; it manages only kwok-annotated nodes)."""
        if any(r.name == "kwok" and r.alive() for r in procs.recorded(self.pid_dir)):
            return
        if not os.access(self.binaries.kwok, os.X_OK):
            ensure_built(kwok=True)
        owner = int(self.info().get("owner_pid") or 0)
        procs.spawn(
            name="kwok",
            argv=[
                str(self.binaries.kwok),
                *kwok.controller_args(
                    kubeconfig=str(self.kubeconfig), cidr=str(self.net.kwok_cidr), node_ip=self.gateway_ip
                ),
            ],
            log_path=self.log_dir / "kwok.log",
            pid_dir=self.pid_dir,
            die_with_parent=bool(self.info().get("die_with_caller")) and owner == os.getpid(),
            death_signal=signal.SIGKILL,
        )


def renewed_since(lease: Mapping[str, Any], since: dt.datetime) -> bool:
    """Whether a node Lease (JSON) was renewed after `since` (timezone-aware): its kubelet is alive and talking."""
    renewed = (lease.get("spec") or {}).get("renewTime")
    if not isinstance(renewed, str):
        return False
    return dt.datetime.fromisoformat(renewed.replace("Z", "+00:00")) > since


def _node_ready(api: k8s.ApiClient, name: str) -> bool:
    try:
        node = call_json(k8s.CoreV1Api(api).read_node, name)
    except k8s.ApiException as e:
        if e.status == 404:
            return False
        raise
    conds = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def real_node_names(count: int) -> list[str]:
    """Names of a cluster's real nodes."""
    return [f"node-{k}" for k in range(count)]
