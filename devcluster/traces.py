"""Everything a cluster leaves on the host, found by looking (not by remembering): what `down` must remove.

Used by the clean-up test. Processes inside a real node are found through its namespaces' inodes (kubelet,
containerd, shims) and through the cluster's cgroups (containers, which have namespaces of their own), and
mounts by scanning every process's mount table, so what exists only inside a node is seen too.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from devcluster import cgroups, network


@dataclass(frozen=True)
class NodeNamespaces:
    """Inodes of one real node's namespaces (read from its init while it runs) and when they were read.

    The kernel reuses a namespace's inode number once the namespace is freed, so a process started after
    `seen_at` in a namespace with the same number is in a new namespace, not in the node's.
    """

    name: str
    net: int
    mnt: int
    pid: int
    seen_at: float


def namespaces_of(name: str, pid: int) -> NodeNamespaces:
    """The namespaces process `pid` (a node's init) lives in."""
    ino = {ns: os.stat(f"/proc/{pid}/ns/{ns}").st_ino for ns in ("net", "mnt", "pid")}
    return NodeNamespaces(name=name, seen_at=time.time(), **ino)


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _in_node(pid: int, ns: NodeNamespaces) -> bool:
    if not any(os.stat(f"/proc/{pid}/ns/{kind}").st_ino == getattr(ns, kind) for kind in ("net", "mnt", "pid")):
        return False
    return float(psutil.Process(pid).create_time()) <= ns.seen_at


def processes_in(namespaces: Iterable[NodeNamespaces]) -> list[str]:
    """Processes (pid and command) inside any of the given nodes' PID, network or mount namespaces."""
    nodes = list(namespaces)
    out = []
    for pid in _pids():
        with contextlib.suppress(OSError, psutil.Error):
            if any(_in_node(pid, ns) for ns in nodes):
                out.append(f"{pid} {_cmdline(pid)}")
    return out


def processes_naming(state_dir: Path) -> list[str]:
    """Processes whose command line names the state dir (control plane, node components, the node init)."""
    needle = str(state_dir).encode()
    out = []
    for pid in _pids():
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if needle in cmd and pid != os.getpid():
                out.append(f"{pid} {_cmdline(pid)}")
    return out


def mounts_under(state_dir: Path) -> list[str]:
    """Mount points under the state dir in any mount namespace on the machine."""
    needle = f" {state_dir}/"
    seen: set[str] = set()
    for pid in _pids():
        with contextlib.suppress(OSError), open(f"/proc/{pid}/mountinfo") as f:
            for line in f:
                if needle in line:
                    seen.add(line.split()[4])
    return sorted(seen)


def _lines_mentioning(cmd: list[str], needles: Iterable[str]) -> list[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return [ln for ln in res.stdout.splitlines() if any(n in ln for n in needles)]


def _net_alive(ns: NodeNamespaces) -> bool:
    """Whether a process that was already running when `ns` was read is still in the node's netns."""
    for pid in _pids():
        with contextlib.suppress(OSError, psutil.Error):
            if os.stat(f"/proc/{pid}/ns/net").st_ino == ns.net and psutil.Process(pid).create_time() <= ns.seen_at:
                return True
    return False


@dataclass(frozen=True)
class Traces:
    """What of a cluster exists on the machine right now (empty lists: nothing)."""

    processes: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    network_namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)
    iptables_rules: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        """True when nothing is left."""
        return not any(vars(self).values())


def traces(state_dir: Path, net: network.NetConfig, *, nodes: Iterable[NodeNamespaces] = ()) -> Traces:
    """Look for every trace of the cluster in `state_dir` with network `net` and real nodes `nodes`."""
    nodes = list(nodes)
    prefix = ".".join(str(net.cidr.network_address).split(".")[:2]) + "."
    needles = (net.bridge, f"ftn{net.index}x", prefix)
    in_cgroups = {f"{pid} (in {d})" for d, pids in cgroups.busy(net.cgroup_root).items() for pid in pids}
    return Traces(
        processes=sorted(set(processes_naming(state_dir)) | set(processes_in(nodes)) | in_cgroups),
        mounts=mounts_under(state_dir),
        network_namespaces=[f"node {n.name} netns" for n in nodes if _net_alive(n)],
        links=network.owned_links(net),
        routes=_lines_mentioning(["ip", "route", "show", "table", "all"], (prefix,)),
        iptables_rules=_lines_mentioning(["iptables-save"], needles)
        + _lines_mentioning(["iptables-legacy-save"], needles),
        cgroups=[str(p) for p in cgroups.existing(net.cgroup_root)],
    )
