"""Pod networking for the process node: one Linux network namespace per pod on a host bridge.

This gives every pod its own IP and port space (two pods can both listen on :8080), lets host processes
reach pod IPs directly and lets pods reach host services on the bridge's gateway IP. There is no kube-proxy:
Service names resolve through a per-pod hosts file (see `hosts_entries`) straight to pod IPs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from devcluster.network import NETNS_ETC, NetConfig, ip
from devcluster.nodeconfig import CLUSTER_DOMAIN

__all__ = ["NETNS_ETC", "NetConfig", "create_sandbox", "delete_sandbox", "hosts_file", "service_addresses"]


def create_sandbox(cfg: NetConfig, *, uid: str, pod_ip: str) -> str:
    """Create the pod's netns with eth0=`pod_ip` bridged to the host; return the netns name."""
    ns = cfg.netns(uid)
    veth = cfg.veth(uid)
    delete_sandbox(cfg, uid=uid)
    ip("netns", "add", ns)
    ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    ip("link", "set", veth, "master", cfg.bridge, "up")
    ip("-n", ns, "addr", "add", f"{pod_ip}/{cfg.cidr.prefixlen}", "dev", "eth0")
    ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", ns, "link", "set", "eth0", "up")
    ip("-n", ns, "route", "add", "default", "via", cfg.gateway)
    (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
    return ns


def delete_sandbox(cfg: NetConfig, *, uid: str) -> None:
    """Remove the pod's netns, veth and /etc/netns files; missing pieces are fine."""
    ns = cfg.netns(uid)
    ip("link", "del", cfg.veth(uid), check=False)
    ip("netns", "del", ns, check=False)
    d = NETNS_ETC / ns
    if d.is_dir():
        for f in d.iterdir():
            with contextlib.suppress(OSError):
                f.unlink()
        with contextlib.suppress(OSError):
            d.rmdir()


def write_in_place(path: Path, content: str) -> bool:
    """Rewrite a file keeping its inode (bind mounts made by `ip netns exec` keep seeing it); True if changed."""
    try:
        if path.read_text() == content:
            return False
    except OSError:
        pass
    with path.open("a+") as f:
        f.seek(0)
        f.truncate()
        f.write(content)
    return True


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def service_addresses(
    svc: Mapping[str, Any], *, pods: Iterable[Mapping[str, Any]], slices: Iterable[Mapping[str, Any]]
) -> list[str]:
    """IPs a Service name resolves to: selected Running pods (ready first), or its EndpointSlices if selector-less."""
    meta = svc.get("metadata") or {}
    ns = meta.get("namespace")
    selector = (svc.get("spec") or {}).get("selector") or {}
    if not selector:
        out: list[str] = []
        for sl in slices:
            smeta = sl.get("metadata") or {}
            if smeta.get("namespace") != ns or (smeta.get("labels") or {}).get(
                "kubernetes.io/service-name"
            ) != meta.get("name"):
                continue
            for ep in sl.get("endpoints") or []:
                if (ep.get("conditions") or {}).get("ready") is False:
                    continue
                out.extend(a for a in ep.get("addresses") or [] if a not in out)
        return out
    ready: list[str] = []
    running: list[str] = []
    for pod in pods:
        pmeta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        if pmeta.get("namespace") != ns or pmeta.get("deletionTimestamp") or not status.get("podIP"):
            continue
        if status.get("phase") != "Running":
            continue
        labels = pmeta.get("labels") or {}
        if all(labels.get(k) == v for k, v in selector.items()):
            (ready if _pod_ready(pod) else running).append(str(status["podIP"]))
    return sorted(ready) + sorted(running)


def hosts_file(
    *,
    pod: Mapping[str, Any],
    pod_ip: str,
    services: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    slices: Iterable[Mapping[str, Any]],
    api_ip: str | None = None,
) -> str:
    """/etc/hosts content for one pod: itself, then every Service name as cluster DNS would resolve it.

    `default/kubernetes` resolves to `api_ip` (the node's forwarder to the API server) because its real
    endpoint is the API server's loopback address, which means the pod itself inside a network namespace.
    """
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    ns = meta.get("namespace", "default")
    hostname = spec.get("hostname") or meta.get("name", "")
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    own = [hostname]
    if spec.get("subdomain"):
        own.insert(0, f"{hostname}.{spec['subdomain']}.{ns}.svc.{CLUSTER_DOMAIN}")
    lines.append(f"{pod_ip}\t{' '.join(own)}")
    pod_list = list(pods)
    slice_list = list(slices)
    svc_names: set[tuple[str, str]] = set()
    for svc in services:
        smeta = svc.get("metadata") or {}
        name, sns = smeta.get("name", ""), smeta.get("namespace", "")
        svc_names.add((sns, name))
        fqdn = f"{name}.{sns}.svc.{CLUSTER_DOMAIN}"
        names = [fqdn, f"{name}.{sns}.svc", f"{name}.{sns}"]
        if sns == ns:
            names.append(name)  # the short name only resolves via the pod's own namespace search domain
        addrs = service_addresses(svc, pods=pod_list, slices=slice_list)
        if (sns, name) == ("default", "kubernetes"):
            addrs = [api_ip] if api_ip else []
        for addr in addrs:
            lines.append(f"{addr}\t{' '.join(names)}")
    # Per-pod records of headless services: <hostname>.<subdomain>.<ns>.svc.cluster.local.
    for other in pod_list:
        ometa = other.get("metadata") or {}
        ospec = other.get("spec") or {}
        oip = (other.get("status") or {}).get("podIP")
        sub = ospec.get("subdomain")
        if not oip or not sub or ometa.get("deletionTimestamp") or other is pod:
            continue
        ons = ometa.get("namespace", "")
        if (ons, sub) not in svc_names or ometa.get("uid") == meta.get("uid"):
            continue
        host = ospec.get("hostname") or ometa.get("name", "")
        lines.append(f"{oip}\t{host}.{sub}.{ons}.svc.{CLUSTER_DOMAIN}")
    return "\n".join(lines) + "\n"
