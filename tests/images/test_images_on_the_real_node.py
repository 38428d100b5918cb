"""The product images as pods of the real node's kubelet (not podman): imported into the node's containerd, run
with the restricted security context the chart and the operator give them.

- operator: `finetune operator` with in-cluster configuration from its ServiceAccount token, Ready through the
  kubelet's own httpGet probes on /readyz and /healthz, UID 65532, read-only root, taking its Lease.
- trainer: `finetune run` of a tiny BERT as UID 1000 on a read-only root, writable only in its emptyDirs (/tmp,
  $HOME, a memory-backed /dev/shm) and the output hostPath; the manifest verifies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from finetune_operator import rbac
from kubernetes import client as k8s

from devcluster import DevCluster
from devcluster.kube import call_json
from devcluster.nodeconfig import NODE_LABEL
from devcluster.testing import wait_for, wait_phase
from tests.e2e.operator_harness import grant_documented_rbac, install_crd

pytestmark = [pytest.mark.images, pytest.mark.realnode, pytest.mark.slow]

RESTRICTED = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _pod(name: str, image: str, args: list[str], **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": image, "imagePullPolicy": "Never", "args": args}
    container.update(spec.pop("container", {}))
    container["securityContext"] = RESTRICTED
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 10,
            "nodeSelector": {NODE_LABEL: "real"},
            "containers": [container],
            **spec,
        },
    }


def _exec(cluster: DevCluster, namespace: str, pod: str, *argv: str) -> str:
    return cluster.kubectl("exec", "-n", namespace, pod, "--", *argv).stdout


@pytest.mark.timeout(900)
def test_operator_image_is_ready_under_the_kubelet_as_non_root_on_a_read_only_root(
    real_cluster: DevCluster, real_namespace: str
) -> None:
    image = real_cluster.load_images(["operator"])["operator"].ref
    install_crd(real_cluster)
    grant_documented_rbac(real_cluster, real_namespace)
    probe = {"httpGet": {"path": "/readyz", "port": 8080}, "periodSeconds": 2, "failureThreshold": 60}
    env = [
        {"name": "FINETUNE_NAMESPACES", "value": real_namespace},
        {"name": "POD_NAMESPACE", "value": real_namespace},
        {"name": "POD_NAME", "value": "op"},
    ]
    container = {
        "env": env,
        "readinessProbe": probe,
        "livenessProbe": {**probe, "httpGet": {"path": "/healthz", "port": 8080}},
    }
    body = _pod(
        "op",
        image,
        ["operator", "--health-port=8080", "--metrics-port=9090"],
        serviceAccountName=rbac.SERVICE_ACCOUNT,
        container=container,
    )
    with real_cluster.api() as api:
        core = k8s.CoreV1Api(api)
        call_json(core.create_namespaced_pod, real_namespace, body)

        def ready() -> bool:
            pod = call_json(core.read_namespaced_pod, "op", real_namespace)
            assert pod["status"].get("phase") != "Failed", pod["status"]
            conditions = pod["status"].get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        wait_for(ready, timeout=600, what="the operator pod Ready through the kubelet's /readyz probe")

        def leads() -> bool:
            leases = call_json(k8s.CoordinationV1Api(api).list_namespaced_lease, real_namespace)
            return any(item["spec"].get("holderIdentity") == "op" for item in leases.get("items", []))

        wait_for(leads, timeout=60, what="the operator pod's Lease")
    assert _exec(real_cluster, real_namespace, "op", "id", "-u").strip() == "65532"
    write = real_cluster.kubectl(
        "exec", "-n", real_namespace, "op", "--", "touch", "/opt/x", check=False
    )  # the root filesystem is read-only
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write


@pytest.mark.timeout(1500)
def test_trainer_image_runs_finetune_run_under_the_kubelet_as_non_root_on_a_read_only_root(
    real_cluster: DevCluster, real_namespace: str, trainer_inputs: Path, tmp_path: Path
) -> None:
    from finetune_trainer import artifacts, storage  # noqa: PLC0415 - keep torch out of collection

    image = real_cluster.load_images(["trainer"])["trainer"].ref
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    for parent in out.parents:  # the pod's user (1000) must traverse to the hostPath
        if parent in (Path("/tmp"), Path("/")):
            break
        parent.chmod(parent.stat().st_mode | 0o011)
    volumes = [
        {"name": "data", "hostPath": {"path": str(trainer_inputs), "type": "Directory"}},
        {"name": "out", "hostPath": {"path": str(out), "type": "Directory"}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "home", "emptyDir": {}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "512Mi"}},
    ]
    mounts = [
        {"name": "data", "mountPath": "/data", "readOnly": True},
        {"name": "out", "mountPath": "/out"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "home", "mountPath": "/home/finetune"},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
    container = {
        "volumeMounts": mounts,
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
        "resources": {"limits": {"memory": "4Gi"}},
    }
    body = _pod("trainer", image, ["run", "/data/job.yaml"], volumes=volumes, container=container)
    body["spec"]["automountServiceAccountToken"] = False
    with real_cluster.api() as api:
        call_json(k8s.CoreV1Api(api).create_namespaced_pod, real_namespace, body)
        pod = wait_phase(api, real_namespace, "trainer", ("Succeeded", "Failed"), timeout=1200)
    output = real_cluster.kubectl("logs", "-n", real_namespace, "trainer").stdout
    assert pod["status"]["phase"] == "Succeeded", output[-5000:]
    assert "eval: eval_accuracy=" in output
    assert artifacts.verify(storage.resolve(f"file://{out}/tiny/", storage=None)) == []
    manifest = out / "tiny" / "manifest.json"
    assert (manifest.stat().st_uid, manifest.stat().st_gid) == (1000, 1000)  # written by the image's user
