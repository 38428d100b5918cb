"""Faults in real containers on the real node: the quick-start platform (MinIO pod, the chart's two operator
replicas, the trainer image) installed once by `hack/kind-demo.sh setup`, then one job per fault.

- a worker's container SIGKILLed mid-training (`crictl stop --timeout 0`): Ray Train recovers the worker group
  inside the same attempt, from the last checkpoint;
- the head's container SIGKILLed: attempt 1 ends, attempt 2 resumes from the checkpoint;
- a worker over its memory limit (long sequences, a small limit): the kernel's OOM killer, containerd's
  `OOMKilled`, and the job `Failed` with that reason and the advice to raise memoryPerWorker.

Paced by what the status keeps, never by sleeps or by a value a poll happened to see: the fault lands once
`status.checkpoint` (the latest complete checkpoint) is set and training is short of its last step; the resume is
proven by `status.attempts[].resumedFromStep` (the trainer's own report) and `status.checkpoint`. Steps lost are
printed: the last step the status showed before the fault minus the step training resumed from; they are at most
the checkpoint interval plus the steps the status had not shown yet. After each job is deleted nothing of it is
left: no pod, Service, ConfigMap or NetworkPolicy, no container on the node.
"""

from __future__ import annotations

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
NODE = "node-0"


@pytest.fixture(scope="module")
def platform(real_cluster: devcluster.DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """MinIO, the chart and the data of the quick start, once for every fault (`hack/kind-demo.sh setup`)."""
    images = real_cluster.load_images(quickstart.IMAGES, log=print)
    suffix = f"{time.time_ns() % 10**6}"
    job_ns, operator_ns = f"faults-{suffix}", f"faults-{suffix}-op"
    real_cluster.kubectl("create", "namespace", job_ns)
    setup = quickstart.Quickstart(
        cluster=real_cluster,
        job_namespace=job_ns,
        operator_namespace=operator_ns,
        images={name: image.ref for name, image in images.items()},
        work_dir=tmp_path_factory.mktemp("faults"),
    )
    try:
        res = setup.run("setup", timeout=600)
        assert res.returncode == 0, f"hack/kind-demo.sh setup failed:\n{(res.stdout + res.stderr)[-6000:]}"
        yield setup
    finally:
        setup.teardown()
        real_cluster.kubectl("delete", "namespace", job_ns, "--ignore-not-found", "--wait=false", check=False)


@dataclass
class Job:
    cluster: devcluster.DevCluster
    namespace: str
    name: str

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
        """Until `attempt` runs with a complete checkpoint past `after` and is short of the last step; returns
        (checkpoint step, step shown)."""

        def check(status: dict[str, Any]) -> tuple[int, int] | None:
            checkpoint = int((status.get("checkpoint") or {}).get("step") or 0)
            step = int((status.get("progress") or {}).get("step") or 0)
            if status.get("phase") == "Running" and status.get("attempt") == attempt and checkpoint > after:
                assert step < MAX_STEPS, f"training reached step {step} before the fault could land"
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


def start(platform: quickstart.Quickstart, name: str, spec: dict[str, Any]) -> Job:
    # 64 rows / (8 x 2 workers) = 4 steps per epoch; MAX_STEPS of them, a checkpoint every EVERY_STEPS.
    base = {
        "hyperparameters": {"epochs": 20, "maxSteps": MAX_STEPS},
        "checkpoint": {"everySteps": EVERY_STEPS, "keep": 2},
        "progressDeadlineSeconds": 600,
    }
    job = quickstart.quickstart_job(quickstart.merge(base, spec), name=name)
    platform.cluster.kubectl("-n", platform.job_namespace, "apply", "-f", "-", input=yaml.safe_dump(job))
    return Job(platform.cluster, platform.job_namespace, name)


def report(fault: str, *, shown: int, checkpoint: int, resumed: int) -> None:
    print(f"[faults] {fault}: last step shown {shown}, checkpoint {checkpoint}, resumed from {resumed}, "
          f"steps lost {max(0, shown - resumed)} (checkpoint every {EVERY_STEPS})")  # fmt: skip


@pytest.mark.timeout(1500)
def test_worker_container_killed_recovers_from_the_checkpoint_in_the_same_attempt(platform: Any) -> None:
    job = start(platform, "wkill", {"backoffLimit": 0})
    checkpoint, shown = job.checkpoint_mid_run(attempt=1)
    job.kill("wkill-a1-worker-1")
    status = job.terminal()
    assert status["phase"] == "Succeeded", status.get("lastFailure")
    assert status["attempt"] == 1 and not status.get("failedAttempts"), status
    resumed = status["attempts"][-1]["resumedFromStep"]
    report("worker container killed", shown=shown, checkpoint=checkpoint, resumed=resumed)
    assert resumed >= checkpoint > 0, status["attempts"]
    assert status["checkpoint"]["step"] >= resumed, status["checkpoint"]
    job.delete_and_assert_nothing_left()


@pytest.mark.timeout(1500)
def test_head_container_killed_starts_attempt_two_that_resumes_from_the_checkpoint(platform: Any) -> None:
    job = start(platform, "hkill", {"backoffLimit": 1})
    checkpoint, shown = job.checkpoint_mid_run(attempt=1)
    job.kill("hkill-a1-head")
    status = job.terminal()
    assert status["phase"] == "Succeeded", status.get("lastFailure")
    assert status["attempt"] == 2 and status["failedAttempts"] == 1, status
    first, second = status["attempts"][-2:]
    assert first["reason"] in {"HeadPodLost", "Interrupted", "HeadFailed"}, first
    report("head container killed", shown=shown, checkpoint=checkpoint, resumed=second["resumedFromStep"])
    assert second["resumedFromStep"] >= checkpoint > 0, status["attempts"]
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
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "OOMKilled", failed
    with platform.cluster.api() as api:
        from kubernetes import client as k8s  # noqa: PLC0415

        events = call_json(k8s.CoreV1Api(api).list_namespaced_event, platform.job_namespace)["items"]
    advice = [e["message"] for e in events if e["reason"] == "OOMKilled"]
    assert any("raise" in m for m in advice), advice
    job.delete_and_assert_nothing_left()
