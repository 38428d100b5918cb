"""The product images, built from their Dockerfiles, run the way the chart and the operator run them: non-root,
read-only root filesystem, writable only where a pod mounts volumes.

- operator: `finetune operator` against the real control plane with in-cluster configuration for a least-privilege
  ServiceAccount, serving /healthz, /readyz and /metrics and taking its leader-election Lease, as UID 65532 with
  nothing writable at all.
- trainer: the seeded all-MiniLM-L6-v2 resolving offline from the image as UID 1000, writable only at /tmp and
  $HOME (the emptyDirs), no network. `finetune run` of a tiny BERT in the trainer image, with the same restrictions
  and the same checks, runs under the real kubelet instead (test_images_on_the_real_node.py): one Ray start-up and
  training run for both, not one under podman and again under the kubelet.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from devcluster.cluster import DevCluster
from devcluster.images import Image
from devcluster.kube import call_json
from devcluster.testing import wait_for
from tests.e2e.operator_harness import grant_documented_rbac, install_crd
from tests.images.conftest import open_tree
from tests.images.podman import (
    Containers,
    inspect,
    logs,
    main_pid,
    podman,
    process_ids,
    read_only_args,
    run_once,
    wait_http,
)

pytestmark = [pytest.mark.images]

TRAINER_VOLUMES = ["/tmp", "/home/finetune"]  # the emptyDirs the operator's pods mount (and /dev/shm)
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _service_account_files(kubeconfig: Path, *, namespace: str, target: Path) -> tuple[Path, str, str]:
    """What the kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount (token, ca.crt, namespace) for the
    ServiceAccount the kubeconfig acts as; returns that directory and the API server's host and port."""
    config = yaml.safe_load(kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    target.mkdir(parents=True)
    (target / "token").write_text(config["users"][0]["user"]["token"])
    (target / "ca.crt").write_bytes(Path(cluster["certificate-authority"]).read_bytes())
    (target / "namespace").write_text(namespace)
    host, port = cluster["server"].removeprefix("https://").rsplit(":", 1)
    return open_tree(target), host, port


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_operator_image_serves_health_and_leads_as_non_root_on_a_read_only_root(
    built: Callable[[str], Image], containers: Containers, cluster: DevCluster, namespace: str, tmp_path: Path
) -> None:
    image = built("operator")
    install_crd(cluster)
    kubeconfig = grant_documented_rbac(cluster, namespace)
    secrets, host, port = _service_account_files(kubeconfig, namespace=namespace, target=tmp_path / "sa")
    health, metrics = _free_port(), _free_port()
    # In-cluster configuration, as in a pod: the ServiceAccount's files and the API server's address in the env.
    options = [*read_only_args(), "--network", "host", "-v", f"{secrets}:{SERVICE_ACCOUNT_DIR}:ro"]
    env = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port, "FINETUNE_NAMESPACES": namespace,
           "POD_NAMESPACE": namespace, "POD_NAME": "op-img"}  # fmt: skip
    options += [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    cid = containers.start(
        image.ref,
        "operator",
        f"--health-port={health}",
        f"--metrics-port={metrics}",
        "--bind-address=127.0.0.1",
        options=options,
    )
    pid = main_pid(cid)
    assert wait_http(pid, f"http://127.0.0.1:{health}/healthz", cid=cid) == "ok\n"
    assert wait_http(pid, f"http://127.0.0.1:{health}/readyz", cid=cid) == "ok\n"
    assert "finetune_" in wait_http(pid, f"http://127.0.0.1:{metrics}/metrics", cid=cid)
    assert process_ids(pid) == (65532, 65532)

    def leads() -> bool:
        with cluster.api() as api:
            from kubernetes import client as k8s  # noqa: PLC0415 - only this test needs the client

            leases = call_json(k8s.CoordinationV1Api(api).list_namespaced_lease, namespace)
        return any(item["spec"].get("holderIdentity") == "op-img" for item in leases.get("items", []))

    wait_for(leads, timeout=60, what="the operator container's Lease")
    podman("stop", "--time", "30", cid)
    state = inspect(cid)["State"]
    assert isinstance(state, dict)
    assert state["ExitCode"] == 0, logs(cid)[-3000:]


def test_trainer_image_resolves_the_seeded_model_offline_from_its_read_only_cache(
    built: Callable[[str], Image], tmp_path: Path
) -> None:
    image = built("trainer")
    code = (
        "from finetune_trainer import sources; import os, transformers\n"
        "from finetune_trainer.spec import ModelSource\n"
        "source = ModelSource(uri='hf://sentence-transformers/all-MiniLM-L6-v2')\n"
        "path = sources.resolve_model(source, storage_spec=None)\n"
        "model = transformers.AutoModel.from_pretrained(path)\n"
        "print(os.getuid(), path, type(model).__name__)\n"
    )
    options = [
        *read_only_args(scratch=tmp_path, writable=TRAINER_VOLUMES),
        "--network",
        "none",
        "-e",
        "HF_HUB_OFFLINE=1",
    ]
    out = run_once(image.ref, "-c", code, options=[*options, "--entrypoint", "python"])
    uid, path, model = out.split()[-3:]
    assert uid == "1000" and model == "BertModel"
    assert path.startswith("/opt/finetune/huggingface/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/")
