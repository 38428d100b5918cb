"""Kill the operator (SIGKILL, as `finetune operator` subprocess) at random moments while 20 jobs reconcile.

Expected: every job reaches a terminal state, jobs that never failed ran exactly one attempt (no decision was taken
twice), no pod is left behind and no pod outlives its job. Everything the operator needs is in the cluster, so a
restart at any point resumes where the previous process stopped.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from finetune_trainer import contract

from devcluster import DevCluster
from devcluster.controlplane import free_port
from tests.e2e.operator_harness import Jobs, add_simulated_node, grant_documented_rbac, install_crd, job_manifest

pytestmark = [pytest.mark.cluster, pytest.mark.kwok, pytest.mark.slow]

JOBS = 20
FAILING = {f"chaos-{i}" for i in range(0, JOBS, 5)}  # these end Failed (backoffLimit 0)


@pytest.fixture(scope="module")
def sim_node(cluster: DevCluster) -> Iterator[str]:
    install_crd(cluster)
    yield from add_simulated_node(cluster)


def _spawn(kubeconfig: Path, namespace: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "FINETUNE_NAMESPACES": namespace,
        "FINETUNE_KUBECONFIG": str(kubeconfig),
        "FINETUNE_LEASE_NAMESPACE": namespace,
        "FINETUNE_OUTPUT_BASE_URI": "s3://models/",
        "FINETUNE_METRICS_PORT": str(free_port()),
        "FINETUNE_HEALTH_PORT": str(free_port()),
        "FINETUNE_BIND_ADDRESS": "127.0.0.1",
        "FINETUNE_RESYNC_SECONDS": "1",
        "FINETUNE_LEASE_DURATION_SECONDS": "3",
        "FINETUNE_LEASE_RENEW_SECONDS": "1",
        "FINETUNE_METRICS_SOURCE": "simulated",
        "FINETUNE_LOG_FORMAT": "text",
    }
    finetune = Path(sys.executable).parent / "finetune"
    with log.open("ab") as out:
        return subprocess.Popen([str(finetune), "operator"], env=env, stdout=out, stderr=subprocess.STDOUT)


def test_operator_killed_at_random_moments(cluster: DevCluster, namespace: str, sim_node: str, tmp_path: Path) -> None:
    rng = random.Random(4)
    kubeconfig = grant_documented_rbac(cluster, namespace)
    jobs = Jobs(cluster, namespace)
    log = tmp_path / "operator.log"
    names = [f"chaos-{i}" for i in range(JOBS)]
    proc = _spawn(kubeconfig, namespace, log)
    try:
        for name in names:
            jobs.create(job_manifest(name, backoffLimit=0 if name in FAILING else 2, resources={"workers": 1}))
        deadline = time.monotonic() + 240
        kills = 0
        finished: dict[str, str] = {}
        while len(finished) < JOBS:
            assert time.monotonic() < deadline, (
                f"not terminal: {sorted(set(names) - set(finished))}\n{log.read_text()[-3000:]}"
            )
            if kills < 4 and rng.random() < 0.3:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                kills += 1
                time.sleep(rng.uniform(0, 1.5))
                proc = _spawn(kubeconfig, namespace, log)
            for name in names:
                if name in finished:
                    continue
                status = jobs.status(name)
                phase = status.get("phase")
                if phase in {"Succeeded", "Failed"}:
                    finished[name] = phase
                    continue
                head = f"{name}-a{status.get('attempt', 1)}-head"
                pod = jobs.pods(name).get(head)
                if phase == "Running" and pod and pod["status"].get("phase") == "Running":
                    if name in FAILING:
                        line = contract.failure_line(contract.Reason.TRAINING_ERROR, "chaos")
                        cluster.end_pod(namespace, head, exit_code=6, message=line)
                    else:
                        cluster.end_pod(namespace, head, exit_code=0)
            time.sleep(0.5)
        assert kills >= 2
        for name in names:
            expected = "Failed" if name in FAILING else "Succeeded"
            assert finished[name] == expected, (name, jobs.status(name))
            status = jobs.status(name)
            assert status["attempt"] == 1, (name, status)  # no decision taken twice, no spurious retry
            if expected == "Failed":
                assert status["reason"] == "TrainingError"

        def no_pods() -> bool:
            return not any(jobs.pods(name) for name in names)

        end = time.monotonic() + 60
        while not no_pods():
            assert time.monotonic() < end, {n: list(jobs.pods(n)) for n in names if jobs.pods(n)}
            time.sleep(0.5)
        # Graceful shutdown of the leader: SIGTERM -> exit 0 and the lease handed back at once. The last process
        # started may still be standing by for the lease of the one killed before it: wait until it leads.
        active = re.compile(rf"operator active as \S*-{proc.pid} ")
        end = time.monotonic() + 30
        while not active.search(log.read_text()):
            assert time.monotonic() < end, log.read_text()[-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-2000:]
        holder = cluster.kubectl(
            "get", "lease", "-n", namespace, "finetune-operator", "-o", "jsonpath={.spec.holderIdentity}"
        ).stdout
        assert holder == ""
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_standby_replica_exits_cleanly_on_sigterm(cluster: DevCluster, namespace: str, tmp_path: Path) -> None:
    """A replica that never led (the Lease is held by another) exits 0 on SIGTERM, as a rolling update needs."""
    install_crd(cluster)
    kubeconfig = grant_documented_rbac(cluster, namespace)
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "finetune-operator", "namespace": namespace},
        "spec": {"holderIdentity": "another-replica", "leaseDurationSeconds": 3600, "renewTime": now},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(lease))
    log = tmp_path / "operator.log"
    proc = _spawn(kubeconfig, namespace, log)
    try:
        deadline = time.monotonic() + 60
        while "standing by" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-2000:]
        holder = cluster.kubectl(
            "get", "lease", "-n", namespace, "finetune-operator", "-o", "jsonpath={.spec.holderIdentity}"
        ).stdout
        assert holder == "another-replica"  # a standby never touches the leader's lease
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
