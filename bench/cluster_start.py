"""Warm start time of the dev cluster: API server, controllers, scheduler, real node Ready, CoreDNS, first pod.

Prints figures only (no assertions: timings depend on the machine and its load). Binaries and images must be
built already (`make binaries`; the first `make cluster-up` builds the images) so this measures a warm start;
each run uses a fresh state directory, so etcd and containerd start empty as in a test session.

    .venv/bin/python bench/cluster_start.py [--runs N] [--nodes N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubernetes import client as k8s

import devcluster
from devcluster.binaries import locate
from devcluster.kube import call_json
from devcluster.nodeconfig import NODE_LABEL
from devcluster.testing import pod_manifest, wait_phase

LABELS = {
    "apiserver_readyz": "kube-apiserver /readyz",
    "controller_manager_ready": "controller manager working",
    "scheduler_ready": "kube-scheduler healthy",
    "node_images": "node images (pause, coredns) ensured",
    "node_ready": "real nodes Ready (from node start)",
    "up_to_node_ready": "up() start to real nodes Ready",
    "dns_ready": "CoreDNS ready (after nodes Ready)",
    "total": "cluster up (total)",
    "base_image_import": "base image imported into the node",
    "first_pod_succeeded": "first pod Succeeded after create",
    "down": "down",
}


def _first_pod(cluster: devcluster.DevCluster) -> dict[str, float]:
    t0 = time.monotonic()
    image = cluster.load_images(["base"])["base"].ref
    figures = {"base_image_import": time.monotonic() - t0}
    body = pod_manifest("bench", ["python3", "-c", "pass"], image=image, imagePullPolicy="Never")
    body["spec"]["nodeSelector"] = {NODE_LABEL: "real"}
    with cluster.api() as api:
        t1 = time.monotonic()
        call_json(k8s.CoreV1Api(api).create_namespaced_pod, "default", body)
        wait_phase(api, "default", "bench", ("Succeeded",), timeout=120)
        figures["first_pod_succeeded"] = time.monotonic() - t1
    return figures


def one_run(state: Path, *, nodes: int) -> dict[str, float]:
    """Start a cluster, run one pod to completion, stop; return the measured durations in seconds."""
    t0 = time.monotonic()
    cluster = devcluster.up(state, nodes=nodes, log=lambda _m: None, die_with_caller=True)
    figures = cluster.timings()
    try:
        figures |= _first_pod(cluster)
    finally:
        t2 = time.monotonic()
        devcluster.down(state, log=lambda _m: None)
        figures["down"] = time.monotonic() - t2
    figures["wall"] = time.monotonic() - t0
    return figures


def main() -> int:
    """Run the benchmark and print a small table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=1, help="real nodes (default 1)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("skipped: the dev cluster needs root")
        return 0
    if locate().missing():
        print("binaries missing: run `make binaries` first")
        return 1
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="ft-bench-") as d:
            runs.append(one_run(Path(d) / "cluster", nodes=args.nodes))
        print(f"run {i + 1}: " + ", ".join(f"{k}={v:.1f}s" for k, v in runs[-1].items()), flush=True)
    load = os.getloadavg()
    print(
        f"\nwarm start, {args.nodes} real node(s), over {len(runs)} run(s) on {os.cpu_count()} CPUs "
        f"(load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}); median:"
    )
    for key, label in LABELS.items():
        values = [r[key] for r in runs if key in r]
        if values:
            print(f"  {label:<42} {statistics.median(values):6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
