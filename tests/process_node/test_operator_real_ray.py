"""The whole path with nothing simulated: operator -> real Ray cluster pods -> real trainer -> real S3.

A tiny randomly initialised BERT and an SST-2 subset are uploaded to the S3 server; the job reads them from
s3:// with credentials from a Secret (secretKeyRef), trains with 2 CPU workers (gloo), and must reach Succeeded with
progress seen in its status while it ran, a manifest and a model in S3, and no pods left. Slow (a Ray cluster on
2 cores): marked `ray` and `slow`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.testing import wait_for
from tests.devcluster.cluster import ProcessCluster as DevCluster
from tests.e2e.operator_harness import (
    Jobs,
    OperatorHandle,
    grant_documented_rbac,
    install_crd,
    operator_settings,
    start_operator,
)
from tests.e2e.s3_job import s3_job
from tests.servers.prometheus import PrometheusServer
from tests.servers.s3 import S3Server

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

SCRAPED_STEP = "max_over_time(finetune_trainer_step[15m])"


@pytest.fixture
def real_operator(cluster: DevCluster, namespace: str) -> Iterator[OperatorHandle]:
    install_crd(cluster)
    settings = operator_settings(
        namespace, grant_documented_rbac(cluster, namespace), metrics_source="http", resync_seconds=2.0
    )
    handle = start_operator(settings)
    try:
        yield handle
    finally:
        assert handle.stop_and_wait() == 0


def test_tiny_bert_lora_on_two_cpu_workers_succeeds_with_artifacts_in_s3(
    cluster: DevCluster,
    s3_server: S3Server,
    prometheus_server: PrometheusServer,
    real_operator: OperatorHandle,
    tmp_path: Path,
) -> None:
    namespace = real_operator.settings.namespaces[0]
    prepared = s3_job(
        cluster,
        s3_server,
        namespace=namespace,
        tmp_path=tmp_path,
        name="tiny",
        n_dev=48,
        spec={"hyperparameters": {"maxSteps": 30}, "checkpoint": {"everySteps": 10, "keep": 2}},
    )
    job, bucket, s3 = prepared.manifest, prepared.bucket, prepared.s3
    jobs = Jobs(cluster, namespace)
    prom = prometheus_server
    prom.set_targets("finetune-operator", [f"127.0.0.1:{real_operator.settings.metrics_port}"])
    jobs.create(job)
    scraped: list[str] = []
    seen_phases: list[str] = []
    seen_steps: list[int] = []

    def finished() -> dict[str, object] | None:
        status = jobs.status("tiny")
        phase = status.get("phase")
        if phase and (not seen_phases or seen_phases[-1] != phase):
            seen_phases.append(str(phase))
        step = (status.get("progress") or {}).get("step")
        if phase == "Running" and isinstance(step, int):
            seen_steps.append(step)
        head = jobs.pods("tiny").get("tiny-a1-head")
        ip = (head or {}).get("status", {}).get("podIP")
        if ip and not scraped:  # what a PodMonitor would do: scrape the trainer on the head pod
            prom.set_targets("finetune-trainer", [f"{ip}:8000"], {"namespace": namespace, "job_name": "tiny"})
            scraped.append(ip)
        return status if phase in {"Succeeded", "Failed"} else None

    try:
        status = wait_for(finished, timeout=900, what="tiny job terminal", interval=1.0)
    except TimeoutError:
        head = cluster.pod_logs(namespace, "tiny-a1-head")
        raise AssertionError(
            f"phases {seen_phases}; status {jobs.status('tiny')}\nhead log tail:\n{head[-4000:]}"
        ) from None
    assert status["phase"] == "Succeeded", (status, cluster.pod_logs(namespace, "tiny-a1-head")[-4000:])
    assert "Running" in seen_phases, seen_phases
    # Pending is brief on an idle cluster; the Events record every transition, polled or not.
    assert {"Pending", "Running", "Succeeded"} <= {reason for reason, _ in jobs.events("tiny")}
    assert any(step > 0 for step in seen_steps), f"no progress seen while Running: {seen_steps}"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/tiny/").get("Contents", [])}
    assert "out/tiny/manifest.json" in keys
    assert any(k.startswith("out/tiny/adapter/") for k in keys)
    assert any(k.startswith("out/tiny/checkpoints/") for k in keys)
    assert status["artifacts"]["manifest"] == f"s3://{bucket}/out/tiny/manifest.json"  # type: ignore[index]
    timeline = status["timeline"]
    assert timeline["created"] <= timeline["scheduled"] <= timeline["finished"], timeline  # type: ignore[index]
    assert status["attempts"][-1]["reason"] == "Succeeded"  # type: ignore[index]
    jobs.wait_no_pods("tiny", timeout=60)
    # The real Prometheus scraped both the trainer (during the run) and the operator.
    steps = prom.wait_for(SCRAPED_STEP, lambda samples: any(x.value > 0 for x in samples), timeout=30)
    assert steps[0].metric.get("job_name") == "tiny"
    prom.wait_for('finetune_jobs{phase="Succeeded"}', lambda samples: any(x.value == 1 for x in samples), timeout=30)
    prom.wait_for("finetune_reconcile_duration_seconds_count", lambda samples: any(x.value > 0 for x in samples))
    prom.remove_targets("finetune-trainer")
    prom.remove_targets("finetune-operator")
