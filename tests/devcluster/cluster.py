"""One dev cluster = control plane + process node under a state directory, with the handles tests need.

`up()` starts everything in the background and writes `cluster.json`; `attach()` finds a running cluster
from that file (that is how pytest reuses a `make cluster-up` cluster); `down()` stops it from any process
and sweeps what a crash could leave behind (pod processes, network namespaces, the bridge, mountpoints).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from tests.devcluster import network, procs
from tests.devcluster.binaries import REPO_ROOT, Binaries, ensure_built, locate
from tests.devcluster.controlplane import STOP_ORDER, ControlPlane, api_client, free_port, tail_file
from tests.devcluster.controlplane import mint_kubeconfig as _mint
from tests.devcluster.kube import call_json
from tests.devcluster.node import ANN_LOST, NodeSpec, find_log, node_conditions, node_manifest
from tests.devcluster.runtime import ANN_SIMULATE_EXIT, ANN_SIMULATE_MESSAGE, Mountpoints

CPU_POOL_LABEL = "finetune.dev/pool"


def default_nodes() -> list[NodeSpec]:
    """Two CPU nodes big enough for a Ray head + workers, as `make cluster-up` provides."""
    return [NodeSpec(name=n, cpu="8", memory="16Gi", labels={CPU_POOL_LABEL: "cpu"}) for n in ("node-a", "node-b")]


@dataclass(frozen=True)
class DevCluster:
    """Handles to a running cluster; every method works from any process (state lives in the API/state dir)."""

    state_dir: Path
    kubeconfig: Path
    gateway_ip: str
    net_index: int
    binaries: Binaries

    @property
    def node_state_dir(self) -> Path:
        """Where the process node keeps pod logs, volumes and pidfiles."""
        return self.state_dir / "node"

    # -- clients -------------------------------------------------------------------------------------------

    def api(self) -> k8s.ApiClient:
        """A new admin ApiClient (close it, or use it as a context manager)."""
        return api_client(self.kubeconfig)

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against this cluster; raises with stderr when `check` and it fails."""
        res = subprocess.run(
            [str(self.binaries.kubectl), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=120,
            check=False,
        )
        if check and res.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def mint_kubeconfig(self, namespace: str, serviceaccount: str) -> Path:
        """A kubeconfig acting as exactly that ServiceAccount (TokenRequest)."""
        out = self.state_dir / "sa-kubeconfigs" / f"{namespace}.{serviceaccount}.kubeconfig"
        return _mint(self.kubeconfig, namespace=namespace, serviceaccount=serviceaccount, out=out)

    def component_logs(self) -> dict[str, Path]:
        """Log file of every component (etcd, kube-apiserver, kube-controller-manager, node)."""
        return {p.stem: p for p in sorted((self.state_dir / "logs").glob("*.log"))}

    def log_tails(self, *, lines: int = 25) -> str:
        """Last lines of every component log, for test failure reports."""
        return "\n".join(
            f"----- {name} ({path}) -----\n{tail_file(path, lines=lines)}"
            for name, path in self.component_logs().items()
        )

    # -- pods and nodes ------------------------------------------------------------------------------------

    def pod_logs(self, namespace: str, name: str, container: str | None = None, *, previous: bool = False) -> str:
        """A container's log as the process node recorded it ('' if it has not started).

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
        """End a pod on a simulated node with `exit_code` (and a termination message)."""
        ann = {ANN_SIMULATE_EXIT: str(exit_code)}
        if message is not None:
            ann[ANN_SIMULATE_MESSAGE] = message
        with self.api() as api:
            call_json(k8s.CoreV1Api(api).patch_namespaced_pod, name, namespace, {"metadata": {"annotations": ann}})

    def add_node(self, spec: NodeSpec) -> None:
        """Register another node served by the running process node (e.g. a simulated GPU node)."""
        body = node_manifest(spec, host_ip=self.gateway_ip, kubelet_port=self._kubelet_port())
        with self.api() as api:
            call_json(k8s.CoreV1Api(api).create_node, body)

    def remove_node(self, name: str) -> None:
        """Delete a Node object (its pods are then garbage-collected by the pod GC controller)."""
        with self.api() as api:
            try:
                k8s.CoreV1Api(api).delete_node(name, _preload_content=False)
            except k8s.ApiException as e:
                if e.status != 404:
                    raise

    def lose_node(self, name: str, *, mark_not_ready: bool = True, delete: bool = False) -> None:
        """Simulate a machine failure: its pod processes are SIGKILLed and heartbeats stop.

        With `mark_not_ready` the Ready condition becomes Unknown at once (what the node lifecycle controller
        does after --node-monitor-grace-period=20s anyway); with `delete` the Node object is removed too.
        Pods on a lost node keep their last reported status; deleting them leaves them Terminating, exactly as
        with a real unreachable kubelet, until they are force-deleted or the Node object is deleted.
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

    def timings(self) -> dict[str, float]:
        """Start-up durations measured by `up()` (seconds): apiserver_readyz, controller_manager_ready, ..."""
        info = json.loads((self.state_dir / "cluster.json").read_text())
        return {str(k): float(v) for k, v in (info.get("timings") or {}).items()}

    def _kubelet_port(self) -> int:
        return int(json.loads((self.state_dir / "cluster.json").read_text())["kubelet_port"])


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


def up(
    state_dir: Path,
    *,
    nodes: Sequence[NodeSpec] | None = None,
    with_node: bool = True,
    backoff_base: float = 10.0,
    log: Callable[[str], None] = print,
    die_with_caller: bool = False,
) -> DevCluster:
    """Start control plane (+ process node) in the background; returns once nodes are Ready.

    With `die_with_caller` (the pytest session, benchmarks) every component is SIGTERMed by the kernel when
    the calling process dies, even by SIGKILL; the node's SIGTERM handler then kills its pods and removes
    their network. Call it from the main thread. `make cluster-up` leaves it off: that cluster outlives `up`.
    """
    if os.geteuid() != 0 and with_node:
        raise PermissionError("the process node needs root (network namespaces, bind mounts); run as root")
    state_dir = state_dir.resolve()
    if (state_dir / "cluster.json").exists() or (state_dir / "pids").is_dir():
        down(state_dir, log=log)  # never orphan processes of an earlier cluster in this state dir
    # Never resurrect an old etcd (stale Nodes would look Ready) or mix old logs and pidfiles in.
    for stale in ("etcd", "logs", "pids", "node", "pki", "sa-kubeconfigs"):
        shutil.rmtree(state_dir / stale, ignore_errors=True)
    binaries = ensure_built()
    net = network.NetConfig(network.claim_index(state_dir, is_alive=_running) if with_node else 31)
    cp = ControlPlane(state_dir, binaries=binaries, extra_ips=(net.gateway,), log=log, die_with_caller=die_with_caller)
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    try:
        ep = cp.start()
        timings.update(cp.timings)
        kubelet_port = free_port()
        info: dict[str, Any] = {
            "kubeconfig": str(cp.kubeconfig),
            "apiserver_port": ep.apiserver_port,
            "etcd_port": ep.etcd_port,
            "net_index": net.index,
            "gateway_ip": net.gateway,
            "kubelet_port": kubelet_port,
            "with_node": with_node,
        }
        (state_dir / "cluster.json").write_text(json.dumps(info, indent=2))
        if with_node:
            node_dir = state_dir / "node"
            node_dir.mkdir(parents=True, exist_ok=True)
            node_specs = [n.to_dict() for n in (default_nodes() if nodes is None else nodes)]
            names = [str(n["name"]) for n in node_specs]
            node_cfg: dict[str, Any] = {
                "state_dir": str(node_dir),
                "net_index": net.index,
                "kubelet_port": kubelet_port,
                "apiserver_port": ep.apiserver_port,
                "pki_dir": str(cp.pki_dir),
                "backoff_base": backoff_base,
                "nodes": node_specs,
            }
            cfg_path = state_dir / "node-config.json"
            cfg_path.write_text(json.dumps(node_cfg, indent=2))
            t1 = time.monotonic()
            procs.spawn(
                name="node",
                argv=[
                    sys.executable,
                    "-m",
                    "tests.devcluster.node",
                    "--kubeconfig",
                    str(cp.kubeconfig),
                    "--config",
                    str(cfg_path),
                ],
                log_path=cp.log_dir / "node.log",
                pid_dir=cp.pid_dir,
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                die_with_parent=die_with_caller,
            )

            def alive() -> None:
                for rec in procs.recorded(cp.pid_dir):
                    if rec.name == "node" and not rec.alive():
                        raise RuntimeError("process node exited:\n" + tail_file(cp.log_dir / "node.log", lines=30))

            _wait_nodes_ready(cp.kubeconfig, names, deadline=time.monotonic() + 60, check=alive)
            timings["node_ready"] = time.monotonic() - t1
            log(f"process node ready after {timings['node_ready']:.1f}s (nodes: {names})")
    except BaseException:
        down(state_dir, log=lambda _m: None)
        if with_node:
            network.sweep(net)
            network.release_index(net.index, state_dir)
        raise
    timings["total"] = time.monotonic() - t0
    info["timings"] = timings
    (state_dir / "cluster.json").write_text(json.dumps(info, indent=2))
    log(f"cluster up in {timings['total']:.1f}s; state in {state_dir}")
    return DevCluster(
        state_dir=state_dir, kubeconfig=cp.kubeconfig, gateway_ip=net.gateway, net_index=net.index, binaries=binaries
    )


def _running(state_dir: Path) -> bool:
    """Whether any process recorded for the cluster in `state_dir` is still alive."""
    return any(r.alive() for r in procs.recorded(state_dir / "pids"))


def attach(state_dir: Path) -> DevCluster:
    """Handles to a cluster started earlier by `up()` (possibly another process); raises if it is not running."""
    state_dir = state_dir.resolve()
    info = json.loads((state_dir / "cluster.json").read_text())
    pid_dir = state_dir / "pids"
    dead = [r.name for r in procs.recorded(pid_dir) if not r.alive()]
    if dead or not procs.recorded(pid_dir):
        raise RuntimeError(f"cluster in {state_dir} is not running (dead: {dead}); run `make cluster-up`")
    return DevCluster(
        state_dir=state_dir,
        kubeconfig=Path(info["kubeconfig"]),
        gateway_ip=str(info["gateway_ip"]),
        net_index=int(info["net_index"]),
        binaries=locate(),
    )


def down(state_dir: Path, *, log: Callable[[str], None] = print) -> None:
    """Stop every process of the cluster and remove its netns, bridge, veths and mountpoints."""
    state_dir = state_dir.resolve()
    info: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((state_dir / "cluster.json").read_text())
    # The node first: its SIGTERM handler stops pods gracefully and tears down networking.
    procs.stop_recorded(state_dir / "pids", order=STOP_ORDER, grace=15)
    # Then whatever a crashed node could have left behind.
    procs.stop_recorded(state_dir / "node" / "pids", grace=2)
    if "net_index" in info and info.get("with_node", True):
        removed = network.sweep(network.NetConfig(int(info["net_index"])))
        if removed:
            log(f"removed leftover network objects: {', '.join(removed)}")
        network.release_index(int(info["net_index"]), state_dir)
    registry = state_dir / "node" / "mountpoints.json"
    if registry.exists():
        Mountpoints(registry).sweep()
    for p in (state_dir / "cluster.json",):
        p.unlink(missing_ok=True)
    log(f"cluster in {state_dir} is down")
