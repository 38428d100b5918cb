"""Faults during a real-Ray FineTuneJob: a killed worker pod, a killed head pod (with and without retries), and
suspend/resume mid-run. Nothing is simulated: operator -> Ray cluster pods on the process node -> trainer -> S3.

Each run is paced by steps, not sleeps: the fault lands once Ray Train has *registered* a checkpoint (its
`checkpoint_manager_snapshot.json` in S3 lists it) and before the last step. What proves the resume is what the
job's status keeps durably: `status.attempts[].resumedFromStep` (from the trainer's final report, or its
`finetune_trainer_resumed_from_step` when scraped), `status.checkpoint`, `status.attempt`, and the trainer's
`metrics.json` / `manifest.json` in S3.
Slow (one tiny Ray cluster at a time on 2 cores): marked `ray` and `slow`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

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
from tests.servers.s3 import S3Server

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

MAX_STEPS = 100
EVERY_STEPS = 5


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


@dataclass
class Run:
    """One job on the real cluster, with what the test saw of it while polling."""

    cluster: DevCluster
    jobs: Jobs
    s3: Any
    bucket: str
    name: str
    phases: list[str] = field(default_factory=list)
    steps: list[tuple[int, int]] = field(default_factory=list)  # (attempt, step) seen while Running

    @property
    def prefix(self) -> str:
        return f"out/{self.name}/"

    def observe(self) -> dict[str, Any]:
        status = self.jobs.status(self.name)
        phase = status.get("phase")
        if phase and (not self.phases or self.phases[-1] != phase):
            self.phases.append(str(phase))
        attempt = int(status.get("attempt") or 0)
        progress = status.get("progress") or {}
        if phase == "Running" and isinstance(progress.get("step"), int):
            self.steps.append((attempt, progress["step"]))
        return status

    def assert_step_never_restarted(self, *, attempt: int, checkpoint: int) -> None:
        """While `attempt` ran, status.progress.step never went back to 0: it stays at or above the checkpoint seen
        at the fault, or the last step the status showed before it (scrapes lag by a resync), whichever is lower."""
        before = [step for a, step in self.steps if a < attempt]
        floor = min(checkpoint, before[-1]) if before else checkpoint
        assert floor > 0, (floor, self.steps)
        during = [step for a, step in self.steps if a == attempt]
        assert during and min(during) >= floor, (floor, self.steps)

    def registered_steps(self) -> list[int]:
        """Checkpoint steps Ray Train has registered (its snapshot in S3), not merely started uploading."""
        listing = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}checkpoints/")
        for obj in listing.get("Contents", []):
            if obj["Key"].endswith("checkpoint_manager_snapshot.json"):
                body = self.s3.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
                try:
                    state = json.loads(body)
                except ValueError:
                    return []
                return sorted(
                    int(r["metrics"]["step"])
                    for r in state.get("checkpoint_results", [])
                    if not r["metrics"].get("done")
                )
        return []

    def s3_json(self, key: str) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(
            self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}{key}")["Body"].read()
        )
        return body

    def diagnose(self, attempt: int = 1) -> str:
        head = f"{self.name}-a{attempt}-head"
        try:
            log = self.cluster.pod_logs(self.jobs.namespace, head)[-4000:]
        except Exception as e:  # diagnostics only
            log = f"(no log: {e})"
        return (
            f"phases {self.phases}; steps {self.steps[-5:]}\n"
            f"status {self.jobs.status(self.name)}\nevents {self.jobs.events(self.name)}\n{head} log tail:\n{log}"
        )

    def poll(
        self,
        check: Callable[[dict[str, Any]], Any],
        *,
        timeout: float,
        what: str,
        attempt: int = 1,
        failed_is_final: bool = True,
    ) -> Any:
        """Poll the status (1 s) until `check` returns something truthy; a Failed job ends the wait at once."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.observe()
            result = check(status)
            if result:
                return result
            if failed_is_final and status.get("phase") == "Failed":
                pytest.fail(f"{self.name} Failed while waiting for {what}\n{self.diagnose(attempt)}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{self.diagnose(attempt)}")
            time.sleep(1.0)

    def wait_checkpoint_mid_run(self, *, attempt: int = 1, timeout: float = 300) -> int:
        """Until a checkpoint is registered and training is still short of the last step; returns its step."""

        def check(status: dict[str, Any]) -> int | None:
            steps = self.registered_steps()
            step = (status.get("progress") or {}).get("step") or 0
            if steps and status.get("phase") == "Running":
                assert step < MAX_STEPS, f"training reached step {step} before the fault could land"
                return steps[-1]
            return None

        return int(self.poll(check, timeout=timeout, what="a registered checkpoint mid-run", attempt=attempt))

    def wait_terminal(self, *, timeout: float, attempt: int) -> dict[str, Any]:
        return dict(
            self.poll(
                lambda s: s if s.get("phase") in {"Succeeded", "Failed"} else None,
                timeout=timeout,
                what="a terminal phase",
                attempt=attempt,
                failed_is_final=False,  # returned for the caller to assert on
            )
        )


def start_job(
    cluster: DevCluster,
    s3_server: S3Server,
    operator: OperatorHandle,
    tmp_path: Path,
    name: str,
    *,
    backoff_limit: int,
) -> Run:
    namespace = operator.settings.namespaces[0]
    # 160 rows / (4 x 2 workers) = 20 steps per epoch; MAX_STEPS of them, a checkpoint every EVERY_STEPS.
    prepared = s3_job(
        cluster,
        s3_server,
        namespace=namespace,
        tmp_path=tmp_path,
        name=name,
        spec={
            "hyperparameters": {"epochs": 10, "maxSteps": MAX_STEPS},
            "checkpoint": {"everySteps": EVERY_STEPS, "keep": 2},
            "backoffLimit": backoff_limit,
            "progressDeadlineSeconds": 400,
        },
    )
    jobs = Jobs(cluster, namespace)
    jobs.create(prepared.manifest)
    return Run(cluster=cluster, jobs=jobs, s3=prepared.s3, bucket=prepared.bucket, name=name)


def assert_succeeded_with_artifacts(run: Run, status: dict[str, Any], *, attempt: int) -> dict[str, Any]:
    assert status["phase"] == "Succeeded", run.diagnose(attempt)
    assert status["attempt"] == attempt, status
    manifest = run.s3_json("manifest.json")
    assert manifest["complete"] is True
    assert manifest["run"]["attempt"] == attempt
    summary = run.s3_json("metrics.json")
    assert summary["steps"] == MAX_STEPS
    run.jobs.wait_no_pods(run.name, timeout=90)
    return summary


@pytest.mark.timeout(600)
def test_killed_worker_pod_is_recreated_and_training_resumes_from_checkpoint(
    cluster: DevCluster, s3_server: S3Server, real_operator: OperatorHandle, tmp_path: Path
) -> None:
    run = start_job(cluster, s3_server, real_operator, tmp_path, "wkill", backoff_limit=0)
    checkpoint = run.wait_checkpoint_mid_run()
    victim = "wkill-a1-worker-1"
    old_uid = run.jobs.pods("wkill")[victim]["metadata"]["uid"]
    cluster.kubectl("delete", "pod", "-n", run.jobs.namespace, victim, "--wait=false")

    def recreated(_status: dict[str, Any]) -> bool:
        pod = run.jobs.pods("wkill").get(victim)
        return bool(pod and pod["metadata"]["uid"] != old_uid and pod.get("status", {}).get("phase") == "Running")

    run.poll(recreated, timeout=120, what=f"{victim} re-created and Running")
    status = run.wait_terminal(timeout=420, attempt=1)
    # Ray Train recovered the worker group inside the same attempt (FailureConfig), from the checkpoint.
    summary = assert_succeeded_with_artifacts(run, status, attempt=1)
    assert summary["resumedFromStep"] >= checkpoint > 0, (summary["resumedFromStep"], checkpoint)
    # What the status keeps (not what a poll happened to see): the attempt's resume step and the latest checkpoint.
    assert status["attempts"][-1]["resumedFromStep"] >= checkpoint, status["attempts"]
    assert status["checkpoint"]["step"] >= checkpoint, status["checkpoint"]


@pytest.mark.timeout(600)
def test_killed_head_pod_starts_attempt_two_that_resumes_from_checkpoint(
    cluster: DevCluster, s3_server: S3Server, real_operator: OperatorHandle, tmp_path: Path
) -> None:
    run = start_job(cluster, s3_server, real_operator, tmp_path, "hkill", backoff_limit=1)
    checkpoint = run.wait_checkpoint_mid_run()
    cluster.kubectl("delete", "pod", "-n", run.jobs.namespace, "hkill-a1-head", "--wait=false")
    run.poll(lambda s: s.get("attempt") == 2, timeout=60, what="attempt 2")
    status = run.wait_terminal(timeout=480, attempt=2)
    summary = assert_succeeded_with_artifacts(run, status, attempt=2)
    assert summary["resumedFromStep"] >= checkpoint > 0, (summary["resumedFromStep"], checkpoint)
    assert status["failedAttempts"] == 1, status
    assert "Retrying" in {reason for reason, _ in run.jobs.events("hkill")}
    # The status told the truth while attempt 2 ran: it resumed, and the step never went back to 0.
    record = next(a for a in status["attempts"] if a["attempt"] == 2)
    assert record["resumedFromStep"] >= checkpoint, status["attempts"]
    assert next(a for a in status["attempts"] if a["attempt"] == 1)["reason"] in {"HeadPodLost", "Interrupted"}
    run.assert_step_never_restarted(attempt=2, checkpoint=checkpoint)


@pytest.mark.timeout(400)
def test_killed_head_pod_with_backoff_limit_zero_fails_with_reason(
    cluster: DevCluster, s3_server: S3Server, real_operator: OperatorHandle, tmp_path: Path
) -> None:
    run = start_job(cluster, s3_server, real_operator, tmp_path, "hfail", backoff_limit=0)
    # No need to wait for a checkpoint: without retries the job must end at once, whatever the step.
    run.poll(lambda s: s.get("phase") == "Running", timeout=240, what="Running")
    cluster.kubectl("delete", "pod", "-n", run.jobs.namespace, "hfail-a1-head", "--wait=false")
    status = run.wait_terminal(timeout=90, attempt=1)
    assert status["phase"] == "Failed", run.diagnose()
    assert status["attempt"] == 1, status
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True"
    assert failed["reason"] in {"HeadPodLost", "Interrupted"}, failed
    assert "backoffLimit 0 reached" in failed["message"], failed
    assert {"BackoffLimitExceeded"} <= {reason for reason, _ in run.jobs.events("hfail")}
    run.jobs.wait_no_pods("hfail", timeout=90)


@pytest.mark.timeout(600)
def test_suspend_mid_run_then_resume_continues_from_checkpoint(
    cluster: DevCluster, s3_server: S3Server, real_operator: OperatorHandle, tmp_path: Path
) -> None:
    run = start_job(cluster, s3_server, real_operator, tmp_path, "susp", backoff_limit=0)
    checkpoint = run.wait_checkpoint_mid_run()
    run.jobs.patch("susp", {"suspend": True})
    run.poll(lambda s: s.get("phase") == "Suspended", timeout=60, what="Suspended")
    # The head drains first (its workers checkpoint at the next step, Ray Train registers it, the run ends), then
    # the workers go: bounded by the head's grace period (stop_drain_seconds + 30 s) plus the workers' 30 s.
    run.jobs.wait_no_pods("susp", timeout=240)
    kept = run.registered_steps()
    assert kept and kept[-1] >= checkpoint, kept  # checkpoints survive the suspension
    run.jobs.patch("susp", {"suspend": False})
    status = run.wait_terminal(timeout=420, attempt=2)
    summary = assert_succeeded_with_artifacts(run, status, attempt=2)
    assert summary["resumedFromStep"] >= kept[-1], (summary["resumedFromStep"], kept)
    assert status.get("failedAttempts", 0) == 0, status  # a resume is not a failure
    assert "Resumed" in {reason for reason, _ in run.jobs.events("susp")}
    record = next(a for a in status["attempts"] if a["attempt"] == 2)
    assert record["resumedFromStep"] >= kept[-1], status["attempts"]
    assert next(a for a in status["attempts"] if a["attempt"] == 1)["reason"] == "Suspended"
    run.assert_step_never_restarted(attempt=2, checkpoint=checkpoint)
