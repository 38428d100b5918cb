"""`python -m devcluster up --nodes 2` / `down` (what `make cluster-up NODES=2` / `make cluster-down` run), as
separate processes: two real nodes route pods to each other, and `down` leaves nothing on the machine."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes import client as k8s

import devcluster
from devcluster import hostsysctl, launcher, network, realnode, traces
from devcluster.binaries import REPO_ROOT
from devcluster.kube import call_json
from devcluster.nodeconfig import NODE_LABEL
from devcluster.testing import pod_manifest, wait_for, wait_phase

pytestmark = [pytest.mark.realnode, pytest.mark.slow]
CLI = [sys.executable, "-m", "devcluster"]

SERVE = "import http.server as h; h.test(h.SimpleHTTPRequestHandler, port=8080, bind='0.0.0.0')"
FETCH = "import urllib.request; print(urllib.request.urlopen('http://web/', timeout=10).status)"


def _pod(name: str, script: str, *, image: str, node: str) -> dict[str, object]:
    body = pod_manifest(name, ["python3", "-c", script], image=image, imagePullPolicy="Never")
    body["spec"]["nodeName"] = node
    return body


def _cross_node_service(cluster: devcluster.DevCluster, image: str) -> str:
    """A server on node-0 behind Service `web`; a client on node-1 fetches http://web/; returns its output."""
    server = _pod("web", SERVE, image=image, node="node-0")
    server["metadata"]["labels"] = {"app": "web"}  # type: ignore[index]
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}}
    svc["spec"] = {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}
    with cluster.api() as api:
        core = k8s.CoreV1Api(api)
        call_json(core.create_namespaced_pod, "default", server)
        call_json(core.create_namespaced_service, "default", svc)

        def ready_endpoint() -> object:
            try:
                return call_json(core.read_namespaced_endpoints, "web", "default").get("subsets")
            except k8s.ApiException as e:  # the endpoints controller has not created the object yet
                if e.status != 404:
                    raise
                return None

        wait_for(
            ready_endpoint,
            timeout=120,
            what="Service web has a ready endpoint",
        )
        call_json(core.create_namespaced_pod, "default", _pod("client", FETCH, image=image, node="node-1"))
        done = wait_phase(api, "default", "client", ("Succeeded", "Failed"), timeout=120)
    assert done["status"]["phase"] == "Succeeded", cluster.pod_logs("default", "client")
    return cluster.pod_logs("default", "client").strip()


def test_two_real_nodes_then_down_leaves_no_trace(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    state = tmp_path / "c"
    kernel_before = hostsysctl.read()
    up = subprocess.run(
        [*CLI, "up", "--nodes", "2", "--state-dir", str(state)],
        cwd=REPO_ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        cluster = devcluster.attach(state)
        net = cluster.net
        nodes = json.loads(cluster.kubectl("get", "nodes", "-l", f"{NODE_LABEL}=real", "-o", "json").stdout)["items"]
        assert sorted(n["metadata"]["name"] for n in nodes) == ["node-0", "node-1"]
        image = cluster.load_images(["base"])["base"].ref
        assert _cross_node_service(cluster, image) == "200"
        inits = {n: realnode.init_pid(cluster.pid_dir, n) for n in ("node-0", "node-1")}
        namespaces = [traces.namespaces_of(n, pid) for n, pid in inits.items() if pid is not None]
        # kube-proxy's rules live in each node's network namespace: they go with it.
        assert "KUBE-SERVICES" in cluster.in_node("node-1", "iptables-save").stdout
        running = traces.traces(state, net, nodes=namespaces)
        for kind in ("processes", "mounts", "network_namespaces", "links", "routes", "cgroups"):
            assert getattr(running, kind), f"the check for leftover {kind} sees nothing even while the cluster runs"
    finally:
        down = subprocess.run(
            [*CLI, "down", "--state-dir", str(state)],
            cwd=REPO_ROOT,
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert down.returncode == 0, down.stderr
    left = traces.traces(state, net, nodes=namespaces)
    if network.claimed_indexes().get(net.index, state) != state:  # another cluster took the freed index
        left = dataclasses.replace(left, links=[], routes=[])
    assert left == traces.Traces()
    # kubelet changed host-wide kernel settings; the last real-node cluster's down puts them back.
    others = [o for o in network.claimed_indexes().values() if launcher.has_running_real_nodes(o)]
    if not others:
        assert hostsysctl.read() == kernel_before
