"""Operator at scale: N minimal FineTuneJobs applied at once against the real API server (one kwok node).

Prints, without assertions (figures depend on the machine): p50/p99 time from a job's creation to all its child
objects present (ConfigMap, Service, NetworkPolicy, head and worker pods), p50/p99 time to Running, API requests
per job by method (from the operator's own finetune_api_requests_total), and the operator's peak RSS. The operator
runs as a real `finetune operator` subprocess under the documented RBAC; kube-scheduler places the pods on a kwok
node (nothing runs in them), so the figures are the operator's and the control plane's alone.

    .venv/bin/python bench/operator_scale.py [--jobs 200] [--workers 1]
Set FT_CLUSTER_REUSE=1 to use the cluster of `make cluster-up` instead of starting one (control plane,
kube-scheduler and kwok, no real node).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil
import yaml
from kubernetes import client as k8s

from devcluster import DevCluster, attach, down, up
from devcluster.binaries import REPO_ROOT
from devcluster.controlplane import free_port
from devcluster.kube import call_json
from tests.e2e.operator_harness import SIM_LABEL, grant_documented_rbac, install_crd, job_manifest


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _running_after(job: dict[str, Any]) -> float:
    """Seconds from creation to the Running condition's transition (server-side clocks)."""
    conditions = {c["type"]: c for c in job["status"].get("conditions", [])}
    return _ts(conditions["Running"]["lastTransitionTime"]) - _ts(job["metadata"]["creationTimestamp"])


def _children_created(api: k8s.ApiClient, namespace: str) -> dict[tuple[str, str], float]:
    core, net = k8s.CoreV1Api(api), k8s.NetworkingV1Api(api)
    found: dict[tuple[str, str], float] = {}
    for kind, fn in (
        ("Pod", core.list_namespaced_pod),
        ("Service", core.list_namespaced_service),
        ("ConfigMap", core.list_namespaced_config_map),
        ("NetworkPolicy", net.list_namespaced_network_policy),
    ):
        for item in call_json(fn, namespace)["items"]:
            found[(kind, item["metadata"]["name"])] = _ts(item["metadata"]["creationTimestamp"])
    return found


def _expected(job: str, workers: int) -> set[tuple[str, str]]:
    return {
        ("ConfigMap", f"{job}-config"),
        ("NetworkPolicy", f"{job}-ray"),
        ("Service", f"{job}-a1-head"),
        ("Pod", f"{job}-a1-head"),
        *{("Pod", f"{job}-a1-worker-{i}") for i in range(workers)},
    }


def run(cluster: DevCluster, *, jobs: int, workers: int) -> dict[str, Any]:
    install_crd(cluster)
    node = f"kwok-{secrets.token_hex(3)}"
    cluster.add_kwok_node(node, cpu="2000", memory="8000Gi", pods=5000, labels={SIM_LABEL: "true"})
    namespace = f"bench-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", namespace)
    try:
        kubeconfig = grant_documented_rbac(cluster, namespace)
        metrics_port = free_port()
        env = {
            **os.environ,
            "FINETUNE_NAMESPACES": namespace,
            "FINETUNE_KUBECONFIG": str(kubeconfig),
            "FINETUNE_LEASE_NAMESPACE": namespace,
            "FINETUNE_OUTPUT_BASE_URI": "s3://models/",
            "FINETUNE_METRICS_PORT": str(metrics_port),
            "FINETUNE_HEALTH_PORT": str(free_port()),
            "FINETUNE_BIND_ADDRESS": "127.0.0.1",
            "FINETUNE_METRICS_SOURCE": "simulated",
            "FINETUNE_LOG_LEVEL": "WARNING",
        }
        proc = subprocess.Popen([str(Path(sys.executable).parent / "finetune"), "operator"], env=env)
        peak = [0]
        stop = threading.Event()

        def sample_rss() -> None:
            p = psutil.Process(proc.pid)
            while not stop.is_set():
                try:
                    peak[0] = max(peak[0], p.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.2)

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        time.sleep(3)  # operator start-up (lease, watches) is not part of the measurement
        names = [f"scale-{i}" for i in range(jobs)]
        small = {
            "workers": workers,
            "cpusPerWorker": "100m",
            "memoryPerWorker": "128Mi",
            "head": {"cpu": "100m", "memory": "128Mi"},
        }
        manifests = [job_manifest(n, resources=small) for n in names]
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(manifests))
        present: dict[str, float] = {}
        running: dict[str, float] = {}
        deadline = time.monotonic() + 300
        with cluster.api() as api:
            custom = k8s.CustomObjectsApi(api)
            while len(running) < jobs and time.monotonic() < deadline:
                time.sleep(2)
                items = call_json(
                    custom.list_namespaced_custom_object, "finetune.dev", "v1alpha1", namespace, "finetunejobs"
                )["items"]
                running = {
                    i["metadata"]["name"]: _running_after(i)
                    for i in items
                    if (i.get("status") or {}).get("phase") == "Running"
                }
            # Server-side timestamps (1 s resolution): independent of how fast this loop polls.
            created = {i["metadata"]["name"]: _ts(i["metadata"]["creationTimestamp"]) for i in items}
            children = _children_created(api, namespace)
            for n in names:
                stamps = [children.get(key) for key in _expected(n, workers)]
                if all(stamps):
                    present[n] = max(s for s in stamps if s) - created[n]
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        requests: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("finetune_api_requests_total{"):
                method = line.split('method="')[1].split('"')[0]
                requests[method] = float(line.rsplit(" ", 1)[1])
        stop.set()
        proc.terminate()
        proc.wait(30)
        return {
            "jobs": jobs,
            "workers_per_job": workers,
            "children_present_p50_s": round(_percentile(list(present.values()), 0.5), 2),
            "children_present_p99_s": round(_percentile(list(present.values()), 0.99), 2),
            "running_p50_s": round(_percentile(list(running.values()), 0.5), 2),
            "running_p99_s": round(_percentile(list(running.values()), 0.99), 2),
            "jobs_with_children": len(present),
            "jobs_running": len(running),
            "api_requests_per_job": {m: round(v / jobs, 1) for m, v in sorted(requests.items())},
            "api_writes_per_job": round(sum(v for m, v in requests.items() if m != "GET") / jobs, 1),
            "operator_peak_rss_mib": round(peak[0] / 2**20, 1),
            "note": "times from server-side timestamps (1 s resolution); "
            "GETs include the 10 s resync (GET + pod LIST per job)",
        }
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        cluster.remove_node(node)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("skipped: the dev cluster needs root")
        return 0
    reuse = os.environ.get("FT_CLUSTER_REUSE", "")
    if reuse:
        print(json.dumps(run(attach(REPO_ROOT / ".cluster"), jobs=args.jobs, workers=args.workers), indent=2))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        cluster = up(Path(tmp), nodes=0, kwok=True, log=lambda _m: None, die_with_caller=True)
        try:
            print(json.dumps(run(cluster, jobs=args.jobs, workers=args.workers), indent=2))
        finally:
            down(Path(tmp), log=lambda _m: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
