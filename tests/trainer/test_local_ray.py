"""The Ray that `finetune run` starts runs its workers at the caller's CPU priority.

Ray's default starts every worker process at nice 15: on a machine doing anything else, the training worker of a
local run then gets a fraction of the CPU an in-process training script gets (bench/overhead.py). The check runs in
a subprocess because it starts its own Ray instance (the session's shared head is started elsewhere).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROBE = """
import json, os, ray
from finetune_trainer.local import start_local_ray

start_local_ray(num_cpus=1, log_to_driver=False)
try:
    worker = ray.get(ray.remote(num_cpus=1)(lambda: os.nice(0)).remote())
finally:
    ray.shutdown()
print(json.dumps({"driver": os.nice(0), "worker": worker}))
"""


@pytest.mark.timeout(420)
def test_local_ray_workers_run_at_the_callers_priority() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # start a Ray, do not join one
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=400, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["worker"] == seen["driver"], f"Ray worker niceness {seen['worker']}, driver {seen['driver']}"
