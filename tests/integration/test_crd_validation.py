"""The generated CRD against the real API server: it applies, rejects bad manifests naming the field, explains.

Every rejected manifest is also rejected by the typed model (`parse_spec`) so the operator and the API server agree
on what is valid; the few things a structural schema cannot express are covered by the operator (InvalidSpec) in
tests/e2e/test_operator_lifecycle.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from typing import Any

import pytest
import yaml
from finetune_trainer import spec as ftspec

from devcluster import DevCluster
from tests.e2e.operator_harness import install_crd

pytestmark = pytest.mark.cluster

VALID: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "valid"},
    "spec": {"model": {"uri": "hf://org/model"}, "dataset": {"train": "s3://data/train.csv"}},
}


@pytest.fixture(scope="module")
def crd(cluster: DevCluster) -> None:
    install_crd(cluster)


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return doc


_DELETE = object()


@dataclasses.dataclass(frozen=True)
class Bad:
    name: str
    path: str  # where to change VALID (dotted, from the root)
    value: Any
    field: str  # what the server's message must name
    model_agrees: bool = True  # parse_spec rejects it too (False for metadata / unknown-field checks)


BAD = [
    Bad("model missing", "spec.model", _DELETE, "spec.model"),
    Bad("dataset missing", "spec.dataset", _DELETE, "spec.dataset"),
    Bad("model scheme", "spec.model.uri", "ftp://x/y", "spec.model.uri"),
    Bad("revision without hf", "spec.model", {"uri": "s3://b/m", "revision": "main"}, "spec.model.revision"),
    Bad("train empty", "spec.dataset.train", "", "spec.dataset.train"),
    Bad("train scheme only", "spec.dataset.train", "s3://", "spec.dataset.train"),
    Bad("validation scheme", "spec.dataset.validation", "hf://x/y", "spec.dataset.validation"),
    Bad("validationSplit", "spec.dataset.validationSplit", 1.5, "spec.dataset.validationSplit"),
    Bad("format", "spec.dataset.format", "xlsx", "spec.dataset.format"),
    Bad("maxTrainSamples", "spec.dataset.maxTrainSamples", 0, "spec.dataset.maxTrainSamples"),
    Bad("task", "spec.task", "translation", "spec.task"),
    Bad("strategy", "spec.method", {"strategy": "magic"}, "spec.method.strategy"),
    Bad("lora without lora", "spec.method", {"strategy": "full", "lora": {"r": 4}}, "spec.method.lora"),
    Bad("gradual with lora", "spec.method", {"strategy": "lora", "gradual": {}}, "spec.method.gradual"),
    Bad(
        "unfreezeLayers with head",
        "spec.method",
        {"strategy": "head", "unfreezeLayers": 2},
        "spec.method.unfreezeLayers",
    ),
    Bad("lora rank", "spec.method", {"strategy": "lora", "lora": {"r": 0}}, "spec.method.lora.r"),
    Bad("lora dropout", "spec.method", {"strategy": "lora", "lora": {"dropout": 1.0}}, "spec.method.lora.dropout"),
    Bad("learningRate word", "spec.hyperparameters", {"learningRate": "fast"}, "spec.hyperparameters.learningRate"),
    Bad("learningRate too big", "spec.hyperparameters", {"learningRate": 2}, "spec.hyperparameters.learningRate"),
    Bad("epochs", "spec.hyperparameters", {"epochs": 0}, "spec.hyperparameters.epochs"),
    Bad("batchSize", "spec.hyperparameters", {"batchSize": -1}, "spec.hyperparameters.batchSize"),
    Bad("precision", "spec.hyperparameters", {"precision": "int4"}, "spec.hyperparameters.precision"),
    Bad(
        "early stopping metric",
        "spec.hyperparameters",
        {"earlyStopping": {"metric": "accuracy"}},
        "spec.hyperparameters.earlyStopping.metric",
    ),
    Bad("workers", "spec.resources", {"workers": 0}, "spec.resources.workers"),
    Bad("gpus", "spec.resources", {"gpusPerWorker": -1}, "spec.resources.gpusPerWorker"),
    Bad("cpus zero", "spec.resources", {"cpusPerWorker": "0"}, "spec.resources.cpusPerWorker"),
    Bad("memory word", "spec.resources", {"memoryPerWorker": "lots"}, "spec.resources.memoryPerWorker"),
    Bad("head memory", "spec.resources", {"head": {"memory": "-1Gi"}}, "spec.resources.head.memory"),
    Bad("nodeSelector value", "spec.resources", {"nodeSelector": {"pool": 1}}, "spec.resources.nodeSelector.pool"),
    Bad("endpoint", "spec.storage", {"endpoint": "minio:9000"}, "spec.storage.endpoint"),
    Bad("secret name", "spec.storage", {"credentialsSecret": "Bad_Name"}, "spec.storage.credentialsSecret"),
    Bad("output scheme", "spec.output", {"uri": "gs://bucket/x"}, "spec.output.uri"),
    Bad("file output on a cluster", "spec.output", {"uri": "file:///out/"}, "spec.output.uri", model_agrees=False),
    Bad("local output on a cluster", "spec.output", {"uri": "/out"}, "spec.output.uri", model_agrees=False),
    Bad("checkpoint", "spec.checkpoint", {"everySteps": 0}, "spec.checkpoint.everySteps"),
    Bad("backoffLimit", "spec.backoffLimit", -1, "spec.backoffLimit"),
    Bad("pending deadline", "spec.pendingDeadlineSeconds", 0, "spec.pendingDeadlineSeconds"),
    Bad("ttl", "spec.ttlSecondsAfterFinished", -5, "spec.ttlSecondsAfterFinished"),
    Bad("causal-lm with head", "spec.task", "causal-lm", "spec.method.strategy", model_agrees=True),
    Bad("unknown field", "spec.methd", {"strategy": "lora"}, "spec.methd"),
    Bad("name longer than a subdomain", "metadata.name", "a" * 254, "metadata.name", model_agrees=False),
    Bad("name with capitals", "metadata.name", "Job", "metadata.name", model_agrees=False),
]

# Every valid custom-resource name is accepted (child names are shortened by the operator, names.child_base).
LONG_NAMES = ["a" * 115, "9job", "sst2.minilm.lr2e-5", ("x" * 62 + ".") * 3 + "y" * 64]


@pytest.mark.parametrize("name", LONG_NAMES, ids=lambda n: f"{len(n)}-chars")
def test_every_valid_name_is_accepted(cluster: DevCluster, namespace: str, crd: None, name: str) -> None:
    assert len(name) <= 253
    doc = _set(VALID, "metadata.name", name)
    cluster.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(doc))
    assert ftspec.parse_job(doc).metadata.name == name


def _manifest(case: Bad) -> dict[str, Any]:
    doc = _set(VALID, case.path, case.value)
    if case.name == "causal-lm with head":
        doc["spec"]["method"] = {"strategy": "head"}
    return doc


@pytest.mark.parametrize("case", BAD, ids=[b.name for b in BAD])
def test_bad_manifest_is_rejected_naming_the_field(cluster: DevCluster, namespace: str, crd: None, case: Bad) -> None:
    doc = _manifest(case)
    result = cluster.kubectl(
        "create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False
    )
    assert result.returncode != 0, f"accepted: {doc}"
    assert case.field in result.stderr, result.stderr
    if case.model_agrees:
        with pytest.raises(ftspec.SpecError):
            ftspec.parse_spec(doc["spec"])


def test_valid_manifest_gets_defaults(cluster: DevCluster, namespace: str, crd: None) -> None:
    doc = _set(VALID, "spec.hyperparameters", {"learningRate": "2e-5"})
    out = cluster.kubectl("create", "--dry-run=server", "-n", namespace, "-o", "json", "-f", "-", input=json.dumps(doc))
    stored = json.loads(out.stdout)
    assert stored["spec"]["method"]["strategy"] == "lora"
    assert stored["spec"]["hyperparameters"]["learningRate"] == "2e-5"
    assert stored["spec"]["resources"]["workers"] == 1
    assert "region" not in stored["spec"].get("storage", {})
    # What the server stores is what the operator parses.
    assert ftspec.parse_spec(stored["spec"]).hyperparameters.learning_rate == pytest.approx(2e-5)
    numeric = _set(VALID, "spec.hyperparameters", {"learningRate": 0.0001})
    cluster.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(numeric))


def test_spec_is_immutable_once_started_except_suspend_and_ttl(cluster: DevCluster, namespace: str, crd: None) -> None:
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(VALID))
    # Before the operator has started it, the spec may still be edited.
    cluster.kubectl("patch", "-n", namespace, "ftj", "valid", "--type=merge", "-p", '{"spec":{"backoffLimit":3}}')
    cluster.kubectl(
        "patch",
        "-n",
        namespace,
        "ftj",
        "valid",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"phase":"Running"}}',
    )
    refused = cluster.kubectl(
        "patch", "-n", namespace, "ftj", "valid", "--type=merge", "-p", '{"spec":{"backoffLimit":4}}', check=False
    )
    assert refused.returncode != 0 and "spec is immutable" in refused.stderr
    cluster.kubectl(
        "patch",
        "-n",
        namespace,
        "ftj",
        "valid",
        "--type=merge",
        "-p",
        '{"spec":{"suspend":true,"ttlSecondsAfterFinished":60}}',
    )
    cluster.kubectl(
        "patch",
        "-n",
        namespace,
        "ftj",
        "valid",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"phase":"Suspended"}}',
    )
    cluster.kubectl("patch", "-n", namespace, "ftj", "valid", "--type=merge", "-p", '{"spec":{"backoffLimit":4}}')


def test_kubectl_explain_shows_descriptions(cluster: DevCluster, crd: None) -> None:
    deadline = time.monotonic() + 60
    while True:  # the OpenAPI document is published a moment after the CRD is established
        out = cluster.kubectl("explain", "finetunejob.spec.method", check=False)
        if out.returncode == 0 and "strategy" in out.stdout:
            break
        assert time.monotonic() < deadline, out.stderr
        time.sleep(1)
    assert "How the pretrained model is adapted" in out.stdout
    assert "lora only: adapter settings" in out.stdout
    status = cluster.kubectl("explain", "ftj.status.progress").stdout
    assert "Optimizer steps done" in status


def test_printer_columns(cluster: DevCluster, namespace: str, crd: None) -> None:
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(_set(VALID, "metadata.name", "cols")))
    header = cluster.kubectl("get", "ftj", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "PROGRESS", "METRIC", "WORKERS", "QUEUE", "AGE"]
    assert yaml.safe_load(cluster.kubectl("get", "finetune", "-n", namespace, "-o", "yaml").stdout)["items"]
