"""`start_local_ray` retries Ray's start-up when the raylet misses Ray's fixed 30 s window (a busy machine), and
only then; anything else fails at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from finetune_trainer import local

LATE = Exception("The current node timed out during startup. This could happen because ...")


@dataclass
class FakeRay:
    failures: list[Exception]
    inits: list[dict[str, Any]] = field(default_factory=list)
    shutdowns: int = 0

    def init(self, **kwargs: Any) -> None:
        self.inits.append(kwargs)
        if self.failures:
            raise self.failures.pop(0)

    def shutdown(self) -> None:
        self.shutdowns += 1


@dataclass(frozen=True)
class Case:
    name: str
    failures: list[Exception]
    inits: int
    error: str | None


CASES = [
    Case("starts at once", [], 1, None),
    Case("late raylet, then up", [LATE, LATE], 3, None),
    Case("late every time", [LATE, LATE, LATE], 3, "timed out during startup"),
    Case("other error: no retry", [ValueError("bad address")], 1, "bad address"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_start_local_ray_retries_only_a_late_raylet(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRay(list(case.failures))
    monkeypatch.setattr(local.ray, "init", fake.init)
    monkeypatch.setattr(local.ray, "shutdown", fake.shutdown)
    if case.error is None:
        local.start_local_ray(num_cpus=2, log_to_driver=False)
    else:
        with pytest.raises(Exception, match=case.error):
            local.start_local_ray(num_cpus=2, log_to_driver=False)
    assert len(fake.inits) == case.inits
    assert fake.shutdowns == case.inits - 1
    assert all(i["_system_config"] == {"worker_niceness": 0} for i in fake.inits)
