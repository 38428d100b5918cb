"""devcluster's pure parts: per-cluster addresses, the real node's configuration, kwok nodes and pod endings."""

from __future__ import annotations

import datetime as dt
import ipaddress
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devcluster import kwok, realnode
from devcluster.cluster import renewed_since
from devcluster.network import MAX_REAL_NODES, NetConfig
from devcluster.nodeconfig import (
    CLUSTER_DNS,
    NODE_BINDS,
    NodePlan,
    cni_config,
    containerd_config,
    holder_script,
    kube_proxy_config,
    kubelet_args,
    kubelet_config,
    node_labels,
)


def plan(index: int = 3, k: int = 0, name: str = "node-0") -> NodePlan:
    return NodePlan(name=name, k=k, net=NetConfig(index), cluster_state=Path("/state"))


@dataclass
class AddrCase:
    name: str
    index: int
    k: int
    node_ip: str
    pod_cidr: str
    veth: str


ADDR_CASES = [
    AddrCase("first cluster, first node", 0, 0, "10.213.0.10", "10.213.16.0/20", "ftn0x0"),
    AddrCase("first cluster, second node", 0, 1, "10.213.0.11", "10.213.32.0/20", "ftn0x1"),
    AddrCase("last cluster, last node", 31, MAX_REAL_NODES - 1, "10.244.0.23", "10.244.224.0/20", "ftn31x13"),
]


@pytest.mark.parametrize("case", ADDR_CASES, ids=lambda c: c.name)
def test_node_addresses(case: AddrCase) -> None:
    net = NetConfig(case.index)
    assert (net.node_ip(case.k), str(net.pod_cidr(case.k)), net.node_veth(case.k)) == (
        case.node_ip,
        case.pod_cidr,
        case.veth,
    )
    assert len(net.node_veth(case.k)) <= 15  # the kernel's interface name limit


def test_addresses_of_one_cluster_never_overlap() -> None:
    net = NetConfig(7)
    subnets = [net.pod_cidr(k) for k in range(MAX_REAL_NODES)] + [net.kwok_cidr]
    nodes_net = ipaddress.IPv4Network("10.220.0.0/24")
    assert all(nodes_net.network_address + 10 + k in nodes_net for k in range(MAX_REAL_NODES))
    for i, a in enumerate(subnets):
        assert a.subnet_of(net.cidr) and not a.overlaps(nodes_net)
        assert not any(a.overlaps(b) for b in subnets[i + 1 :]), a


def test_clusters_on_one_machine_get_disjoint_networks_and_cgroups() -> None:
    a, b = NetConfig(0), NetConfig(1)
    assert not a.cidr.overlaps(b.cidr)
    assert len({a.bridge, b.bridge}) == len({a.cgroup_root, b.cgroup_root}) == 2
    assert plan(0, 0).cgroup_root != plan(1, 0).cgroup_root != plan(1, 1, "node-1").cgroup_root


@pytest.mark.parametrize("k", [-1, MAX_REAL_NODES])
def test_node_index_out_of_range_is_refused(k: int) -> None:
    with pytest.raises(ValueError, match="real node index"):
        NetConfig(0).node_ip(k)


def test_containerd_config_has_what_this_machine_needs() -> None:
    cfg = tomllib.loads(containerd_config(plan(), sandbox_image="localhost/finetune/pause:abc"))
    runtime = cfg["plugins"]["io.containerd.cri.v1.runtime"]
    assert cfg["version"] == 3
    assert runtime["restrict_oom_score_adj"] is True  # no CAP_SYS_RESOURCE here
    assert runtime["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False
    assert cfg["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"] == "localhost/finetune/pause:abc"
    assert cfg["root"] == "/state/nodes/node-0/containerd"
    assert cfg["grpc"]["address"] == "/run/containerd/containerd.sock"  # bind-mounted per node
    assert "io.containerd.nri.v1.nri" in cfg["disabled_plugins"]  # its socket path is machine-wide


def test_kubelet_config_uses_the_cluster_ca_and_webhook_auth() -> None:
    cfg = kubelet_config(plan(), ca=Path("/pki/ca.crt"), serving_cert=Path("/s.crt"), serving_key=Path("/s.key"))
    assert cfg["authentication"]["anonymous"] == {"enabled": False}
    assert cfg["authentication"]["webhook"]["enabled"] is True
    assert cfg["authentication"]["x509"]["clientCAFile"] == "/pki/ca.crt"
    assert cfg["authorization"] == {"mode": "Webhook"}
    assert (cfg["cgroupDriver"], cfg["failCgroupV1"], cfg["cgroupRoot"]) == ("cgroupfs", False, "/ftdc3/node-0")
    assert cfg["clusterDNS"] == [CLUSTER_DNS]
    assert cfg["address"] == "10.216.0.10"


def test_kubelet_registers_the_kind_worker_labels() -> None:
    labels = node_labels(plan())
    assert labels["finetune.dev/pool"] == "cpu"  # like the workers in kind-config.yaml
    flag = next(
        a for a in kubelet_args(plan(), config=Path("/c"), kubeconfig=Path("/k")) if a.startswith("--node-labels=")
    )
    assert "finetune.dev/pool=cpu" in flag.split("=", 1)[1].split(",")


def test_cni_and_kube_proxy_use_the_node_and_cluster_ranges() -> None:
    bridge = cni_config(plan())["plugins"][0]
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.216.16.0/20"}]]
    assert bridge["ipMasq"] is False and bridge["hairpinMode"] is True
    proxy = kube_proxy_config(plan(), kubeconfig=Path("/kp"))
    assert (proxy["mode"], proxy["clusterCIDR"], proxy["conntrack"]["maxPerCore"]) == ("iptables", "10.216.0.0/16", 0)


def test_node_init_mounts_private_directories_before_it_becomes_pid_1() -> None:
    script = holder_script(plan(), pause=Path("/bin/init")).splitlines()
    assert script[-1] == "exec /bin/init"
    for src, dst in NODE_BINDS:
        assert f"mount --bind /state/nodes/node-0/{src} {dst}" in script
    assert script.index("mount --make-rshared /") < script.index("exec /bin/init")


def test_kwok_node_manifest() -> None:
    node = kwok.node_manifest(
        kwok.KwokNode(name="gpu-1", gpus=4, labels={"pool": "gpu"}, taints=[{"key": "g", "effect": "NoSchedule"}])
    )
    assert node["metadata"]["annotations"] == {kwok.KWOK_ANNOTATION: "fake"}
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "4"
    assert node["metadata"]["labels"]["pool"] == "gpu"
    assert node["spec"]["taints"] == [{"key": "g", "effect": "NoSchedule"}]


def running_pod(*names: str) -> dict[str, Any]:
    return {
        "spec": {"containers": [{"name": n, "image": "img"} for n in names]},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {"name": n, "restartCount": 1, "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}
                for n in names
            ],
        },
    }


@dataclass
class EndCase:
    name: str
    exit_code: int
    message: str | None
    phase: str
    reason: str
    first_message: str | None


END_CASES = [
    EndCase("success", 0, None, "Succeeded", "Completed", None),
    EndCase("failure with message", 3, '{"reason": "NaNLoss"}', "Failed", "Error", '{"reason": "NaNLoss"}'),
    EndCase("message capped like the kubelet", 1, "x" * 5000, "Failed", "Error", "x" * 4096),
]


@pytest.mark.parametrize("case", END_CASES, ids=lambda c: c.name)
def test_end_pod_status(case: EndCase) -> None:
    patch = kwok.end_pod_status(running_pod("main", "side"), exit_code=case.exit_code, message=case.message)
    status = patch["status"]
    first, second = status["containerStatuses"]
    assert status["phase"] == case.phase
    for cs in (first, second):
        term = cs["state"]["terminated"]
        assert (term["exitCode"], term["reason"]) == (case.exit_code, case.reason)
        assert term["startedAt"] == "2026-01-01T00:00:00Z" and cs["restartCount"] == 1
    assert first["state"]["terminated"].get("message") == case.first_message
    assert "message" not in second["state"]["terminated"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Ready": "False", "ContainersReady": "False"}


@pytest.mark.parametrize(
    ("lease", "renewed"),
    [
        ({"spec": {"renewTime": "2026-12-07T21:30:01.500000Z"}}, True),
        ({"spec": {"renewTime": "2026-12-07T21:29:59.000000Z"}}, False),
        ({"spec": {}}, False),
        ({}, False),
    ],
    ids=["after", "before", "never", "no-spec"],
)
def test_a_restarted_kubelet_is_back_once_it_renewed_its_lease(lease: dict[str, Any], renewed: bool) -> None:
    since = dt.datetime(2026, 12, 7, 21, 30, 0, tzinfo=dt.UTC)
    assert renewed_since(lease, since) is renewed


def test_only_node_daemons_restart_in_place(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be restarted"):
        realnode.restart_component("node-0", "init", pid_dir=tmp_path, log_dir=tmp_path, die_with_caller=False)
