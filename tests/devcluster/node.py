"""The process node: a kubelet + minimal scheduler that runs pods as local processes.

Run as its own background process (`python -m tests.devcluster.node --kubeconfig K --config C`). It manages
every Node object labelled `devcluster.finetune.dev/process-node`, keeps their status and Lease fresh, binds
pending pods the way kube-scheduler's filter plugins would, runs bound pods (see `runtime.PodRuntime`) and
reports their status truthfully. Control from tests goes through the API server (annotations on Nodes and
Pods), so any process, even a reused `make cluster-up` cluster, can drive it.

Threads: one informer per watched resource, one scheduler loop, one kubelet loop (the only thread touching
pod runtimes), one heartbeat loop, the kubelet log server, and a small probe pool.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from devcluster import network as netcfg
from devcluster.kube import Informer, Obj, call_json
from tests.devcluster import network, scheduling
from tests.devcluster.runtime import Mountpoints, NodeContext, PodRuntime, main_exited, now_rfc3339

log = logging.getLogger("devcluster.node")

LABEL_MANAGED = "devcluster.finetune.dev/process-node"
ANN_SIMULATE = "devcluster.finetune.dev/simulate"
ANN_LOST = "devcluster.finetune.dev/lost"
DEFAULT_SCHEDULER = "default-scheduler"
KUBELET_VERSION = "v1.34.4"


@dataclass(frozen=True)
class NodeSpec:
    """What one simulated machine offers."""

    name: str
    cpu: str = "8"
    memory: str = "16Gi"
    pods: int = 110
    gpus: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Mapping[str, str], ...] = ()
    simulate: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NodeSpec:
        """Parse the JSON form used in the node config file."""
        return cls(
            name=str(d["name"]),
            cpu=str(d.get("cpu", "8")),
            memory=str(d.get("memory", "16Gi")),
            pods=int(d.get("pods", 110)),
            gpus=int(d.get("gpus", 0)),
            labels=dict(d.get("labels") or {}),
            taints=tuple(d.get("taints") or ()),
            simulate=bool(d.get("simulate", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "name": self.name,
            "cpu": self.cpu,
            "memory": self.memory,
            "pods": self.pods,
            "gpus": self.gpus,
            "labels": dict(self.labels),
            "taints": [dict(t) for t in self.taints],
            "simulate": self.simulate,
        }


def node_conditions(*, ready: bool) -> list[dict[str, Any]]:
    """Node conditions as a healthy (or stopped) kubelet reports them."""
    now = now_rfc3339()
    conds = [
        ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
        ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
        ("Ready", "True", "KubeletReady", "kubelet is posting ready status")
        if ready
        else ("Ready", "Unknown", "NodeStatusUnknown", "Kubelet stopped posting node status."),
    ]
    return [
        {"type": t, "status": s, "reason": r, "message": m, "lastHeartbeatTime": now, "lastTransitionTime": now}
        for t, s, r, m in conds
    ]


def node_manifest(spec: NodeSpec, *, host_ip: str, kubelet_port: int) -> dict[str, Any]:
    """The Node object a kubelet would register for `spec` (status included: Node create keeps it)."""
    capacity = {"cpu": spec.cpu, "memory": spec.memory, "pods": str(spec.pods), "ephemeral-storage": "100Gi"}
    if spec.gpus:
        capacity["nvidia.com/gpu"] = str(spec.gpus)
    labels = {
        "kubernetes.io/hostname": spec.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        LABEL_MANAGED: "true",
        **spec.labels,
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": spec.name,
            "labels": labels,
            "annotations": {ANN_SIMULATE: "true" if spec.simulate else "false"},
        },
        "spec": {"taints": [dict(t) for t in spec.taints]} if spec.taints else {},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": node_conditions(ready=True),
            "addresses": [{"type": "InternalIP", "address": host_ip}, {"type": "Hostname", "address": spec.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
            "nodeInfo": {
                "machineID": spec.name,
                "systemUUID": spec.name,
                "bootID": spec.name,
                "kernelVersion": os.uname().release,
                "osImage": "finetune-operator devcluster process node",
                "containerRuntimeVersion": "devcluster://process" + ("-simulated" if spec.simulate else ""),
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        },
    }


class IpPool:
    """Pod IPs: real pods from x.x.1.0 up, simulated pods from x.x.128.0 up; recently freed IPs reused last."""

    def __init__(self, net: network.NetConfig) -> None:
        self.base = int(net.cidr.network_address)
        self.in_use: set[int] = set()
        self.next = {False: 256, True: 32768}
        self.lock = threading.Lock()

    def alloc(self, simulated: bool) -> str:
        """A free IP string."""
        lo, hi = (32768, 65534) if simulated else (256, 32767)
        with self.lock:
            for _ in range(hi - lo):
                off = self.next[simulated]
                self.next[simulated] = off + 1 if off + 1 < hi else lo
                if off % 256 in (0, 255) or off in self.in_use:
                    continue
                self.in_use.add(off)
                return str(ipaddress.IPv4Address(self.base + off))
        raise RuntimeError("pod IP pool exhausted")

    def release(self, addr: str) -> None:
        """Return an IP."""
        with self.lock:
            self.in_use.discard(int(ipaddress.IPv4Address(addr)) - self.base)


class ProcessNode:
    """All node-side behaviour; `run()` blocks until SIGTERM."""

    def __init__(self, *, api: k8s.ApiClient, config: Mapping[str, Any]) -> None:
        self.api = api
        self.core = k8s.CoreV1Api(api)
        self.coord = k8s.CoordinationV1Api(api)
        self.cfg = config
        self.net = network.NetConfig(int(config["net_index"]))
        self.state_dir = Path(config["state_dir"])
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.stop = threading.Event()
        self.kubelet_wake = threading.Event()
        self.sched_wake = threading.Event()
        self.net_dirty = threading.Event()
        self.ips = IpPool(self.net)
        self.runtimes: dict[str, PodRuntime] = {}
        self.runtimes_lock = threading.Lock()
        self.lost: set[str] = set()
        self.assumed: dict[str, tuple[str, float]] = {}
        self.unsched_sent: dict[str, str] = {}
        self.kubelet_port = int(config["kubelet_port"])
        self.ctx = NodeContext(
            core=self.core,
            net=self.net,
            state_dir=self.state_dir,
            mountpoints=Mountpoints(self.state_dir / "mountpoints.json"),
            probes=ThreadPoolExecutor(max_workers=4, thread_name_prefix="probe"),
            emit_event=self.emit_event,
            alloc_ip=self.ips.alloc,
            release_ip=self.ips.release,
            venv_bin=str(Path(sys.executable).parent),
            render_hosts=self._render_hosts,
            api_port=443 if config.get("apiserver_port") else None,
            backoff_base=float(config.get("backoff_base", 10)),
            backoff_max=float(config.get("backoff_max", 300)),
        )
        self.ctx.pid_dir.mkdir(parents=True, exist_ok=True)
        disc = k8s.DiscoveryV1Api(api)
        self.pods = Informer(
            name="pods", list_fn=self.core.list_pod_for_all_namespaces, on_change=self._on_pod, stop=self.stop
        )
        self.services = Informer(
            name="services", list_fn=self.core.list_service_for_all_namespaces, on_change=self._on_net, stop=self.stop
        )
        self.slices = Informer(
            name="endpointslices",
            list_fn=disc.list_endpoint_slice_for_all_namespaces,
            on_change=self._on_net,
            stop=self.stop,
        )
        self.nodes = Informer(name="nodes", list_fn=self.core.list_node, on_change=self._on_node, stop=self.stop)

    # -- events from informers -----------------------------------------------------------------------------

    def _on_pod(self, _typ: str, _obj: Obj) -> None:
        self.kubelet_wake.set()
        self.sched_wake.set()
        self.net_dirty.set()

    def _on_net(self, _typ: str, _obj: Obj) -> None:
        self.net_dirty.set()
        self.kubelet_wake.set()

    def _on_node(self, typ: str, obj: Obj) -> None:
        if typ == "DELETED":  # a re-registered node of the same name starts healthy
            name = str((obj.get("metadata") or {}).get("name"))
            self.lost.discard(name)
            (self.state_dir / "lost" / name).unlink(missing_ok=True)
        self.sched_wake.set()
        self.kubelet_wake.set()

    def managed_nodes(self) -> dict[str, Obj]:
        """Node objects this process acts as the kubelet for."""
        return {
            str(n["metadata"]["name"]): n
            for n in self.nodes.snapshot()
            if ((n.get("metadata") or {}).get("labels") or {}).get(LABEL_MANAGED) == "true"
        }

    @staticmethod
    def is_simulated(node: Obj) -> bool:
        """Simulated nodes report pods Running without starting processes."""
        return ((node.get("metadata") or {}).get("annotations") or {}).get(ANN_SIMULATE) == "true"

    # -- events --------------------------------------------------------------------------------------------

    def emit_event(self, obj: Obj, *, reason: str, message: str, type_: str, component: str = "kubelet") -> None:
        """Record a core/v1 Event about a pod (best effort: events never break the node)."""
        meta = obj.get("metadata") or {}
        now = now_rfc3339()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{secrets.token_hex(8)}", "namespace": meta.get("namespace")},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": component, "host": (obj.get("spec") or {}).get("nodeName") or ""},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "reportingComponent": component,
        }
        try:
            call_json(self.core.create_namespaced_event, meta.get("namespace"), body)
        except Exception as e:
            log.debug("event %s/%s: %r", meta.get("name"), reason, e)

    # -- registration and heartbeats -----------------------------------------------------------------------

    def register(self, spec: NodeSpec) -> None:
        """Create (or refresh) the Node object for `spec`."""
        body = node_manifest(spec, host_ip=self.net.gateway, kubelet_port=self.kubelet_port)
        try:
            call_json(self.core.create_node, body)
        except k8s.ApiException as e:
            if e.status != 409:
                raise
            call_json(self.core.patch_node, spec.name, {"metadata": body["metadata"], "spec": body["spec"]})
            call_json(self.core.patch_node_status, spec.name, {"status": body["status"]})

    def heartbeat_loop(self) -> None:
        """Keep each managed, non-lost node's Ready condition and Lease fresh (the node lifecycle contract)."""
        while not self.stop.is_set():
            for name, node in self.managed_nodes().items():
                if name in self.lost or ((node.get("metadata") or {}).get("annotations") or {}).get(ANN_LOST) == "true":
                    continue
                try:
                    self._beat(name)
                except Exception as e:
                    log.warning("heartbeat %s: %r", name, e)
            self.stop.wait(5)

    def _beat(self, name: str) -> None:
        call_json(
            self.core.patch_node_status,
            name,
            {
                "status": {
                    "conditions": node_conditions(ready=True),
                    "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
                }
            },
        )
        now = dt_micro()
        lease: dict[str, Any] = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now},
        }
        try:
            call_json(self.coord.patch_namespaced_lease, name, "kube-node-lease", {"spec": lease["spec"]})
        except k8s.ApiException as e:
            if e.status != 404:
                raise
            node = self.nodes.get(name)
            if node:
                lease["metadata"]["ownerReferences"] = [
                    {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node["metadata"]["uid"]}
                ]
            call_json(self.coord.create_namespaced_lease, "kube-node-lease", lease)

    # -- scheduler -----------------------------------------------------------------------------------------

    def scheduler_loop(self) -> None:
        """Bind pending pods that fit; explain the ones that do not (PodScheduled=False, Unschedulable)."""
        while not self.stop.is_set():
            self.sched_wake.wait(2.0)
            self.sched_wake.clear()
            try:
                self._schedule_once()
            except Exception:
                log.exception("scheduler pass failed")

    def _schedule_once(self) -> None:
        nodes = sorted(self.nodes.snapshot(), key=lambda n: n["metadata"]["name"])
        pods = self.pods.snapshot()
        now = time.monotonic()
        self.assumed = {u: v for u, v in self.assumed.items() if v[1] > now}
        used: dict[str, dict[str, Decimal]] = {}
        counts: dict[str, int] = {}

        def charge(node_name: str, pod: Obj) -> None:
            _charge(used, counts, node_name, pod)

        pending = []
        for p in pods:
            spec = p.get("spec") or {}
            uid = p["metadata"]["uid"]
            if scheduling.occupies_node(p):
                charge(spec["nodeName"], p)
            elif uid in self.assumed and not spec.get("nodeName"):
                charge(self.assumed[uid][0], p)
            elif (
                not spec.get("nodeName")
                and (spec.get("schedulerName") or DEFAULT_SCHEDULER) == DEFAULT_SCHEDULER
                and not p["metadata"].get("deletionTimestamp")
                and (p.get("status") or {}).get("phase") not in scheduling.TERMINAL
            ):
                pending.append(p)
        pending.sort(
            key=lambda p: (-int((p.get("spec") or {}).get("priority") or 0), p["metadata"].get("creationTimestamp", ""))
        )
        for pod in pending:
            try:
                self._schedule_pod(pod, nodes, used=used, counts=counts, now=now)
            except Exception:  # one odd pod must not stop the others from being scheduled
                log.exception("scheduling %s failed", pod["metadata"].get("name"))

    def _schedule_pod(
        self,
        pod: Obj,
        nodes: list[Obj],
        *,
        used: dict[str, dict[str, Decimal]],
        counts: dict[str, int],
        now: float,
    ) -> None:
        meta = pod["metadata"]
        target, message = scheduling.choose_node(pod, nodes, used=used, counts=counts)
        if target:
            try:
                call_json(
                    self.core.create_namespaced_pod_binding,
                    meta["name"],
                    meta["namespace"],
                    {
                        "apiVersion": "v1",
                        "kind": "Binding",
                        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
                        "target": {"apiVersion": "v1", "kind": "Node", "name": target},
                    },
                )
            except k8s.ApiException as e:
                if e.status not in (404, 409):
                    log.warning("bind %s/%s: %s", meta["namespace"], meta["name"], e.reason)
                return
            self.assumed[meta["uid"]] = (target, now + 30)
            _charge(used, counts, target, pod)
            self.unsched_sent.pop(meta["uid"], None)
            self.emit_event(
                {**pod, "spec": {**pod.get("spec", {}), "nodeName": target}},
                reason="Scheduled",
                message=f"Successfully assigned {meta['namespace']}/{meta['name']} to {target}",
                type_="Normal",
                component=DEFAULT_SCHEDULER,
            )
        else:
            self._mark_unschedulable(pod, message)

    def _mark_unschedulable(self, pod: Obj, message: str) -> None:
        meta = pod["metadata"]
        current = next(
            (c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == "PodScheduled"), None
        )
        if current and current.get("message") == message and current.get("status") == "False":
            return
        if self.unsched_sent.get(meta["uid"]) == message:
            return
        body = {
            "metadata": {"uid": meta["uid"]},
            "status": {
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": message,
                        "lastProbeTime": None,
                        "lastTransitionTime": now_rfc3339(),
                    }
                ]
            },
        }
        try:
            call_json(self.core.patch_namespaced_pod_status, meta["name"], meta["namespace"], body)
        except k8s.ApiException as e:
            log.debug("unschedulable %s: %s", meta["name"], e.reason)
            return
        self.unsched_sent[meta["uid"]] = message
        self.emit_event(pod, reason="FailedScheduling", message=message, type_="Warning", component=DEFAULT_SCHEDULER)

    # -- kubelet -------------------------------------------------------------------------------------------

    def kubelet_loop(self) -> None:
        """Drive every pod bound to a managed node; the only thread that touches PodRuntime objects."""
        while not self.stop.is_set():
            self.kubelet_wake.wait(0.5)
            self.kubelet_wake.clear()
            try:
                self._kubelet_once()
            except Exception:
                log.exception("kubelet pass failed")

    def _handle_lost(self, managed: Mapping[str, Obj]) -> None:
        for name, node in managed.items():
            if ((node.get("metadata") or {}).get("annotations") or {}).get(
                ANN_LOST
            ) == "true" and name not in self.lost:
                log.warning("node %s lost: killing its pods' processes and stopping heartbeats", name)
                self.lost.add(name)
                marker = self.state_dir / "lost"
                marker.mkdir(exist_ok=True)
                with self.runtimes_lock:
                    for uid, rt in list(self.runtimes.items()):
                        if (rt.pod.get("spec") or {}).get("nodeName") == name:
                            rt.kill_now()
                            del self.runtimes[uid]
                (marker / name).write_text(now_rfc3339())

    def _kubelet_once(self) -> None:
        managed = self.managed_nodes()
        self._handle_lost(managed)
        seen: set[str] = set()
        for pod in self.pods.snapshot():
            meta = pod.get("metadata") or {}
            node_name = (pod.get("spec") or {}).get("nodeName")
            if node_name not in managed or node_name in self.lost:
                continue
            uid = str(meta.get("uid"))
            seen.add(uid)
            try:
                rt = self.runtimes.get(uid)
                if rt is None:
                    if (pod.get("status") or {}).get("phase") in scheduling.TERMINAL:
                        if meta.get("deletionTimestamp"):
                            self._finalize_delete(pod)
                        continue  # finished before this node process started: never re-run it
                    rt = PodRuntime(self.ctx, pod, simulated=self.is_simulated(managed[str(node_name)]))
                    with self.runtimes_lock:
                        self.runtimes[uid] = rt
                rt.sync(pod)
                self._report(rt)
            except Exception:  # one odd pod must never stop the node
                log.exception("pod %s/%s sync failed", meta.get("namespace"), meta.get("name"))
        with self.runtimes_lock:
            for uid in [u for u in self.runtimes if u not in seen]:
                rt = self.runtimes.pop(uid)
                rt.kill_now()  # deleted with grace 0 (force) or node lost: nothing to report any more
        if self.net_dirty.is_set():
            self.net_dirty.clear()
            self._write_hosts()

    def _report(self, rt: PodRuntime) -> None:
        if rt.finalized:
            return
        status = rt.status(host_ip=self.net.gateway)
        blob = json.dumps(status, sort_keys=True)
        meta = rt.pod.get("metadata") or {}
        if blob != getattr(rt, "last_sent", None):
            try:
                call_json(
                    self.core.patch_namespaced_pod_status,
                    rt.name,
                    rt.ns,
                    {"metadata": {"uid": rt.uid}, "status": status},
                )
                rt.last_sent = blob  # type: ignore[attr-defined]
            except k8s.ApiException as e:
                if e.status not in (404, 409, 422):
                    log.warning("status %s/%s: %s %s", rt.ns, rt.name, e.status, e.reason)
        if rt.deletion_done and meta.get("deletionTimestamp"):
            self._finalize_delete(rt.pod)
            rt.finalized = True

    def _finalize_delete(self, pod: Obj) -> None:
        meta = pod["metadata"]
        try:
            self.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                body=k8s.V1DeleteOptions(grace_period_seconds=0, preconditions=k8s.V1Preconditions(uid=meta["uid"])),
                _preload_content=False,
            )
        except k8s.ApiException as e:
            if e.status not in (404, 409):
                log.warning("finalize delete %s: %s", meta["name"], e.reason)

    def _render_hosts(self, pod: Obj, pod_ip: str) -> str:
        return network.hosts_file(
            pod=pod,
            pod_ip=pod_ip,
            services=self.services.snapshot(),
            pods=self.pods.snapshot(),
            slices=self.slices.snapshot(),
            api_ip=self.net.gateway if self.ctx.api_port else None,
        )

    def _write_hosts(self) -> None:
        pods = self.pods.snapshot()
        services = self.services.snapshot()
        slices = self.slices.snapshot()
        for rt in list(self.runtimes.values()):
            if rt.simulated or not rt.netns or not rt.pod_ip or rt.torn_down:
                continue
            content = network.hosts_file(
                pod=rt.pod,
                pod_ip=rt.pod_ip,
                services=services,
                pods=pods,
                slices=slices,
                api_ip=self.net.gateway if self.ctx.api_port else None,
            )
            with contextlib.suppress(OSError):
                network.write_in_place(network.NETNS_ETC / rt.netns / "hosts", content)

    # -- kubelet log endpoint (so `kubectl logs` works through the API server) -----------------------------

    def log_file(self, ns: str, name: str, container: str | None, *, previous: bool = False) -> Path | None:
        """The log file the kubelet endpoint and pod_logs() serve."""
        return find_log(self.state_dir, ns, name, container, previous=previous)

    def container_running(self, ns: str, name: str, container: str) -> bool:
        """Whether that container currently has a live process (drives `kubectl logs -f`)."""
        for rt in list(self.runtimes.values()):
            if rt.ns == ns and rt.name == name and not rt.torn_down:
                return any(r.name == container and r.state == "running" for r in rt.all_runs())
        return False

    def serve_logs(self) -> ThreadingHTTPServer:
        """HTTPS server for /containerLogs/<ns>/<pod>/<container>, client certs required (the API server's)."""
        node = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug(format, *args)

            def do_GET(self) -> None:
                url = urllib.parse.urlparse(self.path)
                parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
                q = urllib.parse.parse_qs(url.query)
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404, "only /containerLogs/<ns>/<pod>/<container> is served by the devcluster node")
                    return
                path = node.log_file(parts[1], parts[2], parts[3], previous=q.get("previous", ["false"])[0] == "true")
                if path is None:
                    self.send_error(404, f"no logs for container {parts[3]} of pod {parts[1]}/{parts[2]}")
                    return
                data = path.read_bytes()
                if "tailLines" in q:
                    n = int(q["tailLines"][0])
                    data = b"".join(data.splitlines(keepends=True)[-n:]) if n > 0 else b""
                if "limitBytes" in q:
                    data = data[: int(q["limitBytes"][0])]
                follow = q.get("follow", ["false"])[0] == "true"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                if not follow:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                if follow:  # stream until the container stops (HTTP/1.0: the body ends when we close)
                    offset = path.stat().st_size
                    while not node.stop.is_set() and node.container_running(parts[1], parts[2], parts[3]):
                        offset = self._send_new(path, offset)
                        time.sleep(0.3)
                    self._send_new(path, offset)

            def _send_new(self, path: Path, offset: int) -> int:
                with path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                if chunk:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                return offset + len(chunk)

        pki = Path(self.cfg["pki_dir"])
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(pki / "kubelet.crt"), str(pki / "kubelet.key"))
        ctx.load_verify_locations(str(pki / "ca.crt"))
        ctx.verify_mode = ssl.CERT_REQUIRED
        server = ThreadingHTTPServer((self.net.gateway, self.kubelet_port), Handler)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="kubelet-logs", daemon=True).start()
        return server

    # -- API server access for pods ------------------------------------------------------------------------

    def serve_api_forwarder(self) -> socket.socket | None:
        """Forward <gateway>:443 to the API server on 127.0.0.1, so pods can use in-cluster config.

        The API server only listens on loopback; its serving certificate also names the gateway IP and the
        kubernetes.default.svc names, so TLS verification with the service-account ca.crt succeeds.
        """
        upstream = self.cfg.get("apiserver_port")
        if not upstream:
            return None
        listener = socket.create_server((self.net.gateway, 443), reuse_port=False)
        listener.settimeout(1.0)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                    s.close()

        def accept_loop() -> None:
            while not self.stop.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                try:
                    server = socket.create_connection(("127.0.0.1", int(upstream)), timeout=5)
                    server.settimeout(None)
                    client.settimeout(None)
                except OSError:
                    client.close()
                    continue
                threading.Thread(target=pump, args=(client, server), daemon=True).start()
                threading.Thread(target=pump, args=(server, client), daemon=True).start()

        threading.Thread(target=accept_loop, name="api-forwarder", daemon=True).start()
        return listener

    # -- lifecycle -----------------------------------------------------------------------------------------

    def run(self) -> None:
        """Set up networking, register nodes, run all loops until SIGTERM/SIGINT, then clean up."""
        netcfg.ensure_bridge(self.net)
        server = self.serve_logs()
        forwarder = self.serve_api_forwarder()
        for spec in self.cfg.get("nodes") or []:
            self.register(NodeSpec.from_dict(spec))
        for inf in (self.nodes, self.pods, self.services, self.slices):
            inf.start()
        for inf in (self.nodes, self.pods, self.services, self.slices):
            inf.synced.wait(30)
        threads = [
            threading.Thread(target=self.scheduler_loop, name="scheduler", daemon=True),
            threading.Thread(target=self.kubelet_loop, name="kubelet", daemon=True),
            threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True),
        ]
        for t in threads:
            t.start()
        (self.state_dir / "ready").write_text(str(os.getpid()))
        log.info(
            "process node up: nodes=%s bridge=%s gateway=%s",
            list(self.managed_nodes()),
            self.net.bridge,
            self.net.gateway,
        )
        self.stop.wait()
        log.info("shutting down: stopping pods and removing network namespaces")
        for t in threads:
            t.join(timeout=10)
        server.shutdown()
        if forwarder is not None:
            forwarder.close()
        with self.runtimes_lock:
            for rt in self.runtimes.values():
                rt.signal_all(signal.SIGTERM)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and any(
                r.proc is not None and not main_exited(r.proc) for rt in self.runtimes.values() for r in rt.all_runs()
            ):
                time.sleep(0.1)
            for rt in self.runtimes.values():
                rt.kill_now()
        self.ctx.mountpoints.sweep()
        netcfg.sweep(self.net)
        self.ctx.probes.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "ready").unlink()


def _charge(used: dict[str, dict[str, Decimal]], counts: dict[str, int], node_name: str, pod: Obj) -> None:
    """Account a pod's requests against a node (scheduler bookkeeping within one pass)."""
    acc = used.setdefault(node_name, {})
    for r, q in scheduling.pod_requests(pod).items():
        acc[r] = acc.get(r, Decimal(0)) + q
    counts[node_name] = counts.get(node_name, 0) + 1


def find_log(state_dir: Path, ns: str, name: str, container: str | None, *, previous: bool = False) -> Path | None:
    """Latest log of a pod's container (the most recent pod UID wins when a name was reused)."""
    base = state_dir / "pods" / ns / name
    if not base.is_dir():
        return None
    uids = sorted((d for d in base.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    for uid_dir in uids:
        cdirs = [d for d in uid_dir.iterdir() if d.is_dir() and d.name not in ("volumes", "termination", "root")]
        if container:
            cdirs = [d for d in cdirs if d.name == container]
        if not cdirs:
            continue
        logs = sorted(cdirs[0].glob("*.log"), key=lambda p: int(p.stem))
        idx = -2 if previous else -1
        if len(logs) >= abs(idx):
            return logs[idx]
    return None


def dt_micro() -> str:
    """MicroTime format required by Lease.spec.renewTime."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1e6) % 1000000:06d}Z"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the node process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--config", required=True, help="JSON node config written by tests.devcluster")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    config = json.loads(Path(args.config).read_text())
    conf = k8s.Configuration()
    k8s_config.load_kube_config(config_file=args.kubeconfig, client_configuration=conf)  # type: ignore[no-untyped-call]
    conf.connection_pool_maxsize = 16  # four long-lived watches plus the loops
    api = k8s.ApiClient(conf)
    node = ProcessNode(api=api, config=config)

    def on_signal(signum: int, _frame: object) -> None:
        node.stop.set()

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` dumps every thread's stack
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
