"""`up`, `attach` and `down`: starting a dev cluster in the background, finding it again, and removing every trace.

A cluster is the control plane, optionally kube-scheduler, N real nodes (devcluster.realnode) with CoreDNS
on them, and on demand a kwok controller. Several clusters run on one machine at once: each claims a network
index (devcluster.network) from which its bridge, addresses and cgroup root derive.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from devcluster import cgroups, coredns, hostsysctl, images, network, procs, realnode
from devcluster.binaries import ensure_built, locate
from devcluster.cluster import NODE_IMAGES, DevCluster, real_node_names
from devcluster.controlplane import STOP_ORDER, ControlPlane, api_client, tail_file
from devcluster.kube import call_json
from devcluster.nodeconfig import NodePlan

Log = Callable[[str], None]
STALE = ("etcd", "logs", "pids", "node", "nodes", "pki", "sa-kubeconfigs")


def _silent(_msg: str) -> None:
    pass


def running(state_dir: Path) -> bool:
    """Whether any process recorded for the cluster in `state_dir` is still alive."""
    return any(r.alive() for r in procs.recorded(state_dir / "pids"))


def has_running_real_nodes(state_dir: Path) -> bool:
    """Whether `state_dir` holds a running cluster with real nodes."""
    try:
        info = json.loads((state_dir / "cluster.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(info.get("real_nodes")) and running(state_dir)


def _write_info(state_dir: Path, info: dict[str, Any]) -> None:
    (state_dir / "cluster.json").write_text(json.dumps(info, indent=2))


def _prepare(state_dir: Path, *, log: Log) -> None:
    if os.geteuid() != 0:
        raise PermissionError("the dev cluster needs root (namespaces, bridges, cgroups, mounts); run as root")
    if (state_dir / "cluster.json").exists() or (state_dir / "pids").is_dir():
        down(state_dir, log=log)  # never orphan processes of an earlier cluster in this state dir
    # Never resurrect an old etcd (stale Nodes would look Ready) or mix old logs and pidfiles in.
    for stale in STALE:
        shutil.rmtree(state_dir / stale, ignore_errors=True)
    state_dir.mkdir(parents=True, exist_ok=True)


def _sweep_stale(net: network.NetConfig, *, log: Log) -> None:
    """Remove what a dead cluster that held this network index left (e.g. its pytest was SIGKILLed).

    The index is ours now, so its bridge, veths and cgroup subtree cannot belong to anything running.
    """
    removed = network.sweep(net)
    left = cgroups.remove(net.cgroup_root)
    if removed:
        log(f"removed network objects a dead cluster left: {', '.join(removed)}")
    if left:
        raise RuntimeError(f"cgroups of a dead cluster still hold tasks: {cgroups.busy(net.cgroup_root)}")


def up(
    state_dir: Path,
    *,
    nodes: int = 1,
    kwok: bool = False,
    scheduler: bool | None = None,
    log: Log = print,
    die_with_caller: bool = False,
) -> DevCluster:
    """Start a cluster in the background; return once its nodes are Ready and cluster DNS answers.

    `nodes` real nodes (0: control plane only: API-only tests, kwok nodes); `kwok` starts the kwok controller
    up front (otherwise it starts with the first `add_kwok_node`); kube-scheduler runs whenever real or kwok
    nodes may need it unless `scheduler=False`. With `die_with_caller` (the pytest session, benchmarks)
    every component is SIGTERMed by the kernel when the calling process dies, even by SIGKILL; a real node's
    init then takes its whole node down. Call it from the main thread. `make cluster-up` leaves it off.
    """
    state_dir = state_dir.resolve()
    _prepare(state_dir, log=log)
    with_scheduler = scheduler if scheduler is not None else (nodes > 0 or kwok)
    binaries = ensure_built(node=nodes > 0, scheduler=with_scheduler, kwok=kwok)
    net = network.NetConfig(network.claim_index(state_dir, is_alive=running))
    _sweep_stale(net, log=log)
    info: dict[str, Any] = {
        "net_index": net.index,
        "gateway_ip": net.gateway,
        "real_nodes": real_node_names(nodes),
        "owner_pid": os.getpid(),
        "die_with_caller": die_with_caller,
    }
    _write_info(state_dir, info)
    t0 = time.monotonic()
    try:
        if nodes:
            network.ensure_bridge(net)  # before the API server binds the gateway address
        cp = ControlPlane(
            state_dir,
            binaries=binaries,
            extra_ips=(net.gateway,),
            bind_address=net.gateway if nodes else "127.0.0.1",
            log=log,
            die_with_caller=die_with_caller,
        )
        ep = cp.start()
        if with_scheduler:
            cp.start_scheduler()
        info |= {"kubeconfig": str(cp.kubeconfig), "apiserver_port": ep.apiserver_port, "etcd_port": ep.etcd_port}
        info["timings"] = dict(cp.timings)
        _write_info(state_dir, info)
        cluster = DevCluster(
            state_dir=state_dir,
            kubeconfig=cp.kubeconfig,
            gateway_ip=net.gateway,
            net_index=net.index,
            binaries=binaries,
        )
        if nodes:
            started = _start_nodes(cluster, server=ep.server, log=log, die_with_caller=die_with_caller, t_up=t0)
            info["timings"] |= started
        if kwok:
            cluster.ensure_kwok()
    except BaseException:
        down(state_dir, log=_silent)
        raise
    info["timings"]["total"] = time.monotonic() - t0
    _write_info(state_dir, info)
    log(f"cluster up in {info['timings']['total']:.1f}s; state in {state_dir}")
    return cluster


def _start_nodes(cluster: DevCluster, *, server: str, log: Log, die_with_caller: bool, t_up: float) -> dict[str, float]:
    """Start every real node, route between them, wait for Ready, then deploy CoreDNS and wait for it."""
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    built = images.ensure_images(NODE_IMAGES, log=log)
    timings["node_images"] = time.monotonic() - t0
    cluster.apply([coredns.apiserver_to_kubelet_rbac()])
    access = realnode.ClusterAccess(
        server=server,
        pki_dir=cluster.state_dir / "pki",
        pid_dir=cluster.pid_dir,
        log_dir=cluster.log_dir,
        die_with_caller=die_with_caller,
    )
    hostsysctl.record()  # kubelet changes host-wide kernel settings; the last cluster's down restores them
    t1 = time.monotonic()
    started: list[tuple[NodePlan, int]] = []
    for plan in cluster.node_plans():
        pid = realnode.start(
            plan,
            access=access,
            bins=cluster.binaries.node,
            node_images=list(built.values()),
            sandbox_image=built["pause"].ref,
            log=log,
        )
        started.append((plan, pid))
    realnode.route_between(started)
    _wait_ready(cluster, [p.name for p, _ in started], timeout=120)
    timings["node_ready"] = time.monotonic() - t1
    timings["up_to_node_ready"] = time.monotonic() - t_up
    log(f"real nodes Ready after {timings['node_ready']:.1f}s: {[p.name for p, _ in started]}")
    t2 = time.monotonic()
    cluster.apply([*coredns.rbac(), *coredns.workload(built["coredns"].ref)])
    _wait_dns(cluster, timeout=120)
    timings["dns_ready"] = time.monotonic() - t2
    log(f"CoreDNS ready after {timings['dns_ready']:.1f}s")
    return timings


def _alive_or_raise(cluster: DevCluster) -> None:
    for rec in procs.recorded(cluster.pid_dir):
        if not rec.alive():
            log_path = cluster.log_dir / f"{rec.name}.log"
            raise RuntimeError(f"{rec.name} exited during start-up; last lines of {log_path}:\n{tail_file(log_path)}")


def _wait_ready(cluster: DevCluster, names: Sequence[str], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with api_client(cluster.kubeconfig) as api:
        core = k8s.CoreV1Api(api)
        while time.monotonic() < deadline:
            _alive_or_raise(cluster)
            ready = set()
            for n in call_json(core.list_node).get("items") or []:
                for c in (n.get("status") or {}).get("conditions") or []:
                    if c.get("type") == "Ready" and c.get("status") == "True":
                        ready.add(n["metadata"]["name"])
            if set(names) <= ready:
                return
            time.sleep(0.2)
    raise TimeoutError(f"nodes {list(names)} not Ready after {timeout:.0f}s; see {cluster.log_dir}")


def _wait_dns(cluster: DevCluster, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with api_client(cluster.kubeconfig) as api:
        apps = k8s.AppsV1Api(api)
        while time.monotonic() < deadline:
            _alive_or_raise(cluster)
            dep = call_json(apps.read_namespaced_deployment, "coredns", coredns.NAMESPACE)
            if int((dep.get("status") or {}).get("readyReplicas") or 0) >= 1:
                return
            time.sleep(0.2)
    raise TimeoutError(f"CoreDNS not ready after {timeout:.0f}s; see `kubectl -n kube-system describe pods`")


def attach(state_dir: Path) -> DevCluster:
    """Handles to a cluster started earlier by `up()` (possibly another process); raises if it is not running."""
    state_dir = state_dir.resolve()
    info = json.loads((state_dir / "cluster.json").read_text())
    pid_dir = state_dir / "pids"
    dead = [r.name for r in procs.recorded(pid_dir) if not r.alive()]
    if dead or not procs.recorded(pid_dir) or "kubeconfig" not in info:
        raise RuntimeError(f"cluster in {state_dir} is not running (dead: {dead}); run `make cluster-up`")
    return DevCluster(
        state_dir=state_dir,
        kubeconfig=Path(info["kubeconfig"]),
        gateway_ip=str(info["gateway_ip"]),
        net_index=int(info["net_index"]),
        binaries=locate(),
    )


def down(state_dir: Path, *, log: Log = print) -> None:
    """Stop every process of the cluster, then remove its network, cgroups and node state from the host."""
    state_dir = state_dir.resolve()
    info: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((state_dir / "cluster.json").read_text())
    names = [r.name for r in procs.recorded(state_dir / "pids")]
    # Real nodes first (kubelet, kube-proxy, containerd, then the init that takes the node's namespaces down),
    # then the rest.
    procs.stop_recorded(state_dir / "pids", order=[*realnode.stop_order(names), *STOP_ORDER], grace=15)
    if "net_index" in info:
        net = network.NetConfig(int(info["net_index"]))
        for k, name in enumerate(info.get("real_nodes") or []):
            left = realnode.cleanup(NodePlan(name=name, k=k, net=net, cluster_state=state_dir))
            if left:
                log(f"cgroups of node {name} still busy: {cgroups.busy(net.cgroup_root)}")
        cgroups.remove(net.cgroup_root)
        removed = network.sweep(net)
        if removed:
            log(f"removed network objects: {', '.join(removed)}")
        network.release_index(int(info["net_index"]), state_dir)
    restored = hostsysctl.restore_if_last(state_dir, has_real_nodes=has_running_real_nodes)
    if restored:
        log(f"restored host kernel settings kubelet had changed: {restored}")
    (state_dir / "cluster.json").unlink(missing_ok=True)
    log(f"cluster in {state_dir} is down")
