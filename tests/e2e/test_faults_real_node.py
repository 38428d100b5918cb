"""Faults in real containers on the real node: the quick-start platform (MinIO pod, the chart's two operator
replicas, the trainer image) installed once by `hack/kind-demo.sh setup`, then one job per group of faults (every
job pays a Ray start-up, so faults that can share one do):

- kills: a worker's container SIGKILLed mid-training (`crictl stop --timeout 0`): Ray Train recovers the worker
  group inside the same attempt, from the last checkpoint; then the head's container SIGKILLed: attempt 1 ends
  `KilledBySignal`, attempt 2 resumes from the checkpoint and the job Succeeds;
- node daemons, then suspend: the node's containerd and kubelet restarted mid-training, training goes on in the
  same attempt; then `spec.suspend` mid-run: the pods go, the checkpoint stays, and on resume attempt 2 continues
  from it;
- a worker over its memory limit (long sequences, a small limit): the kernel's OOM killer (or Ray's memory
  monitor) kills the training process inside the worker container, and the job `Failed` with `OOMKilled`, the pod,
  and the advice to raise memoryPerWorker.

Paced by what the status keeps, never by sleeps or by a value a poll happened to see: a fault lands once
`status.checkpoint` (the latest checkpoint Ray Train committed) is set and training is short of its last step; the
resume is proven by `status.attempts[].resumedFromStep` (the trainer's own report) and `status.checkpoint`. Steps
lost are printed: the last step the status showed before the fault minus the step training resumed from; they are
at most the checkpoint interval plus the steps the status had not shown yet. After each job is deleted nothing of
it is left: no pod, Service, ConfigMap or NetworkPolicy, no container on the node.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import devcluster
from devcluster import quickstart
from devcluster.binaries import REPO_ROOT
from devcluster.kube import call_json
from devcluster.testing import wait_for

sys.path.insert(0, str(REPO_ROOT / "hack"))
import demo_s3

pytestmark = [pytest.mark.realnode, pytest.mark.ray, pytest.mark.slow, pytest.mark.productnode]

MAX_STEPS = 60
EVERY_STEPS = 4
# The daemons job has two pauses mid-run (daemon restarts, then a suspension): room for both before the last step.
DAEMONS_MAX_STEPS = 120
NODE = "node-0"


@pytest.fixture(scope="module")
def platform(real_cluster: devcluster.DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """MinIO, the chart and the data of the quick start, once for every fault (`hack/kind-demo.sh setup`)."""
    with quickstart.platform(real_cluster, prefix="faults", work_dir=tmp_path_factory.mktemp("faults")) as setup:
        yield setup


@dataclass
class Job:
    cluster: devcluster.DevCluster
    namespace: str
    name: str
    max_steps: int = MAX_STEPS

    def status(self) -> dict[str, Any]:
        out = self.cluster.kubectl("-n", self.namespace, "get", "ftj", self.name, "-o", "yaml").stdout
        status: dict[str, Any] = (yaml.safe_load(out) or {}).get("status") or {}
        return status

    def wait(
        self, check: Callable[[dict[str, Any]], Any], *, timeout: float, what: str, failed_ends: bool = True
    ) -> Any:
        """Poll the status every second until `check` returns something truthy; Failed ends the wait at once."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            result = check(status)
            if result:
                return result
            if failed_ends and status.get("phase") == "Failed":
                pytest.fail(f"{self.name} Failed while waiting for {what}: {status.get('lastFailure')}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; status {status}")
            time.sleep(1.0)

    def checkpoint_mid_run(self, *, attempt: int, after: int = 0, timeout: float = 600) -> tuple[int, int]:
        """Until `attempt` runs with a committed checkpoint past `after` and is short of the last step; returns
        (checkpoint step, step shown)."""

        def check(status: dict[str, Any]) -> tuple[int, int] | None:
            checkpoint = int((status.get("checkpoint") or {}).get("step") or 0)
            step = int((status.get("progress") or {}).get("step") or 0)
            if status.get("phase") == "Running" and status.get("attempt") == attempt and checkpoint > after:
                assert step < self.max_steps, f"training reached step {step} before the fault could land"
                return checkpoint, step
            return None

        found: tuple[int, int] = self.wait(check, timeout=timeout, what=f"a checkpoint in attempt {attempt}")
        return found

    def terminal(self, *, timeout: float = 900) -> dict[str, Any]:
        done: dict[str, Any] = self.wait(
            lambda s: s if s.get("phase") in {"Succeeded", "Failed"} else None,
            timeout=timeout,
            what="a terminal phase",
            failed_ends=False,
        )
        return done

    def kill(self, pod: str) -> None:
        """SIGKILL the pod's `ray` container through the node's containerd (as a crash or the OOM killer would)."""
        ids = self.cluster.crictl(
            NODE, "ps", "-q", "--name", "ray", "--label", f"io.kubernetes.pod.name={pod}",
            "--label", f"io.kubernetes.pod.namespace={self.namespace}",
        ).stdout.split()  # fmt: skip
        assert len(ids) == 1, f"container of {pod}: {ids}"
        stopped = self.cluster.crictl(NODE, "stop", "--timeout", "0", ids[0])
        assert stopped.returncode == 0, stopped.stderr

    def patch(self, spec: dict[str, Any]) -> None:
        body = json.dumps({"spec": spec})
        self.cluster.kubectl("-n", self.namespace, "patch", "ftj", self.name, "--type", "merge", "-p", body)

    def pods(self) -> list[str]:
        out = self.cluster.kubectl(
            "-n", self.namespace, "get", "pods", "-l", f"finetune.dev/job={self.name}", "-o", "name"
        ).stdout
        return out.split()

    def event_messages(self, reason: str) -> list[str]:
        """The messages of this job's Events with `reason` (Events are kept for an hour: longer than any test)."""
        selector = f"involvedObject.name={self.name},reason={reason}"
        out = self.cluster.kubectl(
            "-n", self.namespace, "get", "events", "--field-selector", selector,
            "-o", "jsonpath={range .items[*]}{.message}{'\\n'}{end}",
        ).stdout  # fmt: skip
        return [line for line in out.splitlines() if line]

    def delete_and_assert_nothing_left(self) -> None:
        self.cluster.kubectl("-n", self.namespace, "delete", "ftj", self.name, "--wait=true", "--timeout=120s")
        selector = f"finetune.dev/job={self.name}"

        def gone() -> bool:
            left = self.cluster.kubectl(
                "-n", self.namespace, "get", "pods,services,configmaps,networkpolicies", "-l", selector, "-o", "name"
            ).stdout
            containers = self.cluster.crictl(
                NODE, "ps", "-a", "-q", "--label", f"io.kubernetes.pod.namespace={self.namespace}"
            ).stdout
            mine = [c for c in containers.split() if self.name in self._pod_of(c)]
            return not left.strip() and not mine

        wait_for(gone, timeout=180, what=f"nothing of {self.name} left (objects, containers)", interval=2)

    def _pod_of(self, container: str) -> str:
        out = self.cluster.crictl(NODE, "inspect", "-o", "go-template", "--template",
                                  '{{index .status.labels "io.kubernetes.pod.name"}}', container)  # fmt: skip
        return out.stdout.strip()


def start(platform: quickstart.Quickstart, name: str, spec: dict[str, Any], *, max_steps: int = MAX_STEPS) -> Job:
    # 64 rows / (8 x 2 workers) = 4 steps per epoch; max_steps of them, a checkpoint every EVERY_STEPS.
    base = {
        "hyperparameters": {"epochs": max_steps // 4, "maxSteps": max_steps},
        "checkpoint": {"everySteps": EVERY_STEPS, "keep": 2},
        "progressDeadlineSeconds": 600,
    }
    job = quickstart.quickstart_job(quickstart.merge(base, spec), name=name)
    platform.cluster.kubectl("-n", platform.job_namespace, "apply", "-f", "-", input=yaml.safe_dump(job))
    return Job(platform.cluster, platform.job_namespace, name, max_steps)


def report(fault: str, *, shown: int, checkpoint: int, resumed: int) -> None:
    print(f"[faults] {fault}: last step shown {shown}, checkpoint {checkpoint}, resumed from {resumed}, "
          f"steps lost {max(0, shown - resumed)} (checkpoint every {EVERY_STEPS})")  # fmt: skip


def attempt_record(status: dict[str, Any], attempt: int) -> dict[str, Any]:
    record: dict[str, Any] = next(a for a in status.get("attempts") or [] if a["attempt"] == attempt)
    return record


def resumed_in(attempt: int) -> Callable[[dict[str, Any]], int | None]:
    """The step `attempt` resumed from, once the status has recorded a resume (it keeps it in attempts[])."""

    def check(status: dict[str, Any]) -> int | None:
        records = [a for a in status.get("attempts") or [] if a["attempt"] == attempt]
        step = records[0].get("resumedFromStep") if records else None
        return int(step) if step else None

    return check


@pytest.mark.timeout(1800)
def test_worker_then_head_container_killed_each_resume_from_the_checkpoint(platform: Any) -> None:
    job = start(platform, "kills", {"backoffLimit": 1})
    # A worker's container: Ray Train restarts the worker group inside attempt 1, from the committed checkpoint.
    checkpoint, shown = job.checkpoint_mid_run(attempt=1)
    job.kill("kills-a1-worker-1")
    resumed = job.wait(resumed_in(1), timeout=600, what="attempt 1 resuming after the worker's kill")
    report("worker container killed", shown=shown, checkpoint=checkpoint, resumed=resumed)
    assert resumed >= checkpoint > 0, job.status().get("attempts")
    # The head's container: attempt 1 ends (the head pod's trainer is gone), attempt 2 resumes.
    status = job.status()
    assert status["attempt"] == 1 and status["phase"] == "Running", status
    head_checkpoint = int(status["checkpoint"]["step"])
    head_shown = int((status.get("progress") or {}).get("step") or 0)
    assert head_checkpoint >= resumed and head_shown < MAX_STEPS, status
    job.kill("kills-a1-head")
    status = job.terminal()
    assert status["phase"] == "Succeeded", status.get("lastFailure")
    assert status["attempt"] == 2 and status["failedAttempts"] == 1, status
    first, second = attempt_record(status, 1), attempt_record(status, 2)
    assert first["reason"] == "KilledBySignal" and first["resumedFromStep"] == resumed, first
    # The attempt's own failure, from its Retrying Event (lastFailure is the latest failure of any kind: on a loaded
    # node a worker of attempt 2 may fail its Ray start-up and be replaced before the job Succeeds).
    retrying = [m for m in job.event_messages("Retrying") if m.startswith("attempt 1 failed")]
    assert any("killed by SIGKILL (exit code 137), not by the OOM killer" in m for m in retrying), retrying
    report("head container killed", shown=head_shown, checkpoint=head_checkpoint, resumed=second["resumedFromStep"])
    assert second["resumedFromStep"] >= head_checkpoint, status["attempts"]
    job.delete_and_assert_nothing_left()


@pytest.mark.timeout(1800)
def test_node_daemons_restarted_then_suspend_and_resume_continue_from_the_checkpoint(
    platform: Any, real_cluster: devcluster.DevCluster
) -> None:
    job = start(platform, "daemons", {"backoffLimit": 0}, max_steps=DAEMONS_MAX_STEPS)
    # containerd and the kubelet restarted mid-training: the containers live on, the job stays in attempt 1.
    checkpoint, shown = job.checkpoint_mid_run(attempt=1)
    real_cluster.restart_node_component(NODE, "containerd")
    real_cluster.restart_node_component(NODE, "kubelet")
    later, _ = job.checkpoint_mid_run(attempt=1, after=checkpoint)  # a checkpoint committed after both restarts
    status = job.status()
    assert not resumed_in(1)(status) and not status.get("failedAttempts"), status  # no restart, no failure
    print(
        f"[faults] kubelet and containerd restarted: last step shown {shown}, checkpoint {checkpoint}, went on in "
        f"attempt 1 to checkpoint {later} without a restart, steps lost 0 (checkpoint every {EVERY_STEPS})"
    )
    # Suspended mid-run: the pods go, the checkpoint stays; resumed: attempt 2 continues from it.
    shown = int((job.status().get("progress") or {}).get("step") or 0)
    job.patch({"suspend": True})
    job.wait(lambda s: s.get("phase") == "Suspended", timeout=120, what="Suspended")
    wait_for(lambda: not job.pods(), timeout=180, what="the suspended job's pods gone", interval=2)
    kept = int(job.status()["checkpoint"]["step"])
    assert kept >= later, job.status()["checkpoint"]
    job.patch({"suspend": False})
    status = job.terminal()
    assert status["phase"] == "Succeeded", status.get("lastFailure")
    assert status["attempt"] == 2 and not status.get("failedAttempts"), status  # a resume is not a failure
    assert attempt_record(status, 1)["reason"] == "Suspended", status["attempts"]
    resumed = attempt_record(status, 2)["resumedFromStep"]
    report("suspended and resumed", shown=shown, checkpoint=kept, resumed=resumed)
    assert resumed >= kept, status["attempts"]
    job.delete_and_assert_nothing_left()


@pytest.mark.timeout(1200)
def test_worker_over_its_memory_limit_is_oom_killed_with_advice(platform: Any, tmp_path: Path) -> None:
    # Sentences of ~500 tokens in batches of 32: attention alone needs GBs in a 1 GiB worker.
    long_rows = "sentence\tlabel\n" + "".join(f"{'a truly great film ' * 120}{i}\t{i % 2}\n" for i in range(64))
    with quickstart.minio_port_forward(platform.cluster) as endpoint:
        s3 = demo_s3.client(endpoint, access_key=demo_s3.DEMO_ACCESS_KEY, secret_key=demo_s3.DEMO_SECRET_KEY)
        s3.put_object(Bucket=demo_s3.DATA_BUCKET, Key="long/train.tsv", Body=long_rows.encode())
    job = start(
        platform,
        "oom",
        {
            "dataset": {"train": "s3://datasets/long/train.tsv", "validation": None, "validationSplit": 0.1},
            "hyperparameters": {"batchSize": 32, "maxSeqLength": 512},
            "method": {"strategy": "full", "lora": None},
            "resources": {"memoryPerWorker": "1Gi"},
            "backoffLimit": 0,
        },
    )
    status = job.terminal()
    assert status["phase"] == "Failed", status
    failure = status["lastFailure"]
    assert failure["reason"] == "OOMKilled", failure
    assert "memoryPerWorker" in failure["message"], failure
    print(f"[faults] worker over its memory limit: {failure['message']}")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "OOMKilled", failed
    with platform.cluster.api() as api:
        from kubernetes import client as k8s  # noqa: PLC0415

        events = call_json(k8s.CoreV1Api(api).list_namespaced_event, platform.job_namespace)["items"]
    advice = [e["message"] for e in events if e["reason"] == "OOMKilled"]
    assert any("raise" in m for m in advice), advice
    job.delete_and_assert_nothing_left()
