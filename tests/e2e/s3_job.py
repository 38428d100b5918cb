"""One helper for the real-Ray e2e tests: upload a tiny model and SST-2-shaped data to S3, create the credentials
Secret, and build the FineTuneJob that reads them (2 CPU workers, LoRA, checkpoints in the same bucket).

Why: every real-Ray test needs exactly this set-up; written once, the tests only say what differs (steps,
checkpoint interval, backoffLimit, deadlines).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import boto3

from tests.devcluster.cluster import CPU_POOL_LABEL, DevCluster
from tests.servers.s3 import S3Server
from tests.trainer import datafiles, tiny

SECRET = "s3-creds"


@dataclasses.dataclass(frozen=True)
class S3Job:
    manifest: dict[str, Any]
    bucket: str
    s3: Any  # boto3 S3 client with the server's credentials

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])

    @property
    def prefix(self) -> str:
        """The job's output prefix inside the bucket."""
        return f"out/{self.name}/"


def _upload_dir(client: Any, bucket: str, root: Path, prefix: str) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root)}")


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def s3_job(
    cluster: DevCluster,
    s3_server: S3Server,
    *,
    namespace: str,
    tmp_path: Path,
    name: str,
    n_train: int = 160,
    n_dev: int | None = None,
    spec: dict[str, Any] | None = None,
) -> S3Job:
    """Upload model + data, create the Secret in `namespace`, return the job manifest (not created yet)."""
    bucket = s3_server.make_bucket(f"{name[:20]}-{namespace[-6:]}")
    s3 = boto3.client("s3", **s3_server.boto3_kwargs())
    model = tiny.build_models(tmp_path / "models")["bert"]
    _upload_dir(s3, bucket, model, "models/bert")
    data = datafiles.write_sst_data(tmp_path / "data", n_train=n_train, n_dev=n_dev or 16)
    s3.upload_file(str(data["tsv_train"]), bucket, "data/train.tsv")
    dataset: dict[str, Any] = {
        "train": f"s3://{bucket}/data/train.tsv",
        "textColumn": "sentence",
        "labelColumn": "label",
    }
    if n_dev is not None:
        s3.upload_file(str(data["tsv_dev"]), bucket, "data/dev.tsv")
        dataset["validation"] = f"s3://{bucket}/data/dev.tsv"
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET},
        "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key},
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(secret))
    base: dict[str, Any] = {
        "model": {"uri": f"s3://{bucket}/models/bert"},
        "dataset": dataset,
        "method": {"strategy": "lora"},
        "hyperparameters": {"learningRate": "1e-3", "epochs": 1, "batchSize": 4, "maxSeqLength": 32},
        "resources": {
            "workers": 2,
            "cpusPerWorker": "1",
            "memoryPerWorker": "2Gi",
            "head": {"cpu": "1", "memory": "2Gi"},
            "nodeSelector": {CPU_POOL_LABEL: "cpu"},
        },
        "storage": {"endpoint": s3_server.endpoint_for(cluster.gateway_ip), "credentialsSecret": SECRET},
        "output": {"uri": f"s3://{bucket}/out/{name}/"},
        "backoffLimit": 0,
        "pendingDeadlineSeconds": 300,
        "progressDeadlineSeconds": 600,
    }
    manifest = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": _merge(base, spec or {}),
    }
    return S3Job(manifest=manifest, bucket=bucket, s3=s3)
