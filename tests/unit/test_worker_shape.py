"""One worker shape: the pod's Kubernetes resources and what Ray inside it advertises, derived once from the spec.

The trainer driver asks Ray for `ray_cpus` per worker and the operator starts each worker pod with
`--num-cpus=<ray_cpus>`: the same number by construction, so a job can neither wait for CPUs that never come
("1.5") nor pack two DDP processes into one pod ("500m").
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
from finetune_operator import builders, names, preflight
from finetune_operator.settings import Settings
from finetune_trainer import spec as ftspec
from finetune_trainer.shape import MIB, head_shape, worker_shape

IDENT = names.JobIdentity(name="job", namespace="ns", uid="0123abcd-0000", attempt=1)
SETTINGS = Settings(identity="t", output_base_uri="s3://out/")


def _resources(**kw: Any) -> ftspec.ResourcesSpec:
    return ftspec.ResourcesSpec.model_validate(kw)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    resources: dict[str, Any]
    ray_cpus: int
    gpus: int = 0
    shm: str = "1228Mi"
    store_mib: int = 982


CASES = [
    Case("whole cpus", {"cpusPerWorker": "4"}, 4),
    Case("integer cpus", {"cpusPerWorker": 2}, 2),
    Case("fractional cpus round down", {"cpusPerWorker": "1.5"}, 1),
    Case("2.5 cpus", {"cpusPerWorker": "2.5"}, 2),
    Case("milli cpus below one are one worker, never two", {"cpusPerWorker": "500m"}, 1),
    Case("1500m", {"cpusPerWorker": "1500m"}, 1),
    Case("2000m is two", {"cpusPerWorker": "2000m"}, 2),
    Case("gpus", {"cpusPerWorker": "8", "gpusPerWorker": 2}, 8, gpus=2),
    Case("small memory keeps the minimum shm", {"memoryPerWorker": "100Mi"}, 1, shm="128Mi", store_mib=102),
    Case("large memory", {"memoryPerWorker": "16Gi"}, 1, shm="4915Mi", store_mib=3932),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_worker_shape(case: Case) -> None:
    shape = worker_shape(_resources(**case.resources))
    assert (shape.ray_cpus, shape.gpus, shape.shm_size) == (case.ray_cpus, case.gpus, case.shm)
    assert shape.object_store_bytes // MIB == case.store_mib
    assert shape.object_store_bytes <= shape.shm_bytes  # the object store lives in /dev/shm
    assert shape.object_store_bytes >= 75 * MIB  # Ray's minimum
    assert shape.threads == max(1, case.ray_cpus)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_pod_advertises_what_the_driver_asks_for(case: Case) -> None:
    """Exactly one training worker (which asks for ray_cpus) fits in each worker pod, never zero, never two."""
    spec = builders.resolve_spec(
        ftspec.parse_spec(
            {"model": {"uri": "hf://o/m"}, "dataset": {"train": "s3://d/t.csv"}, "resources": case.resources}
        ),
        defaults=builders.operator_defaults(SETTINGS),
        ident=IDENT,
    )
    worker = builders.build_worker_pod(spec, settings=SETTINGS, ident=IDENT, index=0)
    container = worker["spec"]["containers"][0]
    advertised = int(re.search(r"--num-cpus=(\d+)", container["command"][-1]).group(1))  # type: ignore[union-attr]
    asked = worker_shape(spec.resources).ray_cpus
    assert asked <= advertised < 2 * asked
    assert f"--num-gpus={case.gpus}" in container["command"][-1]
    shm = next(v for v in worker["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["sizeLimit"] == case.shm
    assert container["resources"]["limits"]["cpu"] == str(case.resources.get("cpusPerWorker", "1"))


def test_head_advertises_no_cpus() -> None:
    shape = head_shape(_resources(head={"cpu": "2", "memory": "8Gi"}))
    assert (shape.ray_cpus, shape.gpus, shape.cpu_cores, shape.memory_bytes) == (0, 0, 2.0, 8 * 2**30)


def test_preflight_uses_the_same_shape() -> None:
    spec = ftspec.parse_spec(
        {"model": {"uri": "hf://o/m"}, "dataset": {"train": "s3://d/t.csv"}, "resources": {"cpusPerWorker": "1500m"}}
    )
    node = {"metadata": {"name": "n"}, "status": {"allocatable": {"cpu": "1", "memory": "64Gi"}}}
    problems = preflight.preflight(spec, [node])
    assert problems == [("spec.resources.cpusPerWorker", "no node can run a worker pod (n: 1 CPUs)")]
