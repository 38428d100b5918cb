"""Was a training process killed for memory? The evidence a pod's status cannot give.

Why: a Ray worker pod's PID 1 is `ray start --block`; the training worker is another process in the same container.
When the container goes over its memory limit the kernel's OOM killer picks the biggest process, the training
worker, and the container lives on: the kubelet never reports OOMKilled. (On cgroup v1 the pod's cgroup, whose
limit is the same as the container's plus the pause container, often hits the limit first; the kill is still
charged to the victim's own cgroup.) Ray Train then sees a worker actor die with Ray's generic words ("Some common
causes include: (1) the process was killed by the OOM killer ...", the same as for any SIGKILL), which prove
nothing. What does prove it:

- Ray's own memory monitor killed it: the error is `ray.exceptions.OutOfMemoryError`, or the actor died with worker
  exit type `NODE_OUT_OF_MEMORY` ("... killed due to the node running low on memory ...");
- the kernel's OOM killer killed it: the `oom_kill` counter of that container's memory cgroup went up during the
  run (`memory.events` on cgroup v2, `memory.oom_control` on v1; each container sees its own cgroup at
  /sys/fs/cgroup). The driver reads it on every Ray node when the run starts and again when it fails.

This module is pure apart from `read_node_memory` (a few small file reads, run on each node by the driver's probe).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# Inside a container the container's own cgroup is mounted at /sys/fs/cgroup (v2: the cgroup namespace's root;
# v1: runc bind-mounts it under each controller's directory).
EVENT_FILES = (Path("/sys/fs/cgroup/memory.events"), Path("/sys/fs/cgroup/memory/memory.oom_control"))
LIMIT_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
# cgroup v1 writes "no limit" as the largest page-aligned 63-bit number.
NO_LIMIT_ABOVE = 1 << 60
# Ray's words when its memory monitor kills a worker (worker exit type, and the detail it writes).
RAY_MEMORY_MONITOR_MARKS = ("NODE_OUT_OF_MEMORY", "running low on memory")


def parse_oom_kills(text: str) -> int | None:
    """The `oom_kill N` line of memory.events (v2) or memory.oom_control (v1); None when absent (old kernels)."""
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value.strip())
    return None


def parse_limit(text: str) -> int | None:
    """memory.max (v2, "max" = none) or memory.limit_in_bytes (v1, a huge number = none), in bytes."""
    value = text.strip()
    if not value.isdigit():
        return None
    limit = int(value)
    return limit if limit < NO_LIMIT_ABOVE else None


@dataclass(frozen=True)
class NodeMemory:
    """One Ray node's container, as its cgroup tells it."""

    pod: str
    oom_kills: int | None  # None: the counter cannot be read here
    limit_bytes: int | None


def _first(paths: Iterable[Path]) -> str | None:
    for path in paths:
        try:
            return path.read_text()
        except OSError:
            continue
    return None


def read_node_memory(
    event_files: Iterable[Path] = EVENT_FILES, limit_files: Iterable[Path] = LIMIT_FILES
) -> NodeMemory:
    """This process's container: its pod name (POD_NAME, set by the operator) and memory cgroup counters."""
    events, limit = _first(event_files), _first(limit_files)
    return NodeMemory(
        pod=os.environ.get("POD_NAME") or socket.gethostname(),
        oom_kills=parse_oom_kills(events) if events is not None else None,
        limit_bytes=parse_limit(limit) if limit is not None else None,
    )


@dataclass(frozen=True)
class OomKills:
    """Processes the kernel's OOM killer killed in one node's container during the run."""

    pod: str
    head: bool
    kills: int
    limit_bytes: int | None


def kills_during(
    before: Mapping[str, NodeMemory], after: Mapping[str, NodeMemory], *, head_node: str
) -> list[OomKills]:
    """Nodes (by Ray node id) whose OOM-kill counter rose between the two readings. A node not read before (a worker
    pod that joined later) counts from 0: its container is new."""
    found = []
    for node, now in after.items():
        if now.oom_kills is None:
            continue
        then = before.get(node)
        base = then.oom_kills if then is not None and then.oom_kills is not None else 0
        if now.oom_kills > base:
            found.append(OomKills(now.pod, node == head_node, now.oom_kills - base, now.limit_bytes))
    return sorted(found, key=lambda k: (k.head, k.pod))


def gib(limit: int | None) -> str:
    return f"{limit / 2**30:.2g} GiB" if limit is not None else "no limit"


def oom_message(kills: list[OomKills], *, ray_detail: str | None) -> str:
    """What the job's status says: which pod, whose memory setting to raise, and the other knobs."""
    advice = "raise {field} or lower hyperparameters.batchSize / maxSeqLength (or use strategy: lora)"
    if kills:
        first = kills[0]
        field = "spec.resources.head.memory" if first.head else "spec.resources.memoryPerWorker"
        where = f"{first.pod} (memory limit {gib(first.limit_bytes)})"
        more = f" and {len(kills) - 1} other pod(s)" if len(kills) > 1 else ""
        return (
            f"the kernel's OOM killer killed {first.kills} process(es) of the training in {where}{more}; the pod "
            f"kept running, so it does not show OOMKilled: {advice.format(field=field)}"
        )
    detail = f" ({ray_detail.strip()[:300]})" if ray_detail else ""
    return (
        f"Ray's memory monitor killed a training worker: its pod ran low on memory{detail}; "
        f"{advice.format(field='spec.resources.memoryPerWorker')}"
    )
