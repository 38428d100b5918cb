"""A training process killed for memory inside its container is reported as OOMKilled (issue 9, finding c).

On the real node a 1 GiB worker over its limit failed the job with TrainingError: the kernel killed Ray's training
process, not the container's PID 1, so the pod never showed OOMKilled, and the driver saw only a dead actor and a
broken collective. The cases below are built from Ray's real exception classes with the words Ray 2.60 writes
(raylet/GCS strings), and from real cgroup v1/v2 file contents.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from finetune_trainer import driver, oom
from finetune_trainer.contract import ExitCode, Reason
from finetune_trainer.errors import InvalidDatasetError, classify_failure
from ray.core.generated.common_pb2 import ActorDiedErrorContext
from ray.exceptions import ActorDiedError, OutOfMemoryError, RayTaskError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

RAY_MONITOR_DETAIL = (
    "Task was killed due to the node running low on memory.\nMemory on the node (IP: 10.1.0.5, ID: 6f1c) was "
    "0.97GB used / 1.00GB limit (0.970703), which exceeds the memory usage threshold of 0.95. Ray killed this "
    "worker (ID: 9a2b) because it was the most recently scheduled task."
)
KERNEL_KILL_DETAIL = (
    "Worker unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) the "
    "process was killed by the OOM killer due to high memory usage, (2) ray stop --force was called, or (3) the "
    "worker crashed unexpectedly due to SIGSEGV or another unexpected error."
)


def actor_died(exit_type: str, detail: str) -> ActorDiedError:
    context = ActorDiedErrorContext(
        error_message=f"The actor is dead because its worker process has died. Worker exit type: {exit_type} "
        f"Worker exit detail: {detail}",
        class_name="RayTrainWorker",
        actor_id=b"\x01" * 16,
        pid=4242,
        node_ip_address="10.1.0.5",
    )
    return ActorDiedError(context)


def worker_group_error(dead: BaseException) -> WorkerGroupError:
    """Rank 1's process died; rank 0 then fails in the collective, as gloo says it."""
    health = WorkerHealthCheckFailedError("A worker health check failed.\nWorker info: rank 1", failure=dead)
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.1.0.5]")
    return WorkerGroupError("Training failed due to worker errors", {0: gloo, 1: health})


WORKER_KILLED = [oom.OomKills(pod="oom-a1-worker-1", head=False, kills=1, limit_bytes=2**30)]
HEAD_KILLED = [oom.OomKills(pod="oom-a1-head", head=True, kills=2, limit_bytes=2 * 2**30)]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    error: BaseException
    reason: Reason
    says: tuple[str, ...] = ()
    kills: tuple[oom.OomKills, ...] = ()


CASES = [
    Case(
        "ray memory monitor: actor died NODE_OUT_OF_MEMORY",
        worker_group_error(actor_died("NODE_OUT_OF_MEMORY", RAY_MONITOR_DETAIL)),
        Reason.OOM_KILLED,
        ("Ray's memory monitor", "spec.resources.memoryPerWorker", "batchSize"),
    ),
    Case(
        "ray memory monitor: OutOfMemoryError from a task",
        ControllerError(OutOfMemoryError(RAY_MONITOR_DETAIL)),
        Reason.OOM_KILLED,
        ("running low on memory", "memoryPerWorker"),
    ),
    Case(
        "kernel OOM killer: the worker container's counter rose",
        worker_group_error(actor_died("SYSTEM_ERROR", KERNEL_KILL_DETAIL)),
        Reason.OOM_KILLED,
        ("OOM killer killed 1 process(es)", "oom-a1-worker-1 (memory limit 1 GiB)", "raise spec.resources.memoryPer"),
        tuple(WORKER_KILLED),
    ),
    Case(
        "kernel OOM killer: the head's counter rose",
        worker_group_error(actor_died("SYSTEM_ERROR", KERNEL_KILL_DETAIL)),
        Reason.OOM_KILLED,
        ("oom-a1-head", "raise spec.resources.head.memory"),
        tuple(HEAD_KILLED),
    ),
    Case(  # Ray's generic words for any SIGKILL name the OOM killer as a possibility: not evidence
        "a SIGKILLed worker without a counter that rose",
        worker_group_error(actor_died("SYSTEM_ERROR", KERNEL_KILL_DETAIL)),
        Reason.TRAINING_ERROR,
        ("worker 0 failed", "Connection closed by peer"),
    ),
    Case(
        "a domain error wins over memory evidence",
        WorkerGroupError("x", {0: InvalidDatasetError("no column `label` in train.tsv")}),
        Reason.INVALID_DATASET,
        ("no column",),
        tuple(WORKER_KILLED),
    ),
    Case(
        "a domain error inside a RayTaskError",
        RayTaskError("train_func", "Traceback ...", InvalidDatasetError("empty file")),
        Reason.INVALID_DATASET,
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_classify_failure(case: Case) -> None:
    error = classify_failure(case.error, oom_kills=case.kills)
    assert error.reason is case.reason, error.message
    assert all(text in error.message for text in case.says), error.message


def test_oom_killed_has_its_own_exit_code_and_the_operator_word() -> None:
    error = classify_failure(ControllerError(OutOfMemoryError(RAY_MONITOR_DETAIL)))
    assert error.exit_code is ExitCode.OOM_KILLED
    from finetune_operator import reasons  # noqa: PLC0415 - the operator's vocabulary is the same word

    assert Reason.OOM_KILLED.value == reasons.OOM_KILLED and reasons.retryable(reasons.OOM_KILLED)


CGROUP_V2_EVENTS = "low 0\nhigh 0\nmax 1273\noom 3\noom_kill 2\noom_group_kill 0\n"
CGROUP_V1_OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n"
CGROUP_V1_OLD_KERNEL = "oom_kill_disable 0\nunder_oom 0\n"


@pytest.mark.parametrize(
    ("text", "kills"),
    [(CGROUP_V2_EVENTS, 2), (CGROUP_V1_OOM_CONTROL, 1), (CGROUP_V1_OLD_KERNEL, None), ("", None)],
    ids=["v2", "v1", "v1-no-counter", "empty"],
)
def test_parse_oom_kills(text: str, kills: int | None) -> None:
    assert oom.parse_oom_kills(text) == kills


@pytest.mark.parametrize(
    ("text", "limit"),
    [("1073741824\n", 2**30), ("max\n", None), ("9223372036854771712\n", None), ("", None)],
    ids=["bytes", "v2-max", "v1-unlimited", "empty"],
)
def test_parse_limit(text: str, limit: int | None) -> None:
    assert oom.parse_limit(text) == limit


def test_kills_during_the_run() -> None:
    def mem(pod: str, kills: int | None) -> oom.NodeMemory:
        return oom.NodeMemory(pod=pod, oom_kills=kills, limit_bytes=2**30)

    before = {"head": mem("h", 0), "w0": mem("w0", 0), "w1": mem("w1", 4), "host": mem("host", 7)}
    after = {
        "head": mem("h", 0),
        "w0": mem("w0", 1),  # rose
        "w1": mem("w1", 4),  # old kills, none during the run
        "host": mem("host", 7),
        "w2": mem("w2", 1),  # a worker pod that joined later: a new container counts from 0
        "w3": mem("w3", None),  # unreadable
    }
    kills = oom.kills_during(before, after, head_node="head")
    assert [(k.pod, k.kills, k.head) for k in kills] == [("w0", 1, False), ("w2", 1, False)]


def test_read_node_memory_from_cgroup_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events, limit = tmp_path / "memory.oom_control", tmp_path / "memory.limit_in_bytes"
    events.write_text(CGROUP_V1_OOM_CONTROL)
    limit.write_text("1073741824\n")
    monkeypatch.setenv("POD_NAME", "job-a1-worker-0")
    node = oom.read_node_memory((tmp_path / "missing", events), (limit,))
    assert node == oom.NodeMemory(pod="job-a1-worker-0", oom_kills=1, limit_bytes=2**30)


HEAD, W0, W1 = "aa" * 28, "bb" * 28, "cc" * 28  # Ray node ids: 28 bytes in hex


class FakeRay:
    """Enough of `ray` for the driver's memory probe: nodes, pinned zero-CPU tasks, get with a timeout."""

    def __init__(self, readings: list[dict[str, oom.NodeMemory | Exception]]) -> None:
        self.readings = readings  # one mapping node -> reading (or error) per probe round
        self.round = -1
        self.pinned: list[str] = []

    def get_runtime_context(self) -> Any:
        return SimpleNamespace(get_node_id=lambda: HEAD)

    def nodes(self) -> list[dict[str, Any]]:
        return [{"NodeID": n, "Alive": True} for n in self.readings[0]] + [{"NodeID": "dd" * 28, "Alive": False}]

    def remote(self, **_options: Any) -> Any:
        self.round += 1
        readings = self.readings[min(self.round, len(self.readings) - 1)]  # later rounds read what the last did

        def options(scheduling_strategy: Any) -> Any:
            node = scheduling_strategy.node_id
            self.pinned.append(node)
            return SimpleNamespace(remote=lambda: readings[node])

        return lambda _fn: SimpleNamespace(options=options)

    def get(self, ref: Any, timeout: float) -> oom.NodeMemory:
        assert timeout > 0
        if isinstance(ref, Exception):
            raise ref
        return ref  # type: ignore[no-any-return]


def test_the_driver_probe_reports_the_nodes_whose_counter_rose(monkeypatch: pytest.MonkeyPatch) -> None:
    def mem(pod: str, kills: int) -> oom.NodeMemory:
        return oom.NodeMemory(pod=pod, oom_kills=kills, limit_bytes=2**30)

    fake = FakeRay(
        [
            {HEAD: mem("j-a1-head", 0), W0: mem("j-a1-worker-0", 0), W1: mem("j-a1-worker-1", 0)},
            {HEAD: mem("j-a1-head", 0), W0: mem("j-a1-worker-0", 2), W1: TimeoutError("no answer")},
        ]
    )
    monkeypatch.setattr(driver, "ray", fake)
    probe = driver.MemoryProbe.start()
    assert probe is not None and fake.pinned == [HEAD, W0, W1]  # one task pinned to each live node
    kills = probe.kills()
    assert [(k.pod, k.kills, k.head) for k in kills] == [("j-a1-worker-0", 2, False)]
    failure = driver.classified(worker_group_error(actor_died("SYSTEM_ERROR", KERNEL_KILL_DETAIL)), probe)
    assert failure.reason is Reason.OOM_KILLED and "j-a1-worker-0" in failure.message


def test_without_a_probe_the_failure_is_classified_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver.ray, "nodes", lambda: (_ for _ in ()).throw(RuntimeError("not connected")))
    assert driver.MemoryProbe.start() is None
    failure = driver.classified(worker_group_error(actor_died("SYSTEM_ERROR", KERNEL_KILL_DETAIL)), None)
    assert failure.reason is Reason.TRAINING_ERROR
