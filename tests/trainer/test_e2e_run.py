"""`finetune run` end to end as a user runs it: its own local Ray, data and model read from S3, artifacts written
to S3, a progress bar, eval metrics and the artifact location printed, and an artifact set that verifies.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from finetune_trainer import artifacts, storage
from finetune_trainer.driver import environment
from finetune_trainer.spec import StorageSpec

from tests.servers.s3 import S3Server
from tests.trainer.conftest import VENV_BIN, TrainerEnv
from tests.trainer.datafiles import job_manifest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.timeout(420)
def test_finetune_run_s3_round_trip(
    s3_server: S3Server, tiny_models: dict[str, Path], sst_data: dict[str, Path], trainer_env: TrainerEnv,
    tmp_path: Path,
) -> None:  # fmt: skip
    bucket = s3_server.make_bucket("e2e-run")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, like a user
    env.update({**trainer_env.env(), **s3_server.env(), "FINETUNE_TERMINATION_LOG": str(tmp_path / "term")})
    env.pop("RAY_AUTH_MODE", None)
    spec_storage = StorageSpec(endpoint=s3_server.endpoint, region=s3_server.region)
    with environment(s3_server.env()):
        storage.upload_dir(tiny_models["bert"], storage.resolve(f"s3://{bucket}/models/bert", storage=spec_storage))
        for split in ("train", "dev"):
            storage.upload_file(
                sst_data[f"jsonl_{split}"], storage.resolve(f"s3://{bucket}/data/{split}.jsonl", storage=spec_storage)
            )
        spec = {
            "model": {"uri": f"s3://{bucket}/models/bert"},
            "dataset": {
                "train": f"s3://{bucket}/data/train.jsonl",
                "validation": f"s3://{bucket}/data/dev.jsonl",
                "textColumn": "sentence",
            },
            "method": {"strategy": "head", "headEpochs": 2},
            "hyperparameters": {"learningRate": "5e-3", "epochs": 2, "batchSize": 16, "maxSeqLength": 32},
            "resources": {"workers": 1},
            "storage": {"endpoint": s3_server.endpoint, "region": s3_server.region},
            "output": {"uri": f"s3://{bucket}/out/e2e/"},
            "checkpoint": {"everySteps": 5, "keep": 1},
        }
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump(job_manifest(name="e2e", spec=spec)))
        proc = subprocess.run(
            [str(VENV_BIN / "finetune"), "run", str(job)],
            check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "eval: eval_accuracy=" in proc.stdout
        assert f"artifacts: s3://{bucket}/out/e2e/" in proc.stdout
        assert "training:" in proc.stderr and "step" in proc.stderr  # the tqdm bar
        out = storage.resolve(f"s3://{bucket}/out/e2e/", storage=spec_storage)
        assert artifacts.verify(out) == []
        stored = storage.list_files(out)
        assert "model/model.safetensors" in stored and "manifest.json" in stored
        assert any(p.startswith("checkpoints/e2e/") for p in stored)
        assert not (tmp_path / "runs").exists()
        assert s3_server.secret_key not in proc.stdout + proc.stderr
