"""The real node (devcluster.realnode): pods are containers from images, with cgroups, Service VIPs and DNS.

Every test here runs real containers (containerd + runc) started by a real kubelet; images come from
devcluster.images (`base` is Debian bookworm with python3).
"""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from finetune_operator import builders, names, reasons
from finetune_operator.settings import Settings
from finetune_trainer import contract
from finetune_trainer import spec as ftspec
from kubernetes import client as k8s

from devcluster import DevCluster
from devcluster.kube import call_json
from devcluster.nodeconfig import NODE_LABEL
from devcluster.testing import container_state, get_pod, pod_manifest, wait_for, wait_phase

pytestmark = pytest.mark.realnode


@pytest.fixture(scope="module")
def base_image(real_cluster: DevCluster) -> str:
    """Reference of the base image, imported into the node's containerd (built once, cached by input hash)."""
    return real_cluster.load_images(["base"])["base"].ref


def pod(name: str, script: str, *, image: str, **container: Any) -> dict[str, Any]:
    """A pod on the real node running `python3 -c script`."""
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    body = pod_manifest(name, ["python3", "-c", script], image=image, imagePullPolicy="Never", env=env, **container)
    body["spec"]["nodeSelector"] = {NODE_LABEL: "real"}
    return body


def create(cluster: DevCluster, namespace: str, body: dict[str, Any]) -> None:
    with cluster.api() as api:
        call_json(k8s.CoreV1Api(api).create_namespaced_pod, namespace, body)


def finished(cluster: DevCluster, namespace: str, name: str, *, timeout: float = 120) -> dict[str, Any]:
    with cluster.api() as api:
        return wait_phase(api, namespace, name, ("Succeeded", "Failed"), timeout=timeout)


def test_node_is_a_real_kubelet_with_containerd(real_cluster: DevCluster) -> None:
    nodes = json.loads(real_cluster.kubectl("get", "nodes", "-l", f"{NODE_LABEL}=real", "-o", "json").stdout)["items"]
    assert [n["metadata"]["name"] for n in nodes] == ["node-0"]
    info = nodes[0]["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.34.4"
    assert info["containerRuntimeVersion"].startswith("containerd://2.0."), info
    assert nodes[0]["metadata"]["labels"]["finetune.dev/pool"] == "cpu"
    ready = {c["type"]: c["status"] for c in nodes[0]["status"]["conditions"]}
    assert ready["Ready"] == "True"


CONTAINER_FACTS = """
import json, os, socket
pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
print(json.dumps({
    'pid': os.getpid(), 'pids': pids, 'hostname': socket.gethostname(),
    'host_repo_visible': os.path.exists('/work'), 'os': open('/etc/os-release').read().split('\\n')[0],
    'uid': os.getuid(),
}))
"""


def test_pod_runs_as_pid_1_in_its_own_pid_namespace_and_root_filesystem(
    real_cluster: DevCluster, real_namespace: str, base_image: str
) -> None:
    create(real_cluster, real_namespace, pod("facts", CONTAINER_FACTS, image=base_image))
    assert finished(real_cluster, real_namespace, "facts")["status"]["phase"] == "Succeeded"
    facts = json.loads(real_cluster.pod_logs(real_namespace, "facts"))
    assert facts["pid"] == 1 and facts["pids"] == [1]  # nothing else is visible: its own PID namespace
    assert facts["hostname"] == "facts"
    assert not facts["host_repo_visible"]  # the image's root filesystem, not the host's
    assert facts["os"] == 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"'


def test_pod_over_its_memory_limit_is_oom_killed(
    real_cluster: DevCluster, real_namespace: str, base_image: str
) -> None:
    hog = "b = bytearray(300 * 1024 * 1024)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')"
    limits = {"requests": {"memory": "32Mi"}, "limits": {"memory": "64Mi"}}
    create(real_cluster, real_namespace, pod("hog", hog, image=base_image, resources=limits))
    done = finished(real_cluster, real_namespace, "hog")
    term = container_state(done)["terminated"]
    assert (done["status"]["phase"], term["reason"], term["exitCode"]) == ("Failed", "OOMKilled", 137)


def _web(real_cluster: DevCluster, namespace: str, image: str, *, node: str | None = None) -> str:
    """An HTTP server pod behind Service `web` (port 80 -> 8080); returns the Service's ClusterIP."""
    server = pod(
        "web", "import http.server as h; h.test(h.SimpleHTTPRequestHandler, port=8080, bind='0.0.0.0')", image=image
    )
    server["metadata"]["labels"] = {"app": "web"}
    server["spec"]["restartPolicy"] = "Always"
    server["spec"]["containers"][0]["readinessProbe"] = {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
    if node:
        server["spec"]["nodeName"] = node
    create(real_cluster, namespace, server)
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    with real_cluster.api() as api:
        created = call_json(k8s.CoreV1Api(api).create_namespaced_service, namespace, svc)
        wait_phase(api, namespace, "web", ("Running",), timeout=120)
    real_cluster.kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod/web", "--timeout=60s")
    return str(created["spec"]["clusterIP"])


CLIENT = """
import json, socket, sys, urllib.request
ns = sys.argv[1]
out = {}
for name in ('web', f'web.{ns}.svc.cluster.local'):
    status = urllib.request.urlopen(f'http://{name}/', timeout=10).status
    out[name] = {'ip': socket.gethostbyname(name), 'status': status}
print(json.dumps(out))
"""


def test_pod_resolves_and_reaches_a_cluster_ip_service_by_dns_name(
    real_cluster: DevCluster, real_namespace: str, base_image: str
) -> None:
    cluster_ip = _web(real_cluster, real_namespace, base_image)
    client = pod("client", CLIENT, image=base_image, args=[real_namespace])
    create(real_cluster, real_namespace, client)
    done = finished(real_cluster, real_namespace, "client")
    logs = real_cluster.pod_logs(real_namespace, "client")
    assert done["status"]["phase"] == "Succeeded", logs
    seen = json.loads(logs)
    assert seen == {
        "web": {"ip": cluster_ip, "status": 200},
        f"web.{real_namespace}.svc.cluster.local": {"ip": cluster_ip, "status": 200},
    }


@pytest.fixture
def port_forward(real_cluster: DevCluster) -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.terminate()
        p.wait(timeout=10)


def test_kubectl_logs_exec_and_port_forward(
    real_cluster: DevCluster, real_namespace: str, base_image: str, port_forward: list[subprocess.Popen[str]]
) -> None:
    _web(real_cluster, real_namespace, base_image)
    logs = real_cluster.kubectl("logs", "-n", real_namespace, "web").stdout
    assert "Serving HTTP on 0.0.0.0 port 8080" in logs
    out = real_cluster.kubectl("exec", "-n", real_namespace, "web", "--", "cat", "/etc/hostname").stdout
    assert out.strip() == "web"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    kubectl = [str(real_cluster.binaries.kubectl), f"--kubeconfig={real_cluster.kubeconfig}"]
    proc = subprocess.Popen(
        [*kubectl, "port-forward", "-n", real_namespace, "pod/web", f"{local}:8080"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    port_forward.append(proc)
    assert proc.stdout is not None
    assert "Forwarding from 127.0.0.1" in proc.stdout.readline()

    def fetch() -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{local}/", timeout=5) as r:
                return int(r.status)
        except OSError:
            return None

    assert wait_for(fetch, timeout=30, what="HTTP through kubectl port-forward") == 200


WRITES = """
import json, os
def can_write(path):
    try:
        with open(path, 'w') as f:
            f.write('x')
        return 'ok'
    except OSError as e:
        return e.strerror
print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'volume': can_write('/scratch/f'),
                  'tmp': can_write('/tmp/f'), 'root': can_write('/f'), 'etc': can_write('/etc/f')}))
"""


def test_non_root_container_with_read_only_root_cannot_write_outside_its_volumes(
    real_cluster: DevCluster, real_namespace: str, base_image: str
) -> None:
    body = pod(
        "ro",
        WRITES,
        image=base_image,
        securityContext={
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}],
    )
    body["spec"]["volumes"] = [{"name": "scratch", "emptyDir": {}}]
    body["spec"]["securityContext"] = {"fsGroup": 1000}
    create(real_cluster, real_namespace, body)
    done = finished(real_cluster, real_namespace, "ro")
    logs = real_cluster.pod_logs(real_namespace, "ro")
    assert done["status"]["phase"] == "Succeeded", logs
    assert json.loads(logs) == {
        "uid": 1000,
        "gid": 1000,
        "volume": "ok",
        "tmp": "Read-only file system",
        "root": "Read-only file system",
        "etc": "Read-only file system",
    }


def _trainer_head_pod() -> dict[str, Any]:
    """The head pod the operator renders for a minimal job (its security contexts and termination policy)."""
    settings = Settings(identity="test")
    ident = names.JobIdentity(name="tm", namespace="ns", uid="00000000-0000-0000-0000-000000000000")
    raw = ftspec.parse_spec({"model": {"uri": "hf://org/m"}, "dataset": {"train": "s3://b/t.csv"},
                             "output": {"uri": "s3://b/out/"}})  # fmt: skip
    spec = builders.resolve_spec(raw, defaults=builders.operator_defaults(settings), ident=ident)
    return builders.build_head_pod(spec, settings=settings, ident=ident)


WRITES_REPORT = """
import sys
open(sys.argv[1], 'w').write(sys.argv[2])
print('this log line must not become the message')
sys.exit(int(sys.argv[3]))
"""
PRINTS_REPORT = """
import sys
print('Traceback (most recent call last): ...')
print(sys.argv[1])
sys.exit(int(sys.argv[2]))
"""


def test_the_trainers_failure_report_reaches_the_pod_status_under_the_operators_security_context(
    real_cluster: DevCluster, real_namespace: str, base_image: str
) -> None:
    """What the operator reads a failure from, as the real kubelet delivers it: the report the trainer writes to
    /dev/termination-log (as non-root, on a read-only root filesystem), else the last log lines
    (FallbackToLogsOnError), with the trainer's exit code."""
    head = _trainer_head_pod()
    (rendered,) = head["spec"]["containers"]
    assert rendered["terminationMessagePolicy"] == "FallbackToLogsOnError"
    like_the_trainer = {k: rendered[k] for k in ("securityContext", "terminationMessagePolicy")}
    written = contract.failure_line(contract.Reason.INVALID_DATASET, "column 'sentence' is missing")
    printed = contract.failure_line(contract.Reason.TRAINING_ERROR, "loss is NaN at step 7")
    codes = {"writes": int(contract.ExitCode.INVALID_DATASET), "prints": int(contract.ExitCode.TRAINING_ERROR)}
    args = {
        "writes": (WRITES_REPORT, [contract.TERMINATION_MESSAGE_PATH, written, str(codes["writes"])]),
        "prints": (PRINTS_REPORT, [printed, str(codes["prints"])]),
    }
    body = pod("report", "", image=base_image)
    (template,) = body["spec"]["containers"]
    body["spec"]["containers"] = [
        {**template, **like_the_trainer, "name": name, "command": ["python3", "-c", script], "args": argv}
        for name, (script, argv) in args.items()
    ]
    body["spec"]["securityContext"] = head["spec"]["securityContext"]
    create(real_cluster, real_namespace, body)
    done = finished(real_cluster, real_namespace, "report")
    assert done["status"]["phase"] == "Failed"
    for name, line in (("writes", written), ("prints", printed)):
        term = container_state(done, name)["terminated"]
        assert (term["exitCode"], term["reason"]) == (codes[name], "Error"), term
        assert contract.parse_failure_line(term["message"]) == contract.parse_failure_line(line), term["message"]
    assert container_state(done, "writes")["terminated"]["message"] == written  # the file, not the log


def test_an_image_that_cannot_be_pulled_leaves_the_pod_pending_with_a_reason_the_operator_reports_at_once(
    real_cluster: DevCluster, real_namespace: str
) -> None:
    """The kubelet's waiting reason for a missing image is one the operator shows in the status at once."""
    body = pod("nopull", "pass", image="unpullable.invalid/finetune/trainer:v1")
    body["spec"]["containers"][0]["imagePullPolicy"] = "IfNotPresent"
    create(real_cluster, real_namespace, body)
    with real_cluster.api() as api:

        def waiting_reason() -> str | None:
            waiting = container_state(get_pod(api, real_namespace, "nopull") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            return str(reason) if reason and reason != "ContainerCreating" else None

        reason = wait_for(waiting_reason, timeout=120, what="a waiting reason other than ContainerCreating")
        assert reason in {"ErrImagePull", "ImagePullBackOff"} and reason in reasons.PENDING_TROUBLE
        assert (get_pod(api, real_namespace, "nopull") or {})["status"]["phase"] == "Pending"
