"""Trainer test fixtures: tiny models, small real data, a seeded HF cache, and one shared local Ray instance.

Why one Ray for the session: starting Ray costs ~10 s on 2 cores; every in-process run and every `finetune run`
subprocess (via RAY_ADDRESS) joins the same head. It is started with its own temp dir and ports so it never touches
another Ray on the machine, and stopped by killing its own process group only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from finetune_trainer.driver import environment
from finetune_trainer.hfcache import seed_repo

from tests.trainer import datafiles, tiny

REPO_ROOT = datafiles.REPO_ROOT
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny.build_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def sst_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return datafiles.write_sst_data(tmp_path_factory.mktemp("data"))


@dataclass(frozen=True)
class TrainerEnv:
    """Environment every trainer process of the session shares (the Ray workers inherit it)."""

    hf_home: Path
    pvc_root: Path
    model_cache: Path

    def env(self) -> dict[str, str]:
        return {
            "HF_HOME": str(self.hf_home),
            "HF_HUB_OFFLINE": "1",
            "FINETUNE_PVC_ROOT": str(self.pvc_root),
            "FINETUNE_MODEL_CACHE": str(self.model_cache),
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
            "RAY_AUTH_MODE": "disabled",  # a loopback-only test cluster; clients and head must agree
        }


@pytest.fixture(scope="session")
def trainer_env(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Iterator[TrainerEnv]:
    """Seeded HF cache (tiny models as tiny-org/<arch>), a PVC mount root, and the env applied to this process."""
    root = tmp_path_factory.mktemp("trainer-env")
    env = TrainerEnv(hf_home=root / "hf", pvc_root=root / "pvc", model_cache=root / "model-cache")
    for arch, path in tiny_models.items():
        seed_repo(source=path, repo_id=f"tiny-org/{arch}", hub_cache=env.hf_home / "hub")
    env.pvc_root.mkdir()
    with environment(env.env()):
        yield env


@dataclass(frozen=True)
class RayCluster:
    address: str
    pid: int  # the `ray start --block` process; its descendants are this cluster's processes

    def env(self) -> dict[str, str]:
        return {"RAY_ADDRESS": self.address}


@pytest.fixture(scope="session")
def ray_cluster(trainer_env: TrainerEnv) -> Iterator[RayCluster]:
    """A 2-CPU Ray head of our own, joined by this process (ray.init) and by subprocess drivers (RAY_ADDRESS)."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ftray", dir="/tmp")  # short: Ray's unix sockets live under it
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
        "--include-dashboard=false", f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
    ]  # fmt: skip
    log = open(Path(temp_dir) / "ray-start.log", "wb")  # noqa: SIM115 - closed in teardown
    # No drain on SIGTERM: `ray start --block` otherwise first asks the GCS (which the same SIGTERM to the group
    # stops) to drain the node and waits up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s) -- every session's
    # teardown waited it out and then killed the group.
    env = {**os.environ, **trainer_env.env(), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}: {(Path(temp_dir) / 'ray-start.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("ray head did not come up in 90 s")
                time.sleep(0.5)
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        yield RayCluster(address=address, pid=proc.pid)
    finally:
        ray.shutdown()
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
