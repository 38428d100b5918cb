"""Model sources (hf via the seeded cache, file://, local path, pvc://, s3://) and S3 storage round trips.

S3 runs against the session's real S3 server (MinIO by default); credentials reach the trainer only through the
environment, as in a pod.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from finetune_trainer import artifacts, data, hfcache, sources, storage
from finetune_trainer.errors import InvalidDatasetError, ModelNotFoundError, StorageError
from finetune_trainer.spec import ModelSource, StorageSpec, parse_spec
from huggingface_hub import snapshot_download
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.servers.s3 import S3Server
from tests.trainer.conftest import TrainerEnv


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[StorageSpec]:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    yield StorageSpec(endpoint=s3_server.endpoint, region=s3_server.region)


def load_back(path: Path) -> None:
    AutoTokenizer.from_pretrained(path)
    AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def test_hf_uri_resolves_from_the_seeded_cache_offline(trainer_env: TrainerEnv) -> None:
    path = sources.resolve_model(ModelSource(uri="hf://tiny-org/bert"), storage_spec=None)
    assert (path / "config.json").is_file() and str(trainer_env.hf_home) in str(path)
    load_back(path)
    sources.check_model(ModelSource(uri="hf://tiny-org/bert"), storage_spec=None)


def test_hf_uri_missing_from_cache_is_model_not_found_with_hint(trainer_env: TrainerEnv) -> None:
    with pytest.raises(ModelNotFoundError, match="hfcache seed"):
        sources.check_model(ModelSource(uri="hf://nobody/nothing"), storage_spec=None)


def test_packaged_minilm_seeds_a_hub_cache_layout(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    snapshot = hfcache.seed_repo(source=hfcache.packaged_model_dir(), repo_id=hfcache.PACKAGED_REPO_ID, hub_cache=hub)
    again = hfcache.seed_repo(source=hfcache.packaged_model_dir(), repo_id=hfcache.PACKAGED_REPO_ID, hub_cache=hub)
    assert snapshot == again  # idempotent, content-addressed
    repo = hub / "models--sentence-transformers--all-MiniLM-L6-v2"
    assert (repo / "refs" / "main").read_text() == snapshot.name
    assert (snapshot / "model.safetensors").is_symlink()
    assert (snapshot / "model.safetensors").resolve().parent == (repo / "blobs").resolve()
    assert Path(snapshot_download(hfcache.PACKAGED_REPO_ID, cache_dir=hub, local_files_only=True)) == snapshot


def test_file_uri_and_plain_paths(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_models["distilbert"]
    assert sources.resolve_model(ModelSource(uri=f"file://{model}"), storage_spec=None) == model
    assert sources.resolve_model(ModelSource(uri=str(model)), storage_spec=None) == model
    shutil.copytree(model, tmp_path / "rel-model")
    assert sources.resolve_model(ModelSource(uri="rel-model"), storage_spec=None, base_dir=tmp_path) == (
        tmp_path / "rel-model"
    )
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        sources.resolve_model(ModelSource(uri=str(tmp_path / "nope")), storage_spec=None)


def test_pvc_uri_maps_to_the_mount_root(tiny_models: dict[str, Path], trainer_env: TrainerEnv) -> None:
    target = trainer_env.pvc_root / "models-claim" / "tiny" / "bert"
    shutil.copytree(tiny_models["bert"], target, dirs_exist_ok=True)
    path = sources.resolve_model(ModelSource(uri="pvc://models-claim/tiny/bert"), storage_spec=None)
    assert path == target.resolve()
    load_back(path)
    with pytest.raises(ModelNotFoundError, match="FINETUNE_PVC_ROOT"):
        sources.resolve_model(ModelSource(uri="pvc://models-claim/missing"), storage_spec=None)


def test_s3_model_is_downloaded_once_and_loads(
    s3_server: S3Server, s3_env: StorageSpec, tiny_models: dict[str, Path], trainer_env: TrainerEnv
) -> None:
    bucket = s3_server.make_bucket("src-models")
    loc = storage.resolve(f"s3://{bucket}/tiny/bert", storage=s3_env)
    storage.upload_dir(tiny_models["bert"], loc)
    source = ModelSource(uri=f"s3://{bucket}/tiny/bert/")
    sources.check_model(source, storage_spec=s3_env)
    path = sources.resolve_model(source, storage_spec=s3_env)
    assert (path / ".complete").is_file()
    load_back(path)
    assert sources.resolve_model(source, storage_spec=s3_env) == path  # cached
    with pytest.raises(ModelNotFoundError):
        sources.check_model(ModelSource(uri=f"s3://{bucket}/nothing-here"), storage_spec=s3_env)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_data_from_s3_in_every_format(
    s3_server: S3Server, s3_env: StorageSpec, sst_data: dict[str, Path], fmt: str
) -> None:
    bucket = s3_server.make_bucket("data-formats")
    for split in ("train", "dev"):
        dst = storage.resolve(f"s3://{bucket}/sst/{split}.{fmt}", storage=s3_env)
        storage.upload_file(sst_data[f"{fmt}_{split}"], dst)
    spec = parse_spec(
        {
            "model": {"uri": "/m"},
            "storage": s3_env.wire(),
            "dataset": {
                "train": f"s3://{bucket}/sst/train.{fmt}",
                "validation": f"s3://{bucket}/sst/dev.{fmt}",
                "textColumn": "sentence",
            },
        }
    )
    local = data.prepare(
        parse_spec(
            {
                **spec.wire(),
                "dataset": {
                    **spec.wire()["dataset"],
                    "train": str(sst_data[f"{fmt}_train"]),
                    "validation": str(sst_data[f"{fmt}_dev"]),
                },
            }
        )
    )
    remote = data.prepare(spec)
    assert remote == local and len(remote.train) == 160


def test_missing_s3_object_is_invalid_dataset_and_bad_credentials_are_storage_errors(
    s3_server: S3Server, s3_env: StorageSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_server.make_bucket("data-missing")
    with pytest.raises(InvalidDatasetError, match="does not exist"):
        data.load_table(f"s3://{bucket}/nope.csv", fmt=None, storage_spec=s3_env, base_dir=None)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID"):
        storage.write_bytes(storage.resolve(f"s3://{bucket}/x", storage=s3_env), b"x")


def test_manifest_on_s3_is_last_and_verifiable(s3_server: S3Server, s3_env: StorageSpec, tmp_path: Path) -> None:
    bucket = s3_server.make_bucket("artifacts-manifest")
    out = storage.resolve(f"s3://{bucket}/job/", storage=s3_env)
    local = tmp_path / "art"
    (local / "model").mkdir(parents=True)
    (local / "model" / "weights.bin").write_bytes(b"\x00" * 1000)
    (local / "metrics.json").write_text(json.dumps({"ok": 1}))
    files = artifacts.file_entries(local)
    storage.upload_dir(local, out)
    assert artifacts.read_manifest(out) is None
    assert artifacts.verify(out) == [f"{out.uri} has no manifest.json: incomplete"]
    artifacts.write_manifest(out, files=files, run={"name": "x"})
    assert artifacts.verify(out) == []
    # a corrupted object is detected by its hash
    storage.write_bytes(out.child("model/weights.bin"), b"\x01" * 1000)
    assert artifacts.verify(out) == ["model/weights.bin: sha256 mismatch"]
    # a manifest is refused when a listed file never arrived
    with pytest.raises(StorageError, match="incomplete"):
        artifacts.write_manifest(out, files=[*files, {"path": "adapter/x", "size": 1, "sha256": "0"}], run={})
