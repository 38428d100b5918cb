"""One pod shape: what a Ray head or worker pod gets and what Ray inside it advertises, derived once from the spec.

Why one function: the operator sizes the pod (requests/limits, `/dev/shm`, `ray start --num-cpus`, the object
store) and the trainer driver asks Ray for room for its workers. Computed in two places with two roundings, they
disagreed: `cpusPerWorker: "1.5"` started workers advertising 1 CPU while the driver waited for 1.5 per worker (and
failed after 600 s), and `"500m"` let two DDP processes share a pod sized for one. Both sides now call these
functions, so the value the driver waits for is, by construction, what each worker pod advertises.

Imports only the spec (pydantic): the operator image has no torch or ray.
"""

from __future__ import annotations

import dataclasses
import math

from finetune_trainer.spec import ResourcesSpec, parse_quantity

MIB = 2**20
SHM_FRACTION = 0.3  # Ray's object store lives in /dev/shm; 30% of the pod's memory, as Ray's own default ratio
SHM_MIN = 128 * MIB
OBJECT_STORE_FRACTION = 0.8  # of /dev/shm: headroom for what else uses shared memory (torch, gloo)
OBJECT_STORE_MIN = 80 * MIB  # Ray refuses less than 75 MiB


@dataclasses.dataclass(frozen=True)
class PodShape:
    """The resources of one Ray pod, as Kubernetes and as Ray see them."""

    cpu: str  # Kubernetes quantity, request = limit (as written in the spec)
    memory: str  # Kubernetes quantity, request = limit
    gpus: int  # nvidia.com/gpu, request = limit; Ray's --num-gpus
    ray_cpus: int  # Ray's --num-cpus: logical CPUs the pod advertises (whole numbers: Ray's CLI takes an int)
    memory_bytes: int
    shm_bytes: int  # sizeLimit of the memory-backed /dev/shm emptyDir (it counts against the memory limit)
    object_store_bytes: int  # Ray's --object-store-memory, inside /dev/shm

    @property
    def cpu_cores(self) -> float:
        return parse_quantity(self.cpu)

    @property
    def shm_size(self) -> str:
        """/dev/shm sizeLimit as a Kubernetes quantity (whole MiB)."""
        return f"{self.shm_bytes // MIB}Mi"

    @property
    def threads(self) -> int:
        """Intra-op threads of the one training process in this pod."""
        return max(1, self.ray_cpus)


def _memory_shape(memory: str) -> tuple[int, int, int]:
    total = int(parse_quantity(memory))
    shm = max(SHM_MIN, math.floor(total * SHM_FRACTION / MIB) * MIB)
    store = max(OBJECT_STORE_MIN, int(shm * OBJECT_STORE_FRACTION))
    return total, shm, store


def worker_ray_cpus(cpus: float) -> int:
    """Whole CPUs a worker pod advertises to Ray, and what each training worker asks for: exactly one per pod.

    Rounded down (the pod's CPU limit is a hard cap: advertising more would oversubscribe it) and at least 1
    (a training worker needs a CPU slot; a pod of "500m" is one slow worker, never two).
    """
    return max(1, math.floor(cpus + 1e-9))


def worker_shape(resources: ResourcesSpec) -> PodShape:
    total, shm, store = _memory_shape(resources.memory_per_worker)
    return PodShape(
        cpu=resources.cpus_per_worker,
        memory=resources.memory_per_worker,
        gpus=resources.gpus_per_worker,
        ray_cpus=worker_ray_cpus(resources.cpus),
        memory_bytes=total,
        shm_bytes=shm,
        object_store_bytes=store,
    )


def head_shape(resources: ResourcesSpec) -> PodShape:
    """The head runs the driver only: it advertises no CPUs, so no training worker is ever placed on it."""
    total, shm, store = _memory_shape(resources.head.memory)
    return PodShape(
        cpu=resources.head.cpu,
        memory=resources.head.memory,
        gpus=0,
        ray_cpus=0,
        memory_bytes=total,
        shm_bytes=shm,
        object_store_bytes=store,
    )
