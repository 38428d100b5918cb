"""Kueue in the dev cluster: how long the launcher takes, and how fast Kueue admits a FineTuneJob's Workload.

Prints figures only (no assertions: timings depend on the machine and its load). Needs the control-plane binaries
(`make binaries`) and Kueue (`bash hack/build-kueue.sh`). Each run starts a fresh control plane without a node
(Kueue never looks at nodes), then:
- kueue_start: CRDs + RBAC + webhooks installed, the process started, /readyz and a webhook round trip answered;
- admit: a Workload built by finetune_operator.kueue created -> Admitted (ClusterQueue with room for it);
- preempt_release_admit: a higher-priority Workload created -> the victim Evicted, its quota released the way the
  operator will release it -> the preemptor Admitted.

    .venv/bin/python bench/kueue_start.py [--runs N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune_operator import builders, names
from finetune_operator import kueue as kq
from finetune_operator.settings import Settings
from finetune_trainer import spec as ftspec
from kubernetes import client as k8s

import devcluster
from devcluster import DevCluster
from devcluster import kueue as kueue_mod
from devcluster.kube import call_json
from devcluster.testing import wait_crd_established, wait_for
from tests.e2e.operator_harness import CRD


def install_crd(cluster: DevCluster) -> None:
    """The FineTuneJob CRD (operator_harness.install_crd polls with a jsonpath that errors before the first
    condition exists, so this waits with wait_crd_established instead)."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=kueue-test", "-f", str(CRD))
    with cluster.api() as api:
        wait_crd_established(api, f"{names.PLURAL}.{names.GROUP}")


NS = "default"
SPEC: dict[str, Any] = {
    "model": {"uri": "hf://org/model"},
    "dataset": {"train": "s3://data/train.csv"},
    "output": {"uri": "s3://models/out/"},
    "resources": {"workers": 1, "cpusPerWorker": "4", "memoryPerWorker": "8Gi"},
}


def _create(custom: k8s.CustomObjectsApi, plural: str, body: dict[str, Any], *, namespaced: bool = False) -> Any:
    if namespaced:
        return call_json(custom.create_namespaced_custom_object, kq.GROUP, kq.VERSION, NS, plural, body)
    return call_json(custom.create_cluster_custom_object, kq.GROUP, kq.VERSION, plural, body)


def _queue(custom: k8s.CustomObjectsApi) -> None:
    _create(custom, "resourceflavors", {"apiVersion": kq.API_VERSION, "kind": "ResourceFlavor",
                                        "metadata": {"name": "bench"}})  # fmt: skip
    quota = [{"name": "cpu", "nominalQuota": "6"}, {"name": "memory", "nominalQuota": "12Gi"}]
    _create(custom, "clusterqueues", {
        "apiVersion": kq.API_VERSION, "kind": "ClusterQueue", "metadata": {"name": "bench"},
        "spec": {"namespaceSelector": {}, "preemption": {"withinClusterQueue": "LowerPriority"},
                 "resourceGroups": [{"coveredResources": ["cpu", "memory"],
                                     "flavors": [{"name": "bench", "resources": quota}]}]},
    })  # fmt: skip
    _create(custom, "localqueues", {"apiVersion": kq.API_VERSION, "kind": "LocalQueue", "metadata": {"name": "q"},
                                    "spec": {"clusterQueue": "bench"}}, namespaced=True)  # fmt: skip


def _submit(custom: k8s.CustomObjectsApi, name: str, priority: int) -> str:
    body = {"apiVersion": names.GROUP_VERSION, "kind": names.KIND, "metadata": {"name": name}, "spec": SPEC}
    job = call_json(custom.create_namespaced_custom_object, names.GROUP, ftspec.API_VERSION, NS, names.PLURAL, body)
    ident = names.JobIdentity(name=name, namespace=NS, uid=job["metadata"]["uid"])
    settings = Settings(identity="bench")
    spec = builders.resolve_spec(ftspec.parse_spec(SPEC), defaults=builders.operator_defaults(settings), ident=ident)
    prio = kq.Priority(kq.PriorityKind.WORKLOAD_PRIORITY_CLASS, f"p{priority}", priority)
    _create(custom, "workloadpriorityclasses", {"apiVersion": kq.API_VERSION, "kind": "WorkloadPriorityClass",
                                                "metadata": {"name": f"p{priority}"}, "value": priority})  # fmt: skip
    workload = kq.build_workload(spec, settings=settings, ident=ident, queue="q", priority=prio)
    _create(custom, kq.WORKLOAD_PLURAL, workload, namespaced=True)
    return str(workload["metadata"]["name"])


def _wait(custom: k8s.CustomObjectsApi, name: str, state: kq.WorkloadState) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        wl = call_json(custom.get_namespaced_custom_object, kq.GROUP, kq.VERSION, NS, kq.WORKLOAD_PLURAL, name)
        admission = kq.read_admission(wl)
        return wl if admission is not None and admission.state is state else None

    return wait_for(reached, timeout=60, what=f"{name} {state.value}", interval=0.02)


def _admission_figures(cluster: DevCluster) -> dict[str, float]:
    install_crd(cluster)
    figures = {}
    with cluster.api() as api:
        custom = k8s.CustomObjectsApi(api)
        _queue(custom)
        t0 = time.monotonic()
        low = _submit(custom, "low", 100)
        _wait(custom, low, kq.WorkloadState.ADMITTED)
        figures["admit"] = time.monotonic() - t0
        t1 = time.monotonic()
        high = _submit(custom, "high", 1000)
        victim = _wait(custom, low, kq.WorkloadState.EVICTED)
        patch = kq.release_quota_patch(victim, now=dt.datetime.now(dt.UTC))
        call_json(custom.patch_namespaced_custom_object_status, kq.GROUP, kq.VERSION, NS, kq.WORKLOAD_PLURAL, low,
                  patch)  # fmt: skip
        _wait(custom, high, kq.WorkloadState.ADMITTED)
        figures["preempt_release_admit"] = time.monotonic() - t1
    return figures


def one_run(state: Path) -> dict[str, float]:
    # A control plane only: no node and no kube-scheduler (Kueue admits Workloads by quota, never by nodes).
    cluster = devcluster.up(state, nodes=0, log=lambda _m: None, die_with_caller=True)
    try:
        t0 = time.monotonic()
        handle = kueue_mod.start(cluster, log=lambda _m: None, die_with_caller=True)
        figures = {"kueue_start": time.monotonic() - t0}
        figures.update(_admission_figures(cluster))
        kueue_mod.stop(cluster, handle)
    finally:
        devcluster.down(state, log=lambda _m: None)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    kueue_mod.ensure_built()
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="kueue-bench-") as tmp:
            runs.append(one_run(Path(tmp)))
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f}s" for k, v in runs[-1].items()), flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} CPUs")
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"{key:>24}: median {statistics.median(values):6.2f}s  min {min(values):6.2f}s  max {max(values):6.2f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
