"""The cgroup subtree a cluster's kubelets own, in every mounted hierarchy, and removing it afterwards.

Kubelet (cgroupDriver cgroupfs) creates `<cgroupRoot>/kubepods/...` in each cgroup v1 hierarchy (and the
unified one on a hybrid host) and never removes it; runc creates the per-container cgroups below. A cluster
gets one top cgroup per network index (`/ftdc<i>`), its nodes one child each, so two clusters never share a
cgroup, and `remove` deletes the whole subtree once the node's processes are gone.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

CGROUP_FS = Path("/sys/fs/cgroup")


def hierarchies(base: Path = CGROUP_FS) -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 controllers, name=systemd, the unified v2 mount)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            mount_point, fstype = Path(fields[4]), fields[sep + 1]
            if fstype in ("cgroup", "cgroup2") and mount_point.is_relative_to(base):
                out.append(mount_point)
    return sorted(set(out))


def create(path: str) -> None:
    """Create `path` (e.g. /ftdc3/node-0) in every hierarchy; cpuset children inherit cpus and mems."""
    for h in hierarchies():
        d = h
        for part in Path(path.strip("/")).parts:
            d = d / part
            d.mkdir(exist_ok=True)
            # A new cpuset v1 cgroup starts with no CPUs or memory nodes and refuses tasks: inherit them.
            for knob in ("cpuset.cpus", "cpuset.mems"):
                mine = d / knob
                if mine.exists() and not mine.read_text().strip():
                    mine.write_text((d.parent / knob).read_text())


def existing(path: str) -> list[Path]:
    """Directories of `path`'s subtree that still exist, in any hierarchy."""
    rel = path.strip("/")
    out = []
    for h in hierarchies():
        top = h / rel
        if top.is_dir():
            out += [Path(root) for root, _dirs, _files in os.walk(top)]
    return out


def _tasks(d: Path) -> list[int]:
    for name in ("cgroup.procs", "tasks"):
        with contextlib.suppress(OSError, ValueError):
            return [int(x) for x in (d / name).read_text().split()]
    return []


def remove(path: str, *, timeout: float = 10.0) -> list[Path]:
    """Delete `path`'s subtree in every hierarchy, deepest first; return what could not be removed.

    A cgroup is removable once its last task has exited; exiting tasks (a node's containers being killed)
    can take a moment, so this retries until `timeout`.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for d in sorted(existing(path), key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                left.append(d)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def busy(path: str) -> dict[Path, list[int]]:
    """Cgroups of the subtree that still hold tasks, with their pids (for error messages)."""
    return {d: t for d in existing(path) if (t := _tasks(d))}
