"""The operator's lifecycle on the real control plane + a kwok node, under its documented RBAC.

Simulated node: kwok reports pods Running without processes and they end when the test asks (`end_pod`), so these
tests exercise every decision (phases, retries, suspend/resume, deadlines, TTL, cleanup) in seconds. Real Ray and
the real trainer are exercised by the real-Ray e2e.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator

import pytest
from finetune_trainer import contract

from devcluster import DevCluster
from devcluster.testing import wait_for
from tests.e2e.operator_harness import (
    Jobs,
    OperatorHandle,
    add_simulated_node,
    grant_documented_rbac,
    install_crd,
    job_manifest,
    operator_settings,
    start_operator,
)

pytestmark = [pytest.mark.cluster, pytest.mark.kwok]


@pytest.fixture(scope="module")
def sim_node(cluster: DevCluster) -> Iterator[str]:
    install_crd(cluster)
    yield from add_simulated_node(cluster)


@pytest.fixture
def operator(cluster: DevCluster, namespace: str, sim_node: str) -> Iterator[OperatorHandle]:
    handle = start_operator(operator_settings(namespace, grant_documented_rbac(cluster, namespace)))
    try:
        yield handle
    finally:
        assert handle.stop_and_wait() == 0


@pytest.fixture
def jobs(cluster: DevCluster, namespace: str) -> Jobs:
    return Jobs(cluster, namespace)


def test_job_goes_pending_to_succeeded_and_cleans_up(
    cluster: DevCluster, namespace: str, operator: OperatorHandle, jobs: Jobs
) -> None:
    jobs.create(job_manifest("ok"))
    pods = jobs.wait_running_pods("ok", 3, attempt=1)
    assert set(pods) == {"ok-a1-head", "ok-a1-worker-0", "ok-a1-worker-1"}
    status = jobs.wait_phase("ok", "Running")
    assert status["cluster"]["ready"] == "2/2" and status["attempt"] == 1
    progressed = wait_for(
        lambda: (jobs.status("ok").get("progress") or {}).get("step", 0) > 0 and jobs.status("ok"),
        timeout=20,
        what="progress in status",
    )
    assert progressed["progress"]["totalSteps"] == 1000 and "(" in progressed["progress"]["summary"]
    cluster.end_pod(namespace, "ok-a1-head", exit_code=0)
    done = jobs.wait_phase("ok", "Succeeded")
    assert done["artifacts"]["model"] == f"s3://models/{namespace}/ok/model/"
    assert done["completionTime"] and done["reason"] == "Succeeded"
    conditions = {c["type"]: c for c in done["conditions"]}
    assert conditions["Succeeded"]["status"] == "True" and conditions["Failed"]["status"] == "False"
    cluster.kubectl("wait", "-n", namespace, "--for=condition=Succeeded", "--timeout=5s", "ftj/ok")
    jobs.wait_no_pods("ok")
    for kind, name in (("svc", "ok-a1-head"), ("cm", "ok-config"), ("netpol", "ok-ray")):
        assert cluster.kubectl("get", "-n", namespace, kind, name, check=False).returncode != 0, f"{kind}/{name} left"
    reasons = [r for r, _ in jobs.events("ok")]
    assert {"Pending", "Running", "Succeeded"} <= set(reasons)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{operator.settings.metrics_port}/metrics", timeout=5).read()
    assert b'finetune_jobs{phase="Succeeded"} 1.0' in metrics
    assert b"finetune_job_duration_seconds_count" in metrics


def test_head_failure_retries_then_fails_with_the_trainer_reason(
    cluster: DevCluster, namespace: str, operator: OperatorHandle, jobs: Jobs
) -> None:
    jobs.create(job_manifest("retry", backoffLimit=1))
    jobs.wait_running_pods("retry", 3, attempt=1)
    line = contract.failure_line(contract.Reason.TRAINING_ERROR, "loss is NaN at step 7")
    cluster.end_pod(namespace, "retry-a1-head", exit_code=int(contract.ExitCode.TRAINING_ERROR), message=line)
    jobs.wait_running_pods("retry", 3, attempt=2)
    status = jobs.status("retry")
    assert status["attempt"] == 2 and status["failedAttempts"] == 1
    wait_for(lambda: not any("-a1-" in n for n in jobs.pods("retry")), timeout=20, what="attempt 1 pods deleted")
    cluster.end_pod(namespace, "retry-a2-head", exit_code=int(contract.ExitCode.TRAINING_ERROR), message=line)
    failed = jobs.wait_phase("retry", "Failed")
    assert failed["reason"] == "TrainingError"
    assert "loss is NaN at step 7" in failed["message"] and "backoffLimit 1 reached" in failed["message"]
    jobs.wait_no_pods("retry")
    assert {"Retrying", "BackoffLimitExceeded", "TrainingError"} <= {r for r, _ in jobs.events("retry")}


def test_deleted_head_pod_with_backoff_limit_zero_fails_as_head_pod_lost(
    cluster: DevCluster, namespace: str, operator: OperatorHandle, jobs: Jobs
) -> None:
    jobs.create(job_manifest("lost", backoffLimit=0))
    jobs.wait_running_pods("lost", 3, attempt=1)
    cluster.kubectl("delete", "pod", "-n", namespace, "lost-a1-head", "--wait=false")
    failed = jobs.wait_phase("lost", "Failed")
    assert failed["attempt"] == 1 and failed["reason"] == "HeadPodLost", failed
    assert "backoffLimit 0 reached" in failed["message"], failed
    assert {c["type"]: c for c in failed["conditions"]}["Failed"]["reason"] == "HeadPodLost"
    jobs.wait_no_pods("lost")
    assert {"BackoffLimitExceeded"} <= {r for r, _ in jobs.events("lost")}


def test_suspend_deletes_the_cluster_and_resume_starts_a_new_attempt(
    namespace: str, operator: OperatorHandle, jobs: Jobs
) -> None:
    jobs.create(job_manifest("pause"))
    jobs.wait_phase("pause", "Running")
    jobs.patch("pause", {"suspend": True})
    suspended = jobs.wait_phase("pause", "Suspended")
    assert {c["type"]: c["status"] for c in suspended["conditions"]}["Suspended"] == "True"
    jobs.wait_no_pods("pause")
    jobs.patch("pause", {"suspend": False})
    jobs.wait_running_pods("pause", 3, attempt=2)
    resumed = jobs.wait_phase("pause", "Running")
    assert resumed["attempt"] == 2 and resumed["failedAttempts"] == 0


def test_unschedulable_job_fails_after_pending_deadline_with_the_schedulers_reason(
    namespace: str, operator: OperatorHandle, jobs: Jobs
) -> None:
    jobs.create(job_manifest("nogpu", resources={"gpusPerWorker": 4}, pendingDeadlineSeconds=4))
    pending = wait_for(
        lambda: jobs.status("nogpu").get("reason") == "Unschedulable" and jobs.status("nogpu"),
        timeout=20,
        what="Unschedulable reason",
    )
    assert pending["phase"] == "Pending" and "nvidia.com/gpu" in pending["message"]
    failed = jobs.wait_phase("nogpu", "Failed", timeout=30)
    assert failed["reason"] == "Unschedulable"
    assert "nvidia.com/gpu" in failed["message"] and "pendingDeadlineSeconds=4" in failed["message"]
    assert {c["type"]: c for c in failed["conditions"]}["Failed"]["reason"] == "Unschedulable"
    jobs.wait_no_pods("nogpu")


INVALID = [
    ("lr-object", {"hyperparameters": {"learningRate": {"value": 1}}}, "spec.hyperparameters.learningRate"),
    ("lr-bool", {"hyperparameters": {"learningRate": True}}, "spec.hyperparameters.learningRate"),
    ("lr-list", {"hyperparameters": {"learningRate": [0.1]}}, "spec.hyperparameters.learningRate"),
]


@pytest.mark.parametrize("case", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_spec_fails_with_field_path_and_others_keep_running(
    operator: OperatorHandle, jobs: Jobs, case: tuple[str, dict[str, object], str]
) -> None:
    name, spec, field = case
    jobs.create(job_manifest(name, **spec))
    jobs.create(job_manifest(f"{name}-fine"))
    failed = jobs.wait_phase(name, "Failed")
    assert failed["reason"] == "InvalidSpec" and field in failed["message"]
    assert not jobs.pods(name)
    jobs.wait_phase(f"{name}-fine", "Running")


def test_missing_output_without_operator_default_is_invalid_spec(
    cluster: DevCluster, namespace: str, sim_node: str, jobs: Jobs
) -> None:
    settings = operator_settings(namespace, grant_documented_rbac(cluster, namespace), output_base_uri=None)
    handle = start_operator(settings)
    try:
        jobs.create(job_manifest("noout"))
        failed = jobs.wait_phase("noout", "Failed")
        assert failed["reason"] == "InvalidSpec" and "spec.output.uri" in failed["message"]
    finally:
        assert handle.stop_and_wait() == 0


def test_lost_worker_is_recreated_and_the_job_still_succeeds(
    cluster: DevCluster, namespace: str, operator: OperatorHandle, jobs: Jobs
) -> None:
    jobs.create(job_manifest("heal"))
    jobs.wait_phase("heal", "Running")
    cluster.kubectl("delete", "pod", "-n", namespace, "heal-a1-worker-1", "--wait=false")
    wait_for(
        lambda: (
            (p := jobs.pods("heal").get("heal-a1-worker-1"))
            and not p["metadata"].get("deletionTimestamp")
            and p["status"].get("phase") == "Running"
            and p
        ),
        timeout=30,
        what="worker re-created",
    )
    assert jobs.status("heal")["attempt"] == 1
    cluster.end_pod(namespace, "heal-a1-head", exit_code=0)
    jobs.wait_phase("heal", "Succeeded")


def test_ttl_deletes_the_finished_job(
    cluster: DevCluster, namespace: str, operator: OperatorHandle, jobs: Jobs
) -> None:
    jobs.create(job_manifest("short", ttlSecondsAfterFinished=1))
    jobs.wait_running_pods("short", 3, attempt=1)
    cluster.end_pod(namespace, "short-a1-head", exit_code=0)
    wait_for(lambda: jobs.get("short") is None, timeout=30, what="job deleted by TTL")


def test_terminal_job_is_final_across_operator_restarts(
    cluster: DevCluster, namespace: str, sim_node: str, jobs: Jobs
) -> None:
    kubeconfig = grant_documented_rbac(cluster, namespace)
    first = start_operator(operator_settings(namespace, kubeconfig))
    jobs.create(job_manifest("final"))
    jobs.wait_running_pods("final", 3, attempt=1)
    cluster.end_pod(namespace, "final-a1-head", exit_code=0)
    jobs.wait_phase("final", "Succeeded")
    jobs.wait_no_pods("final")
    assert first.stop_and_wait() == 0
    second = start_operator(operator_settings(namespace, kubeconfig))
    try:
        # Its start-up reconcile of the finished job and a few resyncs (a count, not a guess at how long they take).
        wait_for(lambda: second.reconciles() >= 4, timeout=60, what="the restarted operator's reconciles")
        assert not jobs.pods("final") and jobs.status("final")["phase"] == "Succeeded"
    finally:
        assert second.stop_and_wait() == 0


def test_operator_account_cannot_read_secrets(cluster: DevCluster, namespace: str, operator: OperatorHandle) -> None:
    who = f"--as=system:serviceaccount:{namespace}:finetune-operator"
    assert cluster.kubectl("auth", "can-i", "get", "secrets", "-n", namespace, who, check=False).stdout.strip() == "no"
    assert cluster.kubectl("auth", "can-i", "create", "pods", "-n", namespace, who, check=False).stdout.strip() == "yes"
    assert cluster.kubectl("auth", "can-i", "create", "pods", "-n", "default", who, check=False).stdout.strip() == "no"


def test_only_the_lease_holder_acts_and_a_standby_takes_over(
    cluster: DevCluster, namespace: str, sim_node: str, jobs: Jobs
) -> None:
    kubeconfig = grant_documented_rbac(cluster, namespace)
    leader = start_operator(operator_settings(namespace, kubeconfig, identity="leader"))
    wait_for(
        lambda: "leader" in cluster.kubectl("get", "lease", "-n", namespace, "finetune-operator", check=False).stdout,
        timeout=20,
        what="leader holds the lease",
    )
    standby = start_operator(operator_settings(namespace, kubeconfig, identity="standby"))
    try:
        readyz = f"http://127.0.0.1:{standby.settings.health_port}/readyz"
        # A standby is ready: it is healthy and will take over (readiness must not block rolling updates).
        wait_for(lambda: _http_ok(readyz), timeout=20, what="standby /readyz")
        jobs.create(job_manifest("early"))
        jobs.wait_phase("early", "Running", timeout=30)
        assert standby.thread.is_alive()  # it waited all along, neither acting nor exiting
        assert jobs.reporters("early") == {"leader"}  # the standby did not act
        assert leader.stop_and_wait() == 0  # graceful: releases the lease at once
        jobs.create(job_manifest("handover"))
        jobs.wait_phase("handover", "Running", timeout=30)
        holder = cluster.kubectl(
            "get", "lease", "-n", namespace, "finetune-operator", "-o", "jsonpath={.spec.holderIdentity}"
        ).stdout
        assert holder == "standby"
        assert jobs.reporters("handover") == {"standby"}
    finally:
        for handle in (leader, standby):
            if handle.thread.is_alive():
                assert handle.stop_and_wait() == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_leader_that_loses_its_lease_stops_acting_and_exits(cluster: DevCluster, namespace: str, sim_node: str) -> None:
    kubeconfig = grant_documented_rbac(cluster, namespace)
    leader = start_operator(operator_settings(namespace, kubeconfig, identity="leader"))
    try:
        wait_for(
            lambda: (
                "leader" in cluster.kubectl("get", "lease", "-n", namespace, "finetune-operator", check=False).stdout
            ),
            timeout=20,
            what="leader holds the lease",
        )
        # Another replica takes the lease over (as after a partition): the old leader must notice and exit.
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        patch = {"spec": {"holderIdentity": "usurper", "renewTime": now, "leaseDurationSeconds": 60}}
        cluster.kubectl("patch", "lease", "-n", namespace, "finetune-operator", "--type=merge", "-p", json.dumps(patch))
        leader.thread.join(20)
        assert not leader.thread.is_alive() and leader.result == [3]
    finally:
        if leader.thread.is_alive():
            leader.stop_and_wait()
