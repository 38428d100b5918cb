"""What a kubelet does for one pod, with local processes instead of containers.

A `PodRuntime` owns one pod bound to a process node: its network namespace, its volumes (materialised as
host directories and bind-mounted in a private mount namespace), one process group per container, restarts
with back-off, probes, and the pod status it reports. It is driven by `sync()` from the node's single
kubelet loop, so no locking is needed inside; probes run on a small thread pool and only hand back results.

Container processes are started as
    ip netns exec <ns> unshare --uts sh -c '<hostname; bind mounts; cd>; exec "$@"' sh <command...>
which keeps the container's pid equal to the process we spawned (every step execs), isolates its network,
hostname and mounts, and shares the host filesystem otherwise (there are no images).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from devcluster import procs
from devcluster.kube import Obj, call_json
from tests.devcluster import network
from tests.devcluster.scheduling import quantity

log = logging.getLogger("devcluster.runtime")

ANN_SIMULATE_EXIT = "devcluster.finetune.dev/simulate-exit"
ANN_SIMULATE_MESSAGE = "devcluster.finetune.dev/simulate-message"
UNPULLABLE_PREFIX = "unpullable.invalid/"
MAX_TERM_MSG = 4096
MAX_TERM_LOG_BYTES = 2048
MAX_TERM_LOG_LINES = 80
BASE_ENV_PASSTHROUGH = (
    "LANG",
    "LC_ALL",
    "TZ",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "RAY_USAGE_STATS_ENABLED",
    "FT_CACHE",
)


# Mounting over these would break every process in the pod (they share the host filesystem).
PROTECTED_EXACT = frozenset(
    Path(p) for p in ("/", "/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64", "/proc", "/sys", "/dev", "/run", "/var")
)
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TERMINATION_LOG = Path("/dev/termination-log")


class ConfigError(Exception):
    """The pod references something that does not exist (yet): reported as CreateContainerConfigError."""


def now_rfc3339() -> str:
    """Kubernetes timestamp format."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Mountpoints:
    """Host paths created only to serve as bind-mount targets; removed when no pod uses them any more.

    Persisted to a JSON file so `down` can remove them even if the node process died.
    """

    def __init__(self, registry: Path) -> None:
        self.registry = registry
        self.users: dict[str, set[str]] = {}
        self.lock = threading.Lock()
        with contextlib.suppress(OSError, ValueError):
            for p in json.loads(registry.read_text()):
                self.users[str(p)] = set()

    def _save(self) -> None:
        self.registry.write_text(json.dumps(sorted(self.users)))

    def acquire(self, target: Path, *, is_file: bool, user: str) -> None:
        """Make `target` exist (creating missing parents); remember what we created and who uses it."""
        if target == DEFAULT_TERMINATION_LOG:
            # Shared by every pod of every dev cluster on this machine: create once, never remove (removing a
            # file that is a mountpoint elsewhere would detach other pods' termination logs).
            if not target.exists():
                target.touch()
            return
        with self.lock:
            created: list[Path] = []
            probe = target
            while not probe.exists() and probe != probe.parent:
                created.append(probe)
                probe = probe.parent
            for p in reversed(created):
                if p == target and is_file:
                    p.touch()
                else:
                    p.mkdir()
                self.users.setdefault(str(p), set())
            for p in [target, *target.parents]:
                if str(p) in self.users:
                    self.users[str(p)].add(user)
            self._save()

    def release(self, user: str) -> None:
        """Drop `user`; remove created paths nobody uses (deepest first, only if empty)."""
        with self.lock:
            for p in sorted(self.users, key=len, reverse=True):
                self.users[p].discard(user)
                if not self.users[p]:
                    remove_if_empty(Path(p))
                    self.users.pop(p)
            self._save()

    def sweep(self) -> None:
        """Remove every created path (used by `down`)."""
        with self.lock:
            for p in sorted(self.users, key=len, reverse=True):
                remove_if_empty(Path(p))
            self.users.clear()
            self._save()


def remove_if_empty(p: Path) -> None:
    """rmdir an empty dir or unlink an empty regular file; anything with content is left alone."""
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            p.rmdir()
        elif p.is_file() and p.stat().st_size == 0:
            p.unlink()


@dataclass
class NodeContext:
    """Everything pod runtimes share (one per node process)."""

    core: k8s.CoreV1Api
    net: network.NetConfig
    state_dir: Path
    mountpoints: Mountpoints
    probes: ThreadPoolExecutor
    emit_event: Callable[..., None]
    alloc_ip: Callable[[bool], str]
    release_ip: Callable[[str], None]
    venv_bin: str
    render_hosts: Callable[[Obj, str], str]
    api_port: int | None = None  # where pods reach the API server on the gateway (None: not reachable)
    backoff_base: float = 10.0
    backoff_max: float = 300.0

    @property
    def pid_dir(self) -> Path:
        """Pidfiles of container processes, so `down` can kill them even after a node crash."""
        return self.state_dir / "pids"


@dataclass
class ProbeState:
    """Consecutive results of one probe and the in-flight check."""

    successes: int = 0
    failures: int = 0
    next_at: float = 0.0
    future: Future[bool] | None = None
    ok: bool = False


@dataclass
class ContainerRun:
    """One container's life across restarts."""

    spec: Mapping[str, Any]
    init: bool
    proc: subprocess.Popen[bytes] | None = None
    state: str = "waiting"
    reason: str = "ContainerCreating"
    message: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    term_message: str = ""
    term_reason: str = ""
    restart_count: int = 0
    last_terminated: dict[str, Any] | None = None
    next_start: float = 0.0
    backoff: float = 0.0
    started_mono: float = 0.0
    ever_started: bool = False
    pull_attempts: int = 0
    readiness: ProbeState = field(default_factory=ProbeState)
    liveness: ProbeState = field(default_factory=ProbeState)
    killed_by_liveness: bool = False

    @property
    def name(self) -> str:
        """Container name."""
        return str(self.spec.get("name", ""))


def _expand(value: str, env: Mapping[str, str]) -> str:
    """$(VAR) expansion as the kubelet does it ($$ escapes, unknown references stay verbatim)."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0).startswith("$$"):
            return m.group(0)[1:]
        name = m.group(1)
        return env.get(name, m.group(0))

    return re.sub(r"\$\$\([A-Za-z_][A-Za-z0-9_.-]*\)|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", repl, value)


def _container_resource(pod: Obj, ref: Mapping[str, Any], default_container: str) -> str:
    cname = ref.get("containerName") or default_container
    res = str(ref.get("resource", ""))
    divisor = quantity(ref.get("divisor") or "1")
    if divisor <= 0:
        divisor = Decimal(1)
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == cname:
            kind, _, rname = res.partition(".")
            val = ((c.get("resources") or {}).get(kind) or {}).get(rname)
            if val is None:
                return "0"
            return str(int((quantity(val) / divisor).to_integral_value(rounding=ROUND_CEILING)))
    raise ConfigError(f"container {cname!r} not found for resourceFieldRef {res}")


def field_value(pod: Obj, path: str) -> str:
    """Downward API fieldRef values."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
        "status.podIPs": ",".join(i.get("ip", "") for i in status.get("podIPs") or []),
        "status.hostIPs": ",".join(i.get("ip", "") for i in status.get("hostIPs") or []),
    }
    if path in simple:
        return str(simple[path] or "")
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = (meta.get(path.split(".")[1]) or {}).items()
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items))
    raise ConfigError(f"unsupported fieldRef {path!r}")


class PodRuntime:
    """Runs and reports one pod (see module docstring)."""

    def __init__(self, ctx: NodeContext, pod: Obj, *, simulated: bool) -> None:
        self.ctx = ctx
        self.pod = pod
        meta = pod.get("metadata") or {}
        self.uid = str(meta.get("uid"))
        self.ns = str(meta.get("namespace"))
        self.name = str(meta.get("name"))
        self.simulated = simulated
        spec = pod.get("spec") or {}
        self.init_runs = [ContainerRun(spec=c, init=True) for c in spec.get("initContainers") or []]
        self.runs = [ContainerRun(spec=c, init=False) for c in spec.get("containers") or []]
        self.dir = ctx.state_dir / "pods" / self.ns / self.name / self.uid
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pod_ip: str | None = None
        self.netns: str | None = None
        self.volumes: dict[str, Path] | None = None
        self.volume_error = ""
        self.volume_retry_at = 0.0
        self.start_time = now_rfc3339()
        self.phase = "Pending"
        self.transitions: dict[str, tuple[str, str]] = {}
        self.terminating_since: float | None = None
        self.kill_deadline: float | None = None
        self.finalized = False
        self.torn_down = False
        self.hosts_content = ""

    # -- helpers -------------------------------------------------------------------------------------------

    @property
    def spec(self) -> Mapping[str, Any]:
        """Pod spec (immutable in the fields we use)."""
        return self.pod.get("spec") or {}

    def view(self) -> Obj:
        """The pod with what this node knows ahead of the API (its IPs), for downward-API values."""
        status = dict(self.pod.get("status") or {})
        gw = self.ctx.net.gateway
        status.update(hostIP=gw, hostIPs=[{"ip": gw}])
        if self.pod_ip:
            status.update(podIP=self.pod_ip, podIPs=[{"ip": self.pod_ip}])
        return {**self.pod, "status": status}

    @property
    def restart_policy(self) -> str:
        """Always | OnFailure | Never."""
        return str(self.spec.get("restartPolicy") or "Always")

    def all_runs(self) -> list[ContainerRun]:
        """Init containers then app containers."""
        return [*self.init_runs, *self.runs]

    def log_path(self, run: ContainerRun) -> Path:
        """Current log file of a container (one per restart, like the kubelet)."""
        d = self.dir / run.name
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{run.restart_count}.log"

    def _term_path(self, run: ContainerRun) -> Path:
        return self.dir / "termination" / f"{run.name}-{run.restart_count}"

    # -- sandbox and volumes -------------------------------------------------------------------------------

    def _ensure_sandbox(self) -> None:
        if self.pod_ip:
            return
        ip_addr = self.ctx.alloc_ip(self.simulated)
        if not self.simulated:
            try:
                self.netns = network.create_sandbox(self.ctx.net, uid=self.uid, pod_ip=ip_addr)
                # `ip netns exec` only bind-mounts files that exist when a container starts.
                network.write_in_place(
                    network.NETNS_ETC / self.netns / "hosts", self.ctx.render_hosts(self.pod, ip_addr)
                )
            except Exception:
                self.ctx.release_ip(ip_addr)
                raise
        self.pod_ip = ip_addr

    def _get_json(self, kind: str, name: str) -> Obj | None:
        fn = self.ctx.core.read_namespaced_secret if kind == "Secret" else self.ctx.core.read_namespaced_config_map
        try:
            return call_json(fn, name, self.ns)
        except k8s.ApiException as e:
            if e.status == 404:
                return None
            raise

    def _kv(self, kind: str, name: str, *, optional: bool) -> dict[str, bytes] | None:
        obj = self._get_json(kind, name)
        if obj is None:
            if optional:
                return None
            raise ConfigError(f'{kind.lower() if kind == "Secret" else "configmap"} "{name}" not found')
        out: dict[str, bytes] = {}
        if kind == "Secret":
            for k, v in (obj.get("data") or {}).items():
                out[k] = base64.b64decode(v or "")
            for k, v in (obj.get("stringData") or {}).items():
                out[k] = str(v).encode()
        else:
            for k, v in (obj.get("data") or {}).items():
                out[k] = str(v).encode()
            for k, v in (obj.get("binaryData") or {}).items():
                out[k] = base64.b64decode(v or "")
        return out

    def _write_items(
        self,
        dest: Path,
        data: Mapping[str, bytes],
        *,
        items: list[Mapping[str, Any]] | None,
        mode: int,
        what: str,
        optional: bool,
    ) -> None:
        files: list[tuple[str, bytes, int]] = []
        if items:
            for it in items:
                k = str(it.get("key"))
                if k not in data:
                    if optional:
                        continue
                    raise ConfigError(f"configmap/secret {what}: key {k!r} not found")
                files.append((str(it.get("path") or k), data[k], int(it.get("mode") or mode)))
        else:
            files = [(k, v, mode) for k, v in data.items()]
        for rel, content, fmode in files:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            target.chmod(fmode)

    def _token(self, src: Mapping[str, Any]) -> bytes:
        sa = self.spec.get("serviceAccountName") or "default"
        aud = src.get("audience")
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [aud] if aud else None,
                "expirationSeconds": int(src.get("expirationSeconds") or 3607),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid},
            },
        }
        try:
            resp = call_json(self.ctx.core.create_namespaced_service_account_token, sa, self.ns, body)
        except k8s.ApiException as e:
            raise ConfigError(f"serviceaccount token for {sa!r}: {e.reason}") from e
        return str((resp.get("status") or {}).get("token", "")).encode()

    def _materialize_volumes(self) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for vol in self.spec.get("volumes") or []:
            name = str(vol.get("name"))
            dest = self.dir / "volumes" / name
            if "emptyDir" in vol:
                if (vol.get("emptyDir") or {}).get("medium") == "Memory":
                    dest = Path("/dev/shm") / f"ftdevcluster{self.ctx.net.index}" / self.uid / name
                dest.mkdir(parents=True, exist_ok=True)
            elif "configMap" in vol or "secret" in vol:
                kind = "Secret" if "secret" in vol else "ConfigMap"
                src = vol.get("secret") if kind == "Secret" else vol.get("configMap")
                src = src or {}
                ref = src.get("secretName") if kind == "Secret" else src.get("name")
                optional = bool(src.get("optional"))
                data = self._kv(kind, str(ref), optional=optional) or {}
                dest.mkdir(parents=True, exist_ok=True)
                self._write_items(
                    dest,
                    data,
                    items=src.get("items"),
                    mode=int(src.get("defaultMode") or 0o644),
                    what=str(ref),
                    optional=optional,
                )
            elif "projected" in vol or "downwardAPI" in vol:
                dest.mkdir(parents=True, exist_ok=True)
                proj = vol.get("projected") or {}
                mode = int(proj.get("defaultMode") or (vol.get("downwardAPI") or {}).get("defaultMode") or 0o644)
                sources = proj.get("sources") or []
                if "downwardAPI" in vol:
                    sources = [{"downwardAPI": vol["downwardAPI"]}]
                for s in sources:
                    if "serviceAccountToken" in s:
                        path = dest / str(s["serviceAccountToken"].get("path", "token"))
                        path.write_bytes(self._token(s["serviceAccountToken"]))
                        path.chmod(mode)
                    elif "configMap" in s or "secret" in s:
                        kind = "Secret" if "secret" in s else "ConfigMap"
                        src = s.get("secret") if kind == "Secret" else s.get("configMap")
                        src = src or {}
                        optional = bool(src.get("optional"))
                        data = self._kv(kind, str(src.get("name")), optional=optional) or {}
                        self._write_items(
                            dest, data, items=src.get("items"), mode=mode, what=str(src.get("name")), optional=optional
                        )
                    elif "downwardAPI" in s:
                        for it in (s["downwardAPI"] or {}).get("items") or []:
                            if it.get("fieldRef"):
                                val = field_value(self.view(), str(it["fieldRef"].get("fieldPath")))
                            elif it.get("resourceFieldRef"):
                                val = _container_resource(self.pod, it["resourceFieldRef"], "")
                            else:
                                continue
                            target = dest / str(it.get("path"))
                            target.parent.mkdir(parents=True, exist_ok=True)
                            target.write_text(val)
            elif "hostPath" in vol:
                dest = Path(str((vol.get("hostPath") or {}).get("path")))
                if (vol.get("hostPath") or {}).get("type") in ("DirectoryOrCreate",):
                    dest.mkdir(parents=True, exist_ok=True)
            else:
                kinds = ", ".join(k for k in vol if k != "name")
                raise ConfigError(f"volume {name!r}: type {kinds} is not supported by the devcluster process node")
            out[name] = dest
        return out

    # -- environment ---------------------------------------------------------------------------------------

    def _env(self, run: ContainerRun) -> dict[str, str]:
        hostname = str(self.spec.get("hostname") or self.name)
        env: dict[str, str] = {
            "PATH": f"{self.ctx.venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "HOSTNAME": hostname,
        }
        for k in BASE_ENV_PASSTHROUGH:
            if k in os.environ:
                env[k] = os.environ[k]
        if self.ctx.api_port:  # what the kubelet injects for the `kubernetes` Service (in-cluster config)
            host, port = self.ctx.net.gateway, str(self.ctx.api_port)
            env.update(
                KUBERNETES_SERVICE_HOST=host,
                KUBERNETES_SERVICE_PORT=port,
                KUBERNETES_SERVICE_PORT_HTTPS=port,
                KUBERNETES_PORT=f"tcp://{host}:{port}",
                KUBERNETES_PORT_443_TCP=f"tcp://{host}:{port}",
                KUBERNETES_PORT_443_TCP_PROTO="tcp",
                KUBERNETES_PORT_443_TCP_PORT=port,
                KUBERNETES_PORT_443_TCP_ADDR=host,
            )
        spec = run.spec
        for src in spec.get("envFrom") or []:
            prefix = str(src.get("prefix") or "")
            if "configMapRef" in src or "secretRef" in src:
                kind = "Secret" if "secretRef" in src else "ConfigMap"
                ref = src.get("secretRef") if kind == "Secret" else src.get("configMapRef")
                ref = ref or {}
                data = self._kv(kind, str(ref.get("name")), optional=bool(ref.get("optional"))) or {}
                for k, v in data.items():
                    env[prefix + k] = v.decode(errors="replace")
        for item in spec.get("env") or []:
            name = str(item.get("name"))
            if "value" in item or not item.get("valueFrom"):
                env[name] = _expand(str(item.get("value") or ""), env)
                continue
            vf = item["valueFrom"]
            if vf.get("fieldRef"):
                env[name] = field_value(self.view(), str(vf["fieldRef"].get("fieldPath")))
            elif vf.get("resourceFieldRef"):
                env[name] = _container_resource(self.pod, vf["resourceFieldRef"], run.name)
            elif vf.get("secretKeyRef") or vf.get("configMapKeyRef"):
                kind = "Secret" if vf.get("secretKeyRef") else "ConfigMap"
                ref = vf.get("secretKeyRef") or vf.get("configMapKeyRef") or {}
                optional = bool(ref.get("optional"))
                found = self._kv(kind, str(ref.get("name")), optional=optional)
                if found is None:
                    continue
                data = found
                k = str(ref.get("key"))
                if k not in data:
                    if optional:
                        continue
                    raise ConfigError(f"couldn't find key {k} in {kind} {self.ns}/{ref.get('name')}")
                env[name] = data[k].decode(errors="replace")
        return env

    # -- starting and stopping containers ------------------------------------------------------------------

    def _would_hide(self, target: Path) -> str:
        """A host path the pod needs (venv, repo, node state, system dirs) that mounting on `target` would hide."""
        t = Path(os.path.normpath(target))
        if t in PROTECTED_EXACT:
            return str(t)
        for needed in (Path(self.ctx.venv_bin).parent, REPO_ROOT, self.ctx.state_dir):
            if t == needed or t in needed.parents:
                return str(needed)
        return ""

    def _start(self, run: ContainerRun) -> None:
        image = str(run.spec.get("image") or "")
        if image.startswith(UNPULLABLE_PREFIX):
            run.pull_attempts += 1
            run.state = "waiting"
            run.reason = "ErrImagePull" if run.pull_attempts <= 1 else "ImagePullBackOff"
            run.message = (
                f'failed to pull and unpack image "{image}": failed to resolve reference "{image}": '
                f"dial tcp: lookup unpullable.invalid: no such host"
                if run.reason == "ErrImagePull"
                else f'Back-off pulling image "{image}"'
            )
            run.next_start = time.monotonic() + min(5 * run.pull_attempts, 30)
            if run.pull_attempts == 1:
                self.ctx.emit_event(self.pod, reason="Failed", message=run.message, type_="Warning")
            return
        try:
            env = self._env(run)
        except ConfigError as e:
            run.state, run.reason, run.message = "waiting", "CreateContainerConfigError", str(e)
            run.next_start = time.monotonic() + 2
            return
        argv = [_expand(str(a), env) for a in [*(run.spec.get("command") or []), *(run.spec.get("args") or [])]]
        if not argv:
            run.state, run.reason = "waiting", "CreateContainerConfigError"
            run.message = "no command specified (the devcluster node cannot read an image entrypoint)"
            run.next_start = time.monotonic() + 30
            return
        assert self.netns and self.volumes is not None
        script = ["set -e", f"hostname {shlex.quote(env['HOSTNAME'][:63])} 2>/dev/null || true"]
        for m in run.spec.get("volumeMounts") or []:
            vname = str(m.get("name"))
            if vname not in self.volumes:
                run.state, run.reason = "waiting", "CreateContainerConfigError"
                run.message = f"volumeMount {vname!r} refers to no volume"
                run.next_start = time.monotonic() + 30
                return
            src = self.volumes[vname]
            if m.get("subPath"):
                src = src / str(m["subPath"])
                if not src.exists():
                    src.mkdir(parents=True, exist_ok=True)
            target = Path(str(m.get("mountPath")))
            hidden = self._would_hide(target)
            if hidden:
                run.state, run.reason = "waiting", "CreateContainerConfigError"
                run.message = (
                    f"mountPath {target} would hide {hidden} (process-node pods share the host filesystem); "
                    "use another mountPath"
                )
                run.next_start = time.monotonic() + 30
                return
            self.ctx.mountpoints.acquire(target, is_file=src.is_file(), user=self.uid)
            script.append(f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(target))}")
            if m.get("readOnly"):
                script.append(f"mount -o remount,bind,ro {shlex.quote(str(target))}")
        term_file = self._term_path(run)
        term_file.parent.mkdir(parents=True, exist_ok=True)
        term_file.write_bytes(b"")
        term_target = Path(str(run.spec.get("terminationMessagePath") or "/dev/termination-log"))
        self.ctx.mountpoints.acquire(term_target, is_file=True, user=self.uid)
        script.append(f"mount --bind {shlex.quote(str(term_file))} {shlex.quote(str(term_target))}")
        workdir = str(run.spec.get("workingDir") or self.dir / "root")
        script.append(f"mkdir -p {shlex.quote(workdir)} && cd {shlex.quote(workdir)}")
        script.append('exec "$@"')
        full = ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", "\n".join(script), "sh", *argv]
        log_file = self.log_path(run)
        run.proc = procs.spawn(
            name=f"{self.uid}-{run.name}",
            argv=full,
            log_path=log_file,
            pid_dir=self.ctx.pid_dir,
            env=env,
        )
        run.state, run.reason, run.message = "running", "", ""
        run.started_at = now_rfc3339()
        run.started_mono = time.monotonic()
        run.ever_started = True
        run.readiness = ProbeState(
            next_at=time.monotonic() + float(self._probe(run, "readinessProbe").get("initialDelaySeconds") or 0)
        )
        run.liveness = ProbeState(
            next_at=time.monotonic() + float(self._probe(run, "livenessProbe").get("initialDelaySeconds") or 0)
        )
        run.killed_by_liveness = False
        self.ctx.emit_event(self.pod, reason="Started", message=f"Started container {run.name}", type_="Normal")

    def _record_exit(self, run: ContainerRun, code: int) -> None:
        if code < 0:  # killed by a signal: report like a container runtime does (128 + signal)
            code = 128 - code
        run.exit_code = code
        run.finished_at = now_rfc3339()
        run.state = "terminated"
        run.term_reason = "Completed" if code == 0 else ("OOMKilled" if False else "Error")
        msg = b""
        with contextlib.suppress(OSError):
            msg = self._term_path(run).read_bytes()[:MAX_TERM_MSG]
        if not msg.strip() and code != 0 and run.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            with contextlib.suppress(OSError):
                data = self.log_path(run).read_bytes()
                msg = b"\n".join(data.splitlines()[-MAX_TERM_LOG_LINES:])[-MAX_TERM_LOG_BYTES:]
        run.term_message = msg.decode(errors="replace")
        run.proc = None
        with contextlib.suppress(FileNotFoundError):
            (self.ctx.pid_dir / f"{self.uid}-{run.name}.pid").unlink()

    def _terminated_dict(self, run: ContainerRun) -> dict[str, Any]:
        d: dict[str, Any] = {
            "exitCode": run.exit_code,
            "reason": run.term_reason,
            "startedAt": run.started_at,
            "finishedAt": run.finished_at,
        }
        d["message"] = run.term_message or None  # null deletes a stale message (strategic merge patch)
        return d

    def signal_all(self, sig: int) -> None:
        """Send `sig` to every running container's process group."""
        for run in self.all_runs():
            if run.proc is not None and run.proc.returncode is None:  # not reaped: the group id is still ours
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(run.proc.pid, sig)

    def stop_all(self, sig: int) -> None:
        """The runtime's stop signal (pod deletion): to each running container's main process only, as CRI's
        StopContainer signals the container's PID 1 and not every process in it (a head pod's supervisor script
        forwards it to the trainer while Ray keeps running). What else the container started goes when its main
        process exits (_poll) or at the end of the grace period (SIGKILL to the group)."""
        for run in self.all_runs():
            if run.proc is not None and run.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(run.proc.pid, sig)

    def _poll(self) -> None:
        for run in self.all_runs():
            if run.proc is not None and main_exited(run.proc):
                # A container ends with its main process: like a runtime tearing down the container's pid
                # namespace, kill whatever else it started (e.g. daemons `ray start` left in its group) before
                # reporting it terminated or restarting it. The unreaped main process keeps the group id
                # from being reused, so this cannot hit another process.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(run.proc.pid, signal.SIGKILL)
                code = run.proc.wait()
                self._record_exit(run, code)

    # -- probes --------------------------------------------------------------------------------------------

    @staticmethod
    def _probe(run: ContainerRun, kind: str) -> Mapping[str, Any]:
        return run.spec.get(kind) or {}

    def _run_probe(self, probe: Mapping[str, Any], env: Mapping[str, str]) -> bool:
        timeout = float(probe.get("timeoutSeconds") or 1)
        ip_addr = self.pod_ip or "127.0.0.1"
        try:
            if probe.get("exec"):
                cmd = [str(c) for c in (probe["exec"].get("command") or [])]
                res = subprocess.run(
                    ["ip", "netns", "exec", str(self.netns), *cmd],
                    env=dict(env),
                    capture_output=True,
                    timeout=timeout,
                    check=False,
                )
                return res.returncode == 0
            if probe.get("tcpSocket"):
                port = _port(probe["tcpSocket"].get("port"), self.runs)
                with socket.create_connection((probe["tcpSocket"].get("host") or ip_addr, port), timeout=timeout):
                    return True
            if probe.get("httpGet"):
                hg = probe["httpGet"]
                port = _port(hg.get("port"), self.runs)
                scheme = str(hg.get("scheme") or "HTTP").lower()
                url = f"{scheme}://{hg.get('host') or ip_addr}:{port}{hg.get('path') or '/'}"
                req = urllib.request.Request(url, headers={h["name"]: h["value"] for h in hg.get("httpHeaders") or []})
                try:
                    with urllib.request.urlopen(req, timeout=timeout) as r:
                        return 200 <= int(r.status) < 400
                except urllib.error.HTTPError as e:
                    return 200 <= e.code < 400
        except (OSError, subprocess.SubprocessError, ValueError):
            return False
        return False

    def _drive_probe(self, run: ContainerRun, kind: str, st: ProbeState) -> None:
        probe = self._probe(run, kind)
        if not probe or run.state != "running":
            return
        now = time.monotonic()
        if st.future is not None:
            if not st.future.done():
                return
            ok = bool(st.future.result())
            st.future = None
            if ok:
                st.successes += 1
                st.failures = 0
                if st.successes >= int(probe.get("successThreshold") or 1):
                    st.ok = True
            else:
                st.failures += 1
                st.successes = 0
                if st.failures >= int(probe.get("failureThreshold") or 3):
                    st.ok = False
                    if kind == "livenessProbe" and run.proc is not None and not run.killed_by_liveness:
                        run.killed_by_liveness = True
                        self.ctx.emit_event(
                            self.pod,
                            reason="Unhealthy",
                            message=f"Liveness probe failed for {run.name}",
                            type_="Warning",
                        )
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(run.proc.pid, signal.SIGKILL)
        if st.future is None and now >= st.next_at:
            st.next_at = now + float(probe.get("periodSeconds") or 10)
            try:
                env = self._env(run)
            except ConfigError:
                env = {}
            st.future = self.ctx.probes.submit(self._run_probe, probe, env)

    # -- the state machine ---------------------------------------------------------------------------------

    def _maybe_restart(self, run: ContainerRun, *, policy: str) -> None:
        if run.state != "terminated":
            return
        restart = policy == "Always" or (policy == "OnFailure" and run.exit_code != 0)
        if not restart:
            return
        if run.next_start == 0.0 or run.next_start < run.started_mono:
            ran = time.monotonic() - run.started_mono
            run.backoff = (
                self.ctx.backoff_base if ran > 600 or run.backoff == 0 else min(run.backoff * 2, self.ctx.backoff_max)
            )
            run.next_start = time.monotonic() + run.backoff
        if time.monotonic() >= run.next_start:
            run.last_terminated = self._terminated_dict(run)
            run.restart_count += 1
            run.next_start = 0.0
            self._start(run)

    def sync(self, pod: Obj) -> None:
        """Advance the pod one step: start what is due, notice exits, restart, probe, terminate."""
        self.pod = pod
        if self.finalized:
            return
        if self.simulated:
            self._sync_simulated()
            return
        self._poll()
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            self._sync_deleting()
            return
        if self.phase in ("Succeeded", "Failed"):
            return
        try:
            self._ensure_sandbox()
        except Exception as e:
            for run in self.all_runs():
                run.reason, run.message = "ContainerCreating", f"sandbox: {e}"
            return
        if self.volumes is None and time.monotonic() >= self.volume_retry_at:
            try:
                self.volumes = self._materialize_volumes()
                self.volume_error = ""
            except (ConfigError, k8s.ApiException, OSError) as e:
                if str(e) != self.volume_error:
                    self.ctx.emit_event(
                        self.pod, reason="FailedMount", message=f"MountVolume.SetUp failed: {e}", type_="Warning"
                    )
                self.volume_error = str(e)
                self.volume_retry_at = time.monotonic() + 2
                for run in self.all_runs():
                    run.reason, run.message = "ContainerCreating", ""
                return
        if self.volumes is None:
            return
        # Init containers run one at a time, each to success, before any app container.
        for run in self.init_runs:
            if run.state == "terminated" and run.exit_code == 0:
                continue
            if run.state == "running":
                return
            if run.state == "waiting" and time.monotonic() >= run.next_start:
                self._start(run)
                return
            if run.state == "terminated":
                if self.restart_policy == "Never":
                    self._finish("Failed")
                    return
                self._maybe_restart(run, policy="OnFailure")
            return
        policy = self.restart_policy
        for run in self.runs:
            if run.state == "waiting" and time.monotonic() >= run.next_start:
                self._start(run)
            else:
                self._maybe_restart(run, policy=policy)
            self._drive_probe(run, "readinessProbe", run.readiness)
            self._drive_probe(run, "livenessProbe", run.liveness)
        self._compute_phase()

    def _compute_phase(self) -> None:
        runs = self.runs
        if any(r.state == "running" for r in runs):
            self.phase = "Running"
            return
        if not all(r.state == "terminated" for r in runs):
            self.phase = "Running" if any(r.ever_started for r in runs) else "Pending"
            return
        codes = [r.exit_code for r in runs]
        policy = self.restart_policy
        if policy == "Always":
            self.phase = "Running"
        elif policy == "OnFailure":
            self.phase = "Succeeded" if all(c == 0 for c in codes) else "Running"
        else:
            self._finish("Succeeded" if all(c == 0 for c in codes) else "Failed")
            return
        if self.phase == "Succeeded":
            self._finish("Succeeded")

    def _finish(self, phase: str) -> None:
        self.phase = phase
        self.signal_all(signal.SIGKILL)
        self.teardown()

    def _sync_deleting(self) -> None:
        meta = self.pod.get("metadata") or {}
        now = time.monotonic()
        if self.terminating_since is None:
            self.terminating_since = now
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = self.spec.get("terminationGracePeriodSeconds", 30)
            self.kill_deadline = now + float(grace)
            self.stop_all(signal.SIGTERM)
            for run in self.all_runs():
                if run.state == "running":
                    self.ctx.emit_event(
                        self.pod, reason="Killing", message=f"Stopping container {run.name}", type_="Normal"
                    )
        self._poll()
        running = [r for r in self.all_runs() if r.proc is not None]
        if running and self.kill_deadline is not None and now >= self.kill_deadline:
            self.signal_all(signal.SIGKILL)
            return
        if not running:
            if self.phase not in ("Succeeded", "Failed"):
                ok = all(r.state == "terminated" and r.exit_code == 0 for r in self.runs)
                self.phase = "Succeeded" if ok and self.runs else "Failed"
            self.teardown()

    def _sync_simulated(self) -> None:
        meta = self.pod.get("metadata") or {}
        if not self.pod_ip:
            self.pod_ip = self.ctx.alloc_ip(True)
        if meta.get("deletionTimestamp"):
            if self.phase not in ("Succeeded", "Failed"):
                self.phase = "Failed"
                for run in self.runs:
                    if run.state == "running":
                        run.exit_code, run.state, run.term_reason = 143, "terminated", "Error"
                        run.finished_at = now_rfc3339()
            self.teardown()
            return
        if self.phase in ("Succeeded", "Failed"):
            return
        exit_ann = (meta.get("annotations") or {}).get(ANN_SIMULATE_EXIT)
        for run in self.runs:
            if run.state == "waiting":
                run.state, run.started_at, run.ever_started = "running", now_rfc3339(), True
                run.readiness.ok = True
        self.phase = "Running"
        if exit_ann is not None:
            try:
                code = int(exit_ann)
            except ValueError:
                code = 1
            message = (meta.get("annotations") or {}).get(ANN_SIMULATE_MESSAGE, "")
            for run in self.runs:
                run.state, run.exit_code, run.finished_at = "terminated", code, now_rfc3339()
                run.term_reason = "Completed" if code == 0 else "Error"
                run.term_message = message
            self.phase = "Succeeded" if code == 0 else "Failed"
            self.teardown()

    def teardown(self) -> None:
        """Release network, volumes and mountpoints (logs stay). Idempotent."""
        if self.torn_down:
            return
        self.torn_down = True
        if self.netns:
            network.delete_sandbox(self.ctx.net, uid=self.uid)
        self.ctx.mountpoints.release(self.uid)
        shm = Path("/dev/shm") / f"ftdevcluster{self.ctx.net.index}" / self.uid
        if shm.exists():
            subprocess.run(["rm", "-rf", str(shm)], check=False)
        if self.pod_ip:
            self.ctx.release_ip(self.pod_ip)

    def kill_now(self) -> None:
        """SIGKILL everything and release resources (node lost / pod vanished / shutdown)."""
        self.signal_all(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(r.proc is not None for r in self.all_runs()):
            self._poll()
            time.sleep(0.05)
        self.teardown()

    @property
    def deletion_done(self) -> bool:
        """Deletion requested and every process is gone: the kubelet may remove the object now."""
        return self.torn_down and bool((self.pod.get("metadata") or {}).get("deletionTimestamp"))

    # -- status --------------------------------------------------------------------------------------------

    def _cond(self, ctype: str, status: bool, reason: str = "", message: str = "") -> dict[str, Any]:
        s = "True" if status else "False"
        prev = self.transitions.get(ctype)
        if prev is None or prev[0] != s:
            self.transitions[ctype] = (s, now_rfc3339())
        c: dict[str, Any] = {
            "type": ctype,
            "status": s,
            "lastTransitionTime": self.transitions[ctype][1],
            "lastProbeTime": None,
        }
        # Explicit nulls: the status is a strategic merge patch, an omitted key would keep a stale value.
        c["reason"] = reason or None
        c["message"] = message or None
        return c

    def _container_status(self, run: ContainerRun) -> dict[str, Any]:
        ready = False
        state: dict[str, Any] = {"waiting": None, "running": None, "terminated": None}
        if run.state == "running":
            state["running"] = {"startedAt": run.started_at}
            ready = run.readiness.ok if self._probe(run, "readinessProbe") else True
        elif run.state == "terminated":
            policy = self.restart_policy if not run.init else "OnFailure"
            will_restart = (
                (policy == "Always" or (policy == "OnFailure" and run.exit_code != 0))
                and self.phase
                not in (
                    "Succeeded",
                    "Failed",
                )
                and not (self.pod.get("metadata") or {}).get("deletionTimestamp")
            )
            if will_restart and run.next_start > time.monotonic():
                state["waiting"] = {
                    "reason": "CrashLoopBackOff",
                    "message": (
                        f"back-off {int(run.backoff)}s restarting failed container={run.name} "
                        f"pod={self.name}_{self.ns}({self.uid})"
                    ),
                }
            else:
                state["terminated"] = self._terminated_dict(run)
        else:
            state["waiting"] = {"reason": run.reason or "ContainerCreating", "message": run.message or None}
        image = str(run.spec.get("image") or "")
        status: dict[str, Any] = {
            "name": run.name,
            "state": state,
            "ready": ready,
            "restartCount": run.restart_count,
            "image": image,
            "imageID": "",
            "started": run.state == "running",
        }
        last = run.last_terminated
        if state["waiting"] is not None and state["waiting"].get("reason") == "CrashLoopBackOff":
            last = self._terminated_dict(run)
        status["lastState"] = {"terminated": last} if last else {"terminated": None}
        if run.state in ("running", "terminated") or run.ever_started:
            status["containerID"] = f"devcluster://{self.uid}/{run.name}/{run.restart_count}"
        return status

    def status(self, *, host_ip: str) -> dict[str, Any]:
        """The pod status this node reports (strategic-merge-patch body for the status subresource)."""
        statuses = [self._container_status(r) for r in self.runs]
        init_statuses = [self._container_status(r) for r in self.init_runs]
        init_done = all(r.state == "terminated" and r.exit_code == 0 for r in self.init_runs)
        terminal = self.phase in ("Succeeded", "Failed")
        containers_ready = bool(statuses) and all(s["ready"] for s in statuses) and not terminal
        not_ready = [s["name"] for s in statuses if not s["ready"]]
        msg = f"containers with unready status: [{' '.join(not_ready)}]" if not_ready else ""
        reason = "PodCompleted" if terminal else ("ContainersNotReady" if not_ready else "")
        conds = [
            self._cond("PodReadyToStartContainers", bool(self.pod_ip) and not terminal),
            self._cond("Initialized", init_done, "" if init_done else "ContainersNotInitialized"),
            self._cond("ContainersReady", containers_ready, reason, msg),
            self._cond("Ready", containers_ready, reason, msg),
        ]
        st: dict[str, Any] = {
            "phase": self.phase,
            "conditions": conds,
            "hostIP": host_ip,
            "hostIPs": [{"ip": host_ip}],
            "startTime": self.start_time,
            "containerStatuses": statuses,
        }
        if init_statuses:
            st["initContainerStatuses"] = init_statuses
        if self.pod_ip:
            st["podIP"] = self.pod_ip
            st["podIPs"] = [{"ip": self.pod_ip}]
        return st


def main_exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether a container's main process has exited, without reaping it (waitid WNOWAIT)."""
    if proc.returncode is not None:
        return True
    try:
        res = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped elsewhere already
        return proc.poll() is not None
    return res is not None


def _port(value: Any, runs: list[ContainerRun]) -> int:
    """A probe port: a number or the name of a declared containerPort."""
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return int(value)
    for r in runs:
        for p in r.spec.get("ports") or []:
            if p.get("name") == value:
                return int(p.get("containerPort"))
    raise ValueError(f"unknown port {value!r}")
