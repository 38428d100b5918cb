"""Warm start time of the dev cluster: kube-apiserver /readyz, controller manager, process node, first pod.

Prints figures only (no assertions: timings depend on the machine and its load). Binaries must be built
(`make binaries`); each run uses a fresh state directory, so etcd starts empty as in the test session.

    .venv/bin/python bench/cluster_start.py [--runs N]
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

from tests.devcluster.binaries import locate
from tests.devcluster.cluster import down, up
from tests.devcluster.kube import call_json
from tests.devcluster.testing import pod_manifest, wait_phase


def one_run(state: Path) -> dict[str, float]:
    """Start a cluster, run one pod to completion, stop; return the measured durations in seconds."""
    t0 = time.monotonic()
    cluster = up(state, log=lambda _m: None, die_with_caller=True)
    figures = cluster.timings()
    try:
        with cluster.api() as api:
            t1 = time.monotonic()
            call_json(k8s.CoreV1Api(api).create_namespaced_pod, "default", pod_manifest("bench", ["true"]))
            wait_phase(api, "default", "bench", ("Succeeded",), timeout=60)
            figures["first_pod_succeeded"] = time.monotonic() - t1
    finally:
        t2 = time.monotonic()
        down(state, log=lambda _m: None)
        figures["down"] = time.monotonic() - t2
    figures["wall"] = time.monotonic() - t0
    return figures


def main() -> int:
    """Run the benchmark and print a small table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("skipped: the process node needs root")
        return 0
    if locate().missing():
        print("binaries missing: run `make binaries` first")
        return 1
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="ft-bench-") as d:
            runs.append(one_run(Path(d) / "cluster"))
        print(f"run {i + 1}: " + ", ".join(f"{k}={v:.1f}s" for k, v in runs[-1].items()))
    load = os.getloadavg()[0]
    print(f"\nwarm start over {len(runs)} run(s) on {os.cpu_count()} CPUs (1-min load average {load:.1f}); median:")
    labels = {
        "apiserver_readyz": "kube-apiserver /readyz (target < 20 s)",
        "controller_manager_ready": "controller manager working",
        "node_ready": "process node: nodes Ready",
        "total": "cluster up (total)",
        "first_pod_succeeded": "first pod Succeeded",
        "down": "down",
    }
    for key, label in labels.items():
        values = [r[key] for r in runs if key in r]
        if values:
            print(f"  {label:<40} {statistics.median(values):6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
