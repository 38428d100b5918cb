"""devcluster.quickstart: the test-sized quick-start job is the kind job with only its size changed, validates with
the operator's own spec model, and fits one real node's two cores next to the platform's pods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from finetune_trainer import spec

from devcluster import quickstart


@dataclass(frozen=True)
class Case:
    name: str
    base: dict[str, Any]
    overrides: dict[str, Any]
    expected: dict[str, Any]


CASES = [
    Case("adds", {"a": 1}, {"b": 2}, {"a": 1, "b": 2}),
    Case("nested", {"a": {"x": 1, "y": 2}}, {"a": {"y": 3}}, {"a": {"x": 1, "y": 3}}),
    Case("None removes", {"a": {"x": 1, "y": 2}}, {"a": {"y": None}}, {"a": {"x": 1}}),
    Case("replaces a non-mapping", {"a": [1]}, {"a": {"x": 1}}, {"a": {"x": 1}}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_merge(case: Case) -> None:
    before = yaml.safe_dump(case.base)
    assert quickstart.merge(case.base, case.overrides) == case.expected
    assert yaml.safe_dump(case.base) == before  # the base is not changed


def _kind_job() -> dict[str, Any]:
    (job,) = [d for d in yaml.safe_load_all(quickstart.QUICKSTART.read_text()) if d]
    result: dict[str, Any] = job
    return result


def test_test_sized_job_differs_from_the_kind_job_only_in_size() -> None:
    kind, small = _kind_job()["spec"], quickstart.quickstart_job()["spec"]
    for field in ("model", "task", "method", "storage", "output"):
        assert small[field] == kind[field], field
    assert small["resources"]["workers"] == kind["resources"]["workers"]
    assert small["resources"]["nodeSelector"] == kind["resources"]["nodeSelector"]
    assert small["dataset"]["train"] == kind["dataset"]["train"]


def test_renamed_job_writes_its_own_output() -> None:
    job = quickstart.quickstart_job({"backoffLimit": 1}, name="wkill")
    assert job["metadata"]["name"] == "wkill"
    assert job["spec"]["output"]["uri"] == "s3://models/wkill/"
    assert job["spec"]["backoffLimit"] == 1


@pytest.mark.parametrize("overrides", [{}, {"method": {"strategy": "full", "lora": None}}], ids=["lora", "full"])
def test_test_sized_jobs_validate(overrides: dict[str, Any]) -> None:
    spec.parse_job(quickstart.quickstart_job(overrides))


def test_the_ray_pods_fit_two_cores_next_to_the_platform() -> None:
    resources = spec.parse_job(quickstart.quickstart_job()).spec.resources
    ray = resources.workers * resources.cpus + spec.parse_quantity(resources.head.cpu)
    platform = 2 * 0.1 + 0.1 + 0.05 + 0.1  # two operator replicas, MinIO, Prometheus, CoreDNS (their requests)
    assert ray + platform <= 2.0, (ray, platform)
