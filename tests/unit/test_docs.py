"""Docs that must not drift: the generated API reference and the troubleshooting page's list of reasons.

Why tests: docs/api-reference.md is generated from the spec models (hack/gen_api_docs.py), so a changed field
description must come with a regenerated page; and every failure reason the operator can write into a job's
conditions must have a section in docs/troubleshooting.md telling the user what to do.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from finetune_operator import reasons

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "hack"))
import gen_api_docs  # noqa: E402 - hack/ is not a package

# Reasons the issue names explicitly; kept even if the operator spells some as pod reasons only.
REQUIRED = {
    "InvalidSpec", "InvalidDataset", "ModelNotFound", "StorageError", "TrainingError", "Interrupted",
    "Unschedulable", "ErrImagePull", "ImagePullBackOff", "OOMKilled", "NoProgress", "DeadlineExceeded",
    "BackoffLimitExceeded", "PendingDeadlineExceeded",
}  # fmt: skip


def test_api_reference_is_up_to_date() -> None:
    committed = (ROOT / "docs" / "api-reference.md").read_text(encoding="utf-8")
    assert committed == gen_api_docs.render(), (
        "docs/api-reference.md is stale: run .venv/bin/python hack/gen_api_docs.py"
    )


def test_api_reference_covers_every_spec_field() -> None:
    text = (ROOT / "docs" / "api-reference.md").read_text(encoding="utf-8")
    for field in ("model", "dataset", "method", "hyperparameters", "resources", "storage", "output", "suspend"):
        assert f"| `{field}` |" in text


def operator_reasons() -> set[str]:
    """Every reason the operator can put on a condition (finetune_operator.reasons is the vocabulary)."""
    return {str(r) for r in reasons.FAILURE_REASONS | reasons.OTHER_REASONS}


def test_every_failure_reason_has_a_troubleshooting_section() -> None:
    text = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"(?m)^## (\w+)\s*$", text))
    missing = sorted((operator_reasons() | REQUIRED) - sections)
    assert not missing, f"docs/troubleshooting.md has no section for: {missing}"
    for section in re.split(r"(?m)^## ", text)[1:]:
        assert "**Do:**" in section, f"section {section.splitlines()[0]} does not say what to do"
