"""`make kind-demo`, mirrored on our own control plane + process node (CI has no Docker, so no kind).

Why: the kind quick start must work as written, and the chart's RBAC must be *sufficient*, not only minimal. This
test follows hack/kind-demo.sh step by step and differs only where kind and the dev cluster differ:

- MinIO from examples/minio-kind.yaml -> the session's real MinIO process (`s3_server`);
- `helm upgrade --install` with the operator pod -> `helm install` of the same chart with replicaCount=0, then the
  operator container's command and env, read back from the installed Deployment, started as a local process
  with a kubeconfig minted for the chart's own ServiceAccount (so its RBAC is exactly the chart's);
- examples/s3-credentials.yaml -> the same Secret name and keys, holding the test MinIO's keys;
- hack/demo_s3.py upload through a port-forward -> the same function, directly;
- examples/quickstart-kind.yaml -> the same file, endpoint pointed at the test MinIO and a smaller data/step
  budget for 2 CPU cores;
- wait for Succeeded and list the artifacts -> the same, plus: manifest.json present, Ray pods deleted.

The operator runs in namespaced mode (watch.namespaces = the job namespace) so it can never act on other tests'
jobs in the shared cluster; the cluster-mode RBAC is covered by test_chart_cluster.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from botocore.config import Config

from devcluster import DevCluster
from devcluster.controlplane import free_port
from devcluster.testing import wait_crd_established
from tests.fixtures.helm import CHART_CRD_DIR, CHART_DIR, CRD_FILE, helm, set_args
from tests.servers.s3 import S3Server

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "hack"))
import demo_s3  # noqa: E402 - hack/ is not a package; the kind demo runs the same functions

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

JOB = "sst2-quickstart"
# 2 CPU cores run the operator, MinIO, a Ray head and two Ray workers: keep the run to a few dozen steps.
SMALL = {"maxTrainSamples": 96, "maxEvalSamples": 64}
SMALL_HYPER = {"batchSize": 16, "maxSeqLength": 32, "epochs": 1}
SUCCEED_TIMEOUT = 600.0


@pytest.fixture
def seeded_hf_cache() -> None:
    """The trainer image ships all-MiniLM-L6-v2 in its HF cache (trainer/Dockerfile); here pods share the host's."""
    from finetune_trainer import hfcache  # noqa: PLC0415 - trainer-side import, only for this test

    assert hfcache.main(["seed"]) == 0


@pytest.fixture
def job_namespace(cluster: DevCluster, namespace: str) -> Iterator[str]:
    name = f"{namespace[:52]}-jobs"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


def _install_crd(cluster: DevCluster) -> None:
    cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=chart-demo-test",
        "-f",
        str(CHART_CRD_DIR / CRD_FILE),
    )
    with cluster.api() as api:  # not `kubectl wait`: it can fail with "accessor error: <nil>" this early
        wait_crd_established(api, "finetunejobs.finetune.dev")


def _operator_env(cluster: DevCluster, *, release: str, namespace: str, kubeconfig: Path) -> dict[str, str]:
    """The installed Deployment's container env, resolved as the kubelet would, plus the local-process overrides."""
    deployment = yaml.safe_load(
        cluster.kubectl("-n", namespace, "get", "deployment", f"{release}-finetune-operator", "-o", "yaml").stdout
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["finetune", "operator"]
    env: dict[str, str] = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            env[item["name"]] = {"metadata.name": f"{release}-demo-0", "metadata.namespace": namespace}[path]
    return {
        **{k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG", "FT_CACHE", "TMPDIR"}},
        **env,
        # A process, not a pod: the in-cluster config becomes the ServiceAccount's kubeconfig, and the ports must
        # not collide with anything else on this machine.
        "FINETUNE_KUBECONFIG": str(kubeconfig),
        "FINETUNE_METRICS_PORT": str(free_port()),
        "FINETUNE_HEALTH_PORT": str(free_port()),
        "FINETUNE_BIND_ADDRESS": "127.0.0.1",
        "FINETUNE_LOG_FORMAT": "text",
    }


def _quickstart(endpoint: str) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all((ROOT / "examples" / "quickstart-kind.yaml").read_text()) if d]
    job: dict[str, Any] = doc
    spec = job["spec"]
    spec["storage"]["endpoint"] = endpoint
    spec["dataset"].update(SMALL)
    spec["hyperparameters"].update(SMALL_HYPER)
    spec["checkpoint"] = {"everySteps": 2, "keep": 2}
    return job


def _wait_for_terminal(cluster: DevCluster, namespace: str, *, operator: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + SUCCEED_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        assert operator.poll() is None, f"the operator exited with {operator.returncode}"
        out = cluster.kubectl("-n", namespace, "get", "ftj", JOB, "-o", "yaml", check=False).stdout
        status = (yaml.safe_load(out) or {}).get("status") or {}
        line = f"{status.get('phase')} {status.get('progress', {})}"
        if line != last:
            print(f"[{time.strftime('%H:%M:%S')}] {JOB}: {line}", flush=True)
            last = line
        if status.get("phase") in {"Succeeded", "Failed"}:
            return status
        time.sleep(3)
    raise AssertionError(f"{JOB} did not finish within {SUCCEED_TIMEOUT:.0f}s; last status: {last}")


@pytest.mark.usefixtures("seeded_hf_cache")
def test_kind_demo_steps_on_the_dev_cluster(
    cluster: DevCluster, namespace: str, job_namespace: str, s3_server: S3Server, tmp_path: Path
) -> None:
    release = "demo"
    endpoint = s3_server.endpoint_for(cluster.gateway_ip)
    # Step 1 (MinIO): the session's server. Step 2: the chart, exactly as kind-demo.sh sets it, minus the pod.
    _install_crd(cluster)
    helm(
        "install", release, str(CHART_DIR), "--namespace", namespace, "--wait", "--timeout", "2m",
        *set_args({
            "replicaCount": 0,
            "crds.install": False,
            "watch.namespaces": [job_namespace],
            "defaults.storage.endpoint": endpoint,
            "defaults.storage.credentialsSecret": "s3-creds",
        }),
        kubeconfig=cluster.kubeconfig,
    )  # fmt: skip
    kubeconfig = cluster.mint_kubeconfig(namespace, f"{release}-finetune-operator")
    log_path = tmp_path / "operator.log"
    with log_path.open("wb") as log:
        operator = subprocess.Popen(
            [str(Path(sys.executable).parent / "finetune"), "operator"],
            env=_operator_env(cluster, release=release, namespace=namespace, kubeconfig=kubeconfig),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # Step 3: the credentials Secret of examples/s3-credentials.yaml, with this server's keys.
        (secret,) = [d for d in yaml.safe_load_all((ROOT / "examples" / "s3-credentials.yaml").read_text()) if d]
        secret["stringData"] = {
            "AWS_ACCESS_KEY_ID": s3_server.access_key,
            "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        }
        cluster.kubectl("-n", job_namespace, "apply", "-f", "-", input=yaml.safe_dump(secret))
        # Step 4: the SST-2 subset, by the same code the kind demo runs.
        s3 = boto3.client("s3", config=Config(s3={"addressing_style": "path"}), **s3_server.boto3_kwargs())
        demo_s3.upload(s3, sst2_dir=demo_s3.DEFAULT_SST2, rows=SMALL["maxTrainSamples"])
        # Step 5: the quick-start job; wait for a terminal phase.
        cluster.kubectl("-n", job_namespace, "apply", "-f", "-", input=yaml.safe_dump(_quickstart(endpoint)))
        status = _wait_for_terminal(cluster, job_namespace, operator=operator)
        assert status["phase"] == "Succeeded", f"{status.get('reason')}: {status.get('message')}"
        # Step 6: the artifacts, with the manifest written last; the Ray cluster is gone.
        keys = [key for key, _ in demo_s3.list_artifacts(s3, f"s3://models/{JOB}/")]
        assert any(key.endswith("manifest.json") for key in keys), keys
        assert status.get("artifacts", {}).get("model"), status

        def ray_pods() -> str:
            return cluster.kubectl(
                "-n", job_namespace, "get", "pods", "-l", f"finetune.dev/job={JOB}", "-o", "name"
            ).stdout

        deadline = time.monotonic() + 60
        while ray_pods().strip() and time.monotonic() < deadline:
            time.sleep(2)
        assert not ray_pods().strip(), "the Ray cluster was not cleaned up"
    except BaseException:
        print(f"---- operator log ({log_path}) ----\n" + log_path.read_text(errors="replace")[-6000:])
        raise
    finally:
        operator.terminate()
        try:
            operator.wait(timeout=30)
        except subprocess.TimeoutExpired:
            operator.kill()
            operator.wait()
        cluster.kubectl("-n", job_namespace, "delete", "ftj", JOB, "--ignore-not-found", "--wait=false", check=False)
        helm("uninstall", release, "--namespace", namespace, kubeconfig=cluster.kubeconfig, check=False)
