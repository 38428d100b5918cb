"""Issue 10 on the real control plane: the status stays true, children are really ours, defaults are pinned.

The operator runs in-process under its documented RBAC; jobs run on a kwok node (pods Running at once,
`end_pod` ends them), so each case costs seconds. What is checked is I/O the pure tests cannot see: what
the API server accepts, refuses and keeps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

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

LABELS_400 = "labels in the validation set not seen in training: " + ", ".join(f"'label-{i:03d}'" for i in range(400))


@pytest.fixture(scope="module")
def sim_node(cluster: DevCluster) -> Iterator[str]:
    install_crd(cluster)
    yield from add_simulated_node(cluster)


@pytest.fixture
def jobs(cluster: DevCluster, namespace: str) -> Jobs:
    return Jobs(cluster, namespace)


@pytest.fixture
def operator(cluster: DevCluster, namespace: str, sim_node: str) -> Iterator[OperatorHandle]:
    handle = start_operator(operator_settings(namespace, grant_documented_rbac(cluster, namespace)))
    try:
        yield handle
    finally:
        assert handle.stop_and_wait() == 0


def _condition(status: dict[str, object], kind: str) -> dict[str, str]:
    conditions = status.get("conditions") or []
    assert isinstance(conditions, list)
    return next((c for c in conditions if c["type"] == kind), {})


def test_a_users_same_named_configmap_survives_the_jobs_whole_life(
    cluster: DevCluster, namespace: str, operator: OperatorHandle, jobs: Jobs
) -> None:
    mine = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bert-config"}, "data": {"mine": "yes"}}
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(mine))
    jobs.create(job_manifest("bert", pendingDeadlineSeconds=5))
    failed = jobs.wait_phase("bert", "Failed", timeout=60)
    assert failed["reason"] == "NameConflict" and "bert-config" in failed["message"], failed
    assert _condition(failed, "ReplicaFailure")["reason"] == "NameConflict"
    assert not jobs.pods("bert")  # nothing started with someone else's ConfigMap mounted
    assert "NameConflict" in {r for r, _ in jobs.events("bert")}
    cluster.kubectl("delete", "-n", namespace, "ftj", "bert", "--wait=true")
    survivor = json.loads(cluster.kubectl("get", "-n", namespace, "cm", "bert-config", "-o", "json").stdout)
    assert survivor["data"] == {"mine": "yes"} and not survivor["metadata"].get("ownerReferences")


def test_a_4131_character_failure_ends_failed_with_a_clipped_message_and_kubectl_wait_returns(
    cluster: DevCluster, namespace: str, operator: OperatorHandle, jobs: Jobs
) -> None:
    jobs.create(job_manifest("labels", backoffLimit=0))
    jobs.wait_running_pods("labels", 3, attempt=1)
    message = LABELS_400[:4131]
    assert len(message) == 4131
    # The line an older trainer wrote (no size limit of its own): the operator must clip what it puts in status.
    line = json.dumps({"reason": "TrainingError", "message": message})
    cluster.end_pod(namespace, "labels-a1-head", exit_code=6, message=line)
    cluster.kubectl("wait", "-n", namespace, "--for=condition=Failed", "--timeout=60s", "ftj/labels")
    status = jobs.status("labels")
    assert status["phase"] == "Failed" and status["reason"] == "TrainingError"
    assert len(status["message"]) <= 4096 and "[truncated]" in status["message"]
    assert status["message"].endswith("(attempt 1; backoffLimit 0 reached)")
    assert status["lastFailure"]["reason"] == "TrainingError" and status["lastFailure"]["exitCode"] == 6
    jobs.wait_no_pods("labels")


def test_an_operator_stopped_longer_than_the_progress_deadline_restarts_and_the_job_succeeds(
    cluster: DevCluster, namespace: str, sim_node: str, jobs: Jobs
) -> None:
    kubeconfig = grant_documented_rbac(cluster, namespace)
    first = start_operator(operator_settings(namespace, kubeconfig))
    jobs.create(job_manifest("steady", progressDeadlineSeconds=3))
    wait_for(
        lambda: (jobs.status("steady").get("progress") or {}).get("step", 0) > 0,
        timeout=30,
        what="progress in status",
    )
    assert first.stop_and_wait() == 0
    # The outage itself is the scenario: longer than progressDeadlineSeconds while the job keeps training.
    time.sleep(5)
    # The restarted operator cannot reach the trainer's metrics (simulated pods serve none): its start-up reconcile
    # and every resync see only the stale lastProgressTime, which must not count as "no progress".
    restarted = operator_settings(namespace, kubeconfig, metrics_source="http", trainer_metrics_timeout_seconds=1.0)
    second = start_operator(restarted)
    try:
        wait_for(lambda: second.reconciles() >= 5, timeout=60, what="the start-up reconcile and a few resyncs")
        assert jobs.status("steady")["phase"] == "Running", jobs.status("steady")
        cluster.end_pod(namespace, "steady-a1-head", exit_code=0)
        done = jobs.wait_phase("steady", "Succeeded")
        assert "NoProgress" not in {r for r, _ in jobs.events("steady")}, done
    finally:
        assert second.stop_and_wait() == 0


def test_a_quota_rejection_shows_in_the_jobs_status_within_one_reconcile(
    cluster: DevCluster, namespace: str, sim_node: str, jobs: Jobs
) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "two-pods"},
        "spec": {"hard": {"pods": "2"}},
    }
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(quota))
    wait_for(
        lambda: (
            "pods"
            in cluster.kubectl("get", "-n", namespace, "quota", "two-pods", "-o", "jsonpath={.status.hard}").stdout
        ),
        timeout=30,
        what="quota status",
    )
    # No resync: only the job's own ADDED event reconciles it, so what the status shows came from that one reconcile.
    settings = operator_settings(namespace, grant_documented_rbac(cluster, namespace), resync_seconds=3600)
    handle = start_operator(settings)
    try:
        jobs.create(job_manifest("quota", pendingDeadlineSeconds=600))
        status = wait_for(
            lambda: (s := jobs.status("quota")).get("reason") == "FailedCreate" and s,
            timeout=20,
            what="FailedCreate in status",
        )
        assert status["phase"] == "Pending" and "exceeded quota" in status["message"], status
        replica = _condition(status, "ReplicaFailure")
        assert replica["status"] == "True" and "exceeded quota" in replica["message"]
        assert any(r == "FailedCreate" and "exceeded quota" in m for r, m in jobs.events("quota"))
    finally:
        assert handle.stop_and_wait() == 0


def test_a_115_character_job_name_runs_to_succeeded(
    cluster: DevCluster, namespace: str, operator: OperatorHandle, jobs: Jobs
) -> None:
    name = "sst2-minilm-lr2e-5-bs32-seed42-" + "x" * 84
    assert len(name) == 115
    jobs.create(job_manifest(name))
    running = jobs.wait_phase(name, "Running", timeout=60)
    head = running["cluster"]["headPod"]
    assert len(head) <= 63 and head.startswith("sst2-minilm-lr2e-5")
    cluster.end_pod(namespace, head, exit_code=0)
    done = jobs.wait_phase(name, "Succeeded")
    assert done["artifacts"]["model"] == f"s3://models/{namespace}/{name}/model/"
    jobs.wait_no_pods(name)


def test_changed_operator_defaults_do_not_change_a_started_job(
    cluster: DevCluster, namespace: str, sim_node: str, jobs: Jobs
) -> None:
    kubeconfig = grant_documented_rbac(cluster, namespace)
    first = start_operator(operator_settings(namespace, kubeconfig, trainer_image="trainer:first"))
    jobs.create(job_manifest("pinned"))
    jobs.wait_running_pods("pinned", 3, attempt=1)
    assert first.stop_and_wait() == 0
    # The chart's defaults change: no output base any more, another trainer image.
    second = start_operator(operator_settings(namespace, kubeconfig, output_base_uri=None, trainer_image="trainer:2"))
    try:
        cluster.kubectl("delete", "pod", "-n", namespace, "pinned-a1-worker-1", "--wait=false")

        def replaced() -> dict[str, object] | None:
            pod = jobs.pods("pinned").get("pinned-a1-worker-1")
            if pod and not pod["metadata"].get("deletionTimestamp") and pod["status"].get("phase") == "Running":
                return pod
            return None

        worker = wait_for(replaced, timeout=30, what="worker re-created")
        assert worker["spec"]["containers"][0]["image"] == "trainer:first"  # type: ignore[index]
        status = jobs.status("pinned")
        assert status["phase"] == "Running", status
        assert status["operatorDefaults"] == {"outputBaseUri": "s3://models/", "trainerImage": "trainer:first"}
        cluster.end_pod(namespace, "pinned-a1-head", exit_code=0)
        done = jobs.wait_phase("pinned", "Succeeded")
        assert done["artifacts"]["model"] == f"s3://models/{namespace}/pinned/model/"
    finally:
        assert second.stop_and_wait() == 0
