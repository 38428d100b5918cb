"""Pure configuration of a real node: paths, containerd's config.toml, the CNI conflist, kubelet and kube-proxy
configuration. No I/O here, so every choice is visible (and unit-tested) in one place; devcluster.realnode
writes these files and starts the processes.

Why some values are what they are (all checked on this machine, see docs/dev-cluster.md):
- `restrict_oom_score_adj = true`: processes here lack CAP_SYS_RESOURCE; without it the sandbox's negative
  oom_score_adj makes runc's init fail ("can't get final child's PID from pipe: EOF").
- `cgroupDriver: cgroupfs`, `SystemdCgroup = false`: there is no systemd; `failCgroupV1: false`: this kernel
  mounts cgroup v1 (hybrid), which kubelet v1.34 refuses by default.
- `cgroupRoot: /ftdc<i>/<node>`: pods of different clusters and nodes never share a cgroup, and `down` can
  remove exactly its own subtree.
- image garbage collection off and eviction thresholds at 1 %: images here are imported, never pulled, so a
  collected image cannot come back; and a shared disk filling up must not evict test pods.
- `netns_mounts_under_state_dir`: pod network namespaces are pinned under the node's private /run/containerd.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devcluster.network import NetConfig

CLUSTER_DOMAIN = "cluster.local"
SERVICE_CIDR = "10.96.0.0/16"
CLUSTER_DNS = "10.96.0.10"
KUBELET_PORT = 10250
# Host directories bind-mounted over these paths in the node's private mount namespace (relative to the
# node's state dir): everything a kubelet/containerd/CNI plugin writes at a fixed path stays per node, and the
# paths the node's unix sockets live under stay short (a socket path may not exceed 107 bytes, and a pytest
# tmp dir is already 70).
NODE_BINDS: tuple[tuple[str, str], ...] = (
    ("run", "/run/containerd"),  # containerd state, its sockets, shim sockets, runc state, pod netns pins
    ("kubelet", "/var/lib/kubelet"),  # kubelet's root dir: pod volumes, plugin and pod-resources sockets
    ("pod-logs", "/var/log/pods"),  # container logs
    ("log-containers", "/var/log/containers"),  # kubelet's symlinks to container logs
    ("cni-lib", "/var/lib/cni"),  # CNI result cache and host-local IP allocations
)
NODE_LABEL = "devcluster.finetune.dev/node"


@dataclass(frozen=True)
class NodePlan:
    """Everything about real node number `k` of a cluster, derived from the cluster's network and state dir."""

    name: str
    k: int
    net: NetConfig
    cluster_state: Path
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        """The node's own state directory on the host."""
        return self.cluster_state / "nodes" / self.name

    @property
    def ip(self) -> str:
        """The node's InternalIP (eth0 in its network namespace)."""
        return self.net.node_ip(self.k)

    @property
    def pod_cidr(self) -> str:
        """Pod subnet of this node."""
        return str(self.net.pod_cidr(self.k))

    @property
    def cgroup_root(self) -> str:
        """kubelet's cgroupRoot: unique per cluster and node."""
        return f"{self.net.cgroup_root}/{self.name}"

    @property
    def containerd_socket(self) -> Path:
        """containerd's socket as the host sees it (inside the node: /run/containerd/containerd.sock)."""
        return self.dir / "run" / "containerd.sock"

    @property
    def etc(self) -> Path:
        """Configuration files and kubeconfigs of the node's components."""
        return self.dir / "etc"

    def proc_name(self, component: str) -> str:
        """pidfile/log name of one of the node's processes."""
        return f"{self.name}-{component}"


def node_labels(plan: NodePlan) -> dict[str, str]:
    """Labels kubelet registers the node with: the kind worker label plus ours (NodeRestriction allows both)."""
    return {"finetune.dev/pool": "cpu", NODE_LABEL: "real", **plan.labels}


def containerd_config(plan: NodePlan, *, sandbox_image: str) -> str:
    """containerd 2.x config (version 3) for this node."""
    inside = "/run/containerd"
    return f"""version = 3
root = {json.dumps(str(plan.dir / "containerd"))}
state = "{inside}"
disabled_plugins = [
  "io.containerd.nri.v1.nri",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{inside}/containerd.sock"

[plugins.'io.containerd.internal.v1.opt']
  path = {json.dumps(str(plan.dir / "opt"))}

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = {json.dumps(sandbox_image)}

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_unprivileged_ports = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = {json.dumps(str(plan.dir / "cni-conf"))}

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def cni_config(plan: NodePlan) -> dict[str, Any]:
    """The node's CNI network: a Linux bridge with host-local IPs from the node's pod CIDR, plus hostPorts."""
    return {
        "cniVersion": "1.0.0",
        "name": "devcluster",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": False,  # pods keep their IPs: the host and other nodes route to them directly
                "hairpinMode": True,  # a pod reaches itself through its own Service VIP
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": plan.pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(plan: NodePlan, *, ca: Path, serving_cert: Path, serving_key: Path) -> dict[str, Any]:
    """KubeletConfiguration: TLS from the cluster CA, authn/authz delegated to the API server, cgroupfs."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": plan.ip,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "tlsCertFile": str(serving_cert),
        "tlsPrivateKeyFile": str(serving_key),
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True, "cacheTTL": "30s"},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": plan.cgroup_root,
        "cgroupsPerQOS": True,
        "failCgroupV1": False,
        "failSwapOn": False,
        "clusterDomain": CLUSTER_DOMAIN,
        "clusterDNS": [CLUSTER_DNS],
        "maxPods": 110,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "nodeStatusReportFrequency": "10s",
        "syncFrequency": "10s",
        "shutdownGracePeriod": "0s",
    }


def kubelet_args(plan: NodePlan, *, config: Path, kubeconfig: Path) -> list[str]:
    """kubelet's command-line flags (what cannot go into its configuration file)."""
    labels = ",".join(f"{k}={v}" for k, v in sorted(node_labels(plan).items()))
    return [
        f"--config={config}",
        f"--kubeconfig={kubeconfig}",
        f"--hostname-override={plan.name}",
        f"--node-ip={plan.ip}",
        f"--node-labels={labels}",
        "--root-dir=/var/lib/kubelet",
        "--v=1",
    ]


def kube_proxy_config(plan: NodePlan, *, kubeconfig: Path) -> dict[str, Any]:
    """KubeProxyConfiguration: iptables mode in the node's own network namespace.

    conntrack sizing is left alone (maxPerCore 0): nf_conntrack_max is a host-wide setting that a process in
    a network namespace may not change, and the host's is not ours to change.
    """
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": plan.name,
        "bindAddress": "0.0.0.0",
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "clusterCIDR": str(plan.net.cidr),
        "detectLocalMode": "ClusterCIDR",
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"minSyncPeriod": "1s", "syncPeriod": "30s"},
    }


def holder_script(plan: NodePlan, *, pause: Path) -> str:
    """What PID 1 of the node's namespaces runs first: private mounts, loopback, forwarding; then `pause`.

    The namespaces live as long as this process: when it exits (SIGTERM, or the caller dying) the kernel
    kills every process in the node's PID namespace (kubelet, containerd, shims, containers) and the mount
    and network namespaces go with them -- mounts, veths, pod netns and iptables rules included.
    """
    lines = ["set -e", "mount --make-rshared /"]
    for src, dst in NODE_BINDS:
        lines.append(f"mount --bind {plan.dir / src} {dst}")
    lines += [
        "ip link set lo up",
        "echo 1 > /proc/sys/net/ipv4/ip_forward",
        "echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables",
        f": > {plan.dir / 'holder.ready'}",
        f"exec {pause}",
    ]
    return "\n".join(lines)
