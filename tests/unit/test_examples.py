"""Every example parses and every FineTuneJob in examples/ validates with the same model the operator uses.

Why: users copy examples and change three lines; an example that fails validation is the worst first contact.
The cluster test (tests/integration/test_examples_cluster.py) also applies each file to a real API server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator import names
from finetune_trainer import spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FILES = sorted(EXAMPLES.rglob("*.yaml"))


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _jobs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.relative_to(EXAMPLES)}:{doc['metadata']['name']}", doc)
        for path in FILES
        for doc in _documents(path)
        if doc.get("kind") == spec.KIND
    ]


def test_examples_exist() -> None:
    expected = {
        "quickstart-kind.yaml",
        "gpu-lora-7b.yaml",
        "s3-credentials.yaml",
        "suspend-resume.yaml",
        "minio-kind.yaml",
        *(f"strategies/{s.value}.yaml" for s in spec.Strategy),
    }
    present = {str(p.relative_to(EXAMPLES)) for p in FILES}
    assert expected <= present, f"missing examples: {sorted(expected - present)}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_document_is_a_kubernetes_object(path: Path) -> None:
    documents = _documents(path)
    assert documents, f"{path} is empty"
    for doc in documents:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path}: not a Kubernetes object: {doc}"


@pytest.mark.parametrize(("name", "doc"), _jobs(), ids=[n for n, _ in _jobs()])
def test_every_finetunejob_validates(name: str, doc: dict[str, Any]) -> None:
    job = spec.parse_job(doc)
    assert names.child_base(job.metadata.name) == job.metadata.name, f"{name}: children would get hashed names"
    # Examples are applied with `kubectl -n <namespace>`: a hard-coded namespace would defeat that.
    assert job.metadata.namespace is None, f"{name}: examples must not hard-code a namespace"
    # Secrets are referenced, never inlined: no example carries credentials in the job itself.
    assert "AWS_SECRET_ACCESS_KEY" not in yaml.safe_dump(doc)


def test_each_strategy_example_uses_its_strategy() -> None:
    for strategy in spec.Strategy:
        (doc,) = _documents(EXAMPLES / "strategies" / f"{strategy.value}.yaml")
        assert spec.parse_job(doc).spec.method.strategy is strategy


def test_gpu_example_requests_gpus_with_tolerations_and_node_selector() -> None:
    (doc,) = _documents(EXAMPLES / "gpu-lora-7b.yaml")
    job = spec.parse_job(doc).spec
    assert job.resources.gpus_per_worker >= 1
    assert job.resources.node_selector and job.resources.tolerations
    assert job.method.strategy is spec.Strategy.LORA and job.task is spec.Task.CAUSAL_LM
    assert job.image and job.image.endswith("-cuda")


def test_quickstart_kind_matches_kind_config_and_demo_storage() -> None:
    (doc,) = _documents(EXAMPLES / "quickstart-kind.yaml")
    job = spec.parse_job(doc).spec
    kind_config = yaml.safe_load((EXAMPLES.parent / "kind-config.yaml").read_text())
    worker_labels = [n.get("labels", {}) for n in kind_config["nodes"] if n["role"] == "worker"]
    assert len(worker_labels) == 2
    assert all(job.resources.node_selector.items() <= labels.items() for labels in worker_labels)
    assert job.resources.gpus_per_worker == 0
    (secret,) = _documents(EXAMPLES / "s3-credentials.yaml")
    assert job.storage.credentials_secret == secret["metadata"]["name"]
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    minio = {d["kind"]: d for d in _documents(EXAMPLES / "minio-kind.yaml")}
    service = minio["Service"]["metadata"]
    assert job.storage.endpoint == f"http://{service['name']}.{service['namespace']}.svc.cluster.local:9000"
    root = minio["Secret"]["stringData"]
    assert root["MINIO_ROOT_USER"] == secret["stringData"]["AWS_ACCESS_KEY_ID"]
    assert root["MINIO_ROOT_PASSWORD"] == secret["stringData"]["AWS_SECRET_ACCESS_KEY"]


def test_suspend_example_starts_suspended() -> None:
    (doc,) = _documents(EXAMPLES / "suspend-resume.yaml")
    assert spec.parse_job(doc).spec.suspend is True
