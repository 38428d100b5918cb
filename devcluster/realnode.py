"""A real Kubernetes node: containerd + kubelet + kube-proxy in the node's own PID, network and mount namespaces.

This is what kind does with a container per node, without a container engine: `unshare` creates the
namespaces around a tiny init (PID 1, reaps orphans, exits on SIGTERM), a veth joins the node's network
namespace to the cluster's host bridge, and each component is started inside with `nsenter`. Stopping the
init makes the kernel kill everything in the node's PID namespace and drop its mount and network namespaces,
so nothing a node did can outlive it except its cgroups, which `stop` removes.

Processes recorded in the cluster's pid dir, per node: `<node>-init`, `<node>-containerd`, `<node>-kubelet`,
`<node>-kube-proxy`; their logs are `<state>/logs/<same name>.log`.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from devcluster import cgroups, images, pki, procs
from devcluster.binaries import NodeBinaries, cache_dir
from devcluster.controlplane import tail_file, write_kubeconfig
from devcluster.network import ip
from devcluster.nodeconfig import (
    NODE_BINDS,
    NodePlan,
    cni_config,
    containerd_config,
    holder_script,
    kube_proxy_config,
    kubelet_args,
    kubelet_config,
)

INIT_C = r"""
#include <signal.h>
#include <unistd.h>
#include <sys/wait.h>
/* PID 1 of a dev-cluster node's namespaces: reaps orphans (exited shims), exits on SIGTERM/SIGINT. */
static void down(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
  struct sigaction d = {.sa_handler = down}, r = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
  sigaction(SIGINT, &d, 0);
  sigaction(SIGTERM, &d, 0);
  sigaction(SIGCHLD, &r, 0);
  for (;;) pause();
}
"""
# Stop order within a node: kubelet first (it would otherwise restart what we stop), then the init, whose
# exit takes down everything else in the node's namespaces.
COMPONENTS = ("kubelet", "kube-proxy", "containerd", "init")
# Daemons a test may restart in place (as a node's service manager does after a crash or an upgrade).
RESTARTABLE = ("kubelet", "containerd", "kube-proxy")
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NODE_ENV = {"PATH": NODE_PATH, "HOME": "/root", "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class ClusterAccess:
    """What node components need to reach the control plane."""

    server: str
    pki_dir: Path
    pid_dir: Path
    log_dir: Path
    die_with_caller: bool


def node_init_binary() -> Path:
    """The init program, compiled once per source version into the cache (gcc -static)."""
    tag = hashlib.sha256(INIT_C.encode()).hexdigest()[:12]
    out = cache_dir() / "node-init" / tag / "init"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        src = out.with_suffix(".c")
        src.write_text(INIT_C)
        tmp = out.with_suffix(".tmp")
        subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(tmp), str(src)], check=True)
        tmp.rename(out)
    return out


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_files(plan: NodePlan, *, access: ClusterAccess, sandbox_image: str) -> dict[str, Path]:
    """Certificates, kubeconfigs and config files of the node's components; returns their paths by role."""
    for d in ("etc", "containerd", "cni-conf", *(src for src, _dst in NODE_BINDS)):
        (plan.dir / d).mkdir(parents=True, exist_ok=True)
    certs = pki.issue_node(access.pki_dir, name=plan.name, ip=plan.ip)
    proxy = pki.issue_client(access.pki_dir, stem="kube-proxy", user="system:kube-proxy")
    ca = access.pki_dir / "ca.crt"
    kubelet_kc = write_kubeconfig(
        plan.etc / "kubelet.kubeconfig",
        server=access.server,
        ca=ca,
        user=f"system:node:{plan.name}",
        cert=certs.client.cert,
        key=certs.client.key,
    )
    proxy_kc = write_kubeconfig(
        plan.etc / "kube-proxy.kubeconfig",
        server=access.server,
        ca=ca,
        user="system:kube-proxy",
        cert=proxy.cert,
        key=proxy.key,
    )
    kcfg = kubelet_config(plan, ca=ca, serving_cert=certs.serving.cert, serving_key=certs.serving.key)
    return {
        "containerd": _write(plan.etc / "containerd.toml", containerd_config(plan, sandbox_image=sandbox_image)),
        "cni": _write(plan.dir / "cni-conf" / "10-devcluster.conflist", json.dumps(cni_config(plan), indent=2)),
        "kubelet": _write(plan.etc / "kubelet.yaml", yaml.safe_dump(kcfg, sort_keys=False)),
        "kubelet-kubeconfig": kubelet_kc,
        "kube-proxy": _write(
            plan.etc / "kube-proxy.yaml", yaml.safe_dump(kube_proxy_config(plan, kubeconfig=proxy_kc))
        ),
    }


def _spawn(
    plan: NodePlan, component: str, *, argv: Sequence[str], access: ClusterAccess, death: int = signal.SIGTERM
) -> None:
    procs.spawn(
        name=plan.proc_name(component),
        argv=argv,
        log_path=access.log_dir / f"{plan.proc_name(component)}.log",
        pid_dir=access.pid_dir,
        env=NODE_ENV,
        die_with_parent=access.die_with_caller,
        death_signal=death,
    )


def _alive(plan: NodePlan, *, access: ClusterAccess) -> None:
    for rec in procs.recorded(access.pid_dir):
        if rec.name.startswith(f"{plan.name}-") and not rec.alive():
            tail = tail_file(access.log_dir / f"{rec.name}.log", lines=30)
            raise RuntimeError(f"{rec.name} exited while starting node {plan.name}; last log lines:\n{tail}")


def _wait(check: Callable[[], bool], *, plan: NodePlan, access: ClusterAccess, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        _alive(plan, access=access)
        if time.monotonic() > deadline:
            raise TimeoutError(f"node {plan.name}: {what} not ready after {timeout:.0f}s; see {access.log_dir}")
        time.sleep(0.1)


def start_init(plan: NodePlan, *, access: ClusterAccess) -> int:
    """Create the node's namespaces around the init; return the init's host pid (the namespaces' handle)."""
    ready = plan.dir / "holder.ready"
    ready.unlink(missing_ok=True)
    for _src, dst in NODE_BINDS:
        Path(dst).mkdir(parents=True, exist_ok=True)  # mountpoints must exist (empty, on the host)
    # unshare ignores SIGTERM while it waits for its child, so the caller's death kills it (SIGKILL) and
    # --kill-child passes that on to the init: the whole node goes with the caller.
    argv = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--net", "--mount", "--propagation=private"]
    script = holder_script(plan, pause=node_init_binary())
    _spawn(plan, "init", argv=[*argv, "--", "sh", "-c", script], access=access, death=signal.SIGKILL)
    _wait(ready.exists, plan=plan, access=access, what="namespaces", timeout=20)
    rec = next(r for r in procs.recorded(access.pid_dir) if r.name == plan.proc_name("init"))
    children = psutil.Process(rec.pid).children()
    if len(children) != 1:
        raise RuntimeError(f"node {plan.name}: expected one init under unshare pid {rec.pid}, found {children}")
    return int(children[0].pid)


def nsenter(init_pid: int, *argv: str) -> list[str]:
    """argv run inside the node (its PID, network and mount namespaces)."""
    return ["nsenter", f"--target={init_pid}", "--pid", "--net", "--mount", "--", *argv]


def plumb(plan: NodePlan, *, init_pid: int) -> None:
    """Join the node's network namespace to the cluster bridge: eth0 with the node IP, default via the host."""
    veth = plan.net.node_veth(plan.k)
    ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", str(init_pid))
    ip("link", "set", veth, "master", plan.net.bridge, "up")
    inside = ["nsenter", f"--target={init_pid}", "--net", "ip"]
    for args in (
        ("addr", "add", f"{plan.ip}/24", "dev", "eth0"),
        ("link", "set", "eth0", "up"),
        ("route", "add", "default", "via", plan.net.gateway),
    ):
        subprocess.run([*inside, *args], check=True, capture_output=True, text=True)
    ip("route", "replace", plan.pod_cidr, "via", plan.ip)  # the host reaches this node's pods


def route_between(nodes: Sequence[tuple[NodePlan, int]]) -> None:
    """Each node reaches every other node's pods directly over the bridge (no host forwarding needed)."""
    for plan, pid in nodes:
        for other, _ in nodes:
            if other.name != plan.name:
                subprocess.run(
                    ["nsenter", f"--target={pid}", "--net", "ip", "route", "replace", other.pod_cidr, "via", other.ip],
                    check=True,
                    capture_output=True,
                )


def start(
    plan: NodePlan,
    *,
    access: ClusterAccess,
    bins: NodeBinaries,
    node_images: Sequence[images.Image],
    sandbox_image: str,
    log: Callable[[str], None],
) -> int:
    """Start one node (namespaces, containerd with the images, kubelet, kube-proxy); return its init pid."""
    cgroups.create(plan.cgroup_root)
    files = write_files(plan, access=access, sandbox_image=sandbox_image)
    init_pid = start_init(plan, access=access)
    plumb(plan, init_pid=init_pid)
    containerd_argv = [
        f"PATH={bins.containerd_bin_dir}:{NODE_PATH}",
        str(bins.containerd),
        f"--config={files['containerd']}",
    ]
    _spawn(plan, "containerd", argv=nsenter(init_pid, "env", *containerd_argv), access=access)
    _wait(plan.containerd_socket.exists, plan=plan, access=access, what="containerd socket", timeout=30)
    images.load_into_containerd(node_images, address=plan.containerd_socket, registry_host=plan.net.gateway, log=log)
    kubelet = [str(bins.kubelet), *kubelet_args(plan, config=files["kubelet"], kubeconfig=files["kubelet-kubeconfig"])]
    _spawn(plan, "kubelet", argv=nsenter(init_pid, *kubelet), access=access)
    proxy = [str(bins.kube_proxy), f"--config={files['kube-proxy']}", "--v=1"]
    _spawn(plan, "kube-proxy", argv=nsenter(init_pid, *proxy), access=access)
    return init_pid


def restart_component(
    node: str, component: str, *, pid_dir: Path, log_dir: Path, die_with_caller: bool, grace: float = 10.0
) -> None:
    """Stop one daemon of a running node (SIGTERM to its group, SIGKILL after `grace`) and start it again with the
    same command line. Its containers are not its children's group: containerd's shims (their own process groups)
    and the pods they run survive a containerd restart, and the kubelet adopts running pods when it comes back."""
    if component not in RESTARTABLE:
        raise ValueError(f"{component} cannot be restarted in place; one of {RESTARTABLE}")
    name = f"{node}-{component}"
    rec = next((r for r in procs.recorded(pid_dir) if r.name == name and r.alive()), None)
    if rec is None:
        raise RuntimeError(f"{name} is not running (pidfiles in {pid_dir})")
    argv = psutil.Process(rec.pid).cmdline()
    procs.stop_group(rec.pid, grace=grace)
    procs.spawn(
        name=name,
        argv=argv,
        log_path=log_dir / f"{name}.log",
        pid_dir=pid_dir,
        env=NODE_ENV,
        die_with_parent=die_with_caller,
        death_signal=signal.SIGTERM,
    )


def stop_order(names: Sequence[str]) -> list[str]:
    """Recorded process names of real nodes in the order they must be stopped."""
    return [n for c in COMPONENTS for n in names if n.endswith(f"-{c}")]


def cleanup(plan: NodePlan) -> list[Path]:
    """After the node's processes are gone: remove its cgroups and heavy state; return cgroups left behind."""
    left = cgroups.remove(plan.cgroup_root)
    for d in ("containerd", "kubelet", "run", "cni-lib", "pod-logs", "log-containers"):
        subprocess.run(["rm", "-rf", "--one-file-system", str(plan.dir / d)], check=False)
    return left


def in_node(init_pid: int, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command inside a running node (for tests and debugging: crictl, iptables-save, ...)."""
    return subprocess.run(nsenter(init_pid, *argv), capture_output=True, text=True, timeout=timeout, check=False)


def init_pid(pid_dir: Path, name: str) -> int | None:
    """Host pid of the init of node `name` (None when it is not running)."""
    for rec in procs.recorded(pid_dir):
        if rec.name == f"{name}-init" and rec.alive():
            kids = psutil.Process(rec.pid).children()
            return int(kids[0].pid) if kids else None
    return None
