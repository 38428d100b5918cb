"""Issue 11 item 5: a storage or hub blip is retried, and when it lasts it fails with a retryable reason.

Real servers only: MinIO behind `FaultProxy` (real 503/429 responses and real connection resets reach the AWS SDK
inside pyarrow) and `FakeHub` (the real huggingface_hub client against an HTTP endpoint serving a tiny model),
behind the same proxy. The hub checks run in a subprocess because huggingface_hub reads HF_ENDPOINT and
HF_HUB_OFFLINE once at import, exactly as in a pod.

The trainer's own back-off (storage.RetryPolicy: 1, 2, 4, 8 s between its 5 attempts) runs 100 times shorter here
(`short_backoff`, also inside the hub probe): the tests assert which errors are retried, how many attempts are made
and the reason at the end, not how long the waits are (unit/test_trainer_quality.py checks the delays themselves).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from finetune_trainer import cli, data, storage
from finetune_trainer.contract import ExitCode, Reason, parse_report
from finetune_trainer.errors import InvalidDatasetError, StorageError
from finetune_trainer.spec import StorageSpec

from tests.servers.s3 import S3Server
from tests.trainer.conftest import REPO_ROOT
from tests.trainer.datafiles import job_manifest
from tests.trainer.fakehub import FakeHub
from tests.trainer.faultproxy import FaultProxy

BACKOFF_SCALE = 0.01


@pytest.fixture(autouse=True)
def short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same back-off schedule, BACKOFF_SCALE times as long (a lasting outage otherwise waits 15 s per read)."""
    delay = storage.RetryPolicy.delay
    monkeypatch.setattr(storage.RetryPolicy, "delay", lambda self, attempt: delay(self, attempt) * BACKOFF_SCALE)


@pytest.fixture
def proxied(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FaultProxy, StorageSpec, str]]:
    """A bucket holding a small CSV, reachable through a fault proxy in front of MinIO."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.make_bucket("faults")
    direct = StorageSpec(endpoint=s3_server.endpoint, region=s3_server.region)
    body = b"label,sentence\n0,dull\n1,fine\n0,bad\n1,great\n"
    storage.write_bytes(storage.resolve(f"s3://{bucket}/train.csv", storage=direct), body)
    with FaultProxy(s3_server.endpoint) as proxy:
        yield proxy, StorageSpec(endpoint=proxy.endpoint, region=s3_server.region), f"s3://{bucket}/train.csv"


@pytest.mark.parametrize("kind", ["503", "reset"])
def test_data_read_survives_a_storage_blip(proxied: tuple[FaultProxy, StorageSpec, str], kind: str) -> None:
    proxy, spec, uri = proxied
    proxy.fail(6, kind)  # more than the AWS SDK's own 3 attempts
    frame = data.load_table(uri, fmt=None, storage_spec=spec, base_dir=None)
    assert len(frame) == 4 and proxy.faults.failed == 6


def test_lasting_storage_outage_is_a_retryable_storage_error(proxied: tuple[FaultProxy, StorageSpec, str]) -> None:
    proxy, spec, uri = proxied
    proxy.fail(-1, "503")
    with pytest.raises(StorageError, match=r"HTTP status 503.*after 5 attempts") as info:
        data.load_table(uri, fmt=None, storage_spec=spec, base_dir=None)
    assert not isinstance(info.value, InvalidDatasetError)
    assert info.value.reason is Reason.STORAGE_ERROR


def test_missing_object_is_still_invalid_dataset_at_once(proxied: tuple[FaultProxy, StorageSpec, str]) -> None:
    proxy, spec, uri = proxied
    with pytest.raises(InvalidDatasetError, match="does not exist"):
        data.load_table(uri.replace("train.csv", "nope.csv"), fmt=None, storage_spec=spec, base_dir=None)
    assert proxy.faults.seen <= 2  # no retries for a permanent answer


def test_finetune_run_exits_with_the_retryable_reason_when_storage_stays_down(
    proxied: tuple[FaultProxy, StorageSpec, str],
    tiny_models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy, spec, uri = proxied
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(tmp_path / "term"))
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "job.yaml"
    body = {"model": {"uri": str(tiny_models["bert"])}, "dataset": {"train": uri, "textColumn": "sentence"},
            "storage": spec.wire()}  # fmt: skip
    job.write_text(yaml.safe_dump(job_manifest(name="blip", spec=body)))
    proxy.fail(-1, "503")
    code = cli.run_main([str(job), "--no-progress"])
    report = parse_report(capsys.readouterr().err)
    assert code == ExitCode.STORAGE_ERROR and report is not None
    assert report.reason == Reason.STORAGE_ERROR.value and "503" in report.message


HUB_PROBE = f"""
import json, sys
from finetune_trainer import sources, storage
delay = storage.RetryPolicy.delay
storage.RetryPolicy.delay = lambda self, attempt: delay(self, attempt) * {BACKOFF_SCALE}  # as short_backoff
from finetune_trainer.errors import TrainerError
from finetune_trainer.spec import ModelSource
try:
    path = sources.resolve_model(ModelSource(uri=sys.argv[1]), storage_spec=None)
    print(json.dumps({{"ok": str(path)}}))
except TrainerError as e:
    print(json.dumps({{"reason": e.reason.value, "message": e.message}}))
"""


@pytest.fixture
def hub(tiny_models: dict[str, Path]) -> Iterator[tuple[FaultProxy, FakeHub]]:
    with FakeHub("tiny-org/bert-online", tiny_models["bert"]) as fake, FaultProxy(fake.endpoint) as proxy:
        yield proxy, fake


def probe_hub(uri: str, *, endpoint: str, tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-c", HUB_PROBE, uri],
        check=False,
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("kind", ["429", "503"])
def test_hub_rate_limit_or_outage_is_retried(hub: tuple[FaultProxy, FakeHub], tmp_path: Path, kind: str) -> None:
    proxy, _ = hub
    proxy.fail(3, kind)  # the hub client itself does not retry these
    result = probe_hub("hf://tiny-org/bert-online", endpoint=proxy.endpoint, tmp_path=tmp_path)
    assert "ok" in result and (Path(result["ok"]) / "config.json").is_file(), result


def test_lasting_hub_outage_is_storage_error_not_model_not_found(
    hub: tuple[FaultProxy, FakeHub], tmp_path: Path
) -> None:
    proxy, _ = hub
    proxy.fail(-1, "503")
    result = probe_hub("hf://tiny-org/bert-online", endpoint=proxy.endpoint, tmp_path=tmp_path)
    assert result.get("reason") == Reason.STORAGE_ERROR.value, result
    assert "HTTP 503 after 5 attempts" in result["message"]


def test_unknown_hub_repo_is_model_not_found_at_once(hub: tuple[FaultProxy, FakeHub], tmp_path: Path) -> None:
    proxy, _ = hub
    result = probe_hub("hf://tiny-org/no-such-model", endpoint=proxy.endpoint, tmp_path=tmp_path)
    assert result.get("reason") == Reason.MODEL_NOT_FOUND.value, result
    assert proxy.faults.seen <= 3
