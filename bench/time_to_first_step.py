"""Time to first step: `kubectl apply` of the quick-start job on a warm real node to its first optimizer step.

Prints, per run, the seconds from the job's creation to: all pods scheduled, the Ray cluster up (head and workers
ready), the model loaded, the first optimizer step (status.timeline and status.attempts, which the operator
records) -- plus the apply itself measured here. No assertions: timings depend on the machine and its load.

Warm means: images built and already imported into the node's containerd, MinIO, Prometheus and the chart
installed (`hack/kind-demo.sh setup`, as `make kind-demo` does); the first run is done before the measured ones.
The job is examples/quickstart-kind.yaml test-sized for 2 cores (devcluster.quickstart.SMALL_SPEC: same model,
LoRA, two workers).

    .venv/bin/python bench/time_to_first_step.py [--runs N] [--state-dir DIR]   # DIR: a `make cluster-up` cluster
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

import devcluster
from devcluster import quickstart
from devcluster.testing import wait_for

STAGES = ("apply", "scheduled", "ray_up", "model_loaded", "first_step")
LABELS = {
    "apply": "kubectl apply returned",
    "scheduled": "all pods scheduled",
    "ray_up": "Ray cluster up (head + workers ready)",
    "model_loaded": "model loaded",
    "first_step": "first optimizer step",
}


def _t(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def _status(cluster: devcluster.DevCluster, namespace: str, name: str) -> dict[str, Any]:
    out = cluster.kubectl("-n", namespace, "get", "ftj", name, "-o", "yaml").stdout
    status: dict[str, Any] = (yaml.safe_load(out) or {}).get("status") or {}
    return status


def one_run(setup: quickstart.Quickstart, name: str, *, timeout: float = 900) -> dict[str, float]:
    """Apply one job, wait for its first step, return seconds from creation per stage; delete it."""
    cluster, namespace = setup.cluster, setup.job_namespace
    job = quickstart.quickstart_job(name=name)
    started = time.time()
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(job))
    applied = time.time() - started
    deadline = time.monotonic() + timeout
    try:
        while True:
            status = _status(cluster, namespace, name)
            timeline = status.get("timeline") or {}
            if timeline.get("firstStep"):
                break
            if status.get("phase") == "Failed" or time.monotonic() > deadline:
                raise SystemExit(f"{name}: no first step ({status.get('phase')}): {status.get('lastFailure')}")
            time.sleep(0.5)
        created = _t(timeline.get("created")) or started
        attempt = (status.get("attempts") or [{}])[0]
        points = {
            "scheduled": _t(timeline.get("scheduled")),
            "ray_up": _t(attempt.get("runningTime")),
            "model_loaded": _t(timeline.get("modelLoaded")),
            "first_step": _t(timeline.get("firstStep")),
        }
        figures = {"apply": applied}
        figures.update({k: v - created for k, v in points.items() if v is not None})
        return figures
    finally:
        cluster.kubectl("-n", namespace, "delete", "ftj", name, "--wait=true", "--timeout=180s", check=False)
        _wait_pods_gone(cluster, namespace, name)


def _wait_pods_gone(cluster: devcluster.DevCluster, namespace: str, name: str) -> None:
    """The next run starts on an empty node: a deleted job's pods still terminating would hold its CPUs, and the
    next job's "scheduled" would measure their grace period instead of the scheduler."""
    selector = f"finetune.dev/job={name}"

    def gone() -> bool:
        pods = cluster.kubectl("-n", namespace, "get", "pods", "-l", selector, "-o", "name", check=False).stdout
        return not pods.strip()

    wait_for(gone, timeout=300, what=f"the pods of deleted job {name} to go", interval=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="measured runs after one warm-up run")
    parser.add_argument("--state-dir", type=Path, help="a running cluster (`make cluster-up`: .cluster)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ttfs-"))
    state = args.state_dir or work / "cluster"
    own = args.state_dir is None
    cluster = devcluster.up(state, nodes=1, log=print) if own else devcluster.attach(state)
    t0 = time.monotonic()
    namespace = f"ttfs-{time.time_ns() % 10**6}"
    setup = quickstart.Quickstart.for_cluster(cluster, job_namespace=namespace, work_dir=work)
    print(f"images ensured and imported: {time.monotonic() - t0:.0f} s")
    cluster.kubectl("create", "namespace", namespace)
    try:
        t0 = time.monotonic()
        res = setup.run("setup", timeout=600)
        if res.returncode != 0:
            print(res.stdout + res.stderr, file=sys.stderr)
            return 1
        print(f"hack/kind-demo.sh setup (MinIO, Prometheus, chart, data): {time.monotonic() - t0:.0f} s")
        warmup = one_run(setup, "ttfs-warmup")
        print("warm-up run: " + ", ".join(f"{k} {v:.1f} s" for k, v in warmup.items()))
        runs = [one_run(setup, f"ttfs-{i}") for i in range(args.runs)]
    finally:
        setup.teardown()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        if own:
            devcluster.down(state, log=lambda _m: None)
    print(f"\ntime from kubectl apply (job created) to ... ({args.runs} warm runs; median, then each)")
    for stage in STAGES:
        values = [r[stage] for r in runs if stage in r]
        each = ", ".join(f"{v:.1f}" for v in values)
        median = f"{statistics.median(values):6.1f} s" if values else "     n/a"
        print(f"  {LABELS[stage]:<40} {median}   ({each})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
