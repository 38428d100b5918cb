"""The generated CRD: committed file in sync, structural, described, with the CEL rules we promise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator import crd

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "finetune.dev_finetunejobs.yaml"


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for key, child in (node.get("properties") or {}).items():
        found += _walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        found += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _walk(node["additionalProperties"], f"{path}{{}}")
    return found


def test_committed_crd_matches_generator() -> None:
    committed = yaml.safe_load(CRD_FILE.read_text(encoding="utf-8"))
    assert committed == crd.build_crd(), "crds/ drifted from the spec model: run `make crds`"


def test_schema_is_structural() -> None:
    for path, node in _walk(_schema()):
        assert "$ref" not in node and "anyOf" not in node and "oneOf" not in node, path
        assert (
            "type" in node or node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        ), f"{path} has no type"
        assert "nullable" not in node, path


def test_every_spec_and_status_field_is_described() -> None:
    for path, node in _walk(_schema()):
        if path.startswith((".spec.", ".status.")) and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path} has no description (kubectl explain would be empty)"


def test_printer_columns_and_names() -> None:
    spec = crd.build_crd()["spec"]
    assert spec["names"]["shortNames"] == ["ftj"]
    assert "all" in spec["names"]["categories"]
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c] == [
        "Phase",
        "Progress",
        "Metric",
        "Workers",
        "Queue",  # status.queue.name: empty for jobs not under Kueue
        "Age",
    ]


def _rules(path: str) -> list[str]:
    for found, node in _walk(_schema()):
        if found == path:
            return [r["rule"] for r in node.get("x-kubernetes-validations", [])]
    raise KeyError(path)


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        (".spec.method", "self.strategy == 'lora'"),
        (".spec.method", "self.strategy == 'gradual'"),
        (".spec.method", "self.strategy == 'top-layers'"),
        (".spec.model", "self.uri.startsWith('hf://')"),
        (".spec.model.uri", "self.startsWith('pvc://')"),
        (".spec.output.uri", "self.startsWith('s3://') && !self.endsWith('://')"),
        (".spec.resources.cpusPerWorker", "self > 0"),
        ("", "oldSelf.spec.model"),
    ],
)
def test_cel_rules_present(path: str, needle: str) -> None:
    assert any(needle in rule for rule in _rules(path)), _rules(path)


def test_immutability_rule_exempts_only_suspend_and_ttl() -> None:
    rule = crd.immutability_rule(_schema()["properties"]["spec"])["rule"]
    assert "self.spec.suspend" not in rule and "ttlSecondsAfterFinished" not in rule
    for field in ("model", "dataset", "method", "hyperparameters", "resources", "image", "backoffLimit"):
        assert f"oldSelf.spec.{field}" in rule


def test_learning_rate_accepts_number_or_string_encoding() -> None:
    node = _schema()["properties"]["spec"]["properties"]["hyperparameters"]["properties"]["learningRate"]
    assert "type" not in node and node["x-kubernetes-preserve-unknown-fields"] is True
    assert node["pattern"] and node["exclusiveMinimum"] is True and node["maximum"] == 1


def test_defaults_are_filled_for_nested_objects() -> None:
    props = _schema()["properties"]["spec"]["properties"]
    assert props["hyperparameters"]["default"] == {}
    assert props["method"]["properties"]["strategy"]["default"] == "lora"
    assert "default" not in props["storage"]["properties"]["region"]  # operator settings may supply it
