"""The per-cluster network: an index claimed on the machine, a host bridge, and the addresses derived from it.

Several clusters run on one machine at once (every pytest session starts its own), so each claims a network
index `i` (0-31) and derives everything from it: the bridge `ftbr<i>`, the /16 `10.(213+i).0.0/16`, the
gateway (the host's address on the bridge) `10.(213+i).0.1`, and for real nodes their IPs, pod CIDRs and veth
names.

Real node layout for index i (node k = 0, 1, ...):
    host  ftbr<i> 10.(213+i).0.1/16 ── veth ftn<i>x<k> ── eth0 10.(213+i).0.(10+k)/24  (node k's netns)
    node k pods   10.(213+i).(16(k+1)).0/20 on that node's cni0 bridge (CNI bridge + host-local)
    kwok pods     10.(213+i).240.0/20 (never routed: kwok pods run nothing)
The host routes each pod CIDR via its node's IP, and every node routes the other nodes' pod CIDRs the same
way, so host processes (tests, the operator) and pods on other nodes reach pod IPs directly.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CLAIMS = Path("/run/ftdevcluster")
MAX_INDEX = 32
MAX_REAL_NODES = 14


@dataclass(frozen=True)
class NetConfig:
    """Per-cluster names and addresses, so two dev clusters on one machine do not collide."""

    index: int

    @property
    def bridge(self) -> str:
        """Host bridge interface name."""
        return f"ftbr{self.index}"

    @property
    def cidr(self) -> ipaddress.IPv4Network:
        """Everything of this cluster (a /16 per cluster index)."""
        return ipaddress.IPv4Network(f"10.{213 + self.index}.0.0/16")

    @property
    def gateway(self) -> str:
        """The host's address on the bridge: host services are reachable from pods here."""
        return str(self.cidr.network_address + 1)

    # -- real nodes ------------------------------------------------------------------------------------

    def node_ip(self, k: int) -> str:
        """Node k's address on the bridge (its InternalIP)."""
        _check_node(k)
        return str(self.cidr.network_address + 10 + k)

    def pod_cidr(self, k: int) -> ipaddress.IPv4Network:
        """Node k's pod subnet (a /20: 4094 addresses for kubelet's 110 pods plus churn)."""
        _check_node(k)
        return ipaddress.IPv4Network(f"10.{213 + self.index}.{16 * (k + 1)}.0/20")

    def node_veth(self, k: int) -> str:
        """Host-side veth of node k (its peer is eth0 in the node's network namespace)."""
        _check_node(k)
        return f"ftn{self.index}x{k}"

    @property
    def kwok_cidr(self) -> ipaddress.IPv4Network:
        """Pod IPs kwok hands out to pods on simulated nodes."""
        return ipaddress.IPv4Network(f"10.{213 + self.index}.240.0/20")

    @property
    def cgroup_root(self) -> str:
        """Top cgroup (in every hierarchy) under which this cluster's kubelets put their pods."""
        return f"/ftdc{self.index}"


def _check_node(k: int) -> None:
    if not 0 <= k < MAX_REAL_NODES:
        raise ValueError(f"real node index {k} out of range 0..{MAX_REAL_NODES - 1}")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip` and raise with its stderr on failure."""
    res = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def link_exists(name: str) -> bool:
    """Whether a link with this name exists in the host namespace."""
    return ip("link", "show", name, check=False).returncode == 0


bridge_exists = link_exists


def claim_index(owner: Path, *, is_alive: Callable[[Path], bool]) -> int:
    """Atomically claim a network index for the cluster in `owner` (several clusters may share a machine).

    A claim is a file created with O_EXCL naming its owner's state dir; a claim whose owner is no longer
    running is taken over.
    """
    CLAIMS.mkdir(parents=True, exist_ok=True)
    for i in range(MAX_INDEX):
        path = CLAIMS / f"net-{i}"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = Path(path.read_text().strip())
            except OSError:
                continue
            fresh = time.time() - path.stat().st_mtime < 120  # owner may still be starting up
            if holder == owner or not (fresh or is_alive(holder)):
                path.write_text(str(owner))
                return i
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(owner))
        if bridge_exists(f"ftbr{i}"):  # left by something we know nothing about: keep away from it
            continue
        return i
    raise RuntimeError(f"no free devcluster network index (see {CLAIMS}); run `make cluster-down`")


def claimed_indexes() -> dict[int, Path]:
    """Every index currently claimed on this machine, with the state dir of its owner."""
    out: dict[int, Path] = {}
    for i in range(MAX_INDEX):
        with contextlib.suppress(OSError):
            out[i] = Path((CLAIMS / f"net-{i}").read_text().strip())
    return out


def release_index(index: int, owner: Path) -> None:
    """Drop our claim (only if we still hold it)."""
    path = CLAIMS / f"net-{index}"
    with contextlib.suppress(OSError):
        if Path(path.read_text().strip()) == owner:
            path.unlink()


def ensure_bridge(cfg: NetConfig) -> None:
    """Create the bridge with the gateway address (idempotent)."""
    if not bridge_exists(cfg.bridge):
        ip("link", "add", cfg.bridge, "type", "bridge")
    have = ip("-o", "addr", "show", "dev", cfg.bridge).stdout
    if f"{cfg.gateway}/" not in have:
        ip("addr", "add", f"{cfg.gateway}/{cfg.cidr.prefixlen}", "dev", cfg.bridge)
    ip("link", "set", cfg.bridge, "up")


def owned_links(cfg: NetConfig) -> list[str]:
    """Host links of this cluster: the bridge and the real nodes' veths."""
    out = []
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        link = parts[1].strip().split("@")[0]
        if link == cfg.bridge or link.startswith(f"ftn{cfg.index}x"):
            out.append(link)
    return out


def sweep(cfg: NetConfig) -> list[str]:
    """Delete every link of this cluster (used by `down`, also after a crash); return what went.

    Real nodes' network namespaces are unnamed: they go with the node's init process, not here.
    """
    removed = []
    links = owned_links(cfg)
    for link in links:  # veths first: deleting one end removes its peer in a node's namespace too
        if link != cfg.bridge:
            ip("link", "del", link, check=False)
    if cfg.bridge in links:
        ip("link", "del", cfg.bridge, check=False)  # its routes (pod CIDRs via node IPs) go with it
        removed.append(cfg.bridge)
    return removed
